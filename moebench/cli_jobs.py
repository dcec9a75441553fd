"""`moebench sweep`, `moebench worker` and `moebench jobs`: the queue from the terminal.

Display only; queueing lives in moebench.runner.submit, claiming in moebench.store.jobs and the
worker pool in moebench.worker. Registered on the main app by moebench.cli.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from moebench.cli import DbOpt, _setup_logging, app, console, err
from moebench.cli_progress import Throttle, plain_every_s
from moebench.config import parse_sets
from moebench.errors import ConfigError

jobs_app = typer.Typer(
    help="The job queue: list, show (with log tail), cancel and retry jobs.",
    invoke_without_command=True,
    rich_markup_mode=None,  # as every group: plain help keeps "[default: ...]"
)
app.add_typer(jobs_app, name="jobs")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="key=value applied to every job, over the sweep file's `set`."),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(help="Jobs at once on a CPU [default: one per visible GPU, else 1]."),
]


def open_existing(db: str | None) -> Any:
    """The store for a read command: one that does not exist is not created."""
    from moebench import store

    return store.open_existing_store(db)


@app.command()
def sweep(
    file: Annotated[Path, typer.Argument(help="Sweep file (YAML): axes, set, methods, include.")],
    set_: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the expanded jobs; queue and run nothing.")
    ] = False,
    workers: WorkersOpt = None,
    db: DbOpt = None,
    data_dir: Annotated[str | None, typer.Option(help="LLM-Adapters-style data folder.")] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="Root of run outputs [default: results/runs].")
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option("--retry-failed", help="Queue again the jobs that failed or were cancelled."),
    ] = False,
    queue_only: Annotated[
        bool, typer.Option("--queue-only", help="Queue the missing jobs and stop (no workers).")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="Who works the queue: `local` worker processes, or `ray` tasks.")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to use with --backend ray [default: a local Ray instance]."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library details.")] = False,
) -> None:
    """Expand a sweep file into jobs, queue the missing ones, and work the queue until empty."""
    _setup_logging(verbose)
    plain_every_s()  # a bad MOEBENCH_PROGRESS_EVERY fails before anything is queued
    _check_backend(backend, address)
    # First of all, before this process imports torch (reading the file does): see start_early.
    local = backend == "local" and not (dry_run or queue_only)
    early = _start_early(db) if local else None
    try:
        from moebench.sweep import load_sweep
        from moebench.sweep_estimate import estimate

        plan = load_sweep(file, parse_sets(set_ or []))
        if dry_run:
            _print_plan(plan, [estimate(j, data_dir) for j in plan.jobs])
            return
        n_workers = workers if workers is not None else plan.execution.workers
        _check_gpus(plan)
        slots = _slots(n_workers, plan.execution.gpus) if local else None
        _queue(plan, db, data_dir, output_dir, retry_failed, slots, early)
    finally:
        if early is not None:  # not handed over (a bad file, say): it leaves untouched
            early.retire()
    if queue_only:
        return
    if slots is None:
        _work_ray(db, plan.name, address, n_workers)
    else:
        _work(db, plan.name, slots)
    _print_outcome(db, plan)


def _check_backend(backend: str, address: str | None) -> None:
    """--backend and --address, checked before anything runs (Ray installed included)."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r} is not one of: local, ray.")
    if address is not None and backend != "ray":
        raise ConfigError(f"--address {address} is a Ray cluster's address; add --backend ray.")
    if backend == "ray":
        from moebench.ray_backend import require_ray

        require_ray()


def _work_ray(db: str | None, sweep_name: str, address: str | None, workers: int | None) -> None:
    """Work the sweep as Ray tasks; `--workers` is the job slots of a local Ray instance."""
    from moebench import store
    from moebench.ray_backend import work_sweep

    url = store.resolve_db_url(db)
    s = open_existing(db)
    where = address or "a local Ray instance"
    console.print(f"working the queue as Ray tasks on {where}")
    try:
        work_sweep(url, sweep_name, address=address, num_cpus=workers)
    except KeyboardInterrupt:
        err.print(
            "Interrupted: the jobs' processes stop with their Ray tasks and resume from their "
            "last checkpoints when the same command runs again (with either backend)."
        )
        raise typer.Exit(130) from None
    console.print(jobs_table(s, sweep_name))


