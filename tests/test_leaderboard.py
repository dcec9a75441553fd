"""The leaderboard's numbers against an independent recomputation from the database rows.

The recomputation reads the SQLite file with the standard library's sqlite3 and uses scipy's t
quantile and its own bootstrap, so a shared bug between it and `moebench.board` is unlikely.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from moebench import store as db
from moebench.board.table import BoardFilters, build_board
from moebench.store.readonly import StoreUnavailable, open_store_readonly
from tests.test_leaderboard_data import PLAN, seed_store

scipy_stats = pytest.importorskip("scipy.stats")

FAMILY = {"boolq": "commonsense", "piqa": "commonsense", "gsm8k": "math", "svamp": "math"}
FAMILY["ifeval"] = "instruction"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("board") / "board.db"
    seed_store(path)
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # 0444: the app cannot write
    return path


def _raw(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _per_run_scores(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """method -> run id -> set, family average and overall, from the metrics table."""
    rows = _raw(
        path,
        "SELECT r.method, r.id, m.task, m.value FROM runs r JOIN metrics m ON m.run_id = r.id "
        "WHERE r.status = 'done'",
    )
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for method, run, task, value in rows:
        out[method][run][task] = value
    for runs in out.values():
        for scores in runs.values():
            fams = defaultdict(list)
            for task, value in list(scores.items()):
                fams[FAMILY[task]].append(value)
            for f, vals in fams.items():
                scores[f"{f}_avg"] = sum(vals) / len(vals)
            scores["overall"] = sum(scores[f"{f}_avg"] for f in fams) / len(fams)
    return out


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    x = np.array(values)
    half = scipy_stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return x.mean(), x.mean() - half, x.mean() + half


def test_means_intervals_and_family_averages(seeded: Path) -> None:
    expected = _per_run_scores(seeded)
    with open_store_readonly(f"sqlite:///{seeded}") as store:
        board = build_board(store)
    assert {r.method for r in board.rows} == set(PLAN)
    for row in board.rows:
        runs = expected[row.method]
        assert row.n_seeds == len(PLAN[row.method][2]) == len(runs)
        for column in ("boolq", "ifeval", "commonsense_avg", "math_avg", "overall"):
            values = [runs[r][column] for r in runs]
            got = row.scores[column]
            assert got.mean == pytest.approx(np.mean(values), abs=1e-12)
            if len(values) > 1:
                _, low, high = _t_interval(values)
                assert (got.low, got.high) == pytest.approx((low, high), abs=1e-9)
            else:
                assert got.low is None and got.high is None
        assert row.trainable_params == PLAN[row.method][1]
        assert row.percent_of_base == pytest.approx(100 * PLAN[row.method][1] / 1_000_000)


def _item_means(path: Path, method: str) -> dict[str, np.ndarray]:
    rows = _raw(
        path,
        "SELECT p.task, p.item_id, p.correct FROM predictions p JOIN runs r ON r.id = p.run_id "
        f"WHERE r.status = 'done' AND r.method = '{method}'",
    )
    acc: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for task, item, correct in rows:
        acc[task][item].append(correct)
    return {t: np.array([np.mean(acc[t][i]) for i in sorted(acc[t])]) for t in acc}


def _overall(per_set: dict[str, float]) -> float:
    fams = defaultdict(list)
    for task, v in per_set.items():
        fams[FAMILY[task]].append(v)
    return float(np.mean([np.mean(v) for v in fams.values()]))


def _bootstrap_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float]:
    rng = np.random.default_rng(123)
    draws = []
    for _ in range(3000):
        sample = {}
        for task in a:
            idx = rng.integers(0, a[task].size, a[task].size)
            sample[task] = b[task][idx].mean() - a[task][idx].mean()
        draws.append(_overall(sample))
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def test_differences_against_lora_and_tie_ranks(seeded: Path) -> None:
    with open_store_readonly(f"sqlite:///{seeded}") as store:
        board = build_board(store, BoardFilters(target_params=10_000, band=0.05))
    by = {r.method: r for r in board.rows}
    lora = _item_means(seeded, "lora")
    for method in ("loracoe", "loramoe"):
        mine = _item_means(seeded, method)
        diff = _overall({t: mine[t].mean() for t in mine}) - _overall(
            {t: lora[t].mean() for t in lora}
        )
        low, high = _bootstrap_diff(lora, mine)
        got = by[method].vs_lora
        assert got is not None and got.diff == pytest.approx(diff, abs=1e-12)
        assert (got.low, got.high) == pytest.approx((low, high), abs=0.015)
        assert got.holds == (low > 0 or high < 0)
    assert by["loracoe"].vs_lora.holds and not by["loramoe"].vs_lora.holds
    # Band: within 5% of 10,000 are lora, loramoe (9,900) and loracoe (10,200); mixlora is not.
    assert {m: r.in_band for m, r in by.items()} == {
        m: abs(PLAN[m][1] / 10_000 - 1) <= 0.05 for m in PLAN
    }
    # loracoe beats both; lora and loramoe cannot be separated, so they share rank 2.
    assert {m: r.rank for m, r in by.items()} == {
        "loracoe": 1,
        "lora": 2,
        "loramoe": 2,
        "mixlora": None,
        "lora_smoe": None,
    }
    assert by["lora"].vs_lora is None and by["mixlora"].vs_lora is None


def test_filters_are_values_not_sql(seeded: Path) -> None:
    with open_store_readonly(f"sqlite:///{seeded}") as store:
        hostile = build_board(store, BoardFilters(models=("x' OR '1'='1",)))
        only = build_board(store, BoardFilters(methods=("lora",)))
    assert hostile.rows == []
    assert [r.method for r in only.rows] == ["lora"]


def test_readonly_store_refuses_writes(seeded: Path) -> None:
    with open_store_readonly(f"sqlite:///{seeded}") as store:
        run = db.list_runs(store, limit=1)[0]
        with pytest.raises(OperationalError, match=r"readonly|read-only"):
            db.set_status(store, run["id"], "cancelled")


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("missing", lambda tmp, src: tmp / "nope.db"),
        ("empty", lambda tmp, src: (tmp / "empty.db").touch() or tmp / "empty.db"),
        ("corrupt", lambda tmp, src: (tmp / "bad.db").write_bytes(b"x" * 4096) and tmp / "bad.db"),
        ("newer", lambda tmp, src: _stamp(_copy(src, tmp / "new.db"), "ffff9999")),
        ("older", lambda tmp, src: _stamp(_copy(src, tmp / "old.db"), "0004")),
    ],
)
def test_unreadable_stores_say_what_happened(tmp_path: Path, seeded: Path, kind, make) -> None:
    path = make(tmp_path, seeded)
    with pytest.raises(StoreUnavailable) as e:
        open_store_readonly(f"sqlite:///{path}")
    assert e.value.kind == kind
    assert "moebench" in str(e.value) or "--db" in str(e.value)


def _stamp(path: Path, revision: str) -> Path:
    os.chmod(path, 0o644)
    con = sqlite3.connect(path)
    con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    con.commit()
    con.close()
    return path


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own (dropped after), on the CI server."""
    url = os.environ.get("MOEBENCH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set MOEBENCH_TEST_POSTGRES_URL to a PostgreSQL server to run this")
    name = f"moebench_board_{os.getpid()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgres_read_only_and_same_numbers(postgres_url: str, seeded: Path) -> None:
    seed_store(postgres_url)
    with (
        open_store_readonly(postgres_url) as pg,
        open_store_readonly(f"sqlite:///{seeded}") as lite,
    ):
        a, b = build_board(pg), build_board(lite)
        run = db.list_runs(pg, limit=1)[0]
        with pytest.raises(DBAPIError, match="read-only transaction"):
            db.set_status(pg, run["id"], "cancelled")
    assert [(r.method, r.rank, r.scores["overall"]) for r in a.rows] == [
        (r.method, r.rank, r.scores["overall"]) for r in b.rows
    ]


