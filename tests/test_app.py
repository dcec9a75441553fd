"""Every leaderboard page under AppTest, on a seeded store the app may only read (mode 0444).

Shown numbers are checked against a recomputation from the SQLite rows (sqlite3, scipy), and
the database file is byte-for-byte unchanged after every page ran.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.test_leaderboard_data import PLAN, seed_store

pytest.importorskip("streamlit")
scipy_stats = pytest.importorskip("scipy.stats")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
FAMILY = {"boolq": "commonsense", "piqa": "commonsense", "gsm8k": "math", "svamp": "math"}
FAMILY["ifeval"] = "instruction"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("app") / "board.db"
    seed_store(path)
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return path


def _app(monkeypatch: pytest.MonkeyPatch, url: str, page: str | None = None) -> AppTest:
    monkeypatch.setenv("MOEBENCH_DB", url)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _frame(at: AppTest, having: str, not_having: str | None = None):
    """The first table shown with column `having` (AppTest does not expose dataframe keys)."""
    for d in at.dataframe:
        cols = list(d.value.columns)
        if having in cols and (not_having is None or not_having not in cols):
            return d.value
    raise AssertionError(f"no table with a {having!r} column")


def _sql(path: Path, query: str, *args: object) -> list[tuple]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def _expected_scores(path: Path) -> dict[str, dict[str, list[float]]]:
    """method -> column -> per-seed values, from the metrics rows."""
    per_run: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for method, run, task, value in _sql(
        path,
        "SELECT r.method, r.id, m.task, m.value FROM runs r JOIN metrics m ON m.run_id = r.id "
        "WHERE r.status = 'done'",
    ):
        per_run[(method, run)][task] = value
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (method, _), scores in sorted(per_run.items()):
        fams = defaultdict(list)
        for task, v in scores.items():
            fams[FAMILY[task]].append(v)
        avgs = {f"{f}_avg": float(np.mean(v)) for f, v in fams.items()}
        for col, v in {**scores, **avgs, "overall": float(np.mean(list(avgs.values())))}.items():
            out[method][col].append(v)
    return out


def test_main_table_shows_the_recomputed_aggregates(monkeypatch, seeded: Path) -> None:
    before = hashlib.sha256(seeded.read_bytes()).hexdigest()
    at = _app(monkeypatch, f"sqlite:///{seeded}")
    at.number_input(key="f_target").set_value(10_000).run()
    frame = _frame(at, "vs_lora").set_index("method")
    expected = _expected_scores(seeded)
    assert set(frame.index) == set(PLAN)
    for method, cols in expected.items():
        assert frame.loc[method, "n_seeds"] == len(PLAN[method][2])
        assert frame.loc[method, "trainable_params"] == PLAN[method][1]
        for col in ("commonsense_avg", "math_avg", "instruction_avg", "overall"):
            x = np.array(cols[col])
            assert frame.loc[method, col] == pytest.approx(100 * x.mean(), abs=1e-3)
        x = np.array(cols["overall"])
        if x.size > 1:
            half = scipy_stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
            assert frame.loc[method, "overall_low"] == pytest.approx(
                100 * (x.mean() - half), abs=1e-3
            )
            assert frame.loc[method, "overall_high"] == pytest.approx(
                100 * (x.mean() + half), abs=1e-3
            )
    # Budget band at 10,000 +/- 5%: only these are ranked; ties share a rank.
    ranks = frame["rank"].to_dict()
    assert ranks["loracoe"] == 1 and ranks["lora"] == ranks["loramoe"] == 2
    assert np.isnan(ranks["mixlora"]) and np.isnan(ranks["lora_smoe"])
    # Differences against LoRA: point values from the metric means; a verdict only where it holds.
    lora = np.mean(expected["lora"]["overall"])
    for method in ("loracoe", "loramoe"):
        diff = 100 * (np.mean(expected[method]["overall"]) - lora)
        assert frame.loc[method, "vs_lora"] == pytest.approx(diff, abs=1e-3)
    assert frame.loc["loracoe", "vs_lora_verdict"] == "better"
    assert frame.loc["loramoe", "vs_lora_verdict"] == ""
    assert "within ±5% of 10,000" in " ".join(c.value for c in at.caption)
    assert hashlib.sha256(seeded.read_bytes()).hexdigest() == before


def test_filters_and_reference_rows(monkeypatch, seeded: Path) -> None:
    at = _app(monkeypatch, f"sqlite:///{seeded}")
    at.multiselect(key="f_method").set_value(["lora", "loracoe"]).run()
    assert sorted(_frame(at, "vs_lora")["method"]) == ["lora", "loracoe"]
    assert len(at.dataframe) == 1  # the reference rows are built once their expander opens
    at.session_state["references"] = True
    at.run()
    ref = _frame(at, "source", not_having="rank").set_index("method")
    assert ref.loc["chance", "boolq"] == pytest.approx(50.0)
    assert ref.loc["chance", "commonsense_avg"] == pytest.approx(50.0)  # boolq 1/2, piqa 1/2
    published = ref[ref["model"] == "qwen2-0.5b"]
    assert published.loc["LoRACoE (published)", "overall"] == pytest.approx(58.20)
    assert set(ref["source"]) - {"measured"} == set(ref["source"])


def test_charts_tab_plots_the_table_rows(monkeypatch, seeded: Path) -> None:
    """Charts are drawn only in their tab; the Pareto points are the table's rows."""
    import json

    at = _app(monkeypatch, f"sqlite:///{seeded}")
    assert not at.get("plotly_chart")
    at.session_state["view"] = "Charts"
    at.run()
    assert not at.exception and not at.dataframe
    scores = _expected_scores(seeded)
    expected = sorted(
        (PLAN[m][1], round(100 * np.mean(s["overall"]), 6)) for m, s in scores.items()
    )
    pareto = json.loads(at.get("plotly_chart")[0].proto.spec)
    shown = [
        (x, round(y, 6))
        for trace in pareto["data"]
        if trace.get("mode") == "markers"
        for x, y in zip(trace["x"], trace["y"], strict=True)
    ]
    assert sorted(shown) == expected


