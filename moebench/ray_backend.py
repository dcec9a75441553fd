"""`moebench sweep --backend ray`: a sweep's jobs as Ray tasks, the store's queue still in charge.

Ray only places work: each job becomes one task that asks for the job's GPUs (`num_gpus`), and
Ray runs it again elsewhere when the process holding it is lost (`max_retries`). What a task
does is what a local worker does: it starts `python -m moebench.worker --run-id N` (the same
claim, heartbeat, run and retry path), which claims that job in the store and resumes it from its
last checkpoint. So the store decides who works a job, never Ray: a job that a local worker (or
another sweep) is running is waited on, not run twice, and a sweep begun with one backend can
be resumed with the other.

Every path a task sees must be valid on every machine: the store URL (PostgreSQL, or a SQLite
file by absolute path on a shared disk) and the output root, which `runner.submit` stores as an
absolute path. docs/cluster.md walks through a cluster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from moebench.errors import ConfigError, MoebenchError
from moebench.store import jobs as q
from moebench.worker import EXIT_NOTHING

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "--backend ray needs Ray, which is not installed here; install it with "
    "`pip install 'moebench[ray]'` (on every machine of the cluster)."
)
BUSY_POLL_S = 2.0  # how often a task looks again at a job that another live process holds
MAX_WORKER_ERRORS = 3  # worker processes in a row that fail on their own before a task gives up
FINAL = ("done", "failed", "cancelled")
UNFINISHED = ("queued", "running", "interrupted")


class RayStartError(MoebenchError):
    """Ray did not start (a local instance) or could not be reached (a cluster's address)."""


class RayTaskError(MoebenchError):
    """A task's worker processes keep failing on their own (not their job)."""


def require_ray() -> Any:
    """The `ray` module, or one sentence saying how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(INSTALL_HINT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray


def shared_db_url(url: str) -> str:
    """The store URL as every machine must read it: a SQLite file by its absolute path.

    A relative SQLite path would be read from each Ray worker's own working directory.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    path = Path(parsed.database).expanduser().resolve()
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def job_state(store: Any, run_id: int) -> str:
    """What a task should do with its job: `claimable`, `busy` (a live process holds it), or
    the status it ended in (done, failed, cancelled; `interrupted` for a plain run's job)."""
    from moebench import store as db

    row = db.get_run(store, run_id)
    status = row["status"]
    if status in FINAL or (status == "interrupted" and row["sweep"] is None):
        return status
    if status == "running" and q.owner_alive(row["owner"], row["heartbeat_at"], q.store_now(store)):
        return "busy"
    return "claimable"


def work_job(db_url: str, run_id: int) -> str:
    """The body of one job's Ray task: work the job through worker processes until it ends.

    Each process claims the job (`moebench.worker --run-id`) and dies with this one
    (PR_SET_PDEATHSIG), so a lost Ray worker leaves a dead owner in the store, which the retried
    task's claim takes over from the last checkpoint. A failure the job's `retries` allow is
    re-queued by the worker, and worked again here. Returns the job's final status.
    """
    from moebench import store as db

    store = db.open_store(db_url)
    errors = 0
    while True:
        state = job_state(store, run_id)
        if state == "busy":
            time.sleep(BUSY_POLL_S)
            continue
        if state != "claimable":
            return state
        cmd = [sys.executable, "-m", "moebench.worker", "--db", db_url, "--run-id", str(run_id)]
        cmd += ["--parent", str(os.getpid())]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode == 130:
            return "interrupted"
        # A signal (negative code) killed the process, not a fault of its own: the job's next
        # claim notes the death. A positive code other than "nothing to claim" is the worker
        # failing by itself (an import error, say), which would only repeat.
        errors = errors + 1 if done.returncode > 0 and done.returncode != EXIT_NOTHING else 0
        if errors >= MAX_WORKER_ERRORS:
            raise RayTaskError(
                f"{errors} worker processes for job {run_id} in a row failed before working it; "
                f"the last said: {done.stderr.strip()[-500:] or 'nothing'}"
            )


def gpus_for(row: dict[str, Any], cluster_gpus: float) -> float:
    """A job's GPU request: its `gpus` setting, else one GPU where the cluster has any."""
    asked = (row.get("execution") or {}).get("gpus")
    if asked:
        if float(asked) > cluster_gpus:
            raise ConfigError(
                f"Job {row['id']} asks for gpus: {asked}, but the Ray cluster has "
                f"{cluster_gpus:g} GPUs; start it on machines with enough, or lower `gpus`."
            )
        return float(asked)
    return 1.0 if cluster_gpus >= 1 else 0.0


def work_sweep(
    db_url: str,
    sweep: str,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    on_tick: Callable[[], None] = lambda: None,
    tick_s: float = 1.0,
) -> dict[int, str]:
    """Run every unfinished job of `sweep` as a Ray task; each job's final status by id.

    With no `address` (and no RAY_ADDRESS) Ray starts a local instance for the sweep (with
    `num_cpus` job slots when given) and stops it after; with one, the tasks go to that cluster.
    """
    ray = require_ray()
    from moebench import store as db

    url = shared_db_url(db_url)
    store = db.open_store(url)
    rows = [r for r in q.list_jobs(store, sweep=sweep) if r["status"] in UNFINISHED]
    if not rows:
        return {}
    ours = not ray.is_initialized()
    if ours:
        local = address is None and not os.environ.get("RAY_ADDRESS")
        # A local instance is this machine's only, on the loopback address, with no dashboard.
        extra = {"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1"} if local else {}
        try:
            ray.init(
                address=address,
                include_dashboard=False if local else None,
                configure_logging=False,
                log_to_driver=False,
                **extra,
            )
        except Exception as e:  # Ray raises a bare Exception (and others) when it fails to start
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
            raise RayStartError(
                f"Ray could not start or reach {where} ({first}); the jobs stay queued in the "
                "store and run when the same command succeeds (with either backend)."
            ) from None
    try:
        return _run_tasks(ray, url, rows, on_tick, tick_s)
    finally:
        if ours:
            ray.shutdown()


def _run_tasks(
    ray: Any, url: str, rows: list[dict[str, Any]], on_tick: Callable[[], None], tick_s: float
) -> dict[int, str]:
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    task = ray.remote(work_job)
    refs = {}
    for row in rows:
        opts = {"num_gpus": gpus_for(row, cluster_gpus), "max_retries": q.MAX_DEATHS}
        opts["name"] = f"moebench-job-{row['id']}"
        refs[task.options(**opts).remote(url, row["id"])] = row["id"]
    ended: dict[int, str] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=tick_s)
        for ref in ready:
            try:
                ended[refs[ref]] = ray.get(ref)
            except Exception as e:  # Ray's own errors: the job's row says how it stands
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                log.warning("the Ray task of job %d ended in an error: %s", refs[ref], reason)
                ended[refs[ref]] = "error"
        on_tick()
    return ended
