"""The queue: runs as jobs that processes claim, keep alive and hand back.

A job is a run row. `enqueue` stores its spec with status `queued` and loads nothing. A worker
process `claim`s one: a compare-and-set UPDATE (`WHERE id = ? AND status = ?`) that exactly one
claimant can win on SQLite and PostgreSQL alike, without locks held across statements. While it
works, the owner beats a heartbeat; a `running` job whose owner stopped beating (or, on this
host, whose process no longer exists) is dead, and the next claim takes it over and resumes it
from its last checkpoint. Owners are `host:pid:token` strings, so a human can read who holds what.

Every time the queue writes or compares (heartbeats, claims, liveness) is the database's own
clock (`store_now`), not the caller's: on PostgreSQL shared by many machines, a worker whose
clock runs a minute behind would otherwise look dead to the others, and its job run twice.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from moebench.errors import ConfigError
from moebench.store.db import Store
from moebench.store.queries import RUNS, _coerce, _require_run, _select_dicts
from moebench.store.tables import utcnow

HEARTBEAT_EVERY_S = 5.0
# A heartbeat older than this marks its owner dead (several beats missed, with room for a slow
# store or a long synchronous checkpoint write).
STALE_AFTER_S = 60.0
# A job whose process died this many times is failed instead of re-queued: something kills it
# every time (the kernel's OOM killer, a segfault), and retrying forever would hide that.
MAX_DEATHS = 10
ACTIVE = ("queued", "running")


def store_now(store: Store) -> datetime:
    """The current time by the store's clock: PostgreSQL's `now()`, or this host's clock for a
    SQLite file (whose every writer, if it is on a shared disk, reads its own host's clock: that
    case is as good as the hosts' clock sync)."""
    if store.engine.dialect.name != "postgresql":
        return utcnow()
    with store.session() as session:
        now = session.execute(select(func.now())).scalar_one()
    return now if now.tzinfo else now.replace(tzinfo=UTC)


class AlreadyQueued(ConfigError):
    """Another submission of the same sweep queued this spec first (two machines at once)."""


def machine_key() -> str:
    """This host, as a pid check needs it: the host name, plus the boot and the pid namespace.

    Two containers (or two hosts both called `localhost`) share a name but not their pids: only
    where the key matches does a missing pid prove its owner dead.
    """
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def new_owner() -> str:
    """This process's owner id, `host:pid:token`: readable host (with the machine key) and pid,
    plus a token no other process shares."""
    return f"{machine_key()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str | None, heartbeat_at: datetime | None, now: datetime) -> bool:
    """Whether the process holding a job is still there.

    On this host the pid answers at once (a SIGKILLed worker is seen dead immediately); on
    another host only the heartbeat can tell.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == machine_key() and pid_text.isdigit() and not _pid_exists(int(pid_text)):
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
    owner: str | None = None,
) -> int:
    """Store a job, in one INSERT: its spec and how to execute it, no weights loaded.

    It is `queued`, or with `owner` already `running` under that owner (`moebench run` works its
    own job at once, and no worker may take it in between).
    """
    now = store_now(store)
    values = {
        "method": method,
        "model": model,
        "suite": suite,
        "config": config,
        "config_hash": config_hash,
        "seed": seed,
        "versions": versions or {},
        "git_sha": git_sha,
        "hardware": {},
        "status": "running" if owner else "queued",
        "execution": execution or {},
        "sweep": sweep,
        "attempts": 1 if owner else 0,
        "owner": owner,
        "heartbeat_at": now if owner else None,
        "started_at": now if owner else None,
    }
    values = {k: _coerce(RUNS, k, v) for k, v in values.items()}
    try:
        with store.session() as session:
            return int(session.execute(insert(RUNS).values(**values)).inserted_primary_key[0])
    except IntegrityError:
        if sweep is None:
            raise
        raise AlreadyQueued(
            f"Sweep {sweep!r} already holds a job of spec {config_hash[:12]}."
        ) from None


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
    matches, zero rows change, and the next candidate is tried. The row comes back as it is
    after the claim, with `claimed_from`: the status it was taken in.
    """
    now = store_now(store)
    with store.session() as session:
        candidates = session.execute(_claimable(sweep, run_id, any_unfinished)).all()
    for cid, status, old_owner, beat in candidates:
        # A live owner keeps its job whatever the status says (a cancelled one still running
        # until its next heartbeat, say): two processes never work one job.
        if owner_alive(old_owner, beat, now):
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
                row = _select_dicts(session, select(RUNS).where(RUNS.c.id == cid))[0]
            return {**row, "claimed_from": status}
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
    now = store_now(store)
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
    values: dict[str, Any] = {"heartbeat_at": store_now(store)}
    values.update({k: _coerce(RUNS, k, v) for k, v in fields.items()})
    with store.session() as session:
        stmt = update(RUNS).where(
            RUNS.c.id == run_id, RUNS.c.owner == owner, RUNS.c.status == "running"
        )
        return session.execute(stmt.values(**values)).rowcount == 1


def release(store: Store, run_id: int, owner: str, status: str, reason: str | None) -> bool:
    """End the owner's hold: set the final (or re-queued) status; False if it no longer holds
    the job (taken over, or cancelled: a cancel is never overwritten by the ending it caused)."""
    _coerce(RUNS, "status", status)
    values: dict[str, Any] = {"status": status, "status_reason": reason, "owner": None}
    if status in ("done", "failed", "cancelled"):
        values["finished_at"] = store_now(store)
    with store.session() as session:
        stmt = update(RUNS).where(
            RUNS.c.id == run_id, RUNS.c.owner == owner, RUNS.c.status == "running"
        )
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
                "at": store_now(store).isoformat(timespec="seconds"),
            }
        )
        session.execute(update(RUNS).where(RUNS.c.id == run_id).values(failures=failures))
    return failures