def test_a_rescored_run_shows_at_the_next_visit(monkeypatch, tmp_path: Path) -> None:
    """The cached table is keyed on the store's version: a new score is never served stale."""
    from moebench import store as db
    from moebench.store.queries import METRIC_FIELDS

    url = seed_store(tmp_path / "board.db")
    at = _app(monkeypatch, url)
    with db.open_store(url) as store:
        run = next(
            r for r in db.list_runs(store, status="done", limit=None) if r["method"] == "mixlora"
        )
        rows = [{k: m[k] for k in METRIC_FIELDS} for m in db.get_metrics(store, run["id"])]
        db.add_metrics(store, run["id"], [{**m, "value": 1.0} for m in rows])
    expected = _expected_scores(tmp_path / "board.db")["mixlora"]["overall"]
    at.run()
    frame = _frame(at, "vs_lora").set_index("method")
    assert frame.loc["mixlora", "overall"] == pytest.approx(100 * np.mean(expected), abs=1e-3)
    assert max(expected) == 1.0


def test_run_page_predictions_and_flips(monkeypatch, seeded: Path) -> None:
    at = _app(monkeypatch, f"sqlite:///{seeded}", "pages/run.py")
    run_a = at.selectbox(key="run_a").value
    at.checkbox(key="wrong_only").check().run()
    wrong = _sql(seeded, "SELECT COUNT(*) FROM predictions WHERE run_id=? AND NOT correct", run_a)
    assert len(_frame(at, "parse_failed")) == wrong[0][0]
    run_b = at.selectbox(key="run_b").value
    flips = _sql(
        seeded,
        "SELECT COUNT(*) FROM predictions a JOIN predictions b ON a.task=b.task AND "
        "a.item_id=b.item_id AND a.protocol=b.protocol WHERE a.run_id=? AND b.run_id=? AND "
        "a.correct != b.correct",
        run_a,
        run_b,
    )
    assert len(_frame(at, "flipped")) == flips[0][0]


def test_every_page_runs_read_only(monkeypatch, seeded: Path) -> None:
    before = hashlib.sha256(seeded.read_bytes()).hexdigest()
    for page in ("pages/leaderboard.py", "pages/run.py", "pages/jobs.py"):
        at = _app(monkeypatch, f"sqlite:///{seeded}", page)
        assert not at.error, page
    counts = dict(_sql(seeded, "SELECT status, COUNT(*) FROM runs GROUP BY status"))
    shown = {m.label: int(m.value) for m in at.metric}
    assert shown["done"] == counts["done"] and shown["failed"] == counts["failed"] == 1
    failed = [d.value for d in at.dataframe if set(d.value["status"]) == {"failed"}]
    assert list(failed[0]["status_reason"]) == ["CUDA out of memory at step 3"]
    assert hashlib.sha256(seeded.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "newer"])
