"""What a run trains and scores on: drawn from its suite, validated, and fingerprinted.

A resumed run must see exactly the rows it started with, so the record of the draw (file
hashes, the drawn rows' digest) is stored when the run starts and checked on every resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from moebench.data import Row
from moebench.decontam import check_overlap
from moebench.errors import ConfigError
from moebench.mixture import build_mixture
from moebench.runspec import RunSpec
from moebench.suites import ResolvedSuite
from moebench.task import Item, Task


@dataclass(frozen=True)
class PreparedData:
    """What a run trains and scores on, drawn from its suite, with the record of how."""

    train_rows: list[Row]
    evals: dict[str, tuple[Task, list[Item]]]
    mixture: dict[str, Any]
    overlap: dict[str, Any]


def draw_rows(
    spec: RunSpec,
    suite: ResolvedSuite,
    flagged: set[int] | None = None,
    pool: tuple[list[Row], list[str], dict[str, int]] | None = None,
) -> tuple[list[Row], dict[str, Any], list[Row]]:
    """(rows the run trains on, the mixture record, the pool they were drawn from).

    `--decontaminate` drops the pool's rows that overlap an eval item (`flagged`, computed here
    when not given) before the draw, so a sample keeps its size. `pool` is
    `suite.training_pool()` when the caller has read it already. A sweep's estimate calls this
    too, so the steps it predicts are those the run takes.
    """
    rows, origin, unusable = pool or suite.training_pool()
    everything = rows
    if spec.data.decontaminate:
        if flagged is None:
            evals = {k: items for k, (_, items) in suite.eval_items(None).items()}
            flagged = check_overlap(rows, evals, spec.data.ngram).flagged_rows
        keep = [i for i in range(len(rows)) if i not in flagged]
        rows, origin = [rows[i] for i in keep], [origin[i] for i in keep]
    samples = {f.path: f.sample for _, f in suite.train_files}
    drawn, mixture = build_mixture(rows, origin, samples, spec.data)
    mixture["held_out_rows_without_a_correct_output"] = unusable
    return drawn, mixture, everything


def prepare_data(spec: RunSpec, suite: ResolvedSuite) -> PreparedData:
    """Read and validate every row, check train/eval overlap, draw the training mixture.

    The overlap check sees every eval item (even past `eval.limit`): contamination of the full
    set is what a reader of the number needs to know. The stored report is about the rows the
    run trains on.
    """
    full = suite.eval_items(None)
    eval_sets = {k: items for k, (_, items) in full.items()}
    read = suite.training_pool()
    pool_report = check_overlap(read[0], eval_sets, spec.data.ngram)
    drawn, mixture, pool = draw_rows(spec, suite, pool_report.flagged_rows, read)
    # The stored report is about the rows the run trains on; after --decontaminate that is
    # none, and what was dropped is kept beside it.
    report = pool_report if drawn == pool else check_overlap(drawn, eval_sets, spec.data.ngram)
    overlap: dict[str, Any] = {**report.as_dict(), "dropped": 0}
    if spec.data.decontaminate:
        overlap["dropped"] = len(pool_report.flagged_rows)
        overlap["before_dropping"] = pool_report.as_dict()["sets"]
    mixture["rows_sha256"] = rows_digest(drawn)
    mixture["eval_splits"] = {k: suite.split_label(k) for k in full}
    limit = spec.eval.limit
    evals = {k: (t, items if limit is None else items[:limit]) for k, (t, items) in full.items()}
    return PreparedData(drawn, evals, mixture, overlap)


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the training rows in order: a resumed run must see exactly these."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.instruction, r.input, r.output, r.task]).encode())
    return h.hexdigest()


def data_record(suite: ResolvedSuite, data: PreparedData) -> dict[str, Any]:
    """What the store keeps of a run's data (artifact `data`): where, which files, which rows."""
    return {
        "root": str(suite.data_root),
        "sha256": suite.fingerprint(),
        "suite": suite.suite.describe(),
        "rows_sha256": data.mixture["rows_sha256"],
    }


def data_fingerprint(record: dict[str, Any]) -> str:
    """One digest of the files read and the rows drawn: runs that group over seeds share it.

    Computed as store migration 0005 computes it for older runs.
    """
    files = sorted((record.get("sha256") or {}).values())
    blob = json.dumps({"files": files, "rows": record.get("rows_sha256")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_same_data(run_id: int, stored: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume a run on data other than what it started on."""
    if not stored:
        return
    before = sorted((stored.get("sha256") or {}).values())
    if before and before != sorted(now["sha256"].values()):
        raise ConfigError(
            f"Run {run_id} was trained on other data than '{now['root']}' holds now "
            "(file hashes differ); resume it with its own data, or --rerun it."
        )
    drawn = stored.get("rows_sha256")
    if drawn is not None and drawn != now["rows_sha256"]:
        raise ConfigError(
            f"Run {run_id}'s training rows would be drawn differently now (same files, "
            "another mixture or split: this moebench changed how suites draw rows); "
            "--rerun it instead."
        )