def set_execution(store: Store, run_id: int, execution: dict[str, Any]) -> None:
    with store.session() as session:
        session.execute(update(RUNS).where(RUNS.c.id == run_id).values(execution=execution))


def _seen(session: Any, store: Store, run_id: int) -> Any:
    _require_run(session, store, run_id)
    cols = (RUNS.c.status, RUNS.c.owner, RUNS.c.heartbeat_at)
    return session.execute(select(*cols).where(RUNS.c.id == run_id)).one()


def _changed(session: Any, run_id: int, seen: Any, **values: Any) -> bool:
    """Compare-and-set: apply `values` only if the row still has the status and owner seen."""
    owner = RUNS.c.owner == seen.owner if seen.owner is not None else RUNS.c.owner.is_(None)
    stmt = update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == seen.status, owner)
    return session.execute(stmt.values(**values)).rowcount == 1


def requeue(store: Store, run_id: int, reason: str) -> None:
    """Put a stopped job back in the queue (retry); refused while a live process holds it."""
    with store.session() as session:
        seen = _seen(session, store, run_id)
        if owner_alive(seen.owner, seen.heartbeat_at, store_now(store)):
            raise ConfigError(
                f"Run {run_id} is still held by process {seen.owner}; wait for it to stop."
            )
        if seen.status == "done":
            raise ConfigError(f"Run {run_id} is done; `moebench run --rerun {run_id}` repeats it.")
        values = {"status": "queued", "status_reason": reason, "owner": None, "finished_at": None}
        if not _changed(session, run_id, seen, **values):
            raise ConfigError(f"Run {run_id} changed while it was being queued again; try again.")


def cancel(store: Store, run_id: int) -> str:
    """Cancel an unfinished job. A running owner stays recorded (so nobody re-queues the job
    under it) and stops at its next heartbeat, writing nothing more."""
    with store.session() as session:
        seen = _seen(session, store, run_id)
        if seen.status not in (*ACTIVE, "interrupted", "failed"):
            raise ConfigError(
                f"Run {run_id} is {seen.status}; only an unfinished job can be cancelled."
            )
        values = {
            "status": "cancelled",
            "status_reason": f"cancelled by a user (was {seen.status})",
            "finished_at": store_now(store),
        }
        if not _changed(session, run_id, seen, **values):
            raise ConfigError(f"Run {run_id} changed while it was being cancelled; try again.")
    return str(seen.status)


def adopt(store: Store, run_id: int, sweep: str) -> bool:
    """Make a run with a sweep's spec hash one of the sweep's jobs (a plain `moebench run`, or
    another sweep's), so the sweep works it and counts it; False if a live process holds it or
    the sweep already has a job of that spec."""
    try:
        with store.session() as session:
            seen = _seen(session, store, run_id)
            if owner_alive(seen.owner, seen.heartbeat_at, store_now(store)):
                return False
            return _changed(session, run_id, seen, sweep=sweep)
    except IntegrityError:
        return False


def find_jobs(store: Store, config_hashes: list[str]) -> dict[str, dict[str, Any]]:
    """Per spec hash, the run that stands for it: a done one if any, else the newest."""
    out: dict[str, dict[str, Any]] = {}
    if not config_hashes:
        return out
    stmt = (
        select(RUNS.c.id, RUNS.c.config_hash, RUNS.c.status, RUNS.c.sweep)
        .where(RUNS.c.config_hash.in_(config_hashes))
        .order_by(RUNS.c.id)
    )
    with store.session() as session:
        for row in session.execute(stmt).mappings():
            if out.get(row["config_hash"], {}).get("status") != "done":
                out[row["config_hash"]] = dict(row)
    return out


def list_jobs(
    store: Store,
    *,
    sweep: str | None = None,
    status: str | None = None,
    ids: list[int] | None = None,
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
        RUNS.c.resumed_from_step,
        RUNS.c.created_at,
    ]
    stmt = select(*cols).order_by(RUNS.c.id)
    if sweep is not None:
        stmt = stmt.where(RUNS.c.sweep == sweep)
    if status is not None:
        stmt = stmt.where(RUNS.c.status == status)
    if ids is not None:
        stmt = stmt.where(RUNS.c.id.in_(ids))
    with store.session() as session:
        return _select_dicts(session, stmt)
