"""Reading and writing runs and their results.

Plain functions over a `Store` rather than ORM objects in the callers: the trainer, runner and
CLI exchange plain dicts, so none of them depends on sessions or lazy loading. Writes that may
be repeated (a resumed run re-logs steps, a re-evaluation re-scores a task) replace what was
there, done as delete-then-insert in one transaction because that works on every backend.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Integer,
    String,
    Table,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from moebench.errors import NotFoundError
from moebench.store.db import Store
from moebench.store.tables import (
    RUN_STATUSES,
    Checkpoint,
    Metric,
    Prediction,
    Run,
    RunArtifact,
    TrainingStep,
    utcnow,
)

RUNS: Table = Run.__table__  # type: ignore[assignment]
METRICS: Table = Metric.__table__  # type: ignore[assignment]
PREDICTIONS: Table = Prediction.__table__  # type: ignore[assignment]
TRAINING_LOG: Table = TrainingStep.__table__  # type: ignore[assignment]
CHECKPOINTS: Table = Checkpoint.__table__  # type: ignore[assignment]
ARTIFACTS: Table = RunArtifact.__table__  # type: ignore[assignment]

# Columns the store fills itself; callers never pass them.
_MANAGED = frozenset({"id", "run_id", "created_at", "updated_at"})
RUN_FIELDS = frozenset(RUNS.c.keys()) - _MANAGED
METRIC_FIELDS = frozenset(METRICS.c.keys()) - _MANAGED
PREDICTION_FIELDS = frozenset(PREDICTIONS.c.keys()) - _MANAGED
STEP_FIELDS = frozenset(TRAINING_LOG.c.keys()) - _MANAGED

# The natural key of each replaceable row, within one run.
_METRIC_KEY = ("task", "metric", "protocol")
_PREDICTION_KEY = ("task", "item_id", "protocol")
_STEP_KEY = ("step",)


# ---------------------------------------------------------------------------------------------
# Value normalisation


def _plain_json(value: Any) -> Any:
    """Turn numpy/torch values into plain JSON data, so a router statistic can be logged as is.

    Raises TypeError for anything else that JSON cannot hold, at the call site rather than at
    flush time where the offending key would be lost.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _plain_json(value.tolist())
    raise TypeError(f"Cannot store {type(value).__name__} value {value!r} as JSON.")


def _coerce(table: Table, name: str, value: Any) -> Any:
    """Convert numpy/torch scalars to the Python type the column expects.

    DB drivers reject numpy scalars, and silently truncating a float into an integer column
    would hide a caller bug, so integers must be true integers (`operator.index`).
    """
    column = table.c[name]
    if value is None:
        if not column.nullable:
            raise ValueError(f"{table.name}.{name} cannot be None.")
        return None
    kind = column.type
    try:
        if isinstance(kind, Boolean):
            if isinstance(value, str):
                raise TypeError("a string is not a boolean")
            return bool(value)
        if isinstance(kind, Integer):
            return operator.index(value)
        if isinstance(kind, Float):
            return float(value)
        if isinstance(kind, String):
            # Paths are welcome where a path is stored; anything else that is not text is a bug
            # SQLite would hide by storing it anyway and PostgreSQL would reject.
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            if not isinstance(value, str):
                raise TypeError(f"expected text, got {type(value).__name__}")
            return value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{table.name}.{name} got {value!r}: {exc}.") from exc
    if isinstance(kind, JSON):
        return _plain_json(value)
    return value


def _check_names(table: Table, names: Iterable[str], allowed: frozenset[str]) -> None:
    extra = sorted(set(names) - allowed)
    if extra:
        raise ValueError(
            f"Unknown {table.name} field(s) {', '.join(extra)}; "
            f"expected: {', '.join(sorted(allowed))}."
        )


def _normalize_rows(
    table: Table, rows: Iterable[Mapping[str, Any]], allowed: frozenset[str], key: Sequence[str]
) -> list[dict[str, Any]]:
    """Validate rows, fill omitted optional fields with None, keep the last row per key.

    Every row gets the same keys because an executemany INSERT compiles one statement from the
    first row's keys.
    """
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        _check_names(table, row, allowed)
        missing = [name for name in allowed if name not in row and not table.c[name].nullable]
        if missing:
            raise ValueError(
                f"{table.name} row lacks required field(s) {', '.join(sorted(missing))}."
            )
        clean = {name: _coerce(table, name, row.get(name)) for name in sorted(allowed)}
        by_key[tuple(clean[k] for k in key)] = clean
    return list(by_key.values())


# ---------------------------------------------------------------------------------------------
# Helpers


def _require_run(session: Session, store: Store, run_id: int) -> None:
    if session.execute(select(RUNS.c.id).where(RUNS.c.id == run_id)).first() is None:
        raise NotFoundError(
            f"No run with id {run_id} in {store.display_url}; `moebench runs list` lists them."
        )


def _validate_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(
            f"Unknown run status {status!r}; expected one of: {', '.join(RUN_STATUSES)}."
        )


