"""Exporting runs for analysis outside moebench (spreadsheets, pandas, papers).

CSV is flat, one row per score, for plotting and pivot tables; JSON keeps everything nested
(config, metrics, artifacts, the training log, optionally predictions) so nothing about how a
score was made is lost.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from moebench.errors import ConfigError, did_you_mean
from moebench.store.db import Store
from moebench.store.queries import (
    get_artifacts,
    get_metrics,
    get_predictions,
    get_run,
    get_training_log,
    list_runs,
)

log = logging.getLogger(__name__)

EXPORT_FORMATS: tuple[str, ...] = ("csv", "json")

CSV_COLUMNS: tuple[str, ...] = (
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
)


def _runs(store: Store, run_ids: list[int] | None) -> list[dict[str, Any]]:
    """The runs to export: the given ones in the given order, else all of them oldest first."""
    if run_ids is None:
        return list(reversed(list_runs(store, limit=None)))
    return [get_run(store, run_id) for run_id in run_ids]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"Cannot export {type(value).__name__} value {value!r} as JSON.")


def _to_json(store: Store, runs: list[dict[str, Any]], include_predictions: bool) -> str:
    documents = []
    for run in runs:
        document = dict(run)
        document["metrics"] = get_metrics(store, run["id"])
        document["artifacts"] = get_artifacts(store, run["id"])
        document["training_log"] = get_training_log(store, run["id"])
        if include_predictions:
            document["predictions"] = get_predictions(store, run["id"])
        documents.append(document)
    return json.dumps(documents, indent=2, default=_json_default) + "\n"


def _to_csv(store: Store, runs: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        for metric in get_metrics(store, run["id"]):
            row = {**{k: run[k] for k in CSV_COLUMNS if k in run}, **metric, "run_id": run["id"]}
            writer.writerow({k: row[k] for k in CSV_COLUMNS})
    return buffer.getvalue()


def export_runs(
    store: Store,
    run_ids: list[int] | None,
    fmt: str,
    path: Path | None = None,
    *,
    include_predictions: bool = False,
) -> str:
    """Render runs (all when `run_ids` is None) as CSV or JSON, writing to `path` if given.

    CSV has no place for predictions, so `include_predictions` only affects JSON.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(
            f"Unknown export format '{fmt}'; expected one of: {', '.join(EXPORT_FORMATS)}."
            + did_you_mean(fmt, EXPORT_FORMATS)
        )
    runs = _runs(store, run_ids)
    text = _to_json(store, runs, include_predictions) if fmt == "json" else _to_csv(store, runs)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        log.info("Exported %d run(s) as %s to %s", len(runs), fmt, path)
    return text
