"""Named JSON results of a run beyond scores: allocation maps, router statistics, budgets.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

A method's preparation stage (LoRA-SMoE's allocation), the router statistics summary, the
parameter budget a run was solved for and the norms around a phase switch each keep their
provenance by living beside the run they came from, one row per name.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_artifacts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "run_id",
            sa.Integer,
            sa.ForeignKey("runs.id", ondelete="CASCADE", name=op.f("fk_run_artifacts_run_id_runs")),
            nullable=False,
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_artifacts")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_run_artifacts_run_id_name")),
    )
    op.create_index(op.f("ix_run_artifacts_run_id"), "run_artifacts", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_run_artifacts_run_id"), table_name="run_artifacts")
    op.drop_table("run_artifacts")
