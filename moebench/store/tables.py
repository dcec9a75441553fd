"""ORM tables of the results store, at the newest schema revision.

The migrations in `migrations/versions` are the source of truth for what a database holds; this
module must describe the same schema as the head revision, so that the ORM and an upgraded
database always agree. Only generic column types are used so one schema serves SQLite and
PostgreSQL alike.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

RUN_STATUSES: tuple[str, ...] = (
    "queued",
    "running",
    "done",
    "failed",
    "interrupted",
    "cancelled",
)

# Explicit constraint names let a migration drop or alter a constraint by name on every backend.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# datetime.UTC only exists from Python 3.11 and moebench supports 3.10.
UTC = timezone.utc  # noqa: UP017


def utcnow() -> datetime:
    """Current time as an aware UTC datetime (the only kind the store writes)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always reads back timezone-aware in UTC.

    SQLite has no time zone storage and returns naive values; storing UTC and re-attaching the
    zone on read gives callers the same aware datetimes on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Naive datetime {value!r} given to the store; pass an aware one.")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# `none_as_null` makes Python None an SQL NULL instead of the JSON text 'null', so "not recorded"
# reads back as None and is queryable with IS NULL.
NullableJSON = JSON(none_as_null=True)


class Base(DeclarativeBase):
    """Declarative base sharing one MetaData with a naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One training + evaluation run of a method on a model and a task suite."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_method_model", "method", "model"),
        Index("ix_runs_config_hash", "config_hash"),
        Index("ix_runs_status", "status"),
        Index("ix_runs_sweep", "sweep"),
        # One job per spec in a sweep (NULL sweeps, plain runs, never collide).
        Index("uq_runs_sweep_config_hash", "sweep", "config_hash", unique=True),
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in RUN_STATUSES) + ")", name="status"
        ),
        # Run ids name output folders and appear in reports: never reuse a deleted one.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    method: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    suite: Mapped[str] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    status_reason: Mapped[str | None] = mapped_column(Text)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    wall_time_s: Mapped[float | None] = mapped_column(Float)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    versions: Mapped[dict[str, Any]] = mapped_column(JSON)
    git_sha: Mapped[str | None] = mapped_column(String(64))
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    output_dir: Mapped[str | None] = mapped_column(Text)
    last_checkpoint: Mapped[str | None] = mapped_column(Text)
    last_step: Mapped[int | None] = mapped_column(Integer)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)
    # The job side (revision 0005): which sweep queued it, which process holds it and when that
    # process last showed it was alive, how often it was started and why earlier attempts ended.
    sweep: Mapped[str | None] = mapped_column(String(128))
    owner: Mapped[str | None] = mapped_column(String(256))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failures: Mapped[list[dict[str, Any]] | None] = mapped_column(NullableJSON)
    # How it executes (output root, data folder, retries, micro-batch after an OOM): never hashed.
    execution: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    # Live progress of the attempt now running (stage, step, total, loss), for `moebench jobs`.
    progress: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    # One digest of the data files read and the training rows drawn (details: artifact "data").
    data_fingerprint: Mapped[str | None] = mapped_column(String(64))


def _run_fk() -> Any:
    """Foreign key to runs.id; CASCADE so deleting a run leaves no orphan rows."""
    return ForeignKey("runs.id", ondelete="CASCADE")


class Metric(Base):
    """One aggregate score of a run on a task, under a named scoring protocol."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "task", "metric", "protocol"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, _run_fk(), index=True)
    task: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    stderr: Mapped[float | None] = mapped_column(Float)
    protocol: Mapped[str] = mapped_column(String(64))
    protocol_detail: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Prediction(Base):
    """One model output on one evaluation item, kept so scores can be audited and re-scored."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("run_id", "task", "item_id", "protocol"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, _run_fk(), index=True)
    task: Mapped[str] = mapped_column(String(128))
    item_id: Mapped[str] = mapped_column(String(256))
    prompt_hash: Mapped[str] = mapped_column(String(64))
    output: Mapped[str] = mapped_column(Text)
    extracted: Mapped[str | None] = mapped_column(Text)
    gold: Mapped[str] = mapped_column(Text)
    correct: Mapped[bool] = mapped_column(Boolean)
    parse_failed: Mapped[bool] = mapped_column(Boolean)
    protocol: Mapped[str] = mapped_column(String(64))
    # Per-item verdicts below the item (IFEval: one per instruction, strict and loose).
    detail: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)


class TrainingStep(Base):
    """The loss, learning rate and router statistics logged at one optimizer step."""

    __tablename__ = "training_log"
    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, _run_fk(), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    aux_losses: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    stats: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    """A saved training state a run can resume from."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, _run_fk(), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunArtifact(Base):
    """A named JSON result of a run beyond its scores (allocation map, router statistics)."""

    __tablename__ = "run_artifacts"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(Integer, _run_fk(), index=True)
    name: Mapped[str] = mapped_column(String(128))
    data: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
