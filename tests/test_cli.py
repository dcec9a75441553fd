"""The `moebench` command as a user meets it: end to end on a tiny model, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from moebench import store
from moebench.cli import app
from tests.conftest import as_from_a_terminal, invoke, shared_data_or_skip

TINY = [
    "--model",
    "tiny-llama",
    "--max-steps",
    "4",
    "--limit",
    "3",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.checkpoint_every=2",
    # a random model never stops by itself: without a cap every math item generated its full
    # 256 tokens, and one such run took 177 s instead of 48 s on the 2-core CI machine
    "--set",
    "eval.max_new_tokens=16",
]


def moebench(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moebench", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_end_to_end_stores_a_reproducible_done_run(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    r = moebench("run", *TINY, "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # quiet by default: no library deprecation notices (-v shows them, see the piped-run test)
    assert "Warning" not in r.stderr and "deprecated" not in r.stderr, r.stderr
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "done"
    assert run["trainable_params"] > 0 and run["total_params"] > run["trainable_params"]
    assert run["versions"]["torch"] and run["hardware"]["machine"]
    assert run["config"]["train"]["max_steps"] == 4
    assert [row["step"] for row in store.get_training_log(s, run["id"])] == [1, 2, 3, 4]
    metrics = {(m["task"], m["metric"]): m for m in store.get_metrics(s, run["id"])}
    assert metrics[("boolq", "accuracy")]["n"] == 3
    preds = store.get_predictions(s, run["id"], task="boolq")
    assert len(preds) == 3
    assert metrics[("boolq", "accuracy")]["value"] == sum(p["correct"] for p in preds) / 3
    assert (Path(run["output_dir"]) / "adapter" / "adapter.safetensors").is_file()

    # the stored config alone reproduces the run: same predictions, same numbers
    r2 = moebench("run", "--rerun", str(run["id"]), "--db", db, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    second = store.list_runs(s)[0]
    assert second["config_hash"] == run["config_hash"]
    assert [p["output"] for p in store.get_predictions(s, second["id"])] == [
        p["output"] for p in store.get_predictions(s, run["id"])
    ]


_STEP_LINE = re.compile(
    r"step (\d+)/12 \[train\] loss \d+\.\d{4} lr \S+ [\d,]+ tok/s, elapsed (\d+):(\d\d):(\d\d)"
)


def test_a_piped_run_prints_a_plain_line_every_few_seconds_and_v_shows_library_warnings(
    tmp_path: Path,
) -> None:
    """Under nohup or `| tee` progress must reach the file while the run goes: plain lines
    (step/total, loss, elapsed) at most every MOEBENCH_PROGRESS_EVERY seconds, no bars. The run
    has -v, which shows what a run keeps quiet by default: the libraries' deprecation notices."""
    every = 2  # seconds
    env = {**os.environ, "COLUMNS": "200", "MOEBENCH_PROGRESS_EVERY": str(every)}
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["--model", "tiny-llama", "--max-steps", "12", "--limit", "1", "--db", db, "-v"]
    with (tmp_path / "stderr").open("w") as errors:
        child = subprocess.Popen(
            [sys.executable, "-m", "moebench", "run", *args, "--set", "eval.tasks=boolq"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert child.stdout is not None
        arrived = [(time.monotonic(), line.rstrip("\n")) for line in child.stdout]
    assert child.wait() == 0, (tmp_path / "stderr").read_text()[-3000:]
    exited = time.monotonic()
    steps = [(t, _STEP_LINE.fullmatch(line)) for t, line in arrived if line.startswith("step ")]
    assert len(steps) >= 2 and all(m for _, m in steps), [line for _, line in arrived]
    assert steps[-1][1].group(1) == "12"  # the last step is always shown
    elapsed = [
        int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in (x.groups()[1:] for _, x in steps)
    ]
    # a line every `every` seconds at most (the last step's comes whenever training ends)
    assert all(b - a >= every for a, b in itertools.pairwise(elapsed[:-1])), elapsed
    assert steps[0][0] < exited - 1, "the first line came only as the run ended"
    assert not [line for _, line in arrived if re.search(r"━ +\d+/\d+ ", line)]  # no bars
    assert "is deprecated" in (tmp_path / "stderr").read_text()


def test_a_bad_progress_interval_is_one_sentence(in_tmp: Path) -> None:
    db = f"sqlite:///{in_tmp / 'r.db'}"
    _refused(
        ["run", *TINY, "--db", db],
        "MOEBENCH_PROGRESS_EVERY='soon' is not a number of seconds",
        ">= 0",
        env={"MOEBENCH_PROGRESS_EVERY": "soon"},
    )


def _one_clean_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    message = " ".join(r.stderr.split())
    for needle in needles:
        assert needle in message, message


def _refused(args: list[str], *needles: str, env: dict[str, str] | None = None) -> None:
    """In-process, `moebench ARGS` ends non-zero with the one line `main` prints (a traceback
    re-raises in `invoke`), holding every needle."""
    code, message = invoke(args, env)
    text = " ".join(message.split())
    assert code != 0, text
    for needle in needles:
        assert needle in text, text


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process commands run from a scratch folder, as the subprocess ones do: a command
    without --db would otherwise touch the checkout's results/."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "lroa"], ["Unknown method 'lroa'", "Did you mean 'lora'?"]),
        (["--model", "no-such-model"], ["Unknown model 'no-such-model'", "tiny-llama"]),
        (
            ["--model", "Qwen/Qwen2-0.5B"],
            ["Model 'Qwen/Qwen2-0.5B' is not in the local model cache", "offline alternatives"],
        ),
        (["--suite", "minii"], ["Unknown suite 'minii'", "mini"]),
        (["--set", "rnak=4"], ["Unknown config key 'rnak'", "rank"]),
        (["--set", "rank=-4"], ["rank=-4 is out of range; accepted: an integer in [1, 65536]"]),
        (["--set", "train.lr=fast"], ["train.lr='fast' is not a number"]),
        (
            ["--suite", "la-commonsense4", "--data-dir", "/no/such/folder"],
            ["Data folder '/no/such/folder' does not exist"],
        ),
        (["--set", "noequals"], ["is not of the form key=value"]),
    ],
)
def test_bad_input_gives_one_sentence_and_keeps_the_store(
    in_tmp: Path, args: list[str], needles: list[str]
) -> None:
    db = f"sqlite:///{in_tmp / 'keep.db'}"
    s = store.open_store(db)
    keep = store.create_run(
        s,
        method="lora",
        model="m",
        suite="mini",
        config={"a": 1},
        config_hash="h",
        seed=1,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
        status="done",
    )
    _refused(
        ["run", "--model", "tiny-llama", *args, "--db", db], *needles, env={"HF_HUB_OFFLINE": "1"}
    )
    assert store.get_run(s, keep)["status"] == "done"


