"""The main leaderboard table: one row per seed group, i.e. per (method, model, suite, budget).

How each number is made, so a reader can check it:
- A row is a seed group of `moebench.comparisons` (runs equal apart from seed and execution,
  on the same data; the newest run per seed). Only finished runs count.
- A set's score is its headline metric (`headline_metric`) under one protocol. Where a group
  scored a set under several protocols and no protocol filter picks one, the protocol most of
  its runs used is shown (ties: alphabetical), and the row says which.
- Per run: a family average is the unweighted mean of the family's sets that every run of the
  row scored; `overall` is the unweighted mean of the family averages (the seed paper's Table 1
  "Avg."). Each column's mean, Student-t 95% interval and n are over the row's seeds.
- The paired test between two rows resamples items (a paired bootstrap, stratified by set) of
  the seed-averaged verdicts on the items both rows scored with the same prompt and gold, and
  averages sets and families as above. A difference "holds" when its interval excludes zero.
- Rank with ties: a row's rank is 1 + the number of rows of its comparison group (same model
  and suite, inside the budget band when a target is set) that are better by a paired test
  that holds; rows no test separates share a rank.
"""

from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np

from moebench import store as db
from moebench.board import load
from moebench.board.row_cache import ROWS
from moebench.comparisons import seed_free_config
from moebench.errors import ConfigError
from moebench.stats import SeedSummary, percentile_interval, summarize_seeds
from moebench.task import TASKS

LORA = "lora"
DEFAULT_BAND = 0.05
DEFAULT_RESAMPLES = 2_000
FAMILY_ORDER = ("commonsense", "math", "instruction")
OVERALL = "overall"


@dataclass(frozen=True)
class BoardFilters:
    """What the table shows; every value is matched in Python or bound as an SQL parameter."""

    models: tuple[str, ...] = ()
    suites: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    target_params: int | None = None
    band: float = DEFAULT_BAND

    def __post_init__(self) -> None:
        if not 0.0 < self.band < 1.0:
            raise ConfigError(f"budget band {self.band} must be a fraction between 0 and 1.")
        if self.target_params is not None and self.target_params < 1:
            raise ConfigError(f"target budget {self.target_params} must be a positive count.")


