"""Opening the results store: URL resolution, engine setup and schema migration.

Every open brings the database to the newest schema this moebench knows, so results written by
an older release stay readable without a manual step, while a database from a newer release is
refused instead of being misread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from moebench.errors import MoebenchError, NotFoundError, StoreError

log = logging.getLogger(__name__)

DEFAULT_DB_URL = "sqlite:///results/moebench.db"
DB_ENV_VAR = "MOEBENCH_DB"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# alembic runs env.py through a process-global proxy, so two threads must not migrate at once.
_ALEMBIC_LOCK = threading.Lock()
# Arbitrary constant key of the PostgreSQL advisory lock taken while migrating.
_PG_MIGRATION_LOCK = 0x6D6F6562  # "moeb"


def resolve_db_url(url: str | None = None) -> str:
    """Pick the database: explicit argument, else $MOEBENCH_DB, else the default file.

    A bare filesystem path is accepted so users can pass `--db runs.db` without knowing URL
    syntax; it becomes a SQLite URL (relative paths stay relative to the working directory).
    """
    chosen = url or os.environ.get(DB_ENV_VAR) or DEFAULT_DB_URL
    if "://" in chosen:
        return chosen
    return "sqlite:///" + Path(chosen).expanduser().as_posix()


def display_url(url: str) -> str:
    """The URL with any password masked, fit for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic Config built in code, pointing at the migrations shipped in the package.

    Built here rather than read from an alembic.ini so it works the same from a source checkout
    and an installed wheel. With `connection`, migrations run over that connection.
    """
    cfg = Config()
    # ConfigParser interpolates '%', which may legitimately occur in an install path.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision this moebench knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations folder has no revisions"
    return head


class Store:
    """A handle on one results database: its engine and a transactional session factory."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.created = False  # set by open_store when that call made the database
        # Objects stay readable after commit: query functions return data built inside the
        # session, and expiring would turn each later attribute access into a query.
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def display_url(self) -> str:
        """The URL with any password masked."""
        return display_url(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: committed when the block succeeds, rolled back when it raises."""
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        """Release pooled connections (needed before deleting a SQLite file on Windows)."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.display_url!r})"


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (a dashboard, `moebench runs`) work while a trainer writes; foreign keys
    # are off by default in SQLite and the CASCADE deletes rely on them; busy_timeout makes a
    # second writer wait instead of failing at once with "database is locked".
    # busy_timeout goes first: switching to WAL needs a lock another opener may hold.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=5000")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch to WAL once per database file; the mode persists, so later opens only read it.

    Changing the journal mode takes an exclusive lock and SQLite does not always run the busy
    handler for it: parallel workers opening a fresh file can get "database is locked" at once.
    Hence the short, bounded retry.
    """
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.05 + 0.01 * attempt)


def create_store_engine(url: str) -> Engine:
    """An engine for `url`, with SQLite's parent folder created and its pragmas set."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine
    # A server that does not answer fails within seconds instead of libpq's default wait.
    libpq = parsed.get_driver_name() in ("psycopg", "psycopg2")
    timeout = libpq and "connect_timeout" not in parsed.query
    connect_args = {"connect_timeout": 10} if timeout else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _check_not_newer(current: set[str], script: ScriptDirectory, url: str) -> None:
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        raise MoebenchError(
            f"The results database {display_url(url)} was written by a newer moebench "
            f"(revision {', '.join(unknown)}); upgrade moebench to open it."
        )


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (upgrade or downgrade), refusing unknown revisions.

    SQLite foreign keys are switched off while migrating: batch operations copy and drop
    tables, and dropping `runs` with foreign keys on would cascade-delete every result.
    """
    url = engine.url.render_as_string(hide_password=False)
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
        _check_not_newer(current, script, url)
        target = set(script.get_heads()) if revision == "head" else {revision}
        conn.commit()
        if current == target:
            return
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            _lock_for_migration(conn)
            cfg.attributes["connection"] = conn
            log.info(
                "Migrating %s from %s to %s",
                display_url(url),
                ", ".join(sorted(current)) or "empty",
                revision,
            )
            with _ALEMBIC_LOCK:
                if _is_downgrade(script, current, revision):
                    command.downgrade(cfg, revision)
                else:
                    command.upgrade(cfg, revision)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def _lock_for_migration(conn: Connection) -> None:
    """Make concurrent openers of a new database (parallel sweep workers) take turns.

    The first migrates inside the lock; the others wait, and alembic, re-reading the revision
    inside their own lock, finds the schema at the target and does nothing. On SQLite the
    migration also becomes one atomic transaction, since SQLite DDL is transactional.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")


def _is_downgrade(script: ScriptDirectory, current: set[str], revision: str) -> bool:
    """True when `revision` is an ancestor of the database's current revision."""
    if revision == "head" or not current:
        return False
    return any(
        rev.revision == revision
        for head in current
        for rev in script.iterate_revisions(head, "base")
    )


def open_store(url: str | None = None) -> Store:
    """Open (creating if needed) the results database and migrate it to the current schema.

    For `run`, `sweep` and workers, which write: the store is checked to take a write, and
    `Store.created` says whether this call made it. Every failure is one `StoreError` naming
    the database and what to do (see `_translated`)."""
    resolved = resolve_db_url(url)
    with _translated(resolved):
        _refuse_folder(resolved)
        engine = create_store_engine(resolved)
        try:
            created = not _current_heads(engine)
            migrate(engine)
            _check_writable(engine)
        except BaseException:
            engine.dispose()
            raise
    opened = Store(engine, resolved)
    opened.created = created
    if created:
        log.info("created a new results store at %s", opened.display_url)
    return opened


def open_existing_store(url: str | None = None) -> Store:
    """Open a results database for a read command (`runs`, `export`, `compare`, `jobs`): one
    that does not exist, or holds no moebench tables, is refused, never created."""
    resolved = resolve_db_url(url)
    path = _sqlite_path(resolved)
    if path is not None and not path.exists():
        raise NotFoundError(
            f"There is no results database at '{path}'; `moebench run` or `moebench sweep` "
            "creates one (or pass --db the path of an existing one)."
        )
    empty = path is not None and path.is_file() and path.stat().st_size == 0
    with _translated(resolved):
        _refuse_folder(resolved)
        engine = create_store_engine(resolved)
        try:
            if empty or not _current_heads(engine):  # an empty file: not even opened
                raise NotFoundError(
                    f"The database {display_url(resolved)} holds no moebench results (no "
                    "moebench tables); `moebench run` or `moebench sweep` creates them, or pass "
                    "--db the store you meant."
                )
            migrate(engine)
        except BaseException:
            engine.dispose()
            raise
    return Store(engine, resolved)


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    return None if database.startswith("file:") else Path(database).expanduser()


def _refuse_folder(url: str) -> None:
    path = _sqlite_path(url)
    if path is not None and path.is_dir():
        raise StoreError(
            f"The results database path '{path}' is a folder, not a file; pass --db a file "
            f"path such as '{path / 'moebench.db'}'."
        )


def _current_heads(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def _check_writable(engine: Engine) -> None:
    """A write rolled back: a read-only file, folder or role fails here, before a run starts,
    rather than once it has trained."""
    with engine.connect() as conn, conn.begin() as tx:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
        tx.rollback()


@contextmanager
def _translated(url: str) -> Iterator[None]:
    """The one place a store failure becomes a sentence: the database, the cause, the fix."""
    shown = display_url(url)
    try:
        yield
    except MoebenchError:
        raise
    except (ModuleNotFoundError, NoSuchModuleError) as e:
        raise StoreError(_missing_driver(url, e)) from None
    except PermissionError as e:
        raise StoreError(
            f"The results database {shown} cannot be created: {e.strerror} at "
            f"'{e.filename}'; pass --db a path in a folder you can write to."
        ) from None
    except SQLAlchemyError as e:
        raise StoreError(_explain(url, e)) from None


def _missing_driver(url: str, e: Exception) -> str:
    shown = display_url(url)
    name = getattr(e, "name", None)
    if isinstance(e, NoSuchModuleError) or not name:
        scheme = make_url(url).drivername
        return (
            f"Unknown database URL scheme '{scheme}' in {shown}; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DBNAME."
        )
    hint = (
        "pip install 'moebench[postgres]' (psycopg)"
        if make_url(url).get_backend_name() == "postgresql"
        else f"install the '{name}' package"
    )
    return (
        f"The results database {shown} needs the Python driver '{name}', which is not "
        f"installed; {hint}, or use a SQLite path."
    )


def _explain(url: str, e: SQLAlchemyError) -> str:
    shown = display_url(url)
    reason = (str(getattr(e, "orig", None) or e).strip().splitlines() or ["no reason given"])[0]
    reason = reason.removeprefix("connection failed: ")
    path = _sqlite_path(url)
    if path is not None:
        if "not a database" in reason:
            return (
                f"'{path}' is not a SQLite database ({reason}); pass --db a moebench results "
                "database, or a new path to create one."
            )
        if "readonly" in reason or "read-only" in reason:
            return (
                f"The results database '{path}' is read-only ({reason}); make the file and "
                "its folder writable, or copy it to a writable place and pass --db there."
            )
        return (
            f"The results database '{path}' cannot be opened ({reason}); check that its "
            "folder exists and is writable, or pass --db another path."
        )
    parsed = make_url(url)
    if isinstance(e, OperationalError) and parsed.get_backend_name() == "postgresql":
        return (
            f"The database server for {shown} does not answer ({reason}); start it, or check "
            "the host, port, database name and credentials in --db."
        )
    return f"The results database {shown} cannot be opened ({reason}); check the --db URL."
