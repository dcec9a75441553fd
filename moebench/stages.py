"""The stages of one job, each a function that fits on a screen: open (or resume), build the
adapted model, train, score, finish, and how a job that stopped is recorded.

moebench.runner strings them together (`run_claimed`); nothing here claims or queues.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from moebench import store as db
from moebench.adapted import Built, build_adapted
from moebench.checkpoint import find_resumable, step_of
from moebench.config import build, to_dict
from moebench.data import Example, tokenize_row
from moebench.errors import ConfigError, MoebenchError
from moebench.evaluate import TaskResult, group_average
from moebench.fits import check_fits
from moebench.liveness import Heartbeat, shielded
from moebench.method import Method, ModelShapes, PrepareContext, get_method
from moebench.models import cache_dir, count_parameters, describe
from moebench.paths import check_owned, claim_run_folder, run_folder_name, run_owner
from moebench.provenance import git_sha, hardware, package_versions, peak_memory_bytes
from moebench.run_records import (
    LogBuffer,
    PhaseWatch,
    save_adapter,
    store_router_summary,
)
from moebench.rundata import (
    PreparedData,
    check_same_data,
    data_fingerprint,
    data_record,
    prepare_data,
)
from moebench.runspec import RunSpec, resolve
from moebench.scoring import score_all
from moebench.store import jobs as q
from moebench.suites import ResolvedSuite, get_suite
from moebench.suites import resolve as resolve_suite
from moebench.train import StepLog, TrainHooks, train

log = logging.getLogger(__name__)


DEFAULT_OUTPUT_ROOT = Path("results") / "runs"


@dataclass(frozen=True)
class RunEnv:
    """Where a run reads and writes; not part of what determines its numbers (nor its hash).

    `output_dir` is a root: each run writes only into its own folder under it.
    """

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


# --- submitting and starting -----------------------------------------------------------------


def spec_of(row: dict[str, Any]) -> RunSpec:
    """The stored spec, resolved by this moebench, with the execution overrides applied (the
    micro-batch or eval batch an out-of-memory retry halved). Refused if it would mean
    something else now."""
    stored = row["config"]
    spec = resolve(base=stored)
    changed = changed_settings(stored, spec.to_dict())
    if changed:
        raise ConfigError(
            f"Run {row['id']}'s stored config no longer resolves to the same settings "
            f"({', '.join(changed[:4])} differ); this moebench changed a default, so "
            "--rerun it instead."
        )
    execution = row.get("execution") or {}
    if execution.get("micro_batch_size"):
        micro = int(execution["micro_batch_size"])
        spec = replace(spec, train=replace(spec.train, micro_batch_size=micro))
    if execution.get("eval_batch_size"):
        spec = replace(spec, eval=replace(spec.eval, batch_size=int(execution["eval_batch_size"])))
    return spec


def changed_settings(stored: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose stored value differs from what it resolves to now; keys the stored config
    lacks (fields added later, resolved to their defaults) do not count."""
    out = []
    for key, old in stored.items():
        new = now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}")
    return out


def load_data(spec: RunSpec, data_dir: str | None) -> tuple[ResolvedSuite, PreparedData]:
    check_fits(get_method(spec.method), spec.method_config, spec.model)
    suite = resolve_suite(get_suite(spec.suite), data_dir, spec.eval.tasks)
    data = prepare_data(spec, suite)
    if not data.train_rows:
        raise ConfigError(
            f"Suite '{spec.suite}' with these data settings leaves no training rows "
            f"(pool: {data.mixture['pool'] or 'empty'}); check data.task_sizes / train_rows."
        )
    return suite, data


# --- one claimed job -------------------------------------------------------------------------


@dataclass
class Job:
    """A claimed job as its stages see it."""

    run_id: int
    spec: RunSpec
    data: PreparedData
    out_dir: Path
    resume_from: Path | None
    logs: LogBuffer
    watch: PhaseWatch
    examples: list[Example] = field(default_factory=list)
    gpus: int = 1  # data-parallel ranks of the training stage (moebench.distributed)