def _print_plan(plan: Any, estimates: list[dict[str, Any]]) -> None:
    table = Table(title=f"sweep {plan.name}: {len(plan.jobs)} jobs", title_justify="left")
    for col in ("#", "job", "spec hash", "trainable", "steps", "line"):
        table.add_column(col)
    for i, (job, est) in enumerate(zip(plan.jobs, estimates, strict=True), 1):
        trainable = est["trainable_params"]
        table.add_row(
            str(i),
            escape(job.label),
            job.spec.hash[:12],
            f"{trainable:,}" if trainable is not None else "after preparation",
            str(est["steps"]) if est["steps"] is not None else "data not here",
            str(job.line),
        )
    console.print(table)


def _start_early(db: str | None) -> Any:
    from moebench.worker import start_early

    return start_early(db)


def _slots(workers: int | None, gpus: int = 1) -> list[Any]:
    from moebench.worker import plan_slots

    return plan_slots(workers, gpus)


def _check_gpus(plan: Any) -> None:
    """Every job's batch must split over the sweep's `gpus` ranks, said before any is queued."""
    from moebench.distributed import check_gpus

    for job in plan.jobs:
        try:
            train = job.spec.train
            check_gpus(plan.execution.gpus, train.batch_size, train.micro_batch_size)
        except ConfigError as e:
            raise ConfigError(f"{plan.path}: job {job.label} (line {job.line}): {e}") from None


def _queue(
    plan: Any,
    db: str | None,
    data_dir: str | None,
    output_dir: str | None,
    retry: bool,
    slots: list[Any] | None = None,
    early: Any = None,
) -> list[int]:
    """Queue the sweep's jobs that the store does not hold yet; nothing if any is unusable.

    With `slots`, their first workers are started as soon as the store exists, so that their
    start-up overlaps the queueing (see `worker.prestart`).
    """
    from moebench import store
    from moebench.store import jobs as q
    from moebench.suites import get_suite
    from moebench.suites import resolve as resolve_suite

    for suite, tasks in {(j.spec.suite, j.spec.eval.tasks) for j in plan.jobs}:
        resolve_suite(get_suite(suite), data_dir, tasks)  # missing data: one sentence, no job
    s = store.open_store(db)
    if s.created:
        console.print(f"created a new results store at {s.display_url}")
    if slots:
        from moebench.worker import prestart

        prestart(db, plan.name, slots, early)
    from moebench.runner import RunEnv, submit

    have = q.find_jobs(s, [j.spec.hash for j in plan.jobs])
    env = RunEnv(db=db, data_dir=data_dir, output_dir=output_dir)
    new, kept = [], []
    for job in plan.jobs:
        old = have.get(job.spec.hash)
        if old is None:
            execution = {"retries": plan.execution.retries, "label": job.label}
            if plan.execution.gpus > 1:
                execution["gpus"] = plan.execution.gpus
            try:
                run_id = submit(
                    s, job.spec, env, budget=job.budget, sweep=plan.name, execution=execution
                )
            except q.AlreadyQueued:  # another machine submitted the same sweep a moment ago
                continue
            new.append(run_id)
            continue
        # The same spec already in the store (run by hand, or by another sweep): it becomes
        # this sweep's job, so the sweep works it if unfinished and counts it when it ends.
        if old["sweep"] != plan.name and old["status"] != "done":
            q.adopt(s, old["id"], plan.name)
        if retry and old["status"] in ("failed", "cancelled"):
            q.requeue(s, old["id"], "queued again by `moebench sweep --retry-failed`")
            new.append(old["id"])
        else:
            kept.append(old)
    counts: dict[str, int] = {}
    for old in kept:
        counts[old["status"]] = counts.get(old["status"], 0) + 1
    held = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
    console.print(
        f"sweep {plan.name}: {len(plan.jobs)} jobs; queued {len(new)} new"
        + (f"; already in {s.display_url}: {held}" if kept else "")
    )
    if counts.get("failed"):
        console.print("[yellow]failed jobs are not rerun; --retry-failed queues them again[/]")
    return new


