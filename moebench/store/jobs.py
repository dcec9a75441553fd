"""The queue: runs as jobs that processes claim, keep alive and hand back.

A job is a run row. `enqueue` stores its spec with status `queued` and loads nothing. A worker
process `claim`s one: a compare-and-set UPDATE (`WHERE id = ? AND status = ?`) that exactly one
claimant can win on SQLite and PostgreSQL alike, without locks held across statements. While it
works, the owner beats a heartbeat; a `running` job whose owner stopped beating (or, on this
host, whose process no longer exists) is dead, and the next claim takes it over and resumes it
from its last checkpoint. Owners are `host:pid:token` strings, so a human can read who holds what.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from moebench.errors import ConfigError
from moebench.store.db import Store
from moebench.store.queries import RUNS, _coerce, _require_run, _select_dicts, create_run
from moebench.store.tables import utcnow

HEARTBEAT_EVERY_S = 5.0
# A heartbeat older than this marks its owner dead (several beats missed, with room for a slow
# store or a long synchronous checkpoint write).
STALE_AFTER_S = 60.0
# A job whose process died this many times is failed instead of re-queued: something kills it
# every time (the kernel's OOM killer, a segfault), and retrying forever would hide that.
MAX_DEATHS = 10
ACTIVE = ("queued", "running")


def new_owner() -> str:
    """This process's owner id: readable host and pid, plus a token no other process shares."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str | None, heartbeat_at: datetime | None, now: datetime) -> bool:
    """Whether the process holding a job is still there.

    On this host the pid answers at once (a SIGKILLed worker is seen dead immediately); on
    another host only the heartbeat can tell.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit() and not _pid_exists(int(pid_text)):
        return False
    if heartbeat_at is None:
        return False
    return now - heartbeat_at < timedelta(seconds=STALE_AFTER_S)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) still answers kill(0) but does no work.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def enqueue(
    store: Store,
    *,
    method: str,
    model: str,
    suite: str,
    config: dict[str, Any],
    config_hash: str,
    seed: int,
    execution: dict[str, Any] | None = None,
    sweep: str | None = None,
    versions: dict[str, Any] | None = None,
    git_sha: str | None = None,
) -> int:
    """Store a job as `queued`: its spec and how to execute it, no weights loaded."""
    run_id = create_run(
        store,
        method=method,
        model=model,
        suite=suite,
        config=config,
        config_hash=config_hash,
        seed=seed,
        versions=versions or {},
        git_sha=git_sha,
        hardware={},
        output_dir=None,
        status="queued",
    )
    with store.session() as session:
        session.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id)
            .values(execution=execution or {}, sweep=sweep, attempts=0)
        )
    return run_id


def _claimable(sweep: str | None, run_id: int | None, any_unfinished: bool) -> Any:
    """Candidates: queued jobs, running ones (kept only if their owner is dead, which is decided
    per row), and a sweep's jobs that a Ctrl-C or SIGTERM interrupted. A plain `moebench run`
    that was interrupted is not taken: its user stopped it and resumes it by hand."""
    cond = or_(
        RUNS.c.status.in_(ACTIVE),
        and_(RUNS.c.status == "interrupted", RUNS.c.sweep.is_not(None)),
    )
    if any_unfinished:  # `moebench run --resume ID`: the user asks for this one, whatever ended it
        cond = RUNS.c.status != "done"
    stmt = select(RUNS.c.id, RUNS.c.status, RUNS.c.owner, RUNS.c.heartbeat_at).where(cond)
    if sweep is not None:
        stmt = stmt.where(RUNS.c.sweep == sweep)
    if run_id is not None:
        stmt = stmt.where(RUNS.c.id == run_id)
    return stmt.order_by(RUNS.c.id)


def claim(
    store: Store,
    owner: str,
    *,
    sweep: str | None = None,
    run_id: int | None = None,
    any_unfinished: bool = False,
) -> dict[str, Any] | None:
    """Take the oldest queued job (or a dead owner's running one); None when there is none.

    `run_id` asks for that job only (with `any_unfinished`, whatever status other than done it
    is in: a resume). Each candidate is taken with an UPDATE conditioned on the
    status and owner it was seen with: if another claimant got there first, the row no longer
    matches, zero rows change, and the next candidate is tried.
    """
    now = utcnow()
    with store.session() as session:
        candidates = session.execute(_claimable(sweep, run_id, any_unfinished)).all()
    for cid, status, old_owner, beat in candidates:
        if status == "running" and owner_alive(old_owner, beat, now):
            continue
        match = [RUNS.c.id == cid, RUNS.c.status == status]
        match.append(RUNS.c.owner == old_owner if old_owner is not None else RUNS.c.owner.is_(None))
        values = {
            "status": "running",
            "owner": owner,
            "heartbeat_at": now,
            "started_at": now,
            "attempts": RUNS.c.attempts + 1,
        }
        with store.session() as session:
            won = session.execute(update(RUNS).where(*match).values(**values)).rowcount == 1
        if won:
            if status == "running" and _note_death(store, cid, old_owner) >= MAX_DEATHS:
                release(store, cid, owner, "failed", f"its process died {MAX_DEATHS} times")
                continue
            with store.session() as session:
                return _select_dicts(session, select(RUNS).where(RUNS.c.id == cid))[0]
    return None


def _note_death(store: Store, run_id: int, old_owner: str | None) -> int:
    """Record that the previous owner died holding the job; how many times that has happened."""
    failures = add_failure(
        store,
        run_id,
        kind="died",
        reason=f"the process holding it ({old_owner or 'unknown'}) died without finishing",
    )
    return sum(f["kind"] == "died" for f in failures)


def count_claimable(store: Store, *, sweep: str | None = None) -> tuple[int, int]:
    """(jobs a claim would take now, jobs running under a live owner) in the queue or sweep."""
    now = utcnow()
    with store.session() as session:
        rows = session.execute(_claimable(sweep, None, False)).all()
    alive = sum(
        1
        for _, status, owner, beat in rows
        if status == "running" and owner_alive(owner, beat, now)
    )
    return len(rows) - alive, alive


def heartbeat(store: Store, run_id: int, owner: str, **fields: Any) -> bool:
    """Show the owner is alive (and set `fields`: wall time, progress).

    False when it no longer owns the job (another process took it over as dead, or a user
    cancelled it)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    values.update({k: _coerce(RUNS, k, v) for k, v in fields.items()})
    with store.session() as session:
        stmt = update(RUNS).where(
            RUNS.c.id == run_id, RUNS.c.owner == owner, RUNS.c.status == "running"
        )
        return session.execute(stmt.values(**values)).rowcount == 1


def release(store: Store, run_id: int, owner: str, status: str, reason: str | None) -> bool:
    """End the owner's hold: set the final (or re-queued) status; False if it was not the owner."""
    _coerce(RUNS, "status", status)
    values: dict[str, Any] = {"status": status, "status_reason": reason, "owner": None}
    if status in ("done", "failed", "cancelled"):
        values["finished_at"] = utcnow()
    with store.session() as session:
        stmt = update(RUNS).where(RUNS.c.id == run_id, RUNS.c.owner == owner)
        return session.execute(stmt.values(**values)).rowcount == 1


def add_failure(store: Store, run_id: int, *, kind: str, reason: str) -> list[dict[str, Any]]:
    """Append one attempt's failure (kind: error, died, oom, interrupted) and return them all."""
    with store.session() as session:
        _require_run(session, store, run_id)
        row = session.execute(
            select(RUNS.c.failures, RUNS.c.attempts, RUNS.c.last_step).where(RUNS.c.id == run_id)
        ).one()
        failures = list(row.failures or [])
        failures.append(
            {
                "attempt": row.attempts,
                "kind": kind,
                "reason": reason,
                "step": row.last_step,
                "at": utcnow().isoformat(timespec="seconds"),
            }
        )
        session.execute(update(RUNS).where(RUNS.c.id == run_id).values(failures=failures))
    return failures


def set_execution(store: Store, run_id: int, execution: dict[str, Any]) -> None:
    with store.session() as session:
        session.execute(update(RUNS).where(RUNS.c.id == run_id).values(execution=execution))


def requeue(store: Store, run_id: int, reason: str) -> None:
    """Put a stopped job back in the queue (retry); refused for a job someone is running."""
    with store.session() as session:
        _require_run(session, store, run_id)
        row = session.execute(
            select(RUNS.c.status, RUNS.c.owner, RUNS.c.heartbeat_at).where(RUNS.c.id == run_id)
        ).one()
        if row.status == "running" and owner_alive(row.owner, row.heartbeat_at, utcnow()):
            raise ConfigError(
                f"Run {run_id} is running under {row.owner}; stop that process first."
            )
        if row.status == "done":
            raise ConfigError(f"Run {run_id} is done; `moebench run --rerun {run_id}` repeats it.")
        session.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id)
            .values(status="queued", status_reason=reason, owner=None, finished_at=None)
        )