def not_opened(
    store: db.Store, row: dict[str, Any], owner: str, error: BaseException, restore: bool
) -> None:
    """Nothing ran. On an explicit resume (`restore`) the run goes back to the status it was
    claimed in (a resume with the wrong data folder must not turn an interrupted run into a
    failed one); a job a worker took from the queue fails with the reason, so the retry policy
    sees it instead of a worker claiming it again and again."""
    with shielded():
        try:
            if restore:
                q.release(store, row["id"], owner, row["claimed_from"], row["status_reason"])
            elif isinstance(error, KeyboardInterrupt):
                q.release(store, row["id"], owner, "interrupted", "interrupted before it started")
            else:
                reason = _reason(error)
                q.add_failure(store, row["id"], kind="error", reason=reason)
                q.release(store, row["id"], owner, "failed", reason)
        except Exception:  # the store failing must not hide why the job did not open
            log.exception("could not record that run %d did not open", row["id"])


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, MoebenchError) else f"{type(error).__name__}: {error}"


def open_job(
    store: db.Store,
    row: dict[str, Any],
    env: RunEnv,
    loaded: tuple[ResolvedSuite, PreparedData] | None,
) -> Job:
    """Stage 1: the spec, the data (checked against what the run started on), its own output
    folder, and the newest checkpoint that verifies."""
    run_id = row["id"]
    spec = spec_of(row)
    execution = row.get("execution") or {}
    produced = db.get_produced(store, run_id)
    data_dir = env.data_dir or execution.get("data_dir") or _stored_root(produced.data)
    suite, data = loaded or load_data(spec, data_dir)
    record = data_record(suite, data)
    check_same_data(run_id, produced.data, record)
    if produced.data is None:
        db.put_artifact(store, run_id, "data", record)
    out_dir = _own_folder(store, row)
    resume_from, skipped = find_resumable(out_dir / "checkpoints")
    for reason in skipped:
        log.warning("%s", reason)
        q.add_failure(store, run_id, kind="checkpoint", reason=reason)
    if skipped and resume_from is None:
        log.warning("run %d: no usable checkpoint is left; it starts again from step 0", run_id)
    db.update_run(
        store,
        run_id,
        output_dir=str(out_dir),
        data_fingerprint=data_fingerprint(record),
        resumed_from_step=step_of(resume_from) if resume_from else None,
        versions=package_versions(),
        git_sha=git_sha(),
        hardware=hardware(),
    )
    db.put_artifact(store, run_id, "mixture", data.mixture)
    db.put_artifact(store, run_id, "overlap", data.overlap)
    watch = (
        PhaseWatch.restore(db.get_artifacts(store, run_id), step_of(resume_from))
        if resume_from
        else PhaseWatch()
    )
    gpus = int(execution.get("gpus") or 1)
    return Job(run_id, spec, data, out_dir, resume_from, LogBuffer(store, run_id), watch, gpus=gpus)


def _own_folder(store: db.Store, row: dict[str, Any]) -> Path:
    """The run's own folder under its output root (see moebench.paths): made on its first
    attempt, found again from the stored `output_dir` on a resume or retry, and refused in one
    sentence if its marker names another run."""
    owner = run_owner(row, store.identity)
    if row["output_dir"]:  # made again, empty, if it was deleted
        folder = Path(row["output_dir"])
        return claim_run_folder(folder.parent, owner, folder.name)
    execution = row.get("execution") or {}
    root = Path(execution.get("output_root") or DEFAULT_OUTPUT_ROOT).resolve()
    return claim_run_folder(root, owner, run_folder_name(row))


def _stored_root(data: dict[str, Any] | None) -> str | None:
    root = (data or {}).get("root")
    return root if root and Path(root).is_dir() else None


