"""Suites, held-out splits and training mixtures, on real LLM-Adapters files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from moebench import store
from moebench.data import Row
from moebench.errors import ConfigError
from moebench.mixture import DataConfig, build_mixture
from moebench.prompts import build_prompt
from moebench.runner import prepare_data
from moebench.runspec import resolve
from moebench.suites import SUITES, get_suite
from moebench.suites import resolve as resolve_suite
from moebench.task import get_task, question_key
from tests.conftest import shared_data_or_skip
from tests.test_cli import moebench


def small_la_folder(dest: Path, rows: int = 40) -> Path:
    """An LLM-Adapters folder with the first `rows` rows of every shared file (same layout)."""
    shared = shared_data_or_skip()
    for src in shared.glob("*/*.json"):
        out = dest / src.parent.name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json.loads(src.read_text())[:rows]))
    return dest


def _prepared(suite: str, data: Path, **data_cfg: object):  # type: ignore[no-untyped-def]
    spec = resolve(
        options={"suite": suite},
        sets=[(f"data.{k}", str(v)) for k, v in data_cfg.items()],
    )
    return prepare_data(spec, resolve_suite(get_suite(suite), str(data)))


def test_held_out_split_is_disjoint_deterministic_and_covers_the_file(tmp_path: Path) -> None:
    data = small_la_folder(tmp_path / "la", rows=60)
    resolved = resolve_suite(get_suite("la-offline"), str(data))
    held = {h.task for h in get_suite("la-offline").held_out}
    assert {"piqa", "social_i_qa", "winogrande", "gsm8k", "svamp", "mawps"} <= held
    for task in held:
        items = get_task(task).load_items(resolved.held_files[task])
        train, test = resolved.split(task, items)
        assert not set(train) & set(test) and sorted(train + test) == list(range(len(items)))
        assert 0.25 < len(train) / len(items) < 0.75  # a hash split: about half
        assert resolved.split(task, items) == (train, test)  # the suite's seed, not the run's
    piqa = get_task("piqa").load_items(resolved.held_files["piqa"])
    assert resolved.split("piqa", piqa)[0] != list(range(len(resolved.split("piqa", piqa)[0])))

    d = _prepared("la-offline", data)
    piqa_eval = {it.item_id for it in d.evals["piqa"][1]}
    assert piqa_eval == {f"piqa/{i}" for i in resolved.split("piqa", piqa)[1]}
    # the training rows of a held-out set are exactly its train side (commonsense outputs are
    # all correct), labelled with the set
    train_questions = {r.instruction for r in d.train_rows if r.task == "piqa"}
    assert train_questions == {piqa[i].instruction for i in resolved.split("piqa", piqa)[0]}
    # math: only rows whose worked output reaches the gold train; the others are counted
    gsm = get_task("gsm8k")
    rows = gsm.load_items(resolved.held_files["gsm8k"])
    side = resolved.split("gsm8k", rows)[0]
    good = [
        i
        for i in side
        if gsm.score(
            build_prompt("alpaca", rows[i].instruction), rows[i].output, rows[i].answer
        ).correct
    ]
    assert 0 < len(good) < len(side)
    assert d.mixture["drawn"]["gsm8k"] == len(good)
    assert d.mixture["held_out_rows_without_a_correct_output"]["gsm8k"] == len(side) - len(good)
    # sets with a training file are scored in full and train on their own file
    assert len(d.evals["boolq"][1]) == 60 and d.mixture["drawn"]["boolq"] == 60
    assert "mawps" not in d.mixture["drawn"]  # its test rows have no worked solution
    assert d.mixture["eval_splits"]["piqa"] == "heldout50-s0"
    assert d.mixture["eval_splits"]["boolq"] == "test"


def test_a_question_shared_by_two_held_out_sets_never_trains_in_one_and_scores_in_another() -> None:
    """AddSub, SingleEq and mawps share many questions: the split is by question, globally."""
    shared = shared_data_or_skip()
    d = _prepared("la-offline", shared)
    train = {question_key(r.instruction) for r in d.train_rows}
    for name in ("addsub", "singleeq", "multiarith", "mawps", "piqa", "gsm8k"):
        assert not any(question_key(it.instruction) in train for it in d.evals[name][1]), name
    assert d.overlap["sets"]["addsub"]["question_matches"] == 0


def test_every_suite_declares_registered_tasks_and_describes_itself() -> None:
    for suite in SUITES.values():
        for t in suite.eval_tasks + tuple(h.task for h in suite.held_out):
            get_task(t)
        desc = suite.describe()
        assert desc["name"] == suite.name and desc["version"] == suite.version
    seed = get_suite("seed-all")
    assert [f.sample for f in seed.train[:2]] == [75_000, 75_000]
    assert set(seed.eval_tasks) >= {"hellaswag", "gsm8k", "ifeval"}


def _rows(spec: dict[str, int]) -> tuple[list[Row], list[str]]:
    rows = [Row(f"{t} q{i}", "", "a", t) for t, n in spec.items() for i in range(n)]
    return rows, ["f.json"] * len(rows)


def test_mixture_sizes_weights_and_seed() -> None:
    rows, origin = _rows({"a": 100, "b": 50, "c": 10})
    drawn, rec = build_mixture(rows, origin, {}, DataConfig())
    assert rec["drawn"] == {"a": 100, "b": 50, "c": 10}

    # train_rows shares out by weight x available: a 100*1, b 50*2, c 10*1 -> 100:100:10
    cfg = DataConfig(train_rows=84, task_weights=("b=2",))
    drawn, rec = build_mixture(rows, origin, {}, cfg)
    assert rec["drawn"] == {"a": 40, "b": 40, "c": 4} and len(drawn) == 84
    assert len(set(drawn)) == 84  # without replacement
    again, _ = build_mixture(rows, origin, {}, cfg)
    assert again == drawn
    other, _ = build_mixture(
        rows, origin, {}, DataConfig(train_rows=84, mixture_seed=1, task_weights=("b=2",))
    )
    assert other != drawn

    # explicit sizes: upsampling repeats every row before drawing the rest; 0 drops a task
    drawn, rec = build_mixture(rows, origin, {}, DataConfig(task_sizes=("c=25", "b=0")))
    assert rec["drawn"] == {"a": 100, "c": 25}
    counts = Counter(r.instruction for r in drawn if r.task == "c")
    assert len(counts) == 10 and sorted(counts.values()) == [2] * 5 + [3] * 5


def test_file_sample_is_drawn_before_the_task_shares() -> None:
    rows, _ = _rows({"commonsense": 300, "math": 200})
    origin = ["cs.json"] * 300 + ["math.json"] * 200
    drawn, rec = build_mixture(rows, origin, {"cs.json": 75}, DataConfig())
    assert rec["after_file_samples"] == {"commonsense": 75, "math": 200}
    assert rec["drawn"] == {"commonsense": 75, "math": 200}
    # seeded by the file's name: the same 75 rows whichever suite (or position) samples it
    again, _ = build_mixture(
        rows[300:] + rows[:300], origin[300:] + origin[:300], {"cs.json": 75}, DataConfig()
    )
    assert sorted(r.instruction for r in again) == sorted(r.instruction for r in drawn)


def test_default_draw_is_the_pool_in_order() -> None:
    """Runs stored before mixtures existed trained on the file order; resuming must keep it."""
    rows, origin = _rows({"b": 3, "a": 4})
    drawn, _ = build_mixture(rows, origin, {}, DataConfig())
    assert drawn == rows


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ({"task_sizes": ("zzz=3",)}, "task 'zzz', which this suite's training pool does not have"),
        ({"task_weights": ("a=2",)}, "needs data.train_rows"),
    ],
)
def test_mixture_names_bad_settings(cfg: dict[str, object], needle: str) -> None:
    rows, origin = _rows({"a": 5})
    with pytest.raises(ConfigError, match=needle):
        build_mixture(rows, origin, {}, DataConfig(**cfg))  # type: ignore[arg-type]


@pytest.mark.parametrize("item", ["boolq", "boolq=", "=3", "boolq=-1", "boolq=many"])
def test_malformed_mixture_items_are_one_sentence(item: str) -> None:
    with pytest.raises(ConfigError, match="must read task=N") as e:
        DataConfig(task_sizes=(item,))
    assert item in str(e.value)


@pytest.mark.parametrize("item", ["boolq=nan", "boolq=inf", "boolq=-2"])
def test_weights_must_be_finite(item: str) -> None:
    with pytest.raises(ConfigError, match="must read task=w, with a number >= 0"):
        DataConfig(train_rows=10, task_weights=(item,))


def test_task_labels_reach_the_examples_methods_read(tmp_path: Path) -> None:
    """LoRAMoE's constraint reads a per-sample knowledge flag: commonsense 1, math 0."""
    from moebench.method import get_method

    data = small_la_folder(tmp_path / "la", rows=12)
    d = _prepared("la-offline", data)
    method = get_method("loramoe")
    cfg = method.config_cls()
    labels = {r.task: method.task_label(cfg, r.task) for r in d.train_rows}
    assert labels["boolq"] == labels["piqa"] == 1
    assert labels["gsm8k"] == labels["aqua"] == 0
    # a whole-file family label (commonsense_170k rows carry no set name)
    assert method.task_label(cfg, "commonsense") == 1 and method.task_label(cfg, "math") == 0


