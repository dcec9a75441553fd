"""A run is a job: queue columns, liveness, and what a run produced moved out of its spec.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Sweeps put hundreds of runs in one queue and workers claim them, so a run needs an owner, a
heartbeat (a run whose process died is seen as dead and re-queued instead of staying `running`),
the number of attempts and the reason of each failure, and the sweep it belongs to. `cancelled`
joins the statuses.

Until now the stored config also held what the run produced (`_data`, `_budget`, `_prepared`):
those move into artifacts (`data`, `budget`, `prepared`), the data fingerprint into its own
column, and `config_hash` is recomputed over the settings that can change a number, the
execution-only ones left out (the list below is frozen here as it was at this revision, so the
migration means the same thing forever).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("queued", "running", "done", "failed", "interrupted")
NEW_STATUSES = (*OLD_STATUSES, "cancelled")
EXECUTION_FIELDS = {
    "train": ("checkpoint_every", "keep_checkpoints", "stats_every"),
    "eval": ("engine", "batch_size"),
}
PRODUCED = {"_data": "data", "_budget": "budget", "_prepared": "prepared"}


# SQLite's batch mode rebuilds the table; run ids must still never be reused (0001's choice).
_KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}


def _status_check(statuses: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


def identity_hash(config: dict[str, Any]) -> str:
    """sha256 of a config without execution settings (runspec.RunSpec.hash at this revision)."""
    kept = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for section, names in EXECUTION_FIELDS.items():
        for name in names:
            if isinstance(kept.get(section), dict):
                kept[section].pop(name, None)
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(data: dict[str, Any]) -> str:
    """One digest of the files a run read and the rows it drew (rundata.data_fingerprint)."""
    files = sorted((data.get("sha256") or {}).values())
    blob = json.dumps({"files": files, "rows": data.get("rows_sha256")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("runs", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(_status_check(NEW_STATUSES)))
        batch.add_column(sa.Column("sweep", sa.String(128), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(256), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("failures", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("execution", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("progress", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("data_fingerprint", sa.String(64), nullable=True))
        batch.create_index("ix_runs_sweep", ["sweep"])
        # One job per spec in a sweep, even when two machines submit the same file at once.
        batch.create_index("uq_runs_sweep_config_hash", ["sweep", "config_hash"], unique=True)
    _move_produced()


def _move_produced() -> None:
    conn = op.get_bind()
    runs = sa.table(
        "runs",
        sa.column("id", sa.Integer),
        sa.column("config", sa.JSON),
        sa.column("config_hash", sa.String),
        sa.column("data_fingerprint", sa.String),
        sa.column("attempts", sa.Integer),
    )
    artifacts = sa.table(
        "run_artifacts",
        sa.column("run_id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("data", sa.JSON),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    now = datetime.now(timezone.utc)  # noqa: UP017
    for run_id, config in conn.execute(sa.select(runs.c.id, runs.c.config)).all():
        config = dict(config or {})
        have = {
            name
            for (name,) in conn.execute(
                sa.select(artifacts.c.name).where(artifacts.c.run_id == run_id)
            )
        }
        for key, name in PRODUCED.items():
            value = config.pop(key, None)
            if value is not None and name not in have:
                conn.execute(
                    artifacts.insert().values(run_id=run_id, name=name, data=value, created_at=now)
                )
        data = (
            conn.execute(
                sa.select(artifacts.c.data).where(
                    artifacts.c.run_id == run_id, artifacts.c.name == "data"
                )
            ).scalar()
            or {}
        )
        conn.execute(
            runs.update()
            .where(runs.c.id == run_id)
            .values(
                config=config,
                config_hash=identity_hash(config),
                data_fingerprint=data_fingerprint(data) if data else None,
                attempts=1,
            )
        )


def downgrade() -> None:
    """Back to revision 0004, where the produced records lived inside the config again."""
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE runs SET status = 'failed' WHERE status = 'cancelled'"))
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON))
    artifacts = sa.table(
        "run_artifacts",
        sa.column("run_id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("data", sa.JSON),
    )
    for run_id, config in conn.execute(sa.select(runs.c.id, runs.c.config)).all():
        config = dict(config or {})
        for key, name in PRODUCED.items():
            value = conn.execute(
                sa.select(artifacts.c.data).where(
                    artifacts.c.run_id == run_id, artifacts.c.name == name
                )
            ).scalar()
            if value is not None:
                config[key] = value
        conn.execute(runs.update().where(runs.c.id == run_id).values(config=config))
    with op.batch_alter_table("runs", table_kwargs=_KEEP_AUTOINCREMENT) as batch:
        batch.drop_index("uq_runs_sweep_config_hash")
        batch.drop_index("ix_runs_sweep")
        for name in (
            "data_fingerprint",
            "progress",
            "execution",
            "failures",
            "attempts",
            "finished_at",
            "started_at",
            "heartbeat_at",
            "owner",
            "sweep",
        ):
            batch.drop_column(name)
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_runs_status"), sa.text(_status_check(OLD_STATUSES)))