def _replace_rows(
    session: Session, table: Table, run_id: int, rows: list[dict[str, Any]], key: Sequence[str]
) -> None:
    """Delete the rows of `run_id` sharing a key with `rows`, bulk-insert `rows`, and mark the
    run changed (its `updated_at`).

    A reader that caches what it computed from a run's results (the leaderboard's table and
    rows) checks the runs' `updated_at` instead of every results table: SQLite reuses the ids
    of deleted rows, so replaced scores can leave a results table's ids and count as they were.
    """
    if not rows:
        return
    match = [table.c.run_id == run_id]
    match += [table.c[k] == bindparam(f"key_{k}", type_=table.c[k].type) for k in key]
    session.execute(
        delete(table).where(*match), [{f"key_{k}": row[k] for k in key} for row in rows]
    )
    session.execute(insert(table), [{**row, "run_id": run_id} for row in rows])
    session.execute(update(RUNS).where(RUNS.c.id == run_id).values(updated_at=utcnow()))


def _select_dicts(session: Session, stmt: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in session.execute(stmt).mappings()]


# ---------------------------------------------------------------------------------------------
# Runs


def create_run(
    store: Store,
    *,
    method: str,
    model: str,
    suite: str,
    config: dict[str, Any],
    config_hash: str,
    seed: int,
    versions: dict[str, Any],
    git_sha: str | None,
    hardware: dict[str, Any],
    output_dir: str | None,
    status: str = "queued",
) -> int:
    """Record a new run and return its id."""
    _validate_status(status)
    values = {
        "method": method,
        "model": model,
        "suite": suite,
        "config": config,
        "config_hash": config_hash,
        "seed": seed,
        "versions": versions,
        "git_sha": git_sha,
        "hardware": hardware,
        "output_dir": output_dir,
        "status": status,
    }
    values = {name: _coerce(RUNS, name, value) for name, value in values.items()}
    with store.session() as session:
        result = session.execute(insert(RUNS).values(**values))
        run_id = result.inserted_primary_key[0]
    return int(run_id)


def update_run(store: Store, run_id: int, **fields: Any) -> None:
    """Set some run columns (e.g. parameter counts, timings) by name."""
    _check_names(RUNS, fields, RUN_FIELDS)
    if "status" in fields:
        _validate_status(fields["status"])
    values = {name: _coerce(RUNS, name, value) for name, value in fields.items()}
    with store.session() as session:
        _require_run(session, store, run_id)
        if values:
            session.execute(update(RUNS).where(RUNS.c.id == run_id).values(**values))


def set_status(store: Store, run_id: int, status: str, reason: str | None = None) -> None:
    """Move a run to `status`; `reason` (e.g. the error of a failed run) replaces the old one."""
    update_run(store, run_id, status=status, status_reason=reason)


def delete_run(store: Store, run_id: int) -> None:
    """Remove a run; its metrics, predictions, training log and checkpoints go with it."""
    with store.session() as session:
        _require_run(session, store, run_id)
        session.execute(delete(RUNS).where(RUNS.c.id == run_id))


def get_run(store: Store, run_id: int) -> dict[str, Any]:
    """All columns of one run as a plain dict."""
    with store.session() as session:
        rows = _select_dicts(session, select(RUNS).where(RUNS.c.id == run_id))
        if not rows:
            _require_run(session, store, run_id)
    return rows[0]


def list_runs(
    store: Store,
    *,
    method: str | None = None,
    model: str | None = None,
    status: str | None = None,
    limit: int | None = 50,
) -> list[dict[str, Any]]:
    """Runs matching every given filter, newest first; `limit=None` returns all of them."""
    stmt = select(RUNS).order_by(RUNS.c.id.desc())
    if method is not None:
        stmt = stmt.where(RUNS.c.method == method)
    if model is not None:
        stmt = stmt.where(RUNS.c.model == model)
    if status is not None:
        _validate_status(status)
        stmt = stmt.where(RUNS.c.status == status)
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.session() as session:
        return _select_dicts(session, stmt)


def find_runs_by_config_hash(store: Store, config_hash: str) -> list[dict[str, Any]]:
    """Runs made from an identical resolved config, newest first (to skip or resume repeats)."""
    stmt = select(RUNS).where(RUNS.c.config_hash == config_hash).order_by(RUNS.c.id.desc())
    with store.session() as session:
        return _select_dicts(session, stmt)


# ---------------------------------------------------------------------------------------------
# Results of a run


def add_metrics(store: Store, run_id: int, rows: Iterable[Mapping[str, Any]]) -> None:
    """Store scores; a row with an existing (task, metric, protocol) replaces the old value."""
    clean = _normalize_rows(METRICS, rows, METRIC_FIELDS, _METRIC_KEY)
    with store.session() as session:
        _require_run(session, store, run_id)
        _replace_rows(session, METRICS, run_id, clean, _METRIC_KEY)


