"""Round trips through the results store on real databases.

SQLite files in tmp_path always; PostgreSQL too when MOEBENCH_TEST_POSTGRES_URL points at a
scratch database (its tables are dropped before each test).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from moebench.errors import ConfigError, NotFoundError
from moebench.store import (
    Store,
    add_checkpoint,
    add_metrics,
    add_predictions,
    create_run,
    delete_run,
    export_runs,
    find_runs_by_config_hash,
    get_artifacts,
    get_checkpoints,
    get_metrics,
    get_predictions,
    get_run,
    get_training_log,
    list_runs,
    log_steps,
    open_store,
    put_artifact,
    set_status,
    update_run,
)
from moebench.store.tables import UTC, Base
from tests.conftest import POSTGRES_ENV

CONFIG: dict[str, Any] = {
    "method": {"name": "mixlora", "experts": 8, "top_k": 2, "router_aux": 0.01},
    "lr": 0.1 + 0.2,  # not representable in few digits: catches lossy float storage
    "tiny": 1e-300,
    "big": 2**53 + 1,
    "flags": [True, False, None],
    "name": 'ünïcode ✓ "quoted" \n newline',
    "empty": {},
}


def _wipe_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results' / 'moebench.db'}"
    else:
        url = os.environ.get(POSTGRES_ENV, "")
        if not url:
            pytest.skip(f"set {POSTGRES_ENV} to a scratch PostgreSQL database to run this")
        _wipe_postgres(url)
    opened = open_store(url)
    yield opened
    opened.close()


def new_run(store: Store, **overrides: Any) -> int:
    fields: dict[str, Any] = {
        "method": "mixlora",
        "model": "smollm2-135m",
        "suite": "commonsense",
        "config": CONFIG,
        "config_hash": "a" * 64,
        "seed": 0,
        "versions": {"torch": "2.4.0", "moebench": "0.1.0"},
        "git_sha": "0123abcd",
        "hardware": {"gpu": "H100", "count": 1},
        "output_dir": "results/runs/1",
    }
    fields.update(overrides)
    return create_run(store, **fields)


def metric(task: str = "arc_e", name: str = "acc", value: float = 0.5, **extra: Any) -> dict:
    row = {"task": task, "metric": name, "value": value, "n": 100, "protocol": "mc-loglik"}
    row.update(extra)
    return row


def prediction(item: int, task: str = "arc_e", correct: bool = True, **extra: Any) -> dict:
    row = {
        "task": task,
        "item_id": f"item-{item}",
        "prompt_hash": f"{item:064x}",
        "output": f"The answer is ({item % 4})",
        "extracted": str(item % 4),
        "gold": "0",
        "correct": correct,
        "parse_failed": False,
        "protocol": "gen-exact",
    }
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------
# Runs


def test_create_and_get_run_keeps_every_field(store: Store) -> None:
    run_id = new_run(store)
    run = get_run(store, run_id)

    assert run["id"] == run_id
    assert run["config"] == CONFIG
    assert json.dumps(run["config"], sort_keys=True) == json.dumps(CONFIG, sort_keys=True)
    assert run["config"]["lr"] == 0.1 + 0.2
    assert run["versions"] == {"torch": "2.4.0", "moebench": "0.1.0"}
    assert run["hardware"] == {"gpu": "H100", "count": 1}
    assert (run["method"], run["model"], run["suite"], run["seed"]) == (
        "mixlora",
        "smollm2-135m",
        "commonsense",
        0,
    )
    assert run["status"] == "queued"
    assert run["status_reason"] is None
    for column in ("trainable_params", "wall_time_s", "last_checkpoint", "resumed_from_step"):
        assert run[column] is None
    assert run["created_at"].utcoffset() == timedelta(0)
    assert run["updated_at"] >= run["created_at"]


def test_update_run_and_status(store: Store) -> None:
    run_id = new_run(store)
    before = get_run(store, run_id)["updated_at"]
    time.sleep(0.01)
    update_run(
        store,
        run_id,
        trainable_params=3_000_000_000,  # past 2**31: needs BIGINT
        total_params=135_000_000,
        wall_time_s=1234.5678901234567,
        peak_memory_bytes=80 * 2**30,
        tokens_per_s=0.1 + 0.7,
        resumed_from_step=200,
        output_dir=Path("results") / "runs" / "x",
    )
    set_status(store, run_id, "failed", "loss became NaN at step 17")
    run = get_run(store, run_id)
    assert run["trainable_params"] == 3_000_000_000
    assert run["peak_memory_bytes"] == 80 * 2**30
    assert run["wall_time_s"] == 1234.5678901234567
    assert run["tokens_per_s"] == 0.1 + 0.7
    assert run["resumed_from_step"] == 200
    assert run["output_dir"] == str(Path("results") / "runs" / "x")
    assert (run["status"], run["status_reason"]) == ("failed", "loss became NaN at step 17")
    assert run["updated_at"] > before

    set_status(store, run_id, "running")
    assert get_run(store, run_id)["status_reason"] is None


def test_update_run_rejects_bad_input(store: Store) -> None:
    run_id = new_run(store)
    with pytest.raises(ValueError, match="nonsense"):
        update_run(store, run_id, nonsense=1)
    with pytest.raises(ValueError, match="id"):
        update_run(store, run_id, id=5)
    with pytest.raises(ValueError, match="status"):
        set_status(store, run_id, "finished")
    with pytest.raises(ValueError, match="seed"):
        update_run(store, run_id, seed=None)
    with pytest.raises(ValueError):
        create_run(store, **{**_run_fields(), "status": "paused"})
    assert get_run(store, run_id)["status"] == "queued"


def _run_fields() -> dict[str, Any]:
    return {
        "method": "m",
        "model": "x",
        "suite": "s",
        "config": {},
        "config_hash": "b" * 64,
        "seed": 1,
        "versions": {},
        "git_sha": None,
        "hardware": {},
        "output_dir": None,
    }


def test_missing_run_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError) as info:
        get_run(store, 7)
    assert str(info.value) == (
        f"No run with id 7 in {store.display_url}; `moebench runs list` lists them."
    )
    for call in (
        lambda: update_run(store, 7, seed=1),
        lambda: set_status(store, 7, "done"),
        lambda: add_metrics(store, 7, [metric()]),
        lambda: add_predictions(store, 7, [prediction(1)]),
        lambda: log_steps(store, 7, [{"step": 1, "loss": 1.0, "lr": 0.1}]),
        lambda: add_checkpoint(store, 7, 1, "ckpt"),
        lambda: get_metrics(store, 7),
        lambda: delete_run(store, 7),
    ):
        with pytest.raises(NotFoundError):
            call()


def test_list_runs_filters_and_orders_newest_first(store: Store) -> None:
    a = new_run(store, method="mixlora", model="m1")
    b = new_run(store, method="hydralora", model="m1", config_hash="c" * 64)
    c = new_run(store, method="mixlora", model="m2")
    set_status(store, c, "done")

    assert [r["id"] for r in list_runs(store)] == [c, b, a]
    assert [r["id"] for r in list_runs(store, method="mixlora")] == [c, a]
    assert [r["id"] for r in list_runs(store, model="m1")] == [b, a]
    assert [r["id"] for r in list_runs(store, method="mixlora", model="m1")] == [a]
    assert [r["id"] for r in list_runs(store, status="done")] == [c]
    assert [r["id"] for r in list_runs(store, limit=2)] == [c, b]
    assert [r["id"] for r in list_runs(store, limit=None)] == [c, b, a]
    assert [r["id"] for r in find_runs_by_config_hash(store, "a" * 64)] == [c, a]
    assert find_runs_by_config_hash(store, "f" * 64) == []


def test_deleted_run_ids_are_not_reused(store: Store) -> None:
    first = new_run(store)
    delete_run(store, first)
    assert new_run(store) > first


# ---------------------------------------------------------------------------------------------
# Results


def test_metrics_round_trip_and_replace(store: Store) -> None:
    run_id = new_run(store)
    detail = {"scoring": "loglik", "template": "arc-v1", "split": "test", "rows": 100}
    add_metrics(
        store,
        run_id,
        [
            metric(value=0.1 + 0.2, stderr=0.0123456789012345, protocol_detail=detail),
            metric(name="acc_norm", value=0.61),
            metric(task="boolq", value=0.7, protocol="gen-exact"),
        ],
    )
    rows = {(m["task"], m["metric"], m["protocol"]): m for m in get_metrics(store, run_id)}
    assert set(rows) == {
        ("arc_e", "acc", "mc-loglik"),
        ("arc_e", "acc_norm", "mc-loglik"),
        ("boolq", "acc", "gen-exact"),
    }
    first = rows["arc_e", "acc", "mc-loglik"]
    assert first["value"] == 0.1 + 0.2
    assert first["stderr"] == 0.0123456789012345
    assert first["protocol_detail"] == detail
    assert first["n"] == 100
    assert first["run_id"] == run_id
    assert rows["arc_e", "acc_norm", "mc-loglik"]["protocol_detail"] is None

    # Same key: replaced. Same task+metric under another protocol: a separate score.
    add_metrics(store, run_id, [metric(value=0.9), metric(value=0.4, protocol="mc-gen")])
    rows = {(m["task"], m["metric"], m["protocol"]): m for m in get_metrics(store, run_id)}
    assert len(rows) == 4
    assert rows["arc_e", "acc", "mc-loglik"]["value"] == 0.9
    assert rows["arc_e", "acc", "mc-loglik"]["stderr"] is None
    assert rows["arc_e", "acc", "mc-gen"]["value"] == 0.4

    # Duplicates within one call: the last one wins instead of a unique-constraint error.
    add_metrics(store, run_id, [metric(value=0.2), metric(value=0.3)])
    rows = {(m["task"], m["metric"], m["protocol"]): m for m in get_metrics(store, run_id)}
    assert rows["arc_e", "acc", "mc-loglik"]["value"] == 0.3


def test_metric_rows_are_validated(store: Store) -> None:
    run_id = new_run(store)
    with pytest.raises(ValueError, match="colour"):
        add_metrics(store, run_id, [metric(colour="red")])
    with pytest.raises(ValueError, match="value"):
        add_metrics(store, run_id, [{"task": "t", "metric": "acc", "n": 1, "protocol": "p"}])
    with pytest.raises(ValueError, match="n"):
        add_metrics(store, run_id, [metric(n=3.5)])
    with pytest.raises(ValueError, match="task"):
        add_metrics(store, run_id, [metric(task=5)])
    assert get_metrics(store, run_id) == []


def test_predictions_bulk_insert_replace_and_filter(store: Store) -> None:
    run_id = new_run(store)
    rows = [prediction(i) for i in range(5000)] + [prediction(i, task="boolq") for i in range(10)]
    started = time.perf_counter()
    add_predictions(store, run_id, rows)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"5010 predictions took {elapsed:.1f}s: not a bulk insert"

    stored = get_predictions(store, run_id)
    assert len(stored) == 5010
    by_key = {(p["task"], p["item_id"]): p for p in stored}
    sample = by_key["arc_e", "item-4321"]
    expected = prediction(4321)
    assert {k: sample[k] for k in expected} == expected
    assert sample["correct"] is True
    assert sample["parse_failed"] is False

    add_predictions(
        store,
        run_id,
        [
            prediction(4321, correct=False, extracted=None, parse_failed=True),
            prediction(4321, protocol="mc-loglik"),
        ],
    )
    arc = get_predictions(store, run_id, task="arc_e")
    assert len(arc) == 5001
    replaced = [p for p in arc if p["item_id"] == "item-4321" and p["protocol"] == "gen-exact"]
    assert len(replaced) == 1
    assert (replaced[0]["correct"], replaced[0]["extracted"], replaced[0]["parse_failed"]) == (
        False,
        None,
        True,
    )
    boolq = get_predictions(store, run_id, task="boolq")
    assert [p["item_id"] for p in boolq] == [f"item-{i}" for i in range(10)]


def test_training_log_round_trip_and_relog(store: Store) -> None:
    run_id = new_run(store)
    rows = [
        {
            "step": step,
            "loss": 2.0 / (step + 1),
            "lr": 1e-4 * step,
            "tokens": step * 4096 + 2**40,
            "aux_losses": {"load_balance": 0.01 * step, "z_loss": 1e-7},
            "stats": {"expert_load": [0.1, 0.2, 0.3, 0.4], "entropy": 1.3862943611198906},
        }
        for step in range(1, 6)
    ]
    rows.append({"step": 6, "loss": 0.25, "lr": 5e-5})  # optional fields omitted
    log_steps(store, run_id, rows)

    stored = get_training_log(store, run_id)
    assert [r["step"] for r in stored] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(stored, rows, strict=True):
        assert {k: got[k] for k in want} == want
    assert (stored[-1]["tokens"], stored[-1]["aux_losses"], stored[-1]["stats"]) == (
        None,
        None,
        None,
    )
    assert stored[0]["created_at"].tzinfo is not None

    # A resumed run logs steps 5 and 6 again: they are replaced, not duplicated.
    log_steps(
        store, run_id, [{"step": 5, "loss": 9.0, "lr": 1.0}, {"step": 6, "loss": 8.0, "lr": 1.0}]
    )
    stored = get_training_log(store, run_id)
    assert [(r["step"], r["loss"]) for r in stored][-3:] == [(4, 2.0 / 5), (5, 9.0), (6, 8.0)]
    assert stored[4]["aux_losses"] is None


def test_numpy_values_are_converted(store: Store) -> None:
    np = pytest.importorskip("numpy")
    run_id = new_run(store)
    log_steps(
        store,
        run_id,
        [
            {
                "step": np.int64(3),
                "loss": np.float32(0.5),
                "lr": np.float64(1e-4),
                "stats": {"load": np.array([0.25, 0.75]), "top": np.int32(2)},
            }
        ],
    )
    (row,) = get_training_log(store, run_id)
    assert (row["step"], row["loss"], row["lr"]) == (3, 0.5, 1e-4)
    assert row["stats"] == {"load": [0.25, 0.75], "top": 2}
    assert type(row["step"]) is int


def test_checkpoints_set_resume_point(store: Store) -> None:
    run_id = new_run(store)
    add_checkpoint(store, run_id, 100, "results/runs/1/ckpt-100")
    add_checkpoint(store, run_id, 200, Path("results/runs/1/ckpt-200"))
    run = get_run(store, run_id)
    assert (run["last_checkpoint"], run["last_step"]) == (
        str(Path("results/runs/1/ckpt-200")),
        200,
    )
    add_checkpoint(store, run_id, 200, "elsewhere/ckpt-200")
    assert [(c["step"], c["path"]) for c in get_checkpoints(store, run_id)] == [
        (100, "results/runs/1/ckpt-100"),
        (200, "elsewhere/ckpt-200"),
    ]
    assert get_run(store, run_id)["last_checkpoint"] == "elsewhere/ckpt-200"


def _count(store: Store, table: str, run_id: int) -> int:
    with store.engine.connect() as conn:
        query = text(f"SELECT COUNT(*) FROM {table} WHERE run_id = :r")
        return int(conn.execute(query, {"r": run_id}).scalar_one())


def test_deleting_a_run_cascades(store: Store) -> None:
    doomed, kept = new_run(store), new_run(store)
    for run_id in (doomed, kept):
        add_metrics(store, run_id, [metric()])
        add_predictions(store, run_id, [prediction(1), prediction(2)])
        log_steps(store, run_id, [{"step": 1, "loss": 1.0, "lr": 0.1}])
        add_checkpoint(store, run_id, 1, "ckpt")

    delete_run(store, doomed)
    for table in ("metrics", "predictions", "training_log", "checkpoints"):
        assert _count(store, table, doomed) == 0, table
        assert _count(store, table, kept) > 0, table
    with pytest.raises(NotFoundError):
        get_run(store, doomed)


def test_session_rolls_back_on_error(store: Store) -> None:
    run_id = new_run(store)
    with pytest.raises(RuntimeError), store.session() as session:
        session.execute(text("DELETE FROM runs"))
        raise RuntimeError("boom")
    assert get_run(store, run_id)["id"] == run_id


def test_orm_matches_migrated_schema(store: Store) -> None:
    """tables.py and the migrations must describe the same head schema."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_pragmas_are_on(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "p.db")) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_timestamps_are_utc(store: Store) -> None:
    run_id = new_run(store)
    created = get_run(store, run_id)["created_at"]
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert created.tzinfo == UTC