def test_malformed_config_file(in_tmp: Path) -> None:
    cfg = in_tmp / "c.json"
    cfg.write_text('{"train": {"lr": 1e-4,}')
    _refused(["run", "--config", str(cfg)], "c.json", "malformed")


def test_malformed_data_file_fails_and_is_recorded_without_traceback(tmp_path: Path) -> None:
    shared = shared_data_or_skip()
    data = tmp_path / "data"
    for folder in ("boolq", "ARC-Challenge", "ARC-Easy", "openbookqa"):
        (data / folder).mkdir(parents=True)
        (data / folder / "test.json").write_text((shared / folder / "test.json").read_text())
        (data / folder / "train.json").write_text((shared / folder / "train.json").read_text())
    (data / "openbookqa" / "train.json").write_text(
        '[{"instruction": "q", "output": "a"}, {"instruction": 3}]'
    )
    r = moebench("run", "--suite", "la-commonsense4", "--data-dir", str(data), *TINY, cwd=tmp_path)
    _one_clean_error(r, "openbookqa/train.json", "row 1")


def _wait_for_checkpoint(db_file: Path, step: int) -> None:
    """Poll the store until the training process has recorded a checkpoint at `step` or later."""
    deadline, seen = time.time() + 120, 0
    while time.time() < deadline and seen < step:
        time.sleep(0.1)
        if db_file.exists():
            c = sqlite3.connect(db_file, timeout=0.05)
            try:
                seen = c.execute("select coalesce(max(last_step), 0) from runs").fetchone()[0]
            except sqlite3.OperationalError:
                seen = 0
            finally:
                c.close()
    assert seen >= step, "training never reached a checkpoint"


