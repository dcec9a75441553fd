"""Schema versioning: databases from older releases open, newer ones are refused.

The old database is produced the way an older moebench produced it: alembic stopped at
revision 0001, rows written with plain SQL at that schema.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, text

from moebench.errors import MoebenchError
from moebench.store import (
    DEFAULT_DB_URL,
    Store,
    add_checkpoint,
    add_metrics,
    alembic_config,
    create_run,
    get_checkpoints,
    get_metrics,
    get_run,
    get_training_log,
    head_revision,
    log_steps,
    open_store,
    resolve_db_url,
)
from moebench.store.db import display_url, migrate


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _columns(engine: Engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def _database_at_0001(path: Path) -> str:
    """A database as moebench wrote it at schema 0001, holding one run with one logged step."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs (id, created_at, updated_at, method, model, suite, config,"
                " config_hash, seed, status, versions, hardware, trainable_params)"
                " VALUES (1, '2024-05-01 12:00:00.000000', '2024-05-01 13:00:00.000000',"
                " 'mixlora', 'smollm2-135m', 'commonsense', :config, :hash, 42, 'done',"
                ' \'{"torch": "2.3.0"}\', \'{"gpu": "A100"}\', 5000000000)'
            ),
            {"config": '{"lr": 0.0002, "experts": [1, 2]}', "hash": "d" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO training_log (run_id, step, loss, lr, created_at)"
                " VALUES (1, 10, 1.25, 0.0002, '2024-05-01 12:30:00.000000')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO metrics (run_id, task, metric, value, n, protocol, created_at)"
                " VALUES (1, 'arc_e', 'acc', 0.625, 8, 'mc-loglik', '2024-05-01 13:00:00')"
            )
        )
    assert _revision(engine) == "0001"
    assert "aux_losses" not in _columns(engine, "training_log")
    assert "checkpoints" not in inspect(engine).get_table_names()
    engine.dispose()
    return url


def test_old_database_is_upgraded_and_readable(tmp_path: Path) -> None:
    url = _database_at_0001(tmp_path / "old.db")

    with open_store(url) as store:
        assert _revision(store.engine) == head_revision() == "0005"
        assert {"aux_losses", "stats", "tokens"} <= _columns(store.engine, "training_log")
        assert "detail" in _columns(store.engine, "predictions")

        run = get_run(store, 1)
        assert run["config"] == {"lr": 0.0002, "experts": [1, 2]}
        assert (run["method"], run["seed"], run["status"]) == ("mixlora", 42, "done")
        assert run["trainable_params"] == 5_000_000_000
        assert run["versions"] == {"torch": "2.3.0"}
        assert run["resumed_from_step"] is None
        assert run["created_at"].isoformat() == "2024-05-01T12:00:00+00:00"

        (step,) = get_training_log(store, 1)
        assert (step["step"], step["loss"], step["lr"]) == (10, 1.25, 0.0002)
        assert (step["tokens"], step["aux_losses"], step["stats"]) == (None, None, None)
        assert get_metrics(store, 1)[0]["value"] == 0.625

        # The new schema is writable on the upgraded file.
        log_steps(
            store,
            1,
            [{"step": 11, "loss": 1.0, "lr": 0.0002, "tokens": 8192, "aux_losses": {"lb": 0.02}}],
        )
        add_checkpoint(store, 1, 11, "results/runs/1/ckpt-11")
        assert get_training_log(store, 1)[1]["aux_losses"] == {"lb": 0.02}
        assert [c["step"] for c in get_checkpoints(store, 1)] == [11]
        assert get_run(store, 1)["last_step"] == 11


def test_reopening_at_head_is_a_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with caplog.at_level(logging.INFO, logger="moebench.store.db"):
        with open_store(url) as store:
            run_id = _any_run(store)
        assert "Migrating" in caplog.text
        caplog.clear()
        with open_store(url) as store:
            assert _revision(store.engine) == head_revision()
            assert get_run(store, run_id)["config"] == {"a": 1}
        assert "Migrating" not in caplog.text


def test_newer_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    with open_store(url) as store, store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))

    with pytest.raises(MoebenchError) as info:
        open_store(url)
    message = str(info.value)
    assert "newer" in message
    assert "0099" in message
    assert "upgrade moebench" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_downgrade_and_upgrade_keep_results(tmp_path: Path) -> None:
    """Batch migrations copy `runs` on SQLite; that must not cascade-delete its results."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with open_store(url) as store:
        run_id = _any_run(store)
        add_metrics(
            store, run_id, [{"task": "t", "metric": "acc", "value": 0.5, "n": 2, "protocol": "p"}]
        )
        migrate(store.engine, "0001")
        assert _revision(store.engine) == "0001"
        assert "resumed_from_step" not in _columns(store.engine, "runs")
    with open_store(url) as store:
        assert _revision(store.engine) == head_revision()
        assert [m["value"] for m in get_metrics(store, run_id)] == [0.5]
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _any_run(store: Store) -> int:
    return create_run(
        store,
        method="m",
        model="x",
        suite="s",
        config={"a": 1},
        config_hash="e" * 64,
        seed=0,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
    )


_OPEN_AND_WRITE = """
import sys
from moebench.store import create_run, open_store
store = open_store(sys.argv[1])
print(create_run(store, method="m", model="x", suite="s", config={}, config_hash="h", seed=0,
                 versions={}, git_sha=None, hardware={}, output_dir=None))
"""


def test_concurrent_first_open_migrates_once(tmp_path: Path) -> None:
    """Parallel sweep workers opening a fresh database must not race to create the tables."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_WRITE, url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, err) in zip(workers, results, strict=True):
        assert worker.returncode == 0, err
    assert sorted(int(out) for out, _ in results) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# URL resolution


def test_resolve_db_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEBENCH_DB", raising=False)
    assert resolve_db_url(None) == DEFAULT_DB_URL == "sqlite:///results/moebench.db"

    monkeypatch.setenv("MOEBENCH_DB", "postgresql+psycopg://u@db/moebench")
    assert resolve_db_url(None) == "postgresql+psycopg://u@db/moebench"
    assert resolve_db_url("sqlite:///explicit.db") == "sqlite:///explicit.db"

    monkeypatch.setenv("MOEBENCH_DB", "")
    assert resolve_db_url(None) == DEFAULT_DB_URL


def test_resolve_db_url_bare_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MOEBENCH_DB", raising=False)
    assert resolve_db_url("runs/my.db") == "sqlite:///runs/my.db"
    assert resolve_db_url(str(tmp_path / "a.db")) == f"sqlite:///{(tmp_path / 'a.db').as_posix()}"
    monkeypatch.setenv("MOEBENCH_DB", str(tmp_path / "env.db"))
    assert resolve_db_url(None) == f"sqlite:///{(tmp_path / 'env.db').as_posix()}"


def test_default_location_is_relative_and_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MOEBENCH_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    with open_store() as store:
        assert store.url == DEFAULT_DB_URL
    assert (tmp_path / "results" / "moebench.db").is_file()

    nested = tmp_path / "deep" / "er" / "x.db"
    with open_store(str(nested)):
        pass
    assert nested.is_file()


def test_password_is_not_shown() -> None:
    assert "hunter2" not in display_url("postgresql+psycopg://me:hunter2@db/moebench")