def test_rank_test_counts_like_the_percentile_interval() -> None:
    from moebench.board.table import _lower_bound_positive
    from moebench.stats import percentile_interval

    rng = np.random.default_rng(1)
    for n in (2000, 1000, 137):
        diffs = rng.normal(0.05, 0.025, size=(600, n))
        diffs[::3] = np.round(diffs[::3], 2)  # ties at the boundary
        expected = [percentile_interval(d)[0] > 0 for d in diffs]
        assert _lower_bound_positive(diffs).tolist() == expected


def test_board_and_runs_summary_agree(seeded: Path) -> None:
    """The page and `moebench runs summary` read the same library: equal per-set numbers."""
    from moebench.comparisons import seed_groups

    with open_store_readonly(f"sqlite:///{seeded}") as store:
        board = build_board(store)
        groups = seed_groups(store, min_seeds=1)
    by_runs = {r.runs: r for r in board.rows}
    assert {g.runs for g in groups} == set(by_runs)
    for g in groups:
        row = by_runs[g.runs]
        for s in g.sets:
            assert row.scores[s.task] == s.summary


@pytest.fixture(params=["sqlite", "postgres"])
def writable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return seed_store(tmp_path / "board.db")
    return seed_store(request.getfixturevalue("postgres_url"))


def test_store_version_moves_with_every_result_write_not_with_heartbeats(
    writable_url: str,
) -> None:
    """The app's cache key: any write the board reads changes it; a running job's beat does not."""
    from moebench.board.load import store_version
    from moebench.store import jobs
    from moebench.store.queries import METRIC_FIELDS, PREDICTION_FIELDS, PREDICTIONS, RUNS
    from tests.test_leaderboard_data import add_run

    def newest_prediction_ids(store: db.Store) -> tuple[int, int]:
        with store.session() as s:
            return s.execute(select(func.count(), func.max(PREDICTIONS.c.id))).one()

    with db.open_store(writable_url) as store:
        newest = add_run(store, "lora", 12)  # its results are the newest rows
        preds = [{k: p[k] for k in PREDICTION_FIELDS} for p in db.get_predictions(store, newest)]
        metric = {k: db.get_metrics(store, newest)[0][k] for k in METRIC_FIELDS}
        seen = {store_version(store)}
        before = newest_prediction_ids(store)
        writes = {
            "predictions replaced": lambda: db.add_predictions(store, newest, preds),
            "metric rescored": lambda: db.add_metrics(store, newest, [{**metric, "value": 0.5}]),
            "artifact replaced": lambda: db.put_artifact(store, newest, "budget", {"x": 1}),
        }
        for what, write in writes.items():
            write()
            version = store_version(store)
            assert version not in seen, what
            seen.add(version)
        if writable_url.startswith("sqlite"):
            # Why `updated_at` is in the key: SQLite gave the replaced rows back their ids.
            assert newest_prediction_ids(store) == before
        lag = db.get_run(store, newest)["updated_at"] - timedelta(hours=1)
        with store.session() as s:  # a writer whose clock lags an hour behind the others
            s.execute(update(RUNS).where(RUNS.c.id == newest).values(updated_at=lag))
        assert store_version(store) not in seen, "a lagging writer's update"
        seen.add(store_version(store))
        running = add_run(store, "lora", 11, status="running", owner="w1")
        seen.add(store_version(store))
        assert jobs.heartbeat(store, running, "w1", wall_time_s=3.0)
        assert store_version(store) in seen
        for what, write in {
            "run finished": lambda: db.set_status(store, running, "done"),
            "run deleted": lambda: db.delete_run(store, newest),
        }.items():
            write()
            version = store_version(store)
            assert version not in seen, what
            seen.add(version)


