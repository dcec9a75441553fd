"""Per-item scoring detail beside each prediction.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

One right/wrong flag per item is not enough for every protocol: IFEval scores each instruction of
a prompt, strictly and loosely, and the instruction-level metrics (and any paired comparison of
them) need those per-instruction verdicts. They go in a nullable JSON column, so the rows of
protocols with a single verdict per item stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("detail", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("detail")