def cancel(store: Store, run_id: int) -> str:
    """Cancel a queued or running job; a running owner notices at its next heartbeat."""
    with store.session() as session:
        _require_run(session, store, run_id)
        status = session.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar_one()
        if status not in (*ACTIVE, "interrupted", "failed"):
            raise ConfigError(f"Run {run_id} is {status}; only an unfinished job can be cancelled.")
        session.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id)
            .values(
                status="cancelled",
                status_reason=f"cancelled by a user (was {status})",
                owner=None,
                finished_at=utcnow(),
            )
        )
    return status


def find_jobs(store: Store, config_hashes: list[str]) -> dict[str, dict[str, Any]]:
    """The newest run of each given spec hash (to queue a sweep's missing jobs only)."""
    out: dict[str, dict[str, Any]] = {}
    if not config_hashes:
        return out
    stmt = (
        select(RUNS.c.id, RUNS.c.config_hash, RUNS.c.status)
        .where(RUNS.c.config_hash.in_(config_hashes))
        .order_by(RUNS.c.id)
    )
    with store.session() as session:
        for row in session.execute(stmt).mappings():
            out[row["config_hash"]] = dict(row)
    return out


def list_jobs(
    store: Store, *, sweep: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """Jobs (runs) with their queue columns, oldest first, optionally of one sweep or status."""
    cols = [
        RUNS.c.id,
        RUNS.c.method,
        RUNS.c.model,
        RUNS.c.suite,
        RUNS.c.seed,
        RUNS.c.status,
        RUNS.c.status_reason,
        RUNS.c.sweep,
        RUNS.c.owner,
        RUNS.c.heartbeat_at,
        RUNS.c.started_at,
        RUNS.c.finished_at,
        RUNS.c.attempts,
        RUNS.c.failures,
        RUNS.c.last_step,
        RUNS.c.progress,
        RUNS.c.wall_time_s,
        RUNS.c.execution,
        RUNS.c.output_dir,
        RUNS.c.config,
        RUNS.c.created_at,
    ]
    stmt = select(*cols).order_by(RUNS.c.id)
    if sweep is not None:
        stmt = stmt.where(RUNS.c.sweep == sweep)
    if status is not None:
        stmt = stmt.where(RUNS.c.status == status)
    with store.session() as session:
        return _select_dicts(session, stmt)