def build_stage(store: db.Store, job: Job) -> Built:
    """Stage 2: the base model, the method's preparation (once per run), the adapted model."""
    spec, run_id = job.spec, job.run_id
    method = get_method(spec.method)
    produced = db.get_produced(store, run_id)
    stored = produced.prepared

    def prepare(model: torch.nn.Module, tokenizer: Any, device: torch.device, amp: Any) -> Any:
        job.examples = _tokenize(job, tokenizer, method)
        if stored is not None:
            return build(method.config_cls, stored["method_config"], section=method.name)
        return _prepare(method, spec, model, tokenizer, job, device, amp, store)

    built = build_adapted(spec, prepare=prepare)
    trainable, total = count_parameters(built.adapted.model)
    shapes = ModelShapes.from_config(built.adapted.model.config)
    closed = method.trainable_parameters(built.method_config, shapes)
    if closed != trainable:
        log.warning("closed-form count %d differs from counted %d", closed, trainable)
    db.update_run(store, run_id, trainable_params=trainable, total_params=total)
    budget = produced.budget
    if budget is not None:
        budget = {
            **budget,
            "achieved_params": trainable,
            "active_params": method.active_parameters(built.method_config, shapes),
            "relative_error": trainable / budget["target_params"] - 1.0,
        }
        db.put_artifact(store, run_id, "budget", budget)
    return built


def _tokenize(job: Job, tokenizer: Any, method: Method) -> list[Example]:
    t = job.spec.train
    return [
        tokenize_row(
            r,
            tokenizer,
            template=t.template,
            cutoff_len=t.cutoff_len,
            train_on_prompt=t.train_on_prompt,
            task_label=method.task_label(job.spec.method_config, r.task),
        )
        for r in job.data.train_rows
    ]


def _prepare(
    method: Method,
    spec: RunSpec,
    model: torch.nn.Module,
    tokenizer: Any,
    job: Job,
    device: torch.device,
    amp: torch.dtype | None,
    store: db.Store,
) -> Any:
    """The method's preparation stage, once per run; its outcome is stored as the `prepared`
    artifact, so a resume rebuilds the same modules without measuring again."""
    ctx = PrepareContext(
        model=model.to(device),
        examples=job.examples,
        tasks=[r.task for r in job.data.train_rows],
        model_name=spec.model,
        seed=spec.seed,
        cache_dir=cache_dir(),
        device=device,
        autocast=amp,
        pad_token_id=int(tokenizer.pad_token_id or 0),
    )
    prepared = method.prepare(spec.method_config, ctx)
    for note in prepared.notes:
        log.warning("%s", note)
    # Artifacts first: once `prepared` is stored a resume skips this stage, so everything it
    # produced must already be there.
    for name, data in prepared.artifacts.items():
        db.put_artifact(store, job.run_id, name, data)
    if prepared.notes:
        db.put_artifact(store, job.run_id, "notes", prepared.notes)
    record = {"method_config": to_dict(prepared.config), "notes": prepared.notes}
    db.put_artifact(store, job.run_id, "prepared", record)
    return prepared.config


def train_stage(
    store: db.Store, job: Job, built: Built, observer: Observer, beat: Heartbeat
) -> None:
    """Stage 3: the loop, from the checkpoint `open_job` chose; each step logged, heartbeated."""
    trainable, total = count_parameters(built.adapted.model)
    observer.started(
        job.run_id,
        {
            "model": describe(job.spec.model),
            "trainable": trainable,
            "total": total,
            "rows": len(job.examples),
            "mixture": job.data.mixture,
            "overlap": job.data.overlap,
            "device": str(built.device),
            "output_dir": str(job.out_dir),
            "resume_from": str(job.resume_from) if job.resume_from else None,
        },
    )

    def on_step(s: StepLog) -> None:
        beat.check()
        beat.progress = {
            "stage": f"train {s.phase}",
            "step": s.step,
            "total_steps": s.total_steps,
            "loss": s.loss,
        }
        job.logs.add(s)
        job.watch.add(s)
        observer.step(s)

    def on_checkpoint(step: int, path: Path) -> None:
        job.logs.flush()
        job.watch.store(store, job.run_id)
        db.add_checkpoint(store, job.run_id, step, str(path))

    with _ranks(job, built, beat) as ranks:
        result = train(
            built.adapted,
            job.examples,
            job.spec.train,
            seed=job.spec.seed,
            checkpoint_root=job.out_dir / "checkpoints",
            resume_from=job.resume_from,
            hooks=TrainHooks(on_step=on_step, on_checkpoint=on_checkpoint),
            ranks=ranks,
        )
    job.logs.flush()
    job.watch.store(store, job.run_id)
    store_router_summary(store, job.run_id)
    check_owned(job.out_dir, run_owner(db.get_run(store, job.run_id), store.identity))
    save_adapter(built.adapted, job.spec, job.out_dir / "adapter")
    if result.steps_run:
        db.update_run(store, job.run_id, tokens_per_s=result.tokens_per_s)


