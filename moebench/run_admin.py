"""One stored run, looked after: its checkpoints checked, its training log as a table, and the run
deleted (store rows and its own output folder). Plain data for the CLI (`moebench runs
checkpoints|log|delete`) and the app alike; nothing here prints.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from moebench import store as db
from moebench.errors import ConfigError
from moebench.paths import MARKER, check_owned, run_owner
from moebench.store import jobs as q
from moebench.store.queries import ARTIFACTS, CHECKPOINTS, METRICS, PREDICTIONS, RUNS, TRAINING_LOG

# A router statistic's key: `<module>.entropy`, `<module>.share.<expert>` or `<module>.load.<i>`.
_STAT = re.compile(r"^(?P<module>.+)\.(?:(?P<entropy>entropy)|(?P<kind>share|load)\.\d+)$")


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint_table(store: db.Store, run_id: int) -> list[dict[str, Any]]:
    """Each stored checkpoint: step, path, size on disk (bytes; None if gone) and whether it
    would resume ('valid', or why not: every file is read, as a resume would)."""
    from moebench.checkpoint import UNUSABLE, problem  # torch: only when checkpoints are read

    out = []
    for c in db.get_checkpoints(store, run_id):
        path = Path(c["path"])
        aside = path.with_name(path.name + UNUSABLE)
        if path.is_dir():
            why = problem(path)
            state = "valid" if why is None else f"unusable: {why}"
            size: int | None = _size(path)
        elif aside.is_dir():
            state, size = "unusable: set aside by a resume", _size(aside)
        else:
            state, size = "missing (pruned or deleted)", None
        out.append({"step": c["step"], "path": str(path), "bytes": size, "state": state})
    return out


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- the training log --------------------------------------------------------------------------


def training_table(store: db.Store, run_id: int, every: int = 1) -> list[dict[str, Any]]:
    """The training curve, one row per logged step (every `every`-th, and always the last):
    loss, lr, tokens, each auxiliary loss, and the router statistics of the steps that logged
    them, summarised over the routed modules: the mean gate entropy (nats) and the mean share
    of each module's busiest expert (1/E is perfectly balanced, 1.0 is collapse)."""
    if every < 1:
        raise ConfigError(f"--every {every} must be 1 or more (1: every logged step).")
    rows = db.get_training_log(store, run_id)
    picked = [r for i, r in enumerate(rows) if i % every == 0 or i == len(rows) - 1]
    return [
        {
            "step": r["step"],
            "loss": r["loss"],
            "lr": r["lr"],
            "tokens": r["tokens"],
            **{f"aux {k}": v for k, v in sorted((r["aux_losses"] or {}).items())},
            **router_summary(r["stats"] or {}),
        }
        for r in picked
    ]


def router_summary(stats: dict[str, float]) -> dict[str, Any]:
    """One step's per-module router statistics as a few numbers (empty when none logged)."""
    entropy: list[float] = []
    shares: dict[str, float] = {}
    for key, value in stats.items():
        m = _STAT.match(key)
        if m is None:
            continue
        if m["entropy"]:
            entropy.append(value)
        elif m["kind"] == "share":
            shares[m["module"]] = max(shares.get(m["module"], 0.0), value)
    out: dict[str, Any] = {}
    if entropy:
        out["routed modules"] = len(entropy)
        out["gate entropy"] = sum(entropy) / len(entropy)
    if shares:
        out["top expert share"] = sum(shares.values()) / len(shares)
    return out


# --- deleting a run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeletePlan:
    """What `delete_run` would remove, shown before the user confirms."""

    run: dict[str, Any]
    rows: dict[str, int]  # table -> rows of this run
    folder: Path | None  # the run's own output folder, if it is there and is the run's
    folder_bytes: int
    log_file: Path | None


def plan_delete(store: db.Store, run_id: int) -> DeletePlan:
    """Everything of one run, refused (one sentence) while a live process holds it or when its
    stored folder belongs to another run."""
    from moebench.worker import log_path

    row = db.get_run(store, run_id)
    _refuse_if_alive(store, row)
    with store.session() as session:
        rows = {
            name: int(session.scalar(select(func.count()).where(t.c.run_id == run_id)) or 0)
            for name, t in _TABLES.items()
        }
    folder = Path(row["output_dir"]) if row["output_dir"] else None
    if folder is not None and not folder.is_dir():
        folder = None
    if folder is not None and (folder / MARKER).is_file():
        check_owned(folder, run_owner(row, store.identity))
    elif folder is not None:
        raise ConfigError(
            f"Run {run_id}'s stored folder {folder} has no {MARKER}, so moebench cannot tell it "
            "is the run's own; nothing was deleted (move the folder away to delete the rows)."
        )
    log = log_path(row)
    return DeletePlan(
        row, rows, folder, _size(folder) if folder else 0, log if log.is_file() else None
    )


_TABLES = {
    "metrics": METRICS,
    "predictions": PREDICTIONS,
    "training log steps": TRAINING_LOG,
    "checkpoints": CHECKPOINTS,
    "artifacts": ARTIFACTS,
}


def _refuse_if_alive(store: db.Store, row: dict[str, Any]) -> None:
    if q.owner_alive(row["owner"], row["heartbeat_at"], q.store_now(store)):
        raise ConfigError(
            f"Run {row['id']} is being run right now by process {row['owner']} (status "
            f"{row['status']}); stop it first (`moebench jobs cancel {row['id']}`) or wait for "
            "it to end, then delete it."
        )


def delete_run(store: db.Store, plan: DeletePlan) -> None:
    """Remove the run's rows (its metrics, predictions, log, checkpoints and artifacts go with
    it), then its own folder and log file. The rows go only if the run is still held by whom
    the plan saw, so a process that claimed it meanwhile keeps it."""
    run = plan.run
    seen = RUNS.c.owner.is_(None) if run["owner"] is None else RUNS.c.owner == run["owner"]
    with store.session() as session:
        gone = session.execute(delete(RUNS).where(RUNS.c.id == run["id"], seen)).rowcount
    if gone != 1:
        raise ConfigError(
            f"Run {run['id']} was taken by another process while deleting; nothing was "
            "deleted; try again once it ends."
        )
    if plan.folder is not None:
        shutil.rmtree(plan.folder)
    if plan.log_file is not None:
        plan.log_file.unlink(missing_ok=True)