def test_ctrl_c_marks_the_run_interrupted_and_resume_finishes_it(tmp_path: Path) -> None:
    db_file = tmp_path / "i.db"
    db = f"sqlite:///{db_file}"
    args = [
        "run",
        "--model",
        "tiny-llama",
        "--max-steps",
        "60",
        "--limit",
        "2",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "eval.max_new_tokens=16",  # see TINY
        "--db",
        db,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moebench", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    _wait_for_checkpoint(db_file, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "interrupted"
    assert "last checkpoint" in run["status_reason"] and run["last_checkpoint"]
    assert Path(run["last_checkpoint"]).is_dir()
    logged = [r["step"] for r in store.get_training_log(s, run["id"])]
    assert logged and logged == sorted(logged)

    r = moebench("run", "--resume", str(run["id"]), "--db", db, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = store.get_run(s, run["id"])
    assert run["status"] == "done" and run["last_step"] == 60
    assert run["resumed_from_step"] is not None


def test_listing_commands(in_tmp: Path) -> None:
    code, out = invoke(["methods"])
    assert code == 0 and "rank" in out and "target_modules" in out
    code, out = invoke(["models"])
    assert code == 0 and "qwen2-0.5b" in out and "Qwen/Qwen2-0.5B" in out
    code, out = invoke(["tasks"])
    assert code == 0 and "gsm8k" in out and "mini" in out


def test_export_and_runs_show(in_tmp: Path) -> None:
    db = f"sqlite:///{in_tmp / 'e.db'}"
    code, out = invoke(["run", *TINY, "--db", db])
    assert code == 0, out
    code, out = invoke(["export", "--db", db, "--format", "json"])
    assert code == 0
    (run,) = json.loads(out)
    assert any(m["task"] == "gsm8k" for m in run["metrics"])
    code, out = invoke(["runs", "show", str(run["id"]), "--config", "--db", db])
    assert code == 0 and json.loads(out)["model"] == "tiny-llama"
    _refused(["runs", "show", "99", "--db", db], "No run with id 99")


def test_a_third_party_method_registers_through_the_entry_point(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "my_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "my_plugin-0.1.dist-info" / "METADATA").write_text("Name: my-plugin\nVersion: 0.1\n")
    (site / "my_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[moebench.methods]\nqv-lora = my_plugin:METHOD\n"
    )
    (site / "my_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from moebench.methods.lora import LoRA, LoRAConfig\n"
        "class QVLoRA(LoRA):\n"
        "    name = 'qv-lora'\n"
        "    help = 'LoRA on q and v only (a plugin test).'\n"
        "METHOD = QVLoRA()\n"
    )
    env = {"PYTHONPATH": str(site)}
    r = moebench("methods", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "qv-lora" in r.stdout, r.stderr
    db = f"sqlite:///{tmp_path / 'p.db'}"
    r = moebench("run", "--method", "qv-lora", *TINY, "--db", db, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert store.list_runs(store.open_store(db))[0]["method"] == "qv-lora"


def test_resume_refuses_flags_it_would_ignore(in_tmp: Path) -> None:
    _refused(
        ["run", "--resume", "1", "--max-steps", "9"],
        "--resume continues run 1 under its stored config",
        "--max-steps",
        "--rerun",
    )
    assert not (in_tmp / "results").exists()  # refused before any store was opened


def test_sigterm_marks_the_run_interrupted_too(tmp_path: Path) -> None:
    db_file = tmp_path / "t.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moebench",
            "run",
            "--model",
            "tiny-llama",
            "--max-steps",
            "5000",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            "train.batch_size=4",
            "--db",
            f"sqlite:///{db_file}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoint(db_file, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    (run,) = store.list_runs(store.open_store(f"sqlite:///{db_file}"))
    assert run["status"] == "interrupted" and "SIGTERM" in run["status_reason"]


@pytest.mark.parametrize("group", [g.name for g in app.registered_groups])
def test_every_groups_help_keeps_its_bracketed_text(group: str) -> None:
    """Plain help in every group, as in the main app: with rich markup on, "[default: ...]" or
    "[env MOEBENCH_DB; ...]" in a help text is taken for a style tag and dropped. Each group is
    rendered on its own, with its own markup mode (the main app lends it its mode otherwise)."""
    sub = next(g.typer_instance for g in app.registered_groups if g.name == group)
    command = typer.main.get_command(sub)  # a group: its own options, then its commands'
    for path, cmd in [((), command), *(((n,), c) for n, c in command.commands.items())]:
        result = CliRunner().invoke(sub, [*path, "--help"], env={"COLUMNS": "100"})
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())
        for param in cmd.params:
            for bracketed in re.findall(r"\[[^\]]*\]", getattr(param, "help", None) or ""):
                assert " ".join(bracketed.split()) in shown, (group, path, bracketed)