def test_rows_of_unchanged_runs_are_reused_and_equal_a_fresh_build(writable_url: str) -> None:
    """The row cache: after one run is rescored and re-predicted, only its row is rebuilt, and
    the board equals one built from nothing."""
    from moebench.board.row_cache import ROWS
    from moebench.store.queries import METRIC_FIELDS, PREDICTION_FIELDS

    with db.open_store(writable_url) as store:
        first = {r.method: r for r in build_board(store).rows}
        run = first["mixlora"].runs[0]
        metrics = [{k: m[k] for k in METRIC_FIELDS} for m in db.get_metrics(store, run)]
        preds = [{k: p[k] for k in PREDICTION_FIELDS} for p in db.get_predictions(store, run)]
        db.add_metrics(store, run, [{**m, "value": 1.0} for m in metrics])
        db.add_predictions(store, run, [{**p, "correct": True} for p in preds])
        again = build_board(store)
        ROWS.clear()
        fresh = build_board(store)
    assert again == fresh
    for row in again.rows:
        reused = row.scores is first[row.method].scores
        assert reused == (row.method != "mixlora"), row.method
    assert again.rows != [first[r.method] for r in again.rows]


def test_row_cache_drops_the_least_recently_used_rows_past_its_verdict_bound() -> None:
    from moebench.board.row_cache import RowCache
    from moebench.board.table import BoardRow

    def row(name: str, items: int) -> BoardRow:
        verdicts = {("boolq", "p"): {(str(i), "h", "g"): 1.0 for i in range(items)}}
        return BoardRow(name, name, "m", "s", (1,), (0,), 1, 1, None, {}, {}, verdicts=verdicts)

    cache = RowCache(max_verdicts=10)  # a row costs 1 + its verdicts
    cache.put("a", 1, row("a", 3))
    cache.put("b", 1, row("b", 3))
    assert cache.get("a", 1) is not None  # now the most recently used
    cache.put("c", 1, row("c", 3))  # 12 > 10: "b" goes
    assert cache.get("b", 1) is None and cache.get("a", 1) and cache.get("c", 1)
    assert cache.get("a", 2) is None  # built from other runs: not this row
    cache.put("a", 2, row("a", 3))  # a new stamp replaces the old row
    assert len(cache) == 2 and cache.get("a", 1) is None and cache.get("a", 2) is not None
    cache.put("huge", 1, row("huge", 10))  # larger than the bound: never held
    assert cache.get("huge", 1) is None and len(cache) == 2
    got = cache.get("a", 2)
    got.rank = 1
    assert cache.get("a", 2).rank is None  # a build's own fields never leak into the cache


