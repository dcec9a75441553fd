"""What a sweep's job will cost, known before it runs: trainable parameters and optimizer steps.

From configs and data files only: no weights load and nothing is downloaded, so `moebench sweep
--dry-run` is quick and works offline.
"""

from __future__ import annotations

import math
from typing import Any

from moebench.errors import ConfigError, DataError, ModelError
from moebench.method import Method, ModelShapes, get_method
from moebench.models import model_config
from moebench.paths import cache_dir
from moebench.rundata import draw_rows
from moebench.runspec import RunSpec
from moebench.suites import Suite, data_root, get_suite, mini_root
from moebench.suites import resolve as resolve_suite
from moebench.sweep import SweepJob
from moebench.task import get_task
from moebench.train import plan_steps


def estimate(job: SweepJob, data_dir: str | None = None) -> dict[str, Any]:
    """Trainable parameters and optimizer steps of a job, from configs and data files only.

    Either is None when it is not knowable before the run: a method sized by its preparation
    stage (LoRA-SMoE's allocation), a model whose config is not at hand, data not on this machine
    (an estimate never downloads).
    """
    return {"trainable_params": _trainable(job.spec), "steps": _steps(job.spec, data_dir)}


def _trainable(spec: RunSpec) -> int | None:
    method = get_method(spec.method)
    try:
        shapes = ModelShapes.from_config(model_config(spec.model))
    except ModelError:
        return None
    try:
        return method.trainable_parameters(spec.method_config, shapes)
    except ConfigError:
        if type(method).prepare is Method.prepare:
            raise
        return None


def _steps(spec: RunSpec, data_dir: str | None) -> int | None:
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    rows = _train_rows(spec, data_dir)
    if rows is None:
        return None
    return plan_steps(math.ceil(rows / spec.train.micro_batch_size), spec.train)[1]


def _train_rows(spec: RunSpec, data_dir: str | None) -> int | None:
    """The number of rows the run trains on, drawn by the runner's own `draw_rows`."""
    suite = get_suite(spec.suite)
    try:
        if not _files_at_hand(suite, spec.eval.tasks, data_dir):
            return None
        return len(draw_rows(spec, resolve_suite(suite, data_dir, spec.eval.tasks))[0])
    except DataError:
        return None


def _files_at_hand(suite: Suite, eval_tasks: tuple[str, ...] | None, data_dir: str | None) -> bool:
    """Whether every file `suites.resolve` would look for is already local, so it never
    downloads; the places searched are the ones `suites._locate` searches."""
    root = mini_root() if suite.packaged else data_root(data_dir)
    needed = [f.path for f in suite.train]
    for name in eval_tasks or suite.eval_tasks:
        task = get_task(name)
        if task.packaged_file() is None:
            needed.append(f"{task.folder}/test.json")
    needed += [f"{get_task(h.task).folder}/test.json" for h in suite.held_out]
    bases = [root, root / "ft-training_set", root / "dataset"] if root else []
    bases.append(cache_dir() / "data" / "llm-adapters")
    return all(any((base / rel).is_file() for base in bases) for rel in needed)
