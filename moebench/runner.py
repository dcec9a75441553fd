"""One job, end to end, in stages: open (or resume), build the adapted model, train, score, finish.

A job is a run row from before the first weight loads until it ends. `submit` queues one (spec
stored, nothing loaded); a process `claim`s it (moebench.store.jobs) and `run_claimed` works it
while a heartbeat shows the process is alive. A failure or a signal at any point is recorded
(failed/interrupted, with the reason and the last checkpoint), and everything computed before it
(training log, checkpoints, each set's scores) is already stored. `execute` (moebench run) is
submit, claim and run in one process; a sweep's workers call `run_claimed` on what they claim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moebench import store as db
from moebench.distributed import check_gpus
from moebench.errors import ConfigError, MoebenchError
from moebench.liveness import Heartbeat, JobLost, signals_interrupt
from moebench.provenance import git_sha, package_versions
from moebench.rundata import PreparedData, prepare_data
from moebench.runspec import RunSpec
from moebench.stages import (
    DEFAULT_OUTPUT_ROOT,
    Job,
    Observer,
    RunEnv,
    SilentObserver,
    build_stage,
    changed_settings,
    end,
    finish,
    load_data,
    not_opened,
    open_job,
    score_stage,
    spec_of,
    train_stage,
)
from moebench.store import jobs as q
from moebench.suites import ResolvedSuite

__all__ = [
    "Observer",
    "RunEnv",
    "SilentObserver",
    "changed_settings",
    "execute",
    "prepare_data",
    "resume",
    "run_claimed",
    "spec_of",
    "submit",
]


def submit(
    store: db.Store,
    spec: RunSpec,
    env: RunEnv,
    *,
    budget: dict[str, Any] | None = None,
    sweep: str | None = None,
    execution: dict[str, Any] | None = None,
    owner: str | None = None,
) -> int:
    """Queue a job: its spec and how to execute it are stored, nothing is loaded. With `owner`
    the job is stored already running under it (see `jobs.enqueue`)."""
    root = Path(env.output_dir) if env.output_dir else DEFAULT_OUTPUT_ROOT
    run_id = q.enqueue(
        store,
        method=spec.method,
        model=spec.model,
        suite=spec.suite,
        config=spec.to_dict(),
        config_hash=spec.hash,
        seed=spec.seed,
        execution={
            "output_root": str(root.expanduser().resolve()),
            # absolute, like the output root: a worker elsewhere (a Ray task) has another cwd
            "data_dir": str(Path(env.data_dir).expanduser().resolve()) if env.data_dir else None,
            **(execution or {}),
        },
        sweep=sweep,
        versions=package_versions(),
        git_sha=git_sha(),
        owner=owner,
    )
    if budget is not None:
        db.put_artifact(store, run_id, "budget", budget)
    return run_id


def execute(
    spec: RunSpec,
    env: RunEnv,
    observer: Observer | None = None,
    *,
    budget: dict[str, Any] | None = None,
    on_new_store: Callable[[str], None] | None = None,
    gpus: int = 1,
) -> int:
    """Run one job now, in this process (`moebench run`): validate, store it as running under
    this process (so no worker can take it), run it. `on_new_store` hears the store's URL if
    this call had to create it (a misspelt --db shows at once); with `gpus` > 1 its training
    runs on that many data-parallel ranks (moebench.distributed), an execution setting like the
    retries."""
    # Everything that can be wrong with the inputs is checked before anything is stored.
    check_gpus(gpus, spec.train.batch_size, spec.train.micro_batch_size)
    suite, data = load_data(spec, env.data_dir)
    store = db.open_store(env.db)
    if store.created and on_new_store is not None:
        on_new_store(store.display_url)
    owner = q.new_owner()
    execution = {"gpus": gpus} if gpus > 1 else None
    run_id = submit(store, spec, env, budget=budget, owner=owner, execution=execution)
    row = {**db.get_run(store, run_id), "claimed_from": "queued"}
    return run_claimed(store, row, owner, env, observer, loaded=(suite, data))


def resume(
    run_id: int, env: RunEnv, observer: Observer | None = None, *, gpus: int | None = None
) -> int:
    """Continue a stopped run from its last usable checkpoint under its stored spec; `gpus`
    (an execution setting) changes how many data-parallel ranks it continues on."""
    store = db.open_existing_store(env.db)
    row = db.get_run(store, run_id)
    if row["status"] == "done":
        raise ConfigError(f"Run {run_id} is already done; nothing to resume.")
    owner = q.new_owner()
    claimed = q.claim(store, owner, run_id=run_id, any_unfinished=True)
    if claimed is None:
        held = db.get_run(store, run_id)
        if held["owner"] is None:  # it ended between the look and the claim
            raise ConfigError(
                f"Run {run_id} is {held['status']} ({held['status_reason'] or 'no reason'}); "
                "nothing to resume."
            )
        raise ConfigError(
            f"Run {run_id} is being run right now by process {held['owner']} (last heartbeat "
            f"{held['heartbeat_at']:%H:%M:%S} UTC); stop it first, or wait for it to end."
        )
    if gpus is not None:
        try:
            spec = spec_of(claimed)
            check_gpus(gpus, spec.train.batch_size, spec.train.micro_batch_size)
        except BaseException:
            q.release(store, run_id, owner, claimed["claimed_from"], claimed["status_reason"])
            raise
        claimed["execution"] = {**(claimed.get("execution") or {}), "gpus": gpus}
        q.set_execution(store, run_id, claimed["execution"])
    return run_claimed(store, claimed, owner, env, observer, restore=True)


def run_claimed(
    store: db.Store,
    row: dict[str, Any],
    owner: str,
    env: RunEnv,
    observer: Observer | None = None,
    *,
    loaded: tuple[ResolvedSuite, PreparedData] | None = None,
    restore: bool = False,
) -> int:
    """Work a job this process has claimed to its end; the store records how it ended.

    `restore` (an explicit resume): if the job cannot even be opened (the wrong data folder, a
    default changed since), it goes back to the status it was claimed in, instead of failing.
    """
    observer = observer or SilentObserver()
    run_id = row["id"]
    with signals_interrupt(), Heartbeat(store, run_id, owner, row["wall_time_s"] or 0.0) as beat:
        job: Job | None = None
        try:
            job = open_job(store, row, env, loaded)
        except BaseException as e:
            not_opened(store, row, owner, e, restore)
            raise
        try:
            built = build_stage(store, job)
            beat.check()
            train_stage(store, job, built, observer, beat)
            beat.check()
            score_stage(store, job, built, observer, beat)
            finish(store, job, built, beat, owner)
            return run_id
        except JobLost:
            raise
        except KeyboardInterrupt:
            end(store, job, beat, owner, "interrupted", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except torch.OutOfMemoryError as e:
            end(store, job, beat, owner, "failed", f"out of memory: {e}", kind="oom")
            raise
        except MoebenchError as e:
            end(store, job, beat, owner, "failed", str(e))
            raise
        except BaseException as e:
            end(store, job, beat, owner, "failed", f"{type(e).__name__}: {e}")
            raise