def add_predictions(store: Store, run_id: int, rows: Iterable[Mapping[str, Any]]) -> None:
    """Store per-item outputs in bulk; an existing (task, item_id, protocol) is replaced."""
    clean = _normalize_rows(PREDICTIONS, rows, PREDICTION_FIELDS, _PREDICTION_KEY)
    with store.session() as session:
        _require_run(session, store, run_id)
        _replace_rows(session, PREDICTIONS, run_id, clean, _PREDICTION_KEY)


def log_steps(store: Store, run_id: int, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append training-log rows; a step logged before (by a run now resumed) is replaced."""
    clean = _normalize_rows(TRAINING_LOG, rows, STEP_FIELDS, _STEP_KEY)
    with store.session() as session:
        _require_run(session, store, run_id)
        _replace_rows(session, TRAINING_LOG, run_id, clean, _STEP_KEY)


def add_checkpoint(store: Store, run_id: int, step: int, path: str | os.PathLike[str]) -> None:
    """Record a saved checkpoint and make it the one the run resumes from."""
    row = {"step": _coerce(CHECKPOINTS, "step", step), "path": _coerce(CHECKPOINTS, "path", path)}
    with store.session() as session:
        _require_run(session, store, run_id)
        _replace_rows(session, CHECKPOINTS, run_id, [row], ("step",))
        session.execute(
            update(RUNS)
            .where(RUNS.c.id == run_id)
            .values(last_checkpoint=row["path"], last_step=row["step"])
        )


def forget_checkpoints(store: Store, run_id: int) -> None:
    """Drop a run's checkpoint records (their files were set aside): it resumes from none."""
    with store.session() as session:
        _require_run(session, store, run_id)
        session.execute(delete(CHECKPOINTS).where(CHECKPOINTS.c.run_id == run_id))
        session.execute(
            update(RUNS).where(RUNS.c.id == run_id).values(last_checkpoint=None, last_step=None)
        )


def _rows_of(store: Store, run_id: int, stmt: Any) -> list[dict[str, Any]]:
    with store.session() as session:
        _require_run(session, store, run_id)
        return _select_dicts(session, stmt)


def get_metrics(store: Store, run_id: int) -> list[dict[str, Any]]:
    """Scores of a run, ordered by task, metric and protocol."""
    t = METRICS
    stmt = select(t).where(t.c.run_id == run_id).order_by(t.c.task, t.c.metric, t.c.protocol)
    return _rows_of(store, run_id, stmt)


def get_predictions(store: Store, run_id: int, task: str | None = None) -> list[dict[str, Any]]:
    """Per-item outputs of a run (optionally of one task), in the order they were stored."""
    t = PREDICTIONS
    stmt = select(t).where(t.c.run_id == run_id).order_by(t.c.task, t.c.id)
    if task is not None:
        stmt = stmt.where(t.c.task == task)
    return _rows_of(store, run_id, stmt)


def get_training_log(store: Store, run_id: int) -> list[dict[str, Any]]:
    """Training-log rows of a run by step."""
    t = TRAINING_LOG
    return _rows_of(store, run_id, select(t).where(t.c.run_id == run_id).order_by(t.c.step))


def get_checkpoints(store: Store, run_id: int) -> list[dict[str, Any]]:
    """Checkpoints of a run by step."""
    t = CHECKPOINTS
    return _rows_of(store, run_id, select(t).where(t.c.run_id == run_id).order_by(t.c.step))


def put_artifact(store: Store, run_id: int, name: str, data: Any) -> None:
    """Store a named JSON result of a run, replacing an earlier one of the same name."""
    row = {"name": _coerce(ARTIFACTS, "name", name), "data": _plain_json(data)}
    with store.session() as session:
        _require_run(session, store, run_id)
        _replace_rows(session, ARTIFACTS, run_id, [row], ("name",))


def get_artifacts(store: Store, run_id: int) -> dict[str, Any]:
    """A run's named results, name -> JSON value."""
    t = ARTIFACTS
    rows = _rows_of(store, run_id, select(t).where(t.c.run_id == run_id).order_by(t.c.name))
    return {r["name"]: r["data"] for r in rows}


@dataclass(frozen=True)
class Produced:
    """What a run produced on its way, kept apart from its spec (artifacts of those names).

    `data`: the data root, file hashes, suite description and drawn rows' digest; `budget`: the
    parameter budget it was solved for (and, once built, what it achieved); `prepared`: the
    method config its preparation stage produced (LoRA-SMoE's allocation), which a resume and
    every rebuild use instead of preparing again.
    """

    data: dict[str, Any] | None
    budget: dict[str, Any] | None
    prepared: dict[str, Any] | None


def get_produced(store: Store, run_id: int) -> Produced:
    """The one accessor for a run's produced records (see `Produced`)."""
    t = ARTIFACTS
    names = ("data", "budget", "prepared")
    stmt = select(t.c.name, t.c.data).where(t.c.run_id == run_id, t.c.name.in_(names))
    rows = {r["name"]: r["data"] for r in _rows_of(store, run_id, stmt)}
    return Produced(rows.get("data"), rows.get("budget"), rows.get("prepared"))
