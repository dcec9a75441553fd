"""One run, end to end: resolve data, load, adapt, train, score, store; and resume it.

A run is a row in the store from before the first weight loads until it ends, so a failure or a
Ctrl-C at any point is recorded (failed/interrupted, with the reason and the last checkpoint),
and everything computed before it — training log, checkpoints, each task's scores — is already
stored. A job runner (sweeps, Ray) attaches here: `execute` is one resumable job.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from moebench import store as db
from moebench.checkpoint import latest_checkpoint
from moebench.data import load_training_rows, tokenize_row
from moebench.errors import ConfigError, MoebenchError
from moebench.evaluate import TaskResult, evaluate_task, group_average
from moebench.inject import Adapted, inject
from moebench.method import ModelShapes, get_method
from moebench.models import count_parameters, describe, load_model
from moebench.runspec import RunSpec, resolve
from moebench.suites import get_suite
from moebench.suites import resolve as resolve_suite
from moebench.task import Item, Task, get_task
from moebench.train import StepLog, TrainHooks, autocast_dtype, resolve_device, train

log = logging.getLogger(__name__)

LOG_FLUSH_EVERY = 10  # training-log rows buffered before a store write


@dataclass(frozen=True)
class RunEnv:
    """Where a run reads and writes; not part of what determines its numbers (nor its hash)."""

    db: str | None = None
    data_dir: str | None = None
    output_dir: str | None = None


class Observer(Protocol):
    """What a front end (the CLI's progress bars, a job runner) hears about a run."""

    def started(self, run_id: int, info: dict[str, Any]) -> None: ...
    def step(self, s: StepLog) -> None: ...
    def eval_started(self, task: str, n: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def task_done(self, result: TaskResult) -> None: ...


class SilentObserver:
    def started(self, run_id: int, info: dict[str, Any]) -> None: ...
    def step(self, s: StepLog) -> None: ...
    def eval_started(self, task: str, n: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def task_done(self, result: TaskResult) -> None: ...


@dataclass
class _LogBuffer:
    store: db.Store
    run_id: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0

    def add(self, s: StepLog) -> None:
        self.rows.append(
            {
                "step": s.step,
                "loss": s.loss,
                "lr": s.lr,
                "tokens": s.tokens,
                "aux_losses": s.aux or None,
                "stats": s.stats or None,
            }
        )
        self.last_step = s.step
        if len(self.rows) >= LOG_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            db.log_steps(self.store, self.run_id, self.rows)
            self.rows = []


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("moebench", "torch", "transformers", "safetensors", "sqlalchemy", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def git_sha() -> str | None:
    """The source tree's commit (with '-dirty' when it has local changes), if it is a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def load_eval_items(
    spec: RunSpec, eval_files: dict[str, Path]
) -> dict[str, tuple[Task, list[Item]]]:
    return {
        name: (get_task(name), get_task(name).load_items(path, spec.eval.limit))
        for name, path in eval_files.items()
    }


def execute(
    spec: RunSpec,
    env: RunEnv,
    observer: Observer | None = None,
    *,
    resume_run: int | None = None,
) -> int:
    """Run (or resume) one job and return its run id; the store records how it ended."""
    observer = observer or SilentObserver()
    started = time.perf_counter()
    # Everything that can be wrong with the inputs is checked before any weight loads.
    suite = resolve_suite(get_suite(spec.suite), env.data_dir, spec.eval.tasks)
    train_rows = [(r, task) for path, task in suite.train_files for r in load_training_rows(path)]
    evals = load_eval_items(spec, suite.eval_files)
    store = db.open_store(env.db)

    resume_from: Path | None = None
    earlier_wall = 0.0  # wall time spent by earlier processes of a resumed run
    if resume_run is None:
        config = {
            **spec.to_dict(),
            "_data": {"root": str(suite.data_root), "sha256": suite.fingerprint()},
        }
        run_id = db.create_run(
            store,
            method=spec.method,
            model=spec.model,
            suite=spec.suite,
            config=config,
            config_hash=spec.hash,
            seed=spec.seed,
            versions=package_versions(),
            git_sha=git_sha(),
            hardware=hardware(),
            output_dir=None,
            status="running",
        )
        out_dir = Path(env.output_dir or Path("results") / "runs" / str(run_id)).resolve()
        db.update_run(store, run_id, output_dir=str(out_dir))
    else:
        run_id = resume_run
        row = db.get_run(store, run_id)
        stored = sorted(row["config"].get("_data", {}).get("sha256", {}).values())
        if stored and stored != sorted(suite.fingerprint().values()):
            raise ConfigError(
                f"Run {run_id} was trained on other data than '{suite.data_root}' holds now "
                "(file hashes differ); resume it with its own data, or --rerun it."
            )
        earlier_wall = row["wall_time_s"] or 0.0
        out_dir = Path(row["output_dir"])
        resume_from = latest_checkpoint(out_dir / "checkpoints")
        db.update_run(store, run_id, resumed_from_step=row["last_step"])
        db.set_status(store, run_id, "running")

    logs = _LogBuffer(store, run_id)
    try:
        device = resolve_device(spec.train)
        amp = autocast_dtype(spec.train, device)
        # Under bf16 autocast the frozen base is held in bf16 (half the memory, no per-forward
        # casts); adapters stay fp32 (train() sees to it).
        model, tokenizer = load_model(spec.model, dtype=amp or torch.float32)
        torch.manual_seed(spec.seed)  # adapter init; data order has its own seeded generator
        method = get_method(spec.method)
        adapted = inject(model, method, spec.method_config)
        trainable, total = count_parameters(model)
        closed = method.trainable_parameters(
            spec.method_config, ModelShapes.from_config(model.config)
        )
        if closed != trainable:
            log.warning("closed-form count %d differs from counted %d", closed, trainable)
        db.update_run(store, run_id, trainable_params=trainable, total_params=total)
        examples = [
            tokenize_row(
                r,
                tokenizer,
                template=spec.train.template,
                cutoff_len=spec.train.cutoff_len,
                train_on_prompt=spec.train.train_on_prompt,
                task_label=_task_label(r.task or task),
            )
            for r, task in train_rows
        ]
        observer.started(
            run_id,
            {
                "model": describe(spec.model),
                "trainable": trainable,
                "total": total,
                "rows": len(examples),
                "device": str(device),
                "output_dir": str(out_dir),
                "resume_from": str(resume_from) if resume_from else None,
            },
        )
        hooks = TrainHooks(
            on_step=lambda s: (logs.add(s), observer.step(s)),
            on_checkpoint=lambda step, path: (
                logs.flush(),
                db.add_checkpoint(store, run_id, step, str(path)),
            ),
        )
        result = train(
            adapted,
            examples,
            spec.train,
            seed=spec.seed,
            checkpoint_root=out_dir / "checkpoints",
            resume_from=resume_from,
            hooks=hooks,
        )
        logs.flush()
        save_adapter(adapted, spec, out_dir / "adapter")
        results = score_all(adapted, tokenizer, spec, evals, store, run_id, observer, amp)
        db.add_metrics(store, run_id, group_average(results, {k: v[0] for k, v in evals.items()}))
        speed = {"tokens_per_s": result.tokens_per_s} if result.steps_run else {}
        db.update_run(
            store,
            run_id,
            wall_time_s=earlier_wall + time.perf_counter() - started,
            peak_memory_bytes=peak_memory_bytes(device),
            **speed,
        )
        db.set_status(store, run_id, "done")
        return run_id
    except KeyboardInterrupt:
        _mark(
            store,
            run_id,
            logs,
            "interrupted",
            "interrupted (Ctrl-C or SIGTERM)",
            earlier_wall,
            started,
        )
        raise
    except MoebenchError as e:
        _mark(store, run_id, logs, "failed", str(e), earlier_wall, started)
        raise
    except BaseException as e:
        _mark(store, run_id, logs, "failed", f"{type(e).__name__}: {e}", earlier_wall, started)
        raise


def _mark(
    store: db.Store,
    run_id: int,
    logs: _LogBuffer,
    status: str,
    reason: str,
    earlier_wall: float,
    started: float,
) -> None:
    """Record how a run ended without losing what it computed; never masks the original error."""
    try:
        logs.flush()
        row = db.get_run(store, run_id)
        ckpt = row.get("last_checkpoint")
        where = f" after step {logs.last_step}" if logs.last_step and "step" not in reason else ""
        tail = (
            (
                f"; last checkpoint: {ckpt} (step {row.get('last_step')}); continue with "
                f"`moebench run --resume {run_id}`"
            )
            if ckpt
            else "; no checkpoint was written yet"
        )
        db.update_run(store, run_id, wall_time_s=earlier_wall + time.perf_counter() - started)
        db.set_status(store, run_id, status, f"{reason}{where}{tail}")
    except Exception:  # the store itself failing must not hide why the run stopped
        log.exception("could not record the end of run %d", run_id)


def _task_label(task: str | None) -> int:
    if task is None:
        return -1
    try:
        return get_task(task).knowledge
    except MoebenchError:
        return -1


def save_adapter(adapted: Adapted, spec: RunSpec, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapted.adapter_state_dict(), str(folder / "adapter.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(spec.to_dict(), indent=1))


def score_all(
    adapted: Adapted,
    tokenizer: Any,
    spec: RunSpec,
    evals: dict[str, tuple[Task, list[Item]]],
    store: db.Store,
    run_id: int,
    observer: Observer,
    amp: torch.dtype | None,
) -> list[TaskResult]:
    """Score every set, storing each as soon as it is done so a later failure loses nothing."""
    template = spec.eval.template or spec.train.template
    # A bf16 base would round a small merged update away (and unmerge could not restore it).
    fp32_base = all(p.dtype == torch.float32 for p in adapted.model.parameters())
    merged = spec.eval.merge and adapted.mergeable and fp32_base
    if merged:
        adapted.merge()
    tokenizer.padding_side = "left"
    results = []
    try:
        for name, (task, items) in evals.items():
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
            )
            db.add_predictions(store, run_id, r.predictions)
            db.add_metrics(store, run_id, r.metrics)
            observer.task_done(r)
            results.append(r)
    finally:
        if merged:
            adapted.unmerge()
    return results


def resume(run_id: int, env: RunEnv, observer: Observer | None = None) -> int:
    """Continue a stopped run from its last checkpoint under its stored config."""
    store = db.open_store(env.db)
    row = db.get_run(store, run_id)
    if row["status"] == "done":
        raise ConfigError(f"Run {run_id} is already done; nothing to resume.")
    if row["status"] == "running":
        log.warning("run %d is marked running; resuming it (was its process killed?)", run_id)
    config = {k: v for k, v in row["config"].items() if not k.startswith("_")}
    spec = resolve(base=config)
    if spec.hash != row["config_hash"]:
        raise ConfigError(
            f"Run {run_id}'s stored config no longer resolves to the same settings (hash "
            f"{spec.hash[:12]} vs {row['config_hash'][:12]}); this moebench changed a default."
        )
    return execute(
        spec,
        RunEnv(db=env.db, data_dir=env.data_dir or _stored_root(row)),
        observer,
        resume_run=run_id,
    )


def _stored_root(row: dict[str, Any]) -> str | None:
    root = row["config"].get("_data", {}).get("root")
    return root if root and Path(root).is_dir() else None
