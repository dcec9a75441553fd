"""Opening the results store for reading only: the leaderboard's way in.

A viewer must never change a result, so this open neither creates nor migrates anything: SQLite
is opened with the `mode=ro` URI (the file itself refuses writes) plus `PRAGMA query_only`, and
PostgreSQL sessions start with `default_transaction_read_only=on`, so every transaction is a
read-only one. A database that is missing, empty, corrupt, or at another schema revision is
refused with a `StoreUnavailable` naming what happened and what to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, OperationalError

from moebench.errors import MoebenchError
from moebench.store.db import Store, alembic_config, display_url, resolve_db_url


class StoreUnavailable(MoebenchError):
    """The store cannot be read; `kind` is missing, empty, corrupt, newer, older or unreachable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _query_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA query_only=ON")
    finally:
        cursor.close()


def _sqlite_engine(url: str) -> Engine:
    """An engine on the file of `url` opened with `mode=ro`; a missing file is refused."""
    database = make_url(url).database or ""
    if not database or database == ":memory:":
        raise StoreUnavailable("missing", f"{url} is not a database file; pass --db FILE.")
    path = Path(database).expanduser().resolve()
    if not path.is_file():
        raise StoreUnavailable(
            "missing",
            f"There is no results database at {path}; run `moebench run ...` or "
            "`moebench sweep FILE` to make one, or pass --db with the file to read.",
        )
    engine = create_engine(f"sqlite:///file:{path.as_posix()}?mode=ro&uri=true")
    event.listen(engine, "connect", _query_only)
    return engine


def _postgres_engine(url: str) -> Engine:
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"options": "-c default_transaction_read_only=on"},
    )


def _check_revision(engine: Engine, url: str) -> None:
    """Refuse a database whose schema is not the head this moebench reads."""
    script = ScriptDirectory.from_config(alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    heads = set(script.get_heads())
    shown = display_url(url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except (DatabaseError, OperationalError) as e:
        kind = "corrupt" if "not a database" in str(e) or "malformed" in str(e) else "unreachable"
        what = "is not a readable SQLite database" if kind == "corrupt" else "cannot be opened"
        raise StoreUnavailable(
            kind,
            f"The results database {shown} {what} ({str(e.orig or e).strip()}); restore it "
            "from a copy or point --db at another store.",
        ) from e
    if not current:
        raise StoreUnavailable(
            "empty",
            f"The results database {shown} holds no moebench tables yet; run "
            "`moebench run ...` or `moebench sweep FILE` to record runs in it.",
        )
    if current - known:
        raise StoreUnavailable(
            "newer",
            f"The results database {shown} was written by a newer moebench (revision "
            f"{', '.join(sorted(current - known))}); upgrade moebench to read it.",
        )
    if current != heads:
        raise StoreUnavailable(
            "older",
            f"The results database {shown} is at schema revision {', '.join(sorted(current))}, "
            f"older than {', '.join(sorted(heads))}; run `moebench runs list --db {shown}` once "
            "(any writing command migrates it), then reopen the leaderboard.",
        )


def open_store_readonly(url: str | None = None) -> Store:
    """Open an existing store at the current schema so that nothing can be written through it."""
    resolved = resolve_db_url(url)
    backend = make_url(resolved).get_backend_name()
    engine = _sqlite_engine(resolved) if backend == "sqlite" else _postgres_engine(resolved)
    try:
        _check_revision(engine, resolved)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine, resolved)