# ---------------------------------------------------------------------------------------------
# Export


@pytest.fixture
def two_runs(store: Store) -> tuple[int, int]:
    a = new_run(store, method="mixlora", seed=1)
    b = new_run(store, method="hydralora", seed=2)
    update_run(store, a, trainable_params=1_234_567)
    set_status(store, a, "done")
    add_metrics(
        store,
        a,
        [
            metric(value=0.1 + 0.2, stderr=0.01),
            metric(task="boolq", value=0.75, protocol="gen-exact", protocol_detail={"k": 1}),
        ],
    )
    add_metrics(store, b, [metric(value=1 / 3)])
    add_predictions(store, a, [prediction(1), prediction(2, correct=False)])
    return a, b


def test_export_csv(store: Store, two_runs: tuple[int, int], tmp_path: Path) -> None:
    a, b = two_runs
    out = tmp_path / "exports" / "runs.csv"
    text_out = export_runs(store, None, "csv", out)
    assert out.read_text(encoding="utf-8") == text_out

    rows = list(csv.DictReader(io.StringIO(text_out)))
    assert list(rows[0]) == [
        "run_id",
        "method",
        "model",
        "suite",
        "seed",
        "status",
        "trainable_params",
        "task",
        "metric",
        "value",
        "n",
        "stderr",
        "protocol",
    ]
    assert [(int(r["run_id"]), r["task"]) for r in rows] == [
        (a, "arc_e"),
        (a, "boolq"),
        (b, "arc_e"),
    ]
    first = rows[0]
    assert first["method"] == "mixlora"
    assert first["status"] == "done"
    assert int(first["trainable_params"]) == 1_234_567
    assert int(first["seed"]) == 1
    assert float(first["value"]) == 0.1 + 0.2
    assert float(first["stderr"]) == 0.01
    assert (first["metric"], first["protocol"], int(first["n"])) == ("acc", "mc-loglik", 100)
    assert rows[1]["stderr"] == ""
    assert rows[2]["trainable_params"] == ""
    assert float(rows[2]["value"]) == 1 / 3

    only_b = list(csv.DictReader(io.StringIO(export_runs(store, [b], "csv", None))))
    assert [int(r["run_id"]) for r in only_b] == [b]


