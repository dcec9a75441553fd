"""Initial schema: runs, metrics, predictions and a minimal training log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand and frozen: a revision describes the schema as it was, so it must not import
the ORM (which follows head) and must not change once released.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)


def _run_id(table: str) -> sa.Column:
    return sa.Column(
        "run_id",
        sa.Integer,
        sa.ForeignKey("runs.id", ondelete="CASCADE", name=op.f(f"fk_{table}_run_id_runs")),
        nullable=False,
    )


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "runs",
        _id(),
        _created_at(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("method", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.Text, nullable=True),
        sa.Column("trainable_params", sa.BigInteger, nullable=True),
        sa.Column("total_params", sa.BigInteger, nullable=True),
        sa.Column("wall_time_s", sa.Float, nullable=True),
        sa.Column("peak_memory_bytes", sa.BigInteger, nullable=True),
        sa.Column("tokens_per_s", sa.Float, nullable=True),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("git_sha", sa.String(64), nullable=True),
        sa.Column("hardware", sa.JSON, nullable=False),
        sa.Column("output_dir", sa.Text, nullable=True),
        sa.Column("last_checkpoint", sa.Text, nullable=True),
        sa.Column("last_step", sa.Integer, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'interrupted')",
            name=op.f("ck_runs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        # Run ids name output folders and appear in reports: never reuse a deleted one.
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_runs_method_model"), "runs", ["method", "model"])
    op.create_index(op.f("ix_runs_config_hash"), "runs", ["config_hash"])
    op.create_index(op.f("ix_runs_status"), "runs", ["status"])

    op.create_table(
        "metrics",
        _id(),
        _run_id("metrics"),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("stderr", sa.Float, nullable=True),
        sa.Column("protocol", sa.String(64), nullable=False),
        sa.Column("protocol_detail", sa.JSON, nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
        sa.UniqueConstraint(
            "run_id",
            "task",
            "metric",
            "protocol",
            name=op.f("uq_metrics_run_id_task_metric_protocol"),
        ),
    )
    op.create_index(op.f("ix_metrics_run_id"), "metrics", ["run_id"])

    op.create_table(
        "predictions",
        _id(),
        _run_id("predictions"),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("extracted", sa.Text, nullable=True),
        sa.Column("gold", sa.Text, nullable=False),
        sa.Column("correct", sa.Boolean, nullable=False),
        sa.Column("parse_failed", sa.Boolean, nullable=False),
        sa.Column("protocol", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint(
            "run_id",
            "task",
            "item_id",
            "protocol",
            name=op.f("uq_predictions_run_id_task_item_id_protocol"),
        ),
    )
    op.create_index(op.f("ix_predictions_run_id"), "predictions", ["run_id"])

    op.create_table(
        "training_log",
        _id(),
        _run_id("training_log"),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("loss", sa.Float, nullable=False),
        sa.Column("lr", sa.Float, nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_log")),
        sa.UniqueConstraint("run_id", "step", name=op.f("uq_training_log_run_id_step")),
    )
    op.create_index(op.f("ix_training_log_run_id"), "training_log", ["run_id"])


def downgrade() -> None:
    for table in ("training_log", "predictions", "metrics", "runs"):
        op.drop_table(table)
