"""A run as a stored job: failures are recorded with their reason, nothing computed is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from moebench import store
from moebench.errors import TrainingDiverged
from moebench.runner import RunEnv, execute, resume
from moebench.runspec import resolve
from tests.conftest import poisoned_model


def test_a_diverging_run_is_marked_failed_with_its_step_and_keeps_its_log(tmp_path: Path) -> None:
    folder = poisoned_model(tmp_path / "poisoned-model")
    db = f"sqlite:///{tmp_path / 'f.db'}"
    spec = resolve(options={"model": str(folder), "max_steps": 3, "limit": 2})
    with pytest.raises(TrainingDiverged):
        execute(spec, RunEnv(db=db, output_dir=str(tmp_path / "out")))
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "failed"
    assert "non-finite" in run["status_reason"] and "step 1" in run["status_reason"]
    assert run["model"] == str(folder)


def test_scores_of_finished_sets_survive_a_failure_later_in_evaluation(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'e.db'}"
    spec = resolve(
        options={"model": "tiny-llama", "max_steps": 2, "limit": 2},
        sets=[("eval.tasks", "boolq,piqa")],
    )
    calls = []

    class StopAfterFirstSet:
        def started(self, run_id, info): ...  # type: ignore[no-untyped-def]
        def step(self, s): ...  # type: ignore[no-untyped-def]
        def eval_started(self, task, n): ...  # type: ignore[no-untyped-def]
        def eval_progress(self, n): ...  # type: ignore[no-untyped-def]

        def task_done(self, result):  # type: ignore[no-untyped-def]
            calls.append(result.task)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(spec, RunEnv(db=db, output_dir=str(tmp_path / "o")), StopAfterFirstSet())
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "interrupted"
    assert {m["task"] for m in store.get_metrics(s, run["id"])} == {"boolq"}
    assert len(store.get_predictions(s, run["id"])) == 2
    assert [r["step"] for r in store.get_training_log(s, run["id"])] == [1, 2]
    boolq = store.get_predictions(s, run["id"], task="boolq")

    # Resuming picks up at the first unfinished set: boolq is kept, not scored again.
    started = []

    class Record(StopAfterFirstSet):
        def eval_started(self, task, n):  # type: ignore[no-untyped-def]
            started.append(task)

        def task_done(self, result): ...  # type: ignore[no-untyped-def]

    resume(run["id"], RunEnv(db=db), Record())
    assert started == ["piqa"]
    assert store.get_run(s, run["id"])["status"] == "done"
    assert store.get_predictions(s, run["id"], task="boolq") == boolq
    avg = next(m for m in store.get_metrics(s, run["id"]) if m["task"] == "commonsense_avg")
    assert avg["n"] == 2


def test_loglik_mode_scores_commonsense_by_label_and_math_by_generation(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    spec = resolve(
        options={"model": "tiny-qwen2", "max_steps": 1, "limit": 3},
        sets=[("eval.mode", "loglik"), ("eval.tasks", "arc_challenge,gsm8k")],
    )
    run_id = execute(spec, RunEnv(db=db, output_dir=str(tmp_path / "o")))
    s = store.open_store(db)
    protocols = {m["task"]: m["protocol"] for m in store.get_metrics(s, run_id)}
    assert protocols["arc_challenge"] == "llm-adapters-loglik/alpaca"
    assert protocols["gsm8k"].startswith("llm-adapters-gen/alpaca/greedy/max256")
    arc = store.get_predictions(s, run_id, task="arc_challenge")
    assert all(
        p["extracted"] in {"answer1", "answer2", "answer3", "answer4", "answer5"} for p in arc
    )
    assert not any(p["parse_failed"] for p in arc)