def test_export_json(store: Store, two_runs: tuple[int, int]) -> None:
    a, b = two_runs
    documents = json.loads(export_runs(store, [b, a], "json", None))
    assert [d["id"] for d in documents] == [b, a]
    run_a = documents[1]
    assert run_a["config"] == CONFIG
    assert run_a["method"] == "mixlora"
    assert "predictions" not in run_a
    metrics = {(m["task"], m["metric"]): m for m in run_a["metrics"]}
    assert metrics["arc_e", "acc"]["value"] == 0.1 + 0.2
    assert metrics["boolq", "acc"]["protocol_detail"] == {"k": 1}
    assert run_a["created_at"].endswith("+00:00")

    with_predictions = json.loads(export_runs(store, [a], "json", None, include_predictions=True))
    predictions = with_predictions[0]["predictions"]
    assert [(p["item_id"], p["correct"]) for p in predictions] == [
        ("item-1", True),
        ("item-2", False),
    ]


def test_export_rejects_unknown_format(store: Store) -> None:
    with pytest.raises(ConfigError, match="xml"):
        export_runs(store, None, "xml", None)


def test_export_unknown_run(store: Store) -> None:
    with pytest.raises(NotFoundError):
        export_runs(store, [99], "json", None)


def test_artifacts_round_trip_replace_and_go_with_the_run(db_url: str) -> None:
    store = open_store(db_url)
    run_id = create_run(
        store,
        method="lora-smoe",
        model="tiny-llama",
        suite="mini",
        config={},
        config_hash="a" * 64,
        seed=0,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
        status="running",
    )
    put_artifact(store, run_id, "allocation", {"modules": {"model.layers.0.mlp.up_proj": 2}})
    put_artifact(store, run_id, "router_stats", {"share.0": 0.5})
    put_artifact(store, run_id, "allocation", {"modules": {"model.layers.0.mlp.up_proj": 3}})
    assert get_artifacts(store, run_id) == {
        "allocation": {"modules": {"model.layers.0.mlp.up_proj": 3}},
        "router_stats": {"share.0": 0.5},
    }
    delete_run(store, run_id)
    with store.session() as session:
        left = session.execute(text("SELECT count(*) FROM run_artifacts")).scalar()
    assert left == 0
