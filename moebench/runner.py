"""One run, end to end: resolve data, load, adapt, train, score, store; and resume it.

A run is a row in the store from before the first weight loads until it ends, so a failure or a
Ctrl-C at any point is recorded (failed/interrupted, with the reason and the last checkpoint),
and everything computed before it — training log, checkpoints, each task's scores — is already
stored. A job runner (sweeps, Ray) attaches here: `execute` is one resumable job.
"""

from __future__ import annotations

import hashlib
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
from moebench.checkpoint import latest_checkpoint, step_of
from moebench.config import build, to_dict
from moebench.data import Example, Row, tokenize_row
from moebench.decontam import check_overlap
from moebench.errors import ConfigError, MoebenchError
from moebench.evaluate import TaskResult, evaluate_task, group_average, protocol
from moebench.inject import Adapted, inject
from moebench.method import Method, ModelShapes, PrepareContext, get_method
from moebench.mixture import build_mixture
from moebench.models import cache_dir, count_parameters, describe, load_model
from moebench.runspec import RunSpec, resolve
from moebench.suites import ResolvedSuite, get_suite
from moebench.suites import resolve as resolve_suite
from moebench.task import Item, Task
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


@dataclass(frozen=True)
class PreparedData:
    """What a run trains and scores on, drawn from its suite, with the record of how."""

    train_rows: list[Row]
    evals: dict[str, tuple[Task, list[Item]]]
    mixture: dict[str, Any]
    overlap: dict[str, Any]


def prepare_data(spec: RunSpec, suite: ResolvedSuite) -> PreparedData:
    """Read and validate every row, check train/eval overlap, draw the training mixture.

    The overlap check sees every eval item (even past `eval.limit`): contamination of the full
    set is what a reader of the number needs to know. `--decontaminate` drops the pool's
    overlapping rows before the draw (so a sample keeps its size); the stored report is about
    the rows the run trains on.
    """
    rows, origin, unusable = suite.training_pool()
    full = suite.eval_items(None)
    eval_sets = {k: items for k, (_, items) in full.items()}
    pool_report = check_overlap(rows, eval_sets, spec.data.ngram)
    pool = rows
    if spec.data.decontaminate:
        keep = [i for i in range(len(rows)) if i not in pool_report.flagged_rows]
        rows, origin = [rows[i] for i in keep], [origin[i] for i in keep]
    samples = {f.path: f.sample for _, f in suite.train_files}
    drawn, mixture = build_mixture(rows, origin, samples, spec.data)
    # The stored report is about the rows the run trains on; after --decontaminate that is
    # none, and what was dropped is kept beside it.
    report = pool_report if drawn == pool else check_overlap(drawn, eval_sets, spec.data.ngram)
    overlap: dict[str, Any] = {**report.as_dict(), "dropped": 0}
    if spec.data.decontaminate:
        overlap["dropped"] = len(pool_report.flagged_rows)
        overlap["before_dropping"] = pool_report.as_dict()["sets"]
    mixture["held_out_rows_without_a_correct_output"] = unusable
    mixture["rows_sha256"] = rows_digest(drawn)
    mixture["eval_splits"] = {k: suite.split_label(k) for k in full}
    limit = spec.eval.limit
    evals = {k: (t, items if limit is None else items[:limit]) for k, (t, items) in full.items()}
    return PreparedData(drawn, evals, mixture, overlap)


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the training rows in order: a resumed run must see exactly these."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.instruction, r.input, r.output, r.task]).encode())
    return h.hexdigest()