def _ranks(job: Job, built: Built, beat: Heartbeat) -> Any:
    """No ranks for a one-GPU job; else this process as rank 0 of `job.gpus` (the others are
    started here and end with the training)."""
    if job.gpus == 1:
        return contextlib.nullcontext()
    from moebench.distributed import helper_ranks

    return helper_ranks(
        job.gpus,
        spec=job.spec.to_dict(),
        method_config=to_dict(built.method_config),
        examples=job.examples,
        workdir=job.out_dir / "ranks",
        checkpoint_root=job.out_dir / "checkpoints",
        resume_from=job.resume_from,
        device=built.device,
        alive=beat.check,
    )


class _Checked:
    """Passes eval progress on, stopping the job if it is no longer this process's."""

    def __init__(self, inner: Observer, beat: Heartbeat) -> None:
        self.inner, self.beat = inner, beat

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def eval_started(self, task: str, n: int) -> None:
        self.beat.progress = {**self.beat.progress, "stage": f"eval {task}", "items": n, "done": 0}
        self.inner.eval_started(task, n)

    def eval_progress(self, n: int) -> None:
        self.beat.check()
        done = int(self.beat.progress.get("done", 0)) + n  # type: ignore[call-overload]
        self.beat.progress = {**self.beat.progress, "done": done}
        self.inner.eval_progress(n)


def score_stage(
    store: db.Store, job: Job, built: Built, observer: Observer, beat: Heartbeat
) -> None:
    """Stage 4: every eval set, each stored as soon as it is scored, then the family averages."""
    evals = job.data.evals
    results = score_all(
        built.adapted,
        built.tokenizer,
        job.spec,
        evals,
        store,
        job.run_id,
        _Checked(observer, beat),
        built.amp,
        job.data.mixture["eval_splits"],
    )
    averages = group_average(results, {k: v[0] for k, v in evals.items()})
    db.add_metrics(store, job.run_id, averages)


def finish(store: db.Store, job: Job, built: Built, beat: Heartbeat, owner: str) -> None:
    """Stage 5: timings, then `done` (only if this process still holds the job)."""
    db.update_run(
        store,
        job.run_id,
        wall_time_s=beat.wall_s(),
        peak_memory_bytes=peak_memory_bytes(built.device),
    )
    if not q.release(store, job.run_id, owner, "done", None):
        beat.lost.set()
        beat.check()


def end(
    store: db.Store,
    job: Job,
    beat: Heartbeat,
    owner: str,
    status: str,
    reason: str,
    kind: str | None = None,
) -> None:
    """Record how a job ended without losing what it computed; never masks the original error.

    Shielded from SIGINT and SIGTERM: a second signal must not cut the record short."""
    with shielded():
        try:
            job.logs.flush()
            row = db.get_run(store, job.run_id)
            ckpt = row.get("last_checkpoint")
            last = job.logs.last_step
            where = f" after step {last}" if last and "step" not in reason else ""
            tail = (
                (
                    f"; last checkpoint: {ckpt} (step {row.get('last_step')}); continue with "
                    f"`moebench run --resume {job.run_id}`"
                )
                if ckpt
                else "; no checkpoint was written yet"
            )
            if row["owner"] != owner:
                return
            db.update_run(store, job.run_id, wall_time_s=beat.wall_s())
            q.add_failure(
                store,
                job.run_id,
                kind=kind or ("interrupted" if status == "interrupted" else "error"),
                reason=reason,
            )
            q.release(store, job.run_id, owner, status, f"{reason}{where}{tail}")
        except Exception:  # the store itself failing must not hide why the run stopped
            log.exception("could not record the end of run %d", job.run_id)