@pytest.mark.slow
def test_la_offline_runs_end_to_end_and_stores_its_data_record(tmp_path: Path) -> None:
    data = small_la_folder(tmp_path / "la", rows=10)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    r = moebench(
        "run",
        "--suite",
        "la-offline",
        "--data-dir",
        str(data),
        "--model",
        "tiny-llama",
        "--max-steps",
        "2",
        "--limit",
        "1",
        "--set",
        "train.batch_size=4",
        "--set",
        "data.task_sizes=boolq=8",
        "--set",
        "eval.max_new_tokens=16",  # a random model never stops: the math sets' 256 is minutes
        "--db",
        db,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "training mixture:" in r.stdout and "boolq 8" in r.stdout
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "done"
    arts = store.get_artifacts(s, run["id"])
    assert arts["mixture"]["drawn"]["boolq"] == 8
    assert set(arts["overlap"]["sets"]) == set(get_suite("la-offline").eval_tasks)
    assert store.get_produced(s, run["id"]).data["suite"]["name"] == "la-offline"
    assert run["config"]["data"]["task_sizes"] == ["boolq=8"]
    preds = store.get_predictions(s, run["id"])
    assert {p["task"] for p in preds} == set(get_suite("la-offline").eval_tasks)
    # a held-out half is not the full test file: its protocol says so
    protocols = {p["task"]: p["protocol"] for p in preds}
    assert protocols["piqa"].endswith("/heldout50-s0") and "heldout" not in protocols["boolq"]
    assert arts["data"]["rows_sha256"] == arts["mixture"]["rows_sha256"]
    assert "_data" not in run["config"]  # what a run produced is not part of its spec