def execute(
    spec: RunSpec,
    env: RunEnv,
    observer: Observer | None = None,
    *,
    resume_run: int | None = None,
    budget: dict[str, Any] | None = None,
) -> int:
    """Run (or resume) one job and return its run id; the store records how it ended.

    `budget` is the record of the parameter budget `spec` was solved for (moebench.budget).
    """
    observer = observer or SilentObserver()
    started = time.perf_counter()
    # Everything that can be wrong with the inputs is checked before any weight loads.
    suite = resolve_suite(get_suite(spec.suite), env.data_dir, spec.eval.tasks)
    data = prepare_data(spec, suite)
    evals = data.evals
    if not data.train_rows:
        raise ConfigError(
            f"Suite '{spec.suite}' with these data settings leaves no training rows "
            f"(pool: {data.mixture['pool'] or 'empty'}); check data.task_sizes / train_rows."
        )
    store = db.open_store(env.db)

    resume_from: Path | None = None
    earlier_wall = 0.0  # wall time spent by earlier processes of a resumed run
    if resume_run is None:
        config = {
            **spec.to_dict(),
            "_data": {
                "root": str(suite.data_root),
                "sha256": suite.fingerprint(),
                "suite": suite.suite.describe(),
                "rows_sha256": data.mixture["rows_sha256"],
            },
            **({"_budget": budget} if budget else {}),
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
        drawn = row["config"].get("_data", {}).get("rows_sha256")
        if drawn is not None and drawn != data.mixture["rows_sha256"]:
            raise ConfigError(
                f"Run {run_id}'s training rows would be drawn differently now (same files, "
                "another mixture or split: this moebench changed how suites draw rows); "
                "--rerun it instead."
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
        method = get_method(spec.method)
        db.put_artifact(store, run_id, "mixture", data.mixture)
        db.put_artifact(store, run_id, "overlap", data.overlap)
        tasks = [r.task for r in data.train_rows]
        examples = [
            tokenize_row(
                r,
                tokenizer,
                template=spec.train.template,
                cutoff_len=spec.train.cutoff_len,
                train_on_prompt=spec.train.train_on_prompt,
                task_label=method.task_label(spec.method_config, r.task),
            )
            for r in data.train_rows
        ]
        method_config = _prepare(
            method, spec, model, tokenizer, examples, tasks, device, amp, store, run_id
        )
        torch.manual_seed(spec.seed)  # adapter init; data order has its own seeded generator
        adapted = inject(model, method, method_config)
        trainable, total = count_parameters(model)
        shapes = ModelShapes.from_config(model.config)
        closed = method.trainable_parameters(method_config, shapes)
        if closed != trainable:
            log.warning("closed-form count %d differs from counted %d", closed, trainable)
        db.update_run(store, run_id, trainable_params=trainable, total_params=total)
        budget = db.get_run(store, run_id)["config"].get("_budget")
        if budget is not None:
            budget = {
                **budget,
                "achieved_params": trainable,
                "active_params": method.active_parameters(method_config, shapes),
                "relative_error": trainable / budget["target_params"] - 1.0,
            }
            db.put_artifact(store, run_id, "budget", budget)
        observer.started(
            run_id,
            {
                "model": describe(spec.model),
                "trainable": trainable,
                "total": total,
                "rows": len(examples),
                "mixture": data.mixture,
                "overlap": data.overlap,
                "device": str(device),
                "output_dir": str(out_dir),
                "resume_from": str(resume_from) if resume_from else None,
            },
        )
        watch = (
            _PhaseWatch.restore(db.get_artifacts(store, run_id), step_of(resume_from))
            if resume_from
            else _PhaseWatch()
        )
        hooks = TrainHooks(
            on_step=lambda s: (logs.add(s), watch.add(s), observer.step(s)),
            on_checkpoint=lambda step, path: (
                logs.flush(),
                watch.store(store, run_id),
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
        watch.store(store, run_id)
        store_router_summary(store, run_id)
        save_adapter(adapted, spec, out_dir / "adapter")
        results = score_all(
            adapted,
            tokenizer,
            spec,
            evals,
            store,
            run_id,
            observer,
            amp,
            data.mixture["eval_splits"],
        )
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


def _prepare(
    method: Method,
    spec: RunSpec,
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[Example],
    tasks: list[str | None],
    device: torch.device,
    amp: torch.dtype | None,
    store: db.Store,
    run_id: int,
) -> Any:
    """The method's preparation stage, once per run: a resumed run reuses the stored outcome,
    so it rebuilds the same modules without measuring again."""
    row = db.get_run(store, run_id)
    stored = row["config"].get("_prepared")
    if stored is not None:
        return build(method.config_cls, stored["method_config"], section=method.name)
    ctx = PrepareContext(
        model=model.to(device),
        examples=examples,
        tasks=tasks,
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
    # Artifacts first: once `_prepared` is stored a resume skips this stage, so everything it
    # produced must already be there.
    for name, data in prepared.artifacts.items():
        db.put_artifact(store, run_id, name, data)
    if prepared.notes:
        db.put_artifact(store, run_id, "notes", prepared.notes)
    config = {
        **row["config"],
        "_prepared": {"method_config": to_dict(prepared.config), "notes": prepared.notes},
    }
    db.update_run(store, run_id, config=config)
    return prepared.config


class _PhaseWatch:
    """Notes the mean adapter-output norm on both sides of each phase switch (LoRACoE's
    warm-up -> joint), which the loop records on the last and first step of every phase.

    A run interrupted right at a switch resumes with the other side still to come, so the last
    logged side is stored with every checkpoint (`phase_watch_last`) and `restore` picks it up.
    """

    def __init__(
        self,
        switches: list[dict[str, Any]] | None = None,
        prev: tuple[str, int, float | None] | None = None,
    ) -> None:
        self.prev = prev
        self.switches: list[dict[str, Any]] = switches or []

    @classmethod
    def restore(cls, artifacts: dict[str, Any], step: int) -> _PhaseWatch:
        """The watch as it stood at checkpoint `step`, from the run's stored artifacts."""
        switches = [s for s in artifacts.get("phase_switches", []) if s["step"] <= step]
        last = artifacts.get("phase_watch_last")
        prev = None
        if last and last["step"] <= step:
            prev = (last["phase"], last["step"], last["adapter_out_norm"])
        return cls(switches, prev)

    def add(self, s: StepLog) -> None:
        if not s.stats:
            return
        norms = [v for k, v in s.stats.items() if k.endswith(".out_norm")]
        norm = sum(norms) / len(norms) if norms else None
        if self.prev is not None and self.prev[0] != s.phase:
            before = self.prev[2]
            ratio = norm / before if norm is not None and before else None
            self.switches.append(
                {
                    "step": s.step,
                    "from": self.prev[0],
                    "to": s.phase,
                    "from_step": self.prev[1],
                    "adapter_out_norm_before": before,
                    "adapter_out_norm_after": norm,
                    "ratio": ratio,
                }
            )
            if ratio is not None:
                log.warning(
                    "phase %s -> %s at step %d: mean adapter output norm %.4g -> %.4g (x%.3g)",
                    self.prev[0],
                    s.phase,
                    s.step,
                    before,
                    norm,
                    ratio,
                )
        self.prev = (s.phase, s.step, norm)

    def store(self, store: db.Store, run_id: int) -> None:
        if self.switches:
            db.put_artifact(store, run_id, "phase_switches", self.switches)
        if self.prev is not None:
            phase, step, norm = self.prev
            last = {"phase": phase, "step": step, "adapter_out_norm": norm}
            db.put_artifact(store, run_id, "phase_watch_last", last)


def store_router_summary(store: db.Store, run_id: int) -> None:
    """Per-key means of the router statistics over every logged step (all processes of a
    resumed run), plus the last logged values: the per-run view the leaderboard reads."""
    rows = [r for r in db.get_training_log(store, run_id) if r["stats"]]
    if not rows:
        return
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r["stats"].items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    summary = {
        "logged_steps": len(rows),
        # per key over the steps that logged it: gates exist only in some phases (LoRACoE)
        "mean": {k: v / counts[k] for k, v in sums.items()},
        "steps_logged_per_key": counts,
        "last_step": rows[-1]["step"],
        "last": rows[-1]["stats"],
    }
    db.put_artifact(store, run_id, "router_stats", summary)


def save_adapter(adapted: Adapted, spec: RunSpec, folder: Path) -> None:
    """The adapter weights and the config that builds their modules: the prepared method config
    (e.g. with LoRA-SMoE's allocation), so loading never needs the preparation stage again."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapted.adapter_state_dict(), str(folder / "adapter.safetensors"))
    config = {**spec.to_dict(), "method_config": to_dict(adapted.config)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))


def score_all(
    adapted: Adapted,
    tokenizer: Any,
    spec: RunSpec,
    evals: dict[str, tuple[Task, list[Item]]],
    store: db.Store,
    run_id: int,
    observer: Observer,
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
        changed = changed_settings(config, spec.to_dict())
        if changed:
            raise ConfigError(
                f"Run {run_id}'s stored config no longer resolves to the same settings "
                f"({', '.join(changed[:4])} differ); this moebench changed a default, so "
                "--rerun it instead."
            )
        # Only fields added since the run was stored (at their defaults) differ: same run.
        log.warning("run %d predates config fields added since; resuming it", run_id)
    return execute(
        spec,
        RunEnv(db=env.db, data_dir=env.data_dir or _stored_root(row)),
        observer,
        resume_run=run_id,
    )


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


def _stored_root(row: dict[str, Any]) -> str | None:
    root = row["config"].get("_data", {}).get("root")
    return root if root and Path(root).is_dir() else None