@dataclass(frozen=True)
class Paired:
    """Row minus its reference over shared items: point difference and interval."""

    diff: float
    low: float
    high: float
    n_items: int

    @property
    def holds(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


@dataclass
class BoardRow:
    """One line of the main table (scores are fractions in [0, 1])."""

    key: str
    method: str
    model: str
    suite: str
    runs: tuple[int, ...]
    seeds: tuple[int, ...]
    trainable_params: int | None
    base_params: int | None
    active_params: int | None
    protocols: dict[str, str]  # set -> protocol used
    scores: dict[str, SeedSummary]  # set, family average or overall -> over seeds
    in_band: bool = True
    vs_lora: Paired | None = None
    lora_key: str | None = None
    rank: int | None = None
    step_time_s: float | None = None
    peak_memory_bytes: float | None = None
    verdicts: dict[tuple[str, str], dict[tuple[str, str, str], float]] = field(
        default_factory=dict, repr=False
    )

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def percent_of_base(self) -> float | None:
        if not self.trainable_params or not self.base_params:
            return None
        return 100.0 * self.trainable_params / self.base_params

    def columns(self) -> list[str]:
        """Sets first (by family, then name), then family averages, then overall."""
        sets = [c for c in self.scores if c in TASKS]
        sets.sort(key=lambda t: (_family_index(TASKS.get(t).family), t))
        avgs = [f"{f}_avg" for f in FAMILY_ORDER if f"{f}_avg" in self.scores]
        return sets + avgs + ([OVERALL] if OVERALL in self.scores else [])


@dataclass(frozen=True)
class Board:
    rows: list[BoardRow]
    filters: BoardFilters
    resamples: int

    def band_note(self) -> str | None:
        """What to say when a target is set and no row is inside its band: the budgets that
        are measured nearest to it, so that the reader knows which target or band to try."""
        target = self.filters.target_params
        if not target or any(r.in_band for r in self.rows):
            return None
        budgets = sorted({r.trainable_params for r in self.rows if r.trainable_params})
        if not budgets:
            return None
        nearest = sorted(sorted(budgets, key=lambda b: abs(b - target))[:3])
        return (
            f"No row is within ±{100 * self.filters.band:g}% of {target:,} trainable parameters; "
            f"the nearest measured budgets are {', '.join(f'{b:,}' for b in nearest)}. "
            "Change the target or widen the band."
        )

    def score_columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.rows:
            seen.update(dict.fromkeys(r.columns()))
        cols = list(seen)
        return sorted(cols, key=_column_order)


def _family_index(family: str) -> int:
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def _column_order(col: str) -> tuple[int, int, str]:
    if col == OVERALL:
        return (2, 0, col)
    if col.endswith("_avg"):
        return (1, _family_index(col[: -len("_avg")]), col)
    family = TASKS.get(col).family if col in TASKS else ""
    return (0, _family_index(family), col)


# ---------------------------------------------------------------------------------------------
# Building rows


def build_board(
    store: db.Store,
    filters: BoardFilters | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Board:
    """The main table under `filters`, with paired differences against LoRA and tie ranks."""
    filters = filters or BoardFilters()
    if resamples < 100:
        raise ConfigError(f"resamples {resamples} is too few for a 95% interval; use >= 100.")
    groups = _group(load.finished_runs(store, filters))
    rows = _made_rows(store, groups, filters)
    rows = [r for r in rows if r.scores]
    if filters.target_params is not None:
        for r in rows:
            r.in_band = _within(r.trainable_params, filters.target_params, filters.band)
    _compare_and_rank(rows, filters, resamples, seed)
    rows.sort(key=_display_order)
    # The per-item verdicts have served the paired tests; a caller keeps the numbers only.
    # The rows' scores and protocols are shared with `ROWS`: read them, never change them.
    return Board([replace(r, verdicts={}) for r in rows], filters, resamples)


def _made_rows(
    store: db.Store, groups: dict[str, list[dict[str, Any]]], filters: BoardFilters
) -> list[BoardRow]:
    """Each group's row with its verdicts: from `ROWS` where its runs are unchanged since it was
    built, else built now, reading the results of those groups' runs only."""
    stamps = {
        key: tuple((r["id"], r["updated_at"]) for r in members) for key, members in groups.items()
    }
    where = (store.url, filters.protocols)
    made = {key: ROWS.get((*where, key), stamp) for key, stamp in stamps.items()}
    todo = [key for key, row in made.items() if row is None]
    if todo:
        only = None if len(todo) == len(groups) else [r["id"] for k in todo for r in groups[k]]
        metrics = load.headline_metrics(store, filters, only)
        budgets = load.budget_artifacts(store, filters, only)
        fresh = [_row(key, groups[key], metrics, budgets, filters) for key in todo]
        load.attach_verdicts(store, fresh, filters)
        for row in fresh:
            ROWS.put((*where, row.key), stamps[row.key], row)
            made[row.key] = row
    return cast("list[BoardRow]", list(made.values()))


def _group(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Seed groups, keeping the newest run of each seed (repeats of a seed are not new samples)."""
    grouped: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r["id"]):
        grouped[seed_free_config(r["config"], r["data_fingerprint"])][r["seed"]] = r
    return {k: [v[s] for s in sorted(v)] for k, v in grouped.items()}


def _pick_protocols(
    members: list[dict[str, Any]], metrics: dict[int, list[dict[str, Any]]]
) -> dict[str, str]:
    """set -> the protocol most of the row's runs scored it under (ties: alphabetical)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for r in members:
        for m in metrics.get(r["id"], []):
            counts[m["task"]][m["protocol"]] += 1
    return {t: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for t, c in counts.items()}


def _row(
    key: str,
    members: list[dict[str, Any]],
    metrics: dict[int, list[dict[str, Any]]],
    budgets: dict[int, dict[str, Any]],
    filters: BoardFilters,
) -> BoardRow:
    protocols = _pick_protocols(members, metrics)
    per_run: dict[str, list[float]] = defaultdict(list)
    values: dict[int, dict[str, float]] = {}
    for r in members:
        values[r["id"]] = {
            m["task"]: m["value"]
            for m in metrics.get(r["id"], [])
            if protocols.get(m["task"]) == m["protocol"]
        }
    for task in protocols:
        per_run[task] = [values[r["id"]][task] for r in members if task in values[r["id"]]]
    shared = [t for t in protocols if all(t in values[r["id"]] for r in members)]
    families: dict[str, list[str]] = defaultdict(list)
    for t in shared:
        if t in TASKS:
            families[TASKS.get(t).family].append(t)
    for r in members:
        v = values[r["id"]]
        fams = [float(np.mean([v[t] for t in sets])) for sets in families.values()]
        for family, sets in families.items():
            per_run[f"{family}_avg"].append(float(np.mean([v[t] for t in sets])))
        if fams:
            per_run[OVERALL].append(float(np.mean(fams)))
    scores = {c: summarize_seeds(vals) for c, vals in per_run.items() if vals}
    first = members[0]
    trainable = _common(r["trainable_params"] for r in members)
    total = _common(r["total_params"] for r in members)
    active = _common((budgets.get(r["id"]) or {}).get("active_params") for r in members)
    return BoardRow(
        key=key,
        method=first["method"],
        model=first["model"],
        suite=first["suite"],
        runs=tuple(r["id"] for r in members),
        seeds=tuple(r["seed"] for r in members),
        trainable_params=trainable,
        base_params=(total - trainable) if total and trainable else None,
        active_params=active,
        protocols=protocols,
        scores=scores,
        step_time_s=_mean_of(_step_time(r) for r in members),
        peak_memory_bytes=_mean_of(r["peak_memory_bytes"] for r in members),
    )


def _step_time(run: dict[str, Any]) -> float | None:
    steps = run.get("last_step")
    if run.get("wall_time_s") is None or not steps:
        return None
    return float(run["wall_time_s"]) / float(steps)


def _common(values: Any) -> Any:
    """The value all runs share (parameter counts do not depend on the seed), else the max."""
    found = [v for v in values if v is not None]
    return max(found) if found else None


def _mean_of(values: Any) -> float | None:
    found = [float(v) for v in values if v is not None]
    return float(np.mean(found)) if found else None


def _within(params: int | None, target: int, band: float) -> bool:
    return params is not None and abs(params / target - 1.0) <= band + 1e-12


def _display_order(r: BoardRow) -> tuple[Any, ...]:
    overall = r.scores.get(OVERALL)
    return (not r.in_band, r.model, r.suite, -(overall.mean if overall else -1.0), r.method)


# ---------------------------------------------------------------------------------------------
# Paired tests, LoRA differences and ranks


def _compare_and_rank(
    rows: list[BoardRow], filters: BoardFilters, resamples: int, seed: int
) -> None:
    by_group: dict[tuple[str, str], list[BoardRow]] = defaultdict(list)
    for r in rows:
        by_group[(r.model, r.suite)].append(r)
    for members in by_group.values():
        samples = _overall_samples(members, resamples, seed)
        for r in members:
            lora = _lora_for(r, members, filters)
            if lora is not None and lora is not r:
                r.vs_lora = _paired(samples, r, lora)
                r.lora_key = lora.key
        _rank([r for r in members if r.in_band and r.key in samples], samples)


def _rank(ranked: list[BoardRow], samples: dict[str, _Samples]) -> None:
    """1 + how many rows beat each by a paired test that holds, all pairs at once per row."""
    if not ranked:
        return
    boots = np.stack([samples[r.key].boot for r in ranked])  # (rows, resamples)
    for i, r in enumerate(ranked):
        r.rank = 1 + int(np.count_nonzero(_lower_bound_positive(boots - boots[i])))


def _lower_bound_positive(diffs: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Per row of `diffs` (rows x resamples): is its percentile interval's low end above 0?

    The same verdict as `percentile_interval(...)[0] > 0` (numpy's linear quantile), decided by
    counting the non-positive resamples, which needs no sort; only a row whose count puts the
    quantile between two order statistics is settled by computing it.
    """
    n = diffs.shape[1]
    h = (1.0 - level) / 2.0 * (n - 1)
    below = int(np.floor(h))
    nonpositive = np.count_nonzero(diffs <= 0.0, axis=1)
    out = nonpositive <= below  # the order statistic at floor(h) is already positive
    edge = np.flatnonzero(nonpositive == below + 1)
    if edge.size and h > below:
        out[edge] = np.quantile(diffs[edge], (1.0 - level) / 2.0, axis=1) > 0.0
    return out


def _lora_for(row: BoardRow, members: list[BoardRow], filters: BoardFilters) -> BoardRow | None:
    """The LoRA row at this row's budget (within the band of its count), the closest one."""
    if row.trainable_params is None:
        return None
    near = [
        o
        for o in members
        if o.method == LORA and _within(o.trainable_params, row.trainable_params, filters.band)
    ]
    return min(near, key=lambda o: abs(o.trainable_params - row.trainable_params), default=None)


@dataclass(frozen=True)
class _Samples:
    """Per row, its overall score on the items all rows of the group share, and resamples."""

    point: float
    boot: np.ndarray
    n_items: int


def _overall_samples(members: list[BoardRow], resamples: int, seed: int) -> dict[str, _Samples]:
    """Bootstrap the overall score of every row on the same resampled items (paired)."""
    per_set: dict[str, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    shared = _shared_items(members)
    n_items = sum(len(items) for items in shared.values())
    for (task, protocol), items in shared.items():
        n = len(items)
        stream = zlib.crc32(f"{task}\0{protocol}".encode())
        rng = np.random.default_rng([seed, stream])
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n  # (resamples, n)
        for r in members:
            v = np.array([r.verdicts[(task, protocol)][i] for i in items])
            per_set[r.key][(task, protocol)] = (np.array(v.mean()), weights @ v)
    out = {}
    for r in members:
        sets = per_set.get(r.key)
        if not sets:
            continue
        fams: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        for (task, _), pair in sets.items():
            fams[TASKS.get(task).family if task in TASKS else task].append(pair)
        points = [np.mean([p for p, _ in f]) for f in fams.values()]
        boots = [np.mean([b for _, b in f], axis=0) for f in fams.values()]
        out[r.key] = _Samples(float(np.mean(points)), np.mean(boots, axis=0), n_items)
    return out


def _shared_items(members: list[BoardRow]) -> dict[tuple[str, str], list[tuple[str, str, str]]]:
    """(set, protocol) -> the items every row of the group scored there, in a fixed order."""
    keys = set.intersection(*(set(r.verdicts) for r in members)) if members else set()
    out = {}
    for k in sorted(keys):
        items = set.intersection(*(set(r.verdicts[k]) for r in members))
        if items:
            out[k] = sorted(items)
    return out


def _paired(samples: dict[str, _Samples], row: BoardRow, ref: BoardRow) -> Paired | None:
    a, b = samples.get(ref.key), samples.get(row.key)
    if a is None or b is None:
        return None
    low, high = percentile_interval(b.boot - a.boot)
    return Paired(b.point - a.point, low, high, b.n_items)


def rows_for(board: Board, keys: Sequence[str]) -> list[BoardRow]:
    """The rows of `board` with these keys, in board order."""
    wanted = set(keys)
    return [r for r in board.rows if r.key in wanted]