def _work(db: str | None, sweep_name: str | None, slots: list[Any]) -> None:
    from moebench.liveness import signals_interrupt
    from moebench.store import jobs as q
    from moebench.worker import work_queue

    s = open_existing(db)
    console.print(
        f"working the queue with {len(slots)} worker(s): {', '.join(x.name for x in slots)}"
    )

    # A terminal gets the live table; a pipe or a log file gets a plain line every few seconds
    # (rich would draw the table only once, at the end).
    live = Live(jobs_table(s, sweep_name), console=console, refresh_per_second=2)
    plain = None if console.is_terminal else Throttle(plain_every_s())

    def tick() -> None:
        if plain is None:
            live.update(jobs_table(s, sweep_name))
        elif plain.due():
            line = queue_line(q.list_jobs(s, sweep=sweep_name))
            console.print(f"{line}, elapsed {plain.elapsed()}", markup=False, highlight=False)

    # SIGTERM (a scheduler, `kill`) ends the pool as Ctrl-C does: its jobs are marked
    # interrupted with their checkpoints, instead of dying with it.
    with signals_interrupt(), live if plain is None else contextlib.nullcontext():
        try:
            work_queue(db, sweep=sweep_name, slots=slots, on_tick=tick)
        except KeyboardInterrupt:
            err.print(
                "Interrupted: running jobs are marked interrupted with their last checkpoint; "
                "run the same command again to resume them."
            )
            raise typer.Exit(130) from None
        finally:
            if plain is None:
                live.update(jobs_table(s, sweep_name))
    if plain is not None:
        console.print(jobs_table(s, sweep_name))


def queue_line(rows: list[dict[str, Any]]) -> str:
    """The queue in one line: jobs per status, and where each running job is."""
    parts = []
    for status, n in Counter(r["status"] for r in rows).items():
        running = [_where(r) for r in rows if r["status"] == status == "running"]
        parts.append(f"{n} {status}" + (f" ({'; '.join(running)})" if running else ""))
    return f"jobs: {', '.join(parts) or 'none'}"


def _where(row: dict[str, Any]) -> str:
    """A running job's place: 'job 3 step 40/100 loss 1.2345', 'job 4 eval boolq 3/16'."""
    cell = _progress_cell(row) or "starting"
    loss = (row.get("progress") or {}).get("loss")
    step = "step " if cell[:1].isdigit() else ""
    return f"job {row['id']} {step}{cell}" + (f" loss {loss:.4f}" if loss is not None else "")


def _print_outcome(db: str | None, plan: Any) -> None:
    """How each of the plan's jobs stands, by its spec hash (whichever run holds it)."""
    from moebench.store import jobs as q

    s = open_existing(db)
    have = q.find_jobs(s, [j.spec.hash for j in plan.jobs])
    rows = q.list_jobs(s, ids=[r["id"] for r in have.values()])
    unfinished = [r for r in rows if r["status"] != "done"]
    console.print(f"sweep {plan.name}: {len(rows) - len(unfinished)} of {len(plan.jobs)} jobs done")
    for r in unfinished:
        err.print(f"job {r['id']} {r['status']}: {escape(r['status_reason'] or '')}")
    if unfinished:
        raise typer.Exit(1)


@app.command()
def worker(
    db: DbOpt = None,
    sweep_name: Annotated[
        str | None, typer.Option("--sweep", help="Only this sweep's jobs [default: any job].")
    ] = None,
    workers: WorkersOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library details.")] = False,
) -> None:
    """Join a queue (from another shell or machine) and work it until it is empty."""
    _setup_logging(verbose)
    _work(db, sweep_name, _slots(workers))


# --- jobs ------------------------------------------------------------------------------------


def _eta(row: dict[str, Any], now: datetime) -> str:
    p = row.get("progress") or {}
    step, total, started = p.get("step"), p.get("total_steps"), row.get("started_at")
    if row["status"] != "running" or not step or not total or started is None:
        return ""
    done = step - (row.get("resumed_from_step") or 0)
    if done <= 0:
        return ""
    left = (now - started).total_seconds() / done * (total - step)
    return f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"


def _progress_cell(row: dict[str, Any]) -> str:
    p = row.get("progress") or {}
    stage = p.get("stage", "")
    if stage.startswith("eval") and row["status"] == "running":
        return f"{stage} {p.get('done', 0)}/{p.get('items', '?')}"
    if "step" in p:
        return f"{p['step']}/{p.get('total_steps', '?')}"
    return ""