def test_unusable_store_explains(monkeypatch, tmp_path: Path, seeded: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.db"
    if kind == "empty":
        path.touch()
    elif kind == "corrupt":
        path.write_bytes(b"not a database" * 300)
    elif kind == "newer":
        path.write_bytes(seeded.read_bytes())
        con = sqlite3.connect(path)
        con.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
        con.commit()
        con.close()
    at = _app(monkeypatch, f"sqlite:///{path}")
    assert len(at.error) == 1
    text = at.error[0].value + " ".join(m.value for m in at.markdown)
    assert "What to run" in text
    assert {
        "missing": "no results database",
        "empty": "no moebench tables",
        "corrupt": "not a readable",
        "newer": "newer moebench",
    }[kind] in text


def _importance_record(seed: int) -> dict:
    """A stored importance record as `moebench analyze importance` writes one (two tasks, two
    module types, two layers, four ranks), with its figures' numbers from the library."""
    from moebench.importance_figures import figures

    rng = np.random.default_rng(seed)
    tensors, rank_sets, tasks = {}, {}, {}
    for layer in (0, 1):
        for kind in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{kind}"
            rank_sets[name] = {"module_type": kind, "ranks_per_expert": None}
            for role in ("lora_A", "lora_B"):
                tensors[f"{name}.{role}"] = {"module_type": kind, "role": role, "rank_set": name}
    for task in ("boolq", "gsm8k"):
        tasks[task] = {
            "ranks": {k: rng.random(4).tolist() for k in rank_sets},
            "variance": {t: rng.random(2).tolist() for t in tensors},
        }
    record = {"layout": {"rank_sets": rank_sets, "tensors": tensors}, "tasks": tasks}
    record["figures"] = figures(record)
    return record


def _chart_traces(at: AppTest, key_part: str) -> list[str]:
    import json

    for chart in at.get("plotly_chart"):
        spec = json.loads(chart.proto.spec)
        title = spec["layout"].get("title", {}).get("text", "")
        if key_part in title:
            return [t.get("name", "") for t in spec["data"]]
    raise AssertionError(f"no chart titled with {key_part!r}")


def test_run_page_shows_stored_importance_and_compares_runs(monkeypatch, tmp_path: Path) -> None:
    from moebench import store as db

    path = tmp_path / "board.db"
    seed_store(path)
    with db.open_store(f"sqlite:///{path}") as store:
        done = {r["method"]: r["id"] for r in db.list_runs(store, status="done", limit=None)}
        records = {done["lora"]: _importance_record(0), done["loracoe"]: _importance_record(1)}
        for run_id, record in records.items():
            db.put_artifact(store, run_id, "importance", record)
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    at = _app(monkeypatch, f"sqlite:///{path}", "pages/run.py")
    at.selectbox(key="run_a").set_value(done["lora"]).run()
    assert not at.exception, [e.value for e in at.exception]
    table = _frame(at, "d_or_k_avg")
    record = records[done["lora"]]
    for kind in ("q_proj", "v_proj"):  # by hand: every (task, tensor) pair of the type, pooled
        pairs = [
            pair
            for summary in record["tasks"].values()
            for name, pair in summary["variance"].items()
            if record["layout"]["tensors"][name]["module_type"] == kind
        ]
        row = table[(table["module_type"] == kind) & (table["tensor"] == "all")].iloc[0]
        assert row["rank_avg"] == pytest.approx(np.mean([p[0] for p in pairs]))
        assert row["d_or_k_avg"] == pytest.approx(np.mean([p[1] for p in pairs]))
        assert row["ratio"] == pytest.approx(row["rank_avg"] / row["d_or_k_avg"])
    assert len(_chart_traces(at, "Figure 2")) == 2  # rank and d bars of one run
    assert len(_chart_traces(at, "Figure 4")) == 2  # one line per task
    _chart_traces(at, "between tasks")
    _chart_traces(at, "between ranks")
    at.multiselect(key="imp_compare").select(done["loracoe"]).run()
    names = _chart_traces(at, "Figure 4")
    assert len(names) == 4 and sum(n.startswith(f"{done['loracoe']}: loracoe") for n in names) == 2
    assert len(_chart_traces(at, "Figure 2")) == 4
    at.selectbox(key="run_a").set_value(done["loramoe"]).run()
    assert any("moebench analyze importance" in i.value for i in at.info)


def test_choices_outlive_the_charts_tab_and_other_pages(monkeypatch, seeded: Path) -> None:
    """Streamlit forgets a widget's value on a run that does not draw it; the column picker,
    the sort and the filters must not reset when the reader opens Charts or another page."""
    at = _app(monkeypatch, f"sqlite:///{seeded}")
    at.multiselect(key="f_method").set_value(["lora", "loracoe", "mixlora"]).run()
    at.number_input(key="f_target").set_value(10_000).run()
    at.multiselect(key="t_columns").set_value(["method", "trainable_params", "overall"]).run()
    at.selectbox(key="t_sort").set_value("method").run()
    expected = _frame(at, "overall")
    assert list(expected.columns) == ["method", "trainable_params", "overall"]
    assert list(expected["method"]) == ["lora", "loracoe", "mixlora"]  # not the rank order
    at.session_state["view"] = "Charts"
    at.run()
    assert not at.dataframe
    at.session_state["view"] = "Table"
    at.run()
    assert at.selectbox(key="t_sort").value == "method"
    assert _frame(at, "overall").equals(expected)
    at.switch_page("pages/jobs.py").run()
    at.switch_page("pages/leaderboard.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="f_method").value == ["lora", "loracoe", "mixlora"]
    assert at.number_input(key="f_target").value == 10_000
    assert _frame(at, "overall").equals(expected)


def test_columns_a_filter_hides_come_back_when_it_is_cleared(monkeypatch, seeded: Path) -> None:
    """A protocol filter takes the math columns off the view; the reader's choice of them is
    kept, not trimmed for good. Until the reader picks columns, the picker follows the view."""
    at = _app(monkeypatch, f"sqlite:///{seeded}")
    at.multiselect(key="f_protocol").set_value(["ifeval/greedy"]).run()
    assert "math_avg" not in _frame(at, "overall").columns  # the default follows the view
    at.multiselect(key="f_protocol").set_value([]).run()
    assert "math_avg" in _frame(at, "overall").columns
    at.multiselect(key="t_columns").set_value(["method", "math_avg", "overall"]).run()
    at.selectbox(key="t_sort").set_value("math_avg").run()
    at.multiselect(key="f_protocol").set_value(["ifeval/greedy"]).run()
    assert list(_frame(at, "overall").columns) == ["method", "overall"]
    assert at.selectbox(key="t_sort").value == "rank"
    at.multiselect(key="f_protocol").set_value([]).run()
    assert list(_frame(at, "overall").columns) == ["method", "math_avg", "overall"]
    assert at.selectbox(key="t_sort").value == "math_avg"


def test_a_target_with_no_row_in_its_band_names_the_nearest_budgets(
    monkeypatch, seeded: Path
) -> None:
    at = _app(monkeypatch, f"sqlite:///{seeded}")
    at.number_input(key="f_target").set_value(1_000_000).run()
    budgets = sorted({plan[1] for plan in PLAN.values()}, key=lambda b: abs(b - 1_000_000))[:3]
    note = " ".join(w.value for w in at.warning)
    assert "No row is within ±5% of 1,000,000 trainable parameters" in note
    assert ", ".join(f"{b:,}" for b in sorted(budgets)) in note


def test_run_page_opens_the_newest_finished_run_and_names_it_in_the_address(
    monkeypatch, seeded: Path
) -> None:
    (newest,) = _sql(seeded, "SELECT MAX(id) FROM runs")[0]
    (newest_done,) = _sql(seeded, "SELECT MAX(id) FROM runs WHERE status = 'done'")[0]
    assert newest != newest_done  # the seeded store ends with a failed and a queued run
    at = _app(monkeypatch, f"sqlite:///{seeded}", "pages/run.py")
    assert at.selectbox(key="run_a").value == newest_done
    assert at.query_params["run"] == str(newest_done)
    at.selectbox(key="run_a").set_value(newest).run()
    assert at.query_params["run"] == str(newest)