def test_row_cache_keeps_rows_apart_per_protocol_filter(seeded: Path) -> None:
    """A row built under one protocol filter is never served under another."""
    from moebench.board.row_cache import ROWS

    url = f"sqlite:///{seeded}"
    picked = BoardFilters(protocols=("llm-adapters/beam4",))
    with open_store_readonly(url) as store:
        build_board(store)
        cached = build_board(store, picked)
        ROWS.clear()
        fresh = build_board(store, picked)
    assert cached == fresh
    assert "ifeval" not in fresh.score_columns() and "boolq" in fresh.score_columns()


def test_warm_start_builds_the_rows_the_page_then_reuses(
    seeded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`moebench leaderboard`'s warm-up (moebench/board/serve.py) caches every row of the
    default view, so the page's first build makes none; a store it cannot open is left alone."""
    from moebench.board import serve
    from moebench.board.row_cache import ROWS

    url = f"sqlite:///{seeded}"
    ROWS.clear()
    serve.build_rows(url)
    made: list[object] = []
    put = ROWS.put
    monkeypatch.setattr(ROWS, "put", lambda *a: (made.append(a[0]), put(*a)))
    with open_store_readonly(url) as store:
        warm = build_board(store, BoardFilters())
        assert made == []
        ROWS.clear()
        cold = build_board(store, BoardFilters())
    assert warm == cold and len(made) == len(cold.rows) > 0
    missing = tmp_path / "none.db"
    serve.build_rows(f"sqlite:///{missing}")  # logged, not raised; the page explains it
    assert not missing.exists()


def test_warm_start_imports_the_modules_the_pages_import(tmp_path: Path) -> None:
    """Read from the scripts: modules, and submodules named in `from` imports; not the names
    a module exports, the app's own helpers, imports inside functions or `__future__`."""
    from moebench.board.serve import page_modules

    (tmp_path / "pages").mkdir()
    (tmp_path / "entry.py").write_text("from __future__ import annotations\nimport json\n")
    (tmp_path / "helper.py").write_text("import csv, email.mime\n")
    (tmp_path / "pages" / "one.py").write_text(
        "from helper import x\nfrom moebench.board import charts, reference\n"
        "from moebench.board.table import build_board\n"
        "def f():\n    import tomllib\n"
    )
    assert page_modules(tmp_path / "entry.py") == [
        "json", "csv", "email.mime", "moebench.board", "moebench.board.charts",
        "moebench.board.reference", "moebench.board.table",
    ]  # fmt: skip


def test_pareto_chart_tells_models_apart_and_fronts_follow_the_ranking_groups() -> None:
    """Shape by model, faded outside the band, one front per (model, suite): the groups the
    table ranks within, so a front never mixes suites."""
    from moebench.board.charts import OUT_OF_BAND_OPACITY, accuracy_vs_params
    from moebench.board.table import BoardRow
    from moebench.stats import SeedSummary

    def row(method: str, model: str, suite: str, params: int, score: float, in_band: bool):
        summary = SeedSummary(1, score, None, None, None)
        return BoardRow(
            f"{method}/{model}/{suite}", method, model, suite, (1,), (0,), params, 10**6, None,
            {}, {"overall": summary}, in_band=in_band,
        )  # fmt: skip

    rows = [
        row(method, model, suite, params, score, params < 25_000)
        for model in ("m-a", "m-b")
        for suite in ("s-1", "s-2")
        for method, params, score in (("lora", 10_000, 0.5), ("mixlora", 30_000, 0.6))
    ]
    rows[0].scores["overall"] = SeedSummary(1, 0.7, None, None, None)  # m-a/s-1: lora dominates
    split = [row("loracoe", "m-a", "s-1", 10_100, 0.4, True)]  # one method on both sides
    split.append(row("loracoe", "m-b", "s-1", 40_000, 0.3, False))
    both = accuracy_vs_params(split)
    parts = [t for t in both.data if t.mode == "markers"]
    assert [(t.name, t.legendgroup, t.showlegend, t.opacity) for t in parts] == [
        ("loracoe", "loracoe", True, 1.0),
        ("loracoe", "loracoe", False, OUT_OF_BAND_OPACITY),
    ]  # one legend entry; the faded part keeps the method's colour, bars included
    assert parts[0].marker.color == parts[1].marker.color == parts[1].error_y.color
    assert [list(t.x) for t in parts] == [[10_100], [40_000]]
    fig = accuracy_vs_params(rows)
    points = [t for t in fig.data if t.mode == "markers"]
    fronts = {t.name: list(zip(t.x, t.y, strict=True)) for t in fig.data if t.mode == "lines"}
    for t in points:
        faded = t.opacity == OUT_OF_BAND_OPACITY
        members = [r for r in rows if r.method == t.name and r.in_band != faded]
        assert list(t.x) == [r.trainable_params for r in members]
        shapes = {r.model: s for r, s in zip(members, t.marker.symbol, strict=True)}
        assert shapes["m-a"] != shapes["m-b"]
    assert sorted((t.name, t.opacity) for t in points) == [
        ("lora", 1.0),
        ("mixlora", OUT_OF_BAND_OPACITY),
    ]
    assert set(fronts) == {
        f"Pareto front ({m}, {s})" for m in ("m-a", "m-b") for s in ("s-1", "s-2")
    }
    for name, front in fronts.items():
        expected = [(10_000, 70.0)] if "m-a, s-1" in name else [(10_000, 50.0), (30_000, 60.0)]
        assert [x for x, _ in front] == [x for x, _ in expected], name
        assert [y for _, y in front] == pytest.approx([y for _, y in expected]), name
