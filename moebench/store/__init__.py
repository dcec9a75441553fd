"""The results store: every run, its scores, predictions and training log, in one database.

SQLite by default (`results/moebench.db`), PostgreSQL when a shared server is wanted; the schema
is migrated automatically when a store is opened.
"""

from __future__ import annotations

from moebench.store.db import (
    DEFAULT_DB_URL,
    Store,
    alembic_config,
    head_revision,
    open_existing_store,
    open_store,
    resolve_db_url,
)
from moebench.store.export import export_runs
from moebench.store.queries import (
    Produced,
    add_checkpoint,
    add_metrics,
    add_predictions,
    create_run,
    delete_run,
    find_runs_by_config_hash,
    forget_checkpoints,
    get_artifacts,
    get_checkpoints,
    get_metrics,
    get_predictions,
    get_produced,
    get_run,
    get_training_log,
    list_runs,
    log_steps,
    put_artifact,
    set_status,
    update_run,
)
from moebench.store.tables import RUN_STATUSES

__all__ = [
    "DEFAULT_DB_URL",
    "RUN_STATUSES",
    "Produced",
    "Store",
    "add_checkpoint",
    "add_metrics",
    "add_predictions",
    "alembic_config",
    "create_run",
    "delete_run",
    "export_runs",
    "find_runs_by_config_hash",
    "forget_checkpoints",
    "get_artifacts",
    "get_checkpoints",
    "get_metrics",
    "get_predictions",
    "get_produced",
    "get_run",
    "get_training_log",
    "head_revision",
    "list_runs",
    "log_steps",
    "open_existing_store",
    "open_store",
    "put_artifact",
    "resolve_db_url",
    "set_status",
    "update_run",
]
