"""Scoring a trained run: every eval set, each stored the moment it is scored.

A resumed run keeps the sets it already scored under the same protocol, so a job interrupted in
evaluation picks up at the first set it had not finished.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from moebench import store as db
from moebench.evaluate import TaskResult, evaluate_task, protocol
from moebench.inject import Adapted
from moebench.runspec import RunSpec
from moebench.task import Item, Task

log = logging.getLogger(__name__)


class EvalObserver(Protocol):
    def eval_started(self, task: str, n: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def task_done(self, result: TaskResult) -> None: ...


def score_all(
    adapted: Adapted,
    tokenizer: Any,
    spec: RunSpec,
    evals: dict[str, tuple[Task, list[Item]]],
    store: db.Store,
    run_id: int,
    observer: EvalObserver,
    amp: torch.dtype | None,
    splits: dict[str, str] | None = None,
) -> list[TaskResult]:
    """Score every set, storing each as soon as it is done so a later failure loses nothing.

    `splits` names, per set, the part of its test file being scored (see `suites.split_label`).
    """
    splits = splits or {}
    template = spec.eval.template or spec.train.template
    # A bf16 base would round a small merged update away (and unmerge could not restore it).
    fp32_base = all(p.dtype == torch.float32 for p in adapted.model.parameters())
    merged = spec.eval.merge and adapted.mergeable and fp32_base
    if merged:
        adapted.merge()
    tokenizer.padding_side = "left"
    results = []
    # A resumed run keeps the sets it already scored under the same protocol: a job that was
    # interrupted in evaluation picks up at the first set it had not finished.
    stored = db.get_metrics(store, run_id)
    try:
        for name, (task, items) in evals.items():
            pid, _ = protocol(task, spec.eval, template, splits.get(name, "test"))
            earlier = [m for m in stored if m["task"] == name and m["protocol"] == pid]
            if earlier:
                log.info("%s already scored under %s; kept", name, pid)
                results.append(TaskResult(name, earlier, []))
                continue
            observer.eval_started(name, len(items))
            r = evaluate_task(
                adapted,
                tokenizer,
                task,
                items,
                spec.eval,
                template,
                amp,
                on_batch=observer.eval_progress,
                split=splits.get(name, "test"),
            )
            db.add_predictions(store, run_id, r.predictions)
            db.add_metrics(store, run_id, r.metrics)
            observer.task_done(r)
            results.append(r)
    finally:
        if merged:
            adapted.unmerge()
    return results
