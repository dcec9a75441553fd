"""Reads behind the run and jobs pages: filter choices, one run's records, predictions, pairs.

Each is one or two queries with bound parameters, cheap enough for a page that must show in
under a second with hundreds of thousands of predictions in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select

from moebench import store as db
from moebench.store.queries import ARTIFACTS, METRICS, PREDICTIONS, RUNS

PREDICTION_LIMIT = 2_000


@dataclass(frozen=True)
class FilterOptions:
    models: list[str]
    suites: list[str]
    methods: list[str]
    protocols: list[str]


def filter_options(store: db.Store) -> FilterOptions:
    """The distinct values each filter can take among finished runs."""
    with store.session() as s:
        done = RUNS.c.status == "done"

        def distinct(col: Any) -> list[str]:
            return sorted(v for (v,) in s.execute(select(col).where(done).distinct()))

        protocols = select(METRICS.c.protocol).join(RUNS, RUNS.c.id == METRICS.c.run_id)
        return FilterOptions(
            models=distinct(RUNS.c.model),
            suites=distinct(RUNS.c.suite),
            methods=distinct(RUNS.c.method),
            protocols=sorted(v for (v,) in s.execute(protocols.where(done).distinct())),
        )


def run_choices(store: db.Store) -> list[tuple[int, str, str]]:
    """(id, label, status) of every run, newest first, for a run picker."""
    stmt = select(RUNS.c.id, RUNS.c.method, RUNS.c.model, RUNS.c.seed, RUNS.c.status).order_by(
        RUNS.c.id.desc()
    )
    with store.session() as s:
        return [
            (i, f"{i}: {method} on {model}, seed {seed} ({status})", status)
            for i, method, model, seed, status in s.execute(stmt)
        ]


def runs_with_artifact(store: db.Store, name: str) -> list[int]:
    """Ids of the runs that keep an artifact `name` (e.g. `importance`), newest first."""
    stmt = select(ARTIFACTS.c.run_id).where(ARTIFACTS.c.name == name)
    with store.session() as s:
        return sorted((i for (i,) in s.execute(stmt.distinct())), reverse=True)


def prediction_sets(store: db.Store, run_id: int) -> dict[str, int]:
    """set -> how many items the run has predictions for."""
    p = PREDICTIONS
    stmt = select(p.c.task, func.count()).where(p.c.run_id == run_id).group_by(p.c.task)
    with store.session() as s:
        return dict(sorted(s.execute(stmt).all()))


def predictions(
    store: db.Store,
    run_id: int,
    *,
    task: str | None = None,
    wrong_only: bool = False,
    parse_failures_only: bool = False,
    limit: int = PREDICTION_LIMIT,
) -> list[dict[str, Any]]:
    """A run's per-item predictions under the page's filters (at most `limit`, by item id)."""
    p = PREDICTIONS
    cols = (p.c.task, p.c.item_id, p.c.protocol, p.c.extracted, p.c.gold, p.c.correct)
    stmt = select(*cols, p.c.parse_failed, p.c.output).where(p.c.run_id == run_id)
    if task:
        stmt = stmt.where(p.c.task == task)
    if wrong_only:
        stmt = stmt.where(p.c.correct.is_(False))
    if parse_failures_only:
        stmt = stmt.where(p.c.parse_failed.is_(True))
    stmt = stmt.order_by(p.c.task, p.c.id).limit(limit)
    with store.session() as s:
        return [dict(r) for r in s.execute(stmt).mappings()]


def side_by_side(
    store: db.Store, run_a: int, run_b: int, *, task: str | None = None, flipped_only: bool = False
) -> list[dict[str, Any]]:
    """Items both runs scored (same set, id, protocol, prompt and gold), A's and B's verdicts.

    `flipped` marks an item one run got right and the other wrong.
    """
    a, b = PREDICTIONS.alias("a"), PREDICTIONS.alias("b")
    on = and_(
        a.c.task == b.c.task,
        a.c.item_id == b.c.item_id,
        a.c.protocol == b.c.protocol,
        a.c.prompt_hash == b.c.prompt_hash,
        a.c.gold == b.c.gold,
    )
    stmt = (
        select(
            a.c.task,
            a.c.item_id,
            a.c.protocol,
            a.c.gold,
            a.c.extracted.label("a_extracted"),
            b.c.extracted.label("b_extracted"),
            a.c.correct.label("a_correct"),
            b.c.correct.label("b_correct"),
        )
        .join(b, on)
        .where(a.c.run_id == run_a, b.c.run_id == run_b)
        .order_by(a.c.task, a.c.id)
    )
    if task:
        stmt = stmt.where(a.c.task == task)
    if flipped_only:
        stmt = stmt.where(a.c.correct != b.c.correct)
    with store.session() as s:
        rows = [dict(r) for r in s.execute(stmt).mappings()]
    for r in rows:
        r["flipped"] = bool(r["a_correct"]) != bool(r["b_correct"])
    return rows


def jobs_by_status(store: db.Store) -> dict[str, int]:
    """How many runs are in each status (all statuses listed, zero included)."""
    stmt = select(RUNS.c.status, func.count()).group_by(RUNS.c.status)
    with store.session() as s:
        found = dict(s.execute(stmt).all())
    return {status: int(found.get(status, 0)) for status in db.RUN_STATUSES}
