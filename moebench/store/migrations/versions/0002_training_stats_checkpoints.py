"""Router statistics and token counts in the training log; checkpoints for resuming runs.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01

Every added column is nullable, so rows written under 0001 stay valid and read back as None.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch_alter_table: a plain ALTER where SQLite supports it, a table copy where it does not.
    with op.batch_alter_table("training_log") as batch:
        batch.add_column(sa.Column("tokens", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("aux_losses", sa.JSON, nullable=True))
        batch.add_column(sa.Column("stats", sa.JSON, nullable=True))

    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("resumed_from_step", sa.Integer, nullable=True))

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "run_id",
            sa.Integer,
            sa.ForeignKey("runs.id", ondelete="CASCADE", name=op.f("fk_checkpoints_run_id_runs")),
            nullable=False,
        ),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("run_id", "step", name=op.f("uq_checkpoints_run_id_step")),
    )
    op.create_index(op.f("ix_checkpoints_run_id"), "checkpoints", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_checkpoints_run_id"), table_name="checkpoints")
    op.drop_table("checkpoints")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("resumed_from_step")
    with op.batch_alter_table("training_log") as batch:
        batch.drop_column("stats")
        batch.drop_column("aux_losses")
        batch.drop_column("tokens")