def jobs_table(s: Any, sweep_name: str | None, status: str | None = None) -> Table:
    """The live view: one row per job, with step, loss, ETA and why it stopped."""
    from moebench.store import jobs as q

    rows = q.list_jobs(s, sweep=sweep_name, status=status)
    now = q.store_now(s)
    title = f"jobs{f' of sweep {sweep_name}' if sweep_name else ''} in {s.display_url}"
    table = Table(title=title, title_justify="left")
    for col in ("job", "method", "model", "seed", "status", "step", "loss", "ETA", "tries", "note"):
        table.add_column(col)
    for r in rows:
        loss = (r.get("progress") or {}).get("loss")
        note = r["status_reason"] or ""
        if r["status"] == "running":
            alive = q.owner_alive(r["owner"], r["heartbeat_at"], now)
            note = r["owner"] if alive else "owner died: will be resumed"
        table.add_row(
            str(r["id"]),
            r["method"],
            r["model"],
            str(r["seed"]),
            r["status"],
            _progress_cell(r),
            f"{loss:.4f}" if loss is not None else "",
            _eta(r, now),
            str(r["attempts"]),
            escape(note[:70]),
        )
    return table


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    db: DbOpt = None,
    sweep_name: Annotated[str | None, typer.Option("--sweep", help="Only this sweep.")] = None,
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
) -> None:
    """List jobs (with no subcommand), or show, cancel or retry them."""
    if ctx.invoked_subcommand is not None:
        return
    from moebench.store import RUN_STATUSES

    if status is not None and status not in RUN_STATUSES:
        raise ConfigError(f"--status {status!r} is not one of {', '.join(RUN_STATUSES)}.")
    s = open_existing(db)
    table = jobs_table(s, sweep_name, status)
    if not table.row_count:
        what = f" of sweep {sweep_name}" if sweep_name else ""
        console.print(
            f"The store {s.display_url} holds no jobs{what}{f' {status}' if status else ''}."
        )
        return
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[int, typer.Argument(help="Job (run) id.")],
    db: DbOpt = None,
    lines: Annotated[int, typer.Option(help="Log lines to show.")] = 20,
) -> None:
    """One job: status, owner, attempts, every failure with its reason, and its log's tail."""
    from moebench import store
    from moebench.worker import log_path

    s = open_existing(db)
    row = store.get_run(s, job_id)
    for key in (
        "status",
        "status_reason",
        "sweep",
        "owner",
        "heartbeat_at",
        "attempts",
        "last_step",
    ):
        console.print(f"[bold]{key}[/]: {escape(str(row[key]))}")
    console.print(f"[bold]execution[/]: {escape(str(row['execution']))}")
    for f in row["failures"] or []:
        console.print(
            f"  attempt {f['attempt']} {escape('[' + f['kind'] + ']')} at step {f['step']}: "
            + escape(f["reason"])
        )
    path = log_path(row)
    if path.is_file():
        tail = path.read_text(errors="replace").splitlines()[-max(lines, 0) :]
        console.print(f"[bold]log[/] {path}:")
        for line in tail:
            console.print(escape(line), highlight=False)
    else:
        console.print(
            f"[dim]no log at {path} (a job run by `moebench run` logs to its terminal)[/]"
        )


@jobs_app.command("cancel")
def jobs_cancel(
    job_ids: Annotated[list[int], typer.Argument(help="Job ids.")], db: DbOpt = None
) -> None:
    """Cancel unfinished jobs; a running one stops at its next heartbeat."""
    from moebench.store import jobs as q

    s = open_existing(db)
    for job_id in job_ids:
        was = q.cancel(s, job_id)
        console.print(f"job {job_id} cancelled (was {was})")


@jobs_app.command("retry")
def jobs_retry(
    job_ids: Annotated[list[int], typer.Argument(help="Job ids.")], db: DbOpt = None
) -> None:
    """Queue failed, interrupted or cancelled jobs again; they resume from their checkpoints."""
    from moebench.store import jobs as q

    s = open_existing(db)
    for job_id in job_ids:
        q.requeue(s, job_id, "queued again by `moebench jobs retry`")
        console.print(f"job {job_id} queued again")
