"""Statistics over stored runs: two runs item by item, and repeats of one config over seeds.

Read-only: everything here is computed from the store's runs, metrics and per-item predictions
(`moebench.store`) with the pure functions of `moebench.stats`. Two verdicts are paired only when
they are the same item (same id, same prompt, same gold) scored under the same protocol, because a
difference between protocols (beam search vs greedy, generation vs log-likelihood) is not a
difference between methods.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moebench import store as db
from moebench.config import without_execution
from moebench.errors import ConfigError
from moebench.stats import (
    PairedResult,
    SeedSummary,
    binomial_stderr,
    mean_over_sets,
    paired_comparison,
    summarize_seeds,
)
from moebench.task import TASKS

AVERAGE_SUFFIX = "_avg"


def natural_key(item_id: str) -> list[Any]:
    """Sort `boolq/9` before `boolq/10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", item_id)]


# ---------------------------------------------------------------------------------------------
# Two runs, item by item


@dataclass(frozen=True)
class SetComparison:
    """One set compared under one protocol; the flips are item ids in natural order."""

    task: str
    protocol: str
    result: PairedResult
    a_only_ids: list[str]  # A right, B wrong
    b_only_ids: list[str]  # A wrong, B right
    mismatched: int  # ids in both runs whose prompt or gold differ: not the same item, not paired


@dataclass(frozen=True)
class AverageComparison:
    """An unweighted mean over the compared sets of one family, bootstrapped within each set."""

    name: str
    sets: tuple[str, ...]
    result: PairedResult


@dataclass(frozen=True)
class RunComparison:
    run_a: dict[str, Any]
    run_b: dict[str, Any]
    sets: list[SetComparison]
    averages: list[AverageComparison]
    skipped: list[tuple[str, str]]  # (set, why it was not compared)
    notes: list[str]  # families whose average was not formed, and why


MAX_RESAMPLES = 1_000_000  # resamples x items float64 differences are held at once


def compare_runs(
    store: db.Store,
    run_a: int,
    run_b: int,
    *,
    tasks: Sequence[str] | None = None,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> RunComparison:
    """Compare run B against run A on every set both scored the same way.

    Each set's resamples come from a generator seeded by (seed, set, protocol), so a set's
    interval does not change with which other sets are selected.
    """
    if resamples < 100:
        raise ConfigError(
            f"--resamples {resamples} is too few for a 95% interval; use at least 100 "
            "(default 10000)."
        )
    if resamples > MAX_RESAMPLES:
        raise ConfigError(
            f"--resamples {resamples:,} is past the {MAX_RESAMPLES:,} this comparison holds in "
            "memory; use at most that (default 10000)."
        )
    if run_a == run_b:
        raise ConfigError(
            f"compare {run_a} {run_b} compares a run with itself; give two different run ids."
        )
    row_a, row_b = db.get_run(store, run_a), db.get_run(store, run_b)
    pred_a = _predictions_by_set(store, run_a, tasks)
    pred_b = _predictions_by_set(store, run_b, tasks)
    for run_id, found in ((run_a, pred_a), (run_b, pred_b)):
        if not found and not tasks:
            raise ConfigError(
                f"Run {run_id} has no stored per-item predictions, so it cannot be compared "
                "item by item; `moebench runs show` lists its scores."
            )
    names = sorted(set(pred_a) | set(pred_b))
    if tasks:
        averages = [t for t in tasks if t.endswith(AVERAGE_SUFFIX)]
        if averages:
            raise ConfigError(
                f"'{averages[0]}' is an average over sets, not a set of items; pass its sets "
                "with --task (or none), and the average over the compared ones is printed."
            )
        missing = [t for t in tasks if t not in names]
        if missing:
            known = sorted(set(_stored_sets(store, run_a)) | set(_stored_sets(store, run_b)))
            raise ConfigError(
                f"Neither run {run_a} nor run {run_b} has predictions for set "
                f"'{missing[0]}'; they have: {', '.join(known) or 'none'}."
            )
    sets: list[SetComparison] = []
    skipped: list[tuple[str, str]] = []
    for task in names:
        by_protocol_a, by_protocol_b = pred_a.get(task, {}), pred_b.get(task, {})
        if not by_protocol_a or not by_protocol_b:
            skipped.append((task, f"only run {run_a if by_protocol_a else run_b} scored it"))
            continue
        common = sorted(set(by_protocol_a) & set(by_protocol_b))
        if not common:
            skipped.append(
                (
                    task,
                    f"scored under different protocols (run {run_a}: "
                    f"{', '.join(sorted(by_protocol_a))}; run {run_b}: "
                    f"{', '.join(sorted(by_protocol_b))})",
                )
            )
            continue
        for protocol in common:
            found = _compare_set(
                task, protocol, by_protocol_a[protocol], by_protocol_b[protocol], resamples, seed
            )
            if isinstance(found, str):
                skipped.append((task, found))
            else:
                sets.append(found)
    if not sets:
        why = "; ".join(f"{task}: {reason}" for task, reason in skipped) or "no predictions"
        raise ConfigError(
            f"Runs {run_a} and {run_b} have no item scored under the same protocol in both, so "
            f"nothing can be compared ({why})."
        )
    averages, notes = _family_averages(sets, level)
    return RunComparison(row_a, row_b, sets, averages, skipped, notes)


def _stored_sets(store: db.Store, run_id: int) -> list[str]:
    return sorted({p["task"] for p in db.get_predictions(store, run_id)})


def _predictions_by_set(
    store: db.Store, run_id: int, tasks: Sequence[str] | None
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """set -> protocol -> item id -> prediction row."""
    rows: Iterable[dict[str, Any]]
    if tasks:
        rows = [p for t in dict.fromkeys(tasks) for p in db.get_predictions(store, run_id, t)]
    else:
        rows = db.get_predictions(store, run_id)
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for p in rows:
        out[p["task"]][p["protocol"]][p["item_id"]] = p
    return out


def _compare_set(
    task: str,
    protocol: str,
    items_a: dict[str, dict[str, Any]],
    items_b: dict[str, dict[str, Any]],
    resamples: int,
    seed: int,
) -> SetComparison | str:
    """The comparison of one set, or the reason there is none."""
    shared = sorted(set(items_a) & set(items_b), key=natural_key)
    same = [
        i
        for i in shared
        if (items_a[i]["prompt_hash"], items_a[i]["gold"])
        == (items_b[i]["prompt_hash"], items_b[i]["gold"])
    ]
    mismatched = len(shared) - len(same)
    if not same:
        if mismatched:
            return (
                f"its {mismatched} shared item ids hold different prompts or golds under "
                f"{protocol} (different data files?)"
            )
        return f"no item scored by both runs under {protocol}"
    a = np.array([items_a[i]["correct"] for i in same], dtype=bool)
    b = np.array([items_b[i]["correct"] for i in same], dtype=bool)
    stream = zlib.crc32(f"{task}\0{protocol}".encode())
    result = paired_comparison(a, b, resamples=resamples, rng=np.random.default_rng([seed, stream]))
    return SetComparison(
        task=task,
        protocol=protocol,
        result=result,
        a_only_ids=[i for i, x, y in zip(same, a, b, strict=True) if x and not y],
        b_only_ids=[i for i, x, y in zip(same, a, b, strict=True) if y and not x],
        mismatched=mismatched,
    )


def _family_averages(
    sets: list[SetComparison], level: float
) -> tuple[list[AverageComparison], list[str]]:
    """`<family>_avg` over the compared sets of each known family with two or more of them.

    Sets are averaged only with sets scored the same way: the key is the protocol without its
    split suffix (a held-out half and a full test file of one run share decoding and scoring).
    Where one family was compared under several protocols, each gets its own average, named
    with the protocol.
    """
    groups: dict[tuple[str, str], list[SetComparison]] = defaultdict(list)
    for s in sets:
        if s.task in TASKS:
            groups[(TASKS.get(s.task).family, s.protocol.split("/heldout")[0])].append(s)
    per_family = defaultdict(int)
    for family, _ in groups:
        per_family[family] += 1
    averages, notes = [], []
    for (family, proto), members in sorted(groups.items()):
        if len(members) < 2:
            continue
        name = f"{family}{AVERAGE_SUFFIX}"
        if per_family[family] > 1:
            name = f"{name}[{proto}]"
            notes.append(f"{family}: compared under more than one protocol, one average each")
        result = mean_over_sets([s.result for s in members], level)
        averages.append(AverageComparison(name, tuple(s.task for s in members), result))
    return averages, sorted(set(notes))


# ---------------------------------------------------------------------------------------------
# One config over seeds


@dataclass(frozen=True)
class SetOverSeeds:
    """One set's headline metric over the runs of a seed group that scored it."""

    task: str
    metric: str
    protocol: str
    runs: tuple[int, ...]
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    n_items: tuple[int, ...]  # each run's n for this metric
    summary: SeedSummary
    binomial_se: float | None  # of one run at the mean accuracy: item noise, for scale


@dataclass(frozen=True)
class SeedGroup:
    """Runs whose specs are equal apart from the seed (and execution settings), on the same data."""

    method: str
    model: str
    suite: str
    runs: tuple[int, ...]  # one per seed, in seed order
    seeds: tuple[int, ...]
    repeats: tuple[int, ...]  # older runs of a seed already in `runs`: not independent, unused
    sets: list[SetOverSeeds]


def seed_free_config(config: dict[str, Any], data_fingerprint: str | None = None) -> str:
    """A run's spec without its seed and execution settings, with its data fingerprint, as
    canonical JSON (the group key).

    The data fingerprint stays in the key: runs over different data are not seeds of one run.
    Execution settings (checkpoint cadence, device, eval engine and batch) cannot change a
    number, so runs differing only there group together.
    """
    kept = {k: v for k, v in without_execution(config).items() if k != "seed"}
    kept["data_fingerprint"] = data_fingerprint
    return json.dumps(kept, sort_keys=True)


def seed_groups(
    store: db.Store,
    *,
    method: str | None = None,
    model: str | None = None,
    suite: str | None = None,
    min_seeds: int = 2,
    level: float = 0.95,
) -> list[SeedGroup]:
    """Finished runs grouped by seed-free config, newest group first, with per-set summaries.

    A rerun with a seed already in its group repeats a number rather than sampling a new one,
    so only the newest run of each seed is used (the others are listed as `repeats`).
    """
    if min_seeds < 1:
        raise ConfigError(f"--min-seeds {min_seeds} must be at least 1.")
    runs = db.list_runs(store, method=method, model=model, status="done", limit=None)
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if suite is None or r["suite"] == suite:
            grouped[seed_free_config(r["config"], r["data_fingerprint"])].append(r)
    groups = []
    for members in grouped.values():
        newest: dict[int, dict[str, Any]] = {}
        for r in sorted(members, key=lambda r: r["id"]):
            newest[r["seed"]] = r
        if len(newest) < min_seeds:
            continue
        used = [newest[s] for s in sorted(newest)]
        used_ids = {r["id"] for r in used}
        first = used[0]
        groups.append(
            SeedGroup(
                method=first["method"],
                model=first["model"],
                suite=first["suite"],
                runs=tuple(r["id"] for r in used),
                seeds=tuple(r["seed"] for r in used),
                repeats=tuple(sorted(r["id"] for r in members if r["id"] not in used_ids)),
                sets=_sets_over_seeds(store, used, level),
            )
        )
    return sorted(groups, key=lambda g: -max(g.runs))


def headline_metric(task: str) -> str:
    """The metric a set is summarised by: the task's own, `accuracy` for averages and strangers."""
    if not task.endswith(AVERAGE_SUFFIX) and task in TASKS:
        return TASKS.get(task).headline_metric
    return "accuracy"


def _sets_over_seeds(
    store: db.Store, runs: list[dict[str, Any]], level: float
) -> list[SetOverSeeds]:
    found: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for r in runs:
        for m in db.get_metrics(store, r["id"]):
            if m["metric"] == headline_metric(m["task"]):
                found[(m["task"], m["protocol"])].append((r, m))
    out = []
    for (task, protocol), pairs in sorted(found.items(), key=_set_order):
        values = tuple(m["value"] for _, m in pairs)
        summary = summarize_seeds(values, level)
        n_items = tuple(m["n"] for _, m in pairs)
        # A stored stderr marks a proportion over items; averages over sets have none.
        per_item = all(m["stderr"] is not None for _, m in pairs)
        se = binomial_stderr(min(max(summary.mean, 0.0), 1.0), min(n_items)) if per_item else None
        out.append(
            SetOverSeeds(
                task=task,
                metric=pairs[0][1]["metric"],
                protocol=protocol,
                runs=tuple(r["id"] for r, _ in pairs),
                seeds=tuple(r["seed"] for r, _ in pairs),
                values=values,
                n_items=n_items,
                summary=summary,
                binomial_se=se,
            )
        )
    return out


def _set_order(entry: tuple[tuple[str, str], Any]) -> tuple[bool, str, str]:
    """Sets first, then the group averages, each alphabetically."""
    task, protocol = entry[0]
    return task.endswith(AVERAGE_SUFFIX), task, protocol
