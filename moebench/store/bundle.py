"""Moving runs between stores (a cluster's PostgreSQL to a laptop's SQLite) as one bundle file.

A bundle is gzip-compressed JSON lines: a header, then one line per run with the run's columns
and every metric, prediction, training-log row, checkpoint record and artifact. Ids are not
kept (the receiving store numbers runs itself); what identifies a run across stores is
`run_identity`, a digest of columns that are copied verbatim and never change after a run is
created. Importing skips runs whose identity the store already holds, so importing a bundle
twice, or into the store it came from, adds nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert, select

from moebench.errors import ConfigError
from moebench.store.db import Store, head_revision
from moebench.store.queries import ARTIFACTS, CHECKPOINTS, METRICS, PREDICTIONS, RUNS, TRAINING_LOG

FORMAT = "moebench-bundle"
VERSION = 1
# Child tables, by the key a bundle line files their rows under.
CHILDREN: dict[str, Table] = {
    "metrics": METRICS,
    "predictions": PREDICTIONS,
    "training_log": TRAINING_LOG,
    "checkpoints": CHECKPOINTS,
    "artifacts": ARTIFACTS,
}
_IDENTITY_COLUMNS = ("method", "model", "suite", "config_hash", "seed", "created_at", "git_sha")
_DATETIME_COLUMNS = frozenset(
    c.name for t in (RUNS, *CHILDREN.values()) for c in t.c if "DateTime" in type(c.type).__name__
)


def run_identity(run: dict[str, Any]) -> str:
    """SHA-256 over what a run was (spec hash, seed, method, model, suite, git SHA) and when it
    was created, to the microsecond in UTC: the same on every store the run is copied to."""
    parts = []
    for name in _IDENTITY_COLUMNS:
        value = run[name]
        parts.append(value.isoformat() if isinstance(value, datetime) else str(value))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: datetime.fromisoformat(v) if k in _DATETIME_COLUMNS and isinstance(v, str) else v
        for k, v in row.items()
    }


def _select(store: Store, table: Table, where: Any) -> list[dict[str, Any]]:
    with store.session() as s:
        return [dict(r) for r in s.execute(select(table).where(where)).mappings()]


def export_bundle(store: Store, path: Path, run_ids: Sequence[int] | None = None) -> int:
    """Write the runs (all, or these ids) with every record to `path`; returns how many."""
    where = RUNS.c.id.in_(list(run_ids)) if run_ids else RUNS.c.id.isnot(None)
    runs = sorted(_select(store, RUNS, where), key=lambda r: r["id"])
    if run_ids:
        missing = sorted(set(run_ids) - {r["id"] for r in runs})
        if missing:
            raise ConfigError(f"--run {missing[0]}: no such run in {store.display_url}.")
    ids = [r["id"] for r in runs]
    children: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for key, table in CHILDREN.items():
        grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for row in _select(store, table, table.c.run_id.in_(ids)) if ids else []:
            grouped[row.pop("run_id")].append(row)
        children[key] = grouped
    header = {"format": FORMAT, "version": VERSION, "schema": head_revision(), "runs": len(runs)}
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for run in runs:
            line: dict[str, Any] = {"identity": run_identity(run), "run": _plain(run)}
            for key in CHILDREN:
                rows = sorted(children[key].get(run["id"], []), key=lambda r: r["id"])
                line[key] = [_plain({k: v for k, v in r.items() if k != "id"}) for r in rows]
            line["run"].pop("id")
            f.write(json.dumps(line) + "\n")
    return len(runs)


def _read(path: Path) -> Iterable[dict[str, Any]]:
    """The bundle's run lines; a bundle holding fewer runs than its header lists is refused
    (at its end) as truncated."""
    if path.is_dir():
        raise ConfigError(f"Bundle {path} is a folder; give the file `moebench export` wrote.")
    if not path.is_file():
        raise ConfigError(
            f"Bundle {path} does not exist; `moebench export --bundle FILE` makes one."
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ConfigError(f"{path} is not a moebench bundle (no bundle header).")
            if header.get("version") != VERSION:
                raise ConfigError(
                    f"{path} is bundle version {header.get('version')}; this moebench reads "
                    f"version {VERSION}."
                )
            n = 0
            for text in f:
                n += 1
                yield json.loads(text)
            if n != header.get("runs"):
                raise ConfigError(
                    f"{path} holds {n} of the {header.get('runs')} runs its header lists "
                    "(truncated?); export it again."
                )
    except (OSError, json.JSONDecodeError, EOFError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path} is not a readable moebench bundle ({e}).") from e


def existing_identities(store: Store) -> set[str]:
    """The identities of every run the store holds (one query)."""
    with store.session() as s:
        rows = s.execute(select(*(RUNS.c[c] for c in _IDENTITY_COLUMNS))).mappings()
        return {run_identity(dict(r)) for r in rows}


def check_bundle(path: Path) -> int:
    """Read the whole bundle and check every run line (shape, dates, identity) without a
    store; returns how many runs it holds. A `ConfigError` names the first fault."""
    n = 0
    for line in _read(path):
        _checked(line, path)
        n += 1
    return n


def _checked(line: Any, path: Path) -> None:
    """Nothing, or a `ConfigError` saying what is wrong with one bundle line."""
    try:
        identity, run = line["identity"], _typed(line["run"])
        for key in CHILDREN:
            for row in line.get(key, []):
                _typed(row)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: a run line is malformed ({type(e).__name__}: {e}).") from e
    if run_identity(run) != identity:
        raise ConfigError(f"{path}: a run's identity does not match its columns (edited?).")


def import_bundle(store: Store, path: Path, *, checked: bool = False) -> tuple[int, int]:
    """Add the bundle's runs the store does not hold yet; returns (added, already there).

    The whole file is checked (`check_bundle`, skipped where the caller has just run it:
    `checked`) before anything is written, so a truncated, corrupt or edited bundle adds
    nothing; then each run and its records go in one transaction, so an interrupted import
    leaves whole runs.
    """
    if not checked:
        check_bundle(path)
    known = existing_identities(store)
    added = skipped = 0
    for line in _read(path):
        identity, run = line["identity"], _typed(line["run"])
        if identity in known:
            skipped += 1
            continue
        with store.session() as s:
            run_id = s.execute(insert(RUNS).values(**run)).inserted_primary_key[0]
            for key, table in CHILDREN.items():
                rows = [{**_typed(r), "run_id": run_id} for r in line.get(key, [])]
                if rows:
                    s.execute(insert(table), rows)
        known.add(identity)
        added += 1
    return added, skipped
