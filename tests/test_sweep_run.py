"""`moebench sweep` for real: jobs queued once, worked by subprocess workers, a killed worker's job
resumed to the same adapter bit for bit, a bad sweep file queuing nothing."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.runner import RunEnv, execute
from moebench.store import jobs as q
from moebench.sweep import load_sweep
from tests.conftest import as_from_a_terminal

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "sweeps" / "smoke.yaml"
ONE_JOB = """\
name: one
axes: {method: lora, model: tiny-llama, seed: 3}
set:
  train.max_steps: 30
  train.batch_size: 4
  train.checkpoint_every: 4
  train.warmup_steps: 1
  eval.limit: 1
  eval.tasks: boolq
"""


def _sweep(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "moebench", "sweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _adapter(row: dict[str, object]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(str(row["output_dir"])) / "adapter" / "adapter.safetensors"))


def test_a_bad_sweep_file_queues_nothing_and_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes:\n  method: [lora, nosuchmethod]\n  model: tiny-llama\n")
    url = tmp_path / "s.db"
    r = CliRunner().invoke(app, ["sweep", str(bad), "--db", str(url)])
    assert r.exit_code != 0
    assert f"{bad}:2" in str(r.exception) and "nosuchmethod" in str(r.exception)
    assert not url.exists()


@pytest.mark.slow
def test_smoke_sweep_runs_every_job_once_and_a_resubmission_adds_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    p = _sweep(str(SMOKE), "--db", url, "--workers", "2", cwd=tmp_path)
    out, errs = p.communicate(timeout=900)
    assert p.returncode == 0, errs[-3000:]
    assert "queued 4 new" in out and "4 of 4 jobs done" in out
    rows = q.list_jobs(db.open_store(url), sweep="smoke")
    assert [r["status"] for r in rows] == ["done"] * 4 and {r["attempts"] for r in rows} == {1}
    assert all(
        (Path(r["output_dir"]).parent / "logs" / f"{Path(r['output_dir']).name}.log").is_file()
        for r in rows
    )
    p = _sweep(str(SMOKE), "--db", url, cwd=tmp_path)
    out, errs = p.communicate(timeout=300)
    assert p.returncode == 0, errs[-3000:]
    assert "queued 0 new" in out and "4 done" in out
    again = q.list_jobs(db.open_store(url), sweep="smoke")
    assert [(r["id"], r["attempts"]) for r in again] == [(r["id"], 1) for r in rows]


@pytest.mark.slow
def test_a_killed_workers_job_is_resumed_to_the_same_adapter(tmp_path: Path) -> None:
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(ONE_JOB)
    reference = f"sqlite:///{tmp_path / 'ref.db'}"
    p = _sweep(str(sweep_file), "--db", reference, "--output-dir", "ref", cwd=tmp_path)
    assert p.wait(timeout=600) == 0
    (ref,) = q.list_jobs(db.open_store(reference))

    url = f"sqlite:///{tmp_path / 'k.db'}"
    p = _sweep(str(sweep_file), "--db", url, "--output-dir", "killed", cwd=tmp_path)
    s = db.open_store(url)
    deadline = time.monotonic() + 600
    while True:  # kill the worker once it has written its first checkpoint, mid-training
        rows = q.list_jobs(s)
        row = rows[0] if rows else None
        if row and row["status"] == "running" and row["last_step"]:
            break
        assert time.monotonic() < deadline and p.poll() is None, p.stderr and p.stderr.read()
        time.sleep(0.02)
    os.kill(int(row["owner"].split(":")[1]), signal.SIGKILL)
    checkpoint_at_kill = q.list_jobs(s)[0]["last_step"]
    assert 0 < checkpoint_at_kill < 30
    _, errs = p.communicate(timeout=600)
    assert p.returncode == 0, errs[-3000:]
    (run,) = q.list_jobs(s)
    assert run["status"] == "done" and run["attempts"] == 2
    assert [f["kind"] for f in run["failures"]] == ["died"]
    assert db.get_run(s, run["id"])["resumed_from_step"] == checkpoint_at_kill
    got, want = _adapter(run), _adapter(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(db.get_predictions(s, run["id"])) == len(
        db.get_predictions(db.open_store(reference), ref["id"])
    )


TWO_JOBS = ONE_JOB.replace("seed: 3", "seed: [3, 4]").replace("name: one", "name: two")


@pytest.mark.slow
def test_ctrl_c_on_a_sweep_marks_its_jobs_interrupted_and_the_rerun_resumes_them(
    tmp_path: Path,
) -> None:
    """A terminal's Ctrl-C reaches the pool and its workers together: every running job must be
    recorded as interrupted (never left `running` to be taken for dead), and the same command
    run again must finish them without a single recorded death."""
    sweep_file = tmp_path / "two.yaml"
    sweep_file.write_text(TWO_JOBS)
    url = f"sqlite:///{tmp_path / 'i.db'}"
    p = subprocess.Popen(
        [sys.executable, "-m", "moebench", "sweep", str(sweep_file), "--db", url, "--workers", "2"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job is
        preexec_fn=as_from_a_terminal,  # and SIGINT not ignored, whoever started the suite
    )
    s = db.open_store(url)
    deadline = time.monotonic() + 600
    while not any(r["status"] == "running" and r["last_step"] for r in q.list_jobs(s)):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr and p.stderr.read()
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGINT)
    p.communicate(timeout=300)
    assert p.returncode == 130
    stopped = q.list_jobs(s)
    assert "running" not in {r["status"] for r in stopped}
    assert "interrupted" in {r["status"] for r in stopped}
    p = _sweep(str(sweep_file), "--db", url, cwd=tmp_path)
    _, errs = p.communicate(timeout=600)
    assert p.returncode == 0, errs[-3000:]
    done = q.list_jobs(s)
    assert [r["status"] for r in done] == ["done", "done"]
    assert not [f for r in done for f in r["failures"] or [] if f["kind"] == "died"]


@pytest.mark.slow
def test_a_sweep_adopts_an_interrupted_plain_run_of_the_same_spec(tmp_path: Path) -> None:
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(ONE_JOB)
    url = f"sqlite:///{tmp_path / 'a.db'}"

    (job,) = load_sweep(sweep_file).jobs

    class StopAt5:
        def __getattr__(self, name: str) -> object:
            return lambda *a, **k: None

        def step(self, s: object) -> None:
            if s.step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(job.spec, RunEnv(db=url, output_dir=str(tmp_path / "out")), StopAt5())
    p = _sweep(str(sweep_file), "--db", url, cwd=tmp_path, env={"MOEBENCH_PROGRESS_EVERY": "1"})
    out, errs = p.communicate(timeout=600)
    assert p.returncode == 0, errs[-3000:]
    assert "queued 0 new" in out and "1 of 1 jobs done" in out
    (run,) = q.list_jobs(db.open_store(url))
    assert run["status"] == "done" and run["sweep"] == "one" and run["attempts"] == 2
    # piped: plain lines while it works (no live table), one a second at most
    lines = re.findall(r"^jobs: (.*), elapsed (\d+):(\d\d):(\d\d)$", out, re.M)
    assert any(f"1 running (job {run['id']} " in line for line, *_ in lines), out
    seconds = [int(h) * 3600 + int(m) * 60 + int(s) for _, h, m, s in lines]
    assert all(a < b for a, b in itertools.pairwise(seconds)), seconds


def test_workers_below_one_are_refused_in_one_sentence(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["worker", "--db", str(tmp_path / "w.db"), "--workers", "0"])
    assert r.exit_code != 0 and "--workers 0 must be at least 1" in str(r.exception)
