"""Main table: which method wins at a parameter budget, on which sets, and does it hold."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from board_support import board, kept, store_or_stop

from moebench.board import charts
from moebench.board.export import records, to_csv, to_latex, to_markdown
from moebench.board.reference import chance_row, table1_rows
from moebench.board.runs import filter_options
from moebench.board.table import DEFAULT_BAND, OVERALL, Board, BoardFilters

BAR_ROWS = 10  # plotly's default palette has 10 colours: more bars would share them
BAND_MAX_PCT = 99  # the widest band the slider offers; `--band` takes up to 99.x %


def main_table(view: Board, score_cols: list[str]) -> None:
    """The ranked rows (greyed outside the band), the exports and the reference rows."""
    frame = pd.DataFrame(records(view))
    identity = ["rank", "method", "model", "n_seeds", "trainable_params", "pct_of_base"]
    default = identity + [c for c in score_cols if c.endswith("_avg")]
    default += [OVERALL, f"{OVERALL}_low", f"{OVERALL}_high", "vs_lora", "vs_lora_verdict"]
    default = [c for c in default if c in frame.columns]
    # In a popover: its widgets are drawn only when it is opened, and 14 column chips above the
    # table cost its first paint about 0.1 s (BENCHMARKS.md, leaderboard load time).
    with st.popover("Columns and sort"):
        shown = kept(st.multiselect, "t_columns", default, list(frame.columns), label="Columns")
        sort_options = ["rank", *[c for c in shown if c != "rank"]]
        sort_by = kept(st.selectbox, "t_sort", "rank", sort_options, label="Sort by")
    # In-band rows first; names and ranks ascending, scores descending. Ranks count within a
    # model and suite, so a rank sort keeps those groups together.
    ascending = sort_by in ("rank", "method", "model", "suite")
    keys = ["in_band", "model", "suite", "rank"] if sort_by == "rank" else ["in_band", sort_by]
    frame = frame.sort_values(
        keys,
        ascending=[False, *[ascending] * (len(keys) - 1)],
        na_position="last",
        kind="stable",
    )
    table = frame[shown].reset_index(drop=True)
    grey = frame["in_band"].tolist()
    # A Styler costs the browser a style per cell; only a budget band has rows to grey.
    styled = (
        table
        if all(grey)
        else table.style.apply(
            lambda row: ["" if grey[row.name] else "color: #9a9a9a"] * len(row), axis=1
        )
    )
    target = view.filters.target_params
    note = view.band_note()
    if note:
        st.warning(note)
    elif target:
        st.caption(
            f"Compared: rows within ±{view.filters.band:.0%} of {target:,} trainable "
            "parameters; others are greyed, their budget shown."
        )
    st.dataframe(
        styled, hide_index=True, key="main_table", column_config=_formats(table, score_cols)
    )
    st.caption(
        "Scores in %, mean over seeds with the 95% Student-t interval. vs_lora: paired bootstrap "
        "difference against LoRA at the same budget; a verdict only where its interval excludes "
        "0. Rows that no paired test separates share a rank."
    )
    _downloads(view, score_cols)
    _reference_rows(view, score_cols)


def _formats(table: pd.DataFrame, score_cols: list[str]) -> dict[str, object]:
    """Scores with two decimals, counts with separators: what a reader compares by eye."""
    score_like = [c for c in table.columns if c.split("_low")[0].split("_high")[0] in score_cols]
    formats: dict[str, object] = {
        c: st.column_config.NumberColumn(format="%.2f") for c in score_like
    }
    formats["vs_lora"] = st.column_config.NumberColumn(format="%+.2f")
    formats["rank"] = st.column_config.NumberColumn(format="%d")
    formats["pct_of_base"] = st.column_config.NumberColumn("% of base", format="%.3f")
    for c in ("trainable_params", "active_params"):
        formats[c] = st.column_config.NumberColumn(format="localized")
    return formats


def _downloads(view: Board, score_cols: list[str]) -> None:
    """CSV of every row, Markdown and LaTeX of the in-band rows; each built when clicked."""
    in_band = [r for r in view.rows if r.in_band]
    row = st.container(horizontal=True)
    row.download_button(  # the grid's own download holds the shown columns only
        "CSV, every column",
        lambda: to_csv(records(view), score_cols),
        "leaderboard.csv",
        "text/csv",
    )
    row.download_button(
        "Markdown", lambda: to_markdown(records(view, rows=in_band), score_cols), "leaderboard.md"
    )
    row.download_button(
        "LaTeX", lambda: to_latex(records(view, rows=in_band), score_cols), "leaderboard.tex"
    )


def _reference_rows(view: Board, score_cols: list[str]) -> None:
    """Chance and the seed paper's Table 1, built only once the expander is opened."""
    refs = st.expander(
        "External reference rows (not measured here)", key="references", on_change="rerun"
    )
    if not refs.open:
        return
    with refs:
        sets = [c for c in score_cols if not c.endswith("_avg") and c != OVERALL]
        models = view.filters.models
        external = [chance_row(sets), *table1_rows(models[0] if len(models) == 1 else None)]
        ref_frame = pd.DataFrame(records(view, external, rows=[]))
        keep = ["method", "model", "source", *[c for c in score_cols if c in ref_frame.columns]]
        st.dataframe(ref_frame[keep], hide_index=True, key="reference_table")


def main_charts(view: Board, score_cols: list[str]) -> None:
    """Pareto front, per-set bars of the best in-band rows, and cost charts where measured."""
    st.subheader("Accuracy against trainable parameters")
    st.plotly_chart(charts.accuracy_vs_params(view.rows), key="pareto")
    shapes = charts.model_symbols(view.rows)
    note = "Faded: outside the budget band. " if not all(r.in_band for r in view.rows) else ""
    if len(shapes) > 1:
        note += "Marker shape by model: " + ", ".join(f"{m} {s}" for m, s in shapes.items()) + "."
    if note:
        st.caption(note)
    st.subheader("Per set, with 95% intervals")
    # Bars for the best in-band rows only: more groups than this are unreadable anyway.
    in_band = [r for r in view.rows if r.in_band]
    best = sorted(in_band, key=lambda r: r.rank or len(in_band))[:BAR_ROWS]
    if best:
        st.caption(f"The {len(best)} best-ranked rows in the band; the table has them all.")
        st.plotly_chart(charts.per_set_bars(best, score_cols), key="per_set")
    else:
        st.info(view.band_note() or "No row is in the band.")
    for cost in ("step_time_s", "peak_memory_bytes"):
        if any(getattr(r, cost) is not None for r in view.rows):
            st.plotly_chart(charts.accuracy_vs_cost(view.rows, cost), key=f"cost_{cost}")


store = store_or_stop()
st.title("moebench leaderboard")
options = filter_options(store)
if not options.methods:
    st.info(
        "No finished runs yet. `moebench run ...` or `moebench sweep FILE` records some; "
        "the Jobs page shows what is queued or running."
    )
    st.stop()

with st.sidebar:  # kept: the filters outlive a visit to the Run or Jobs page
    models = kept(st.multiselect, "f_model", [], options.models, label="Model")
    suites = kept(st.multiselect, "f_suite", [], options.suites, label="Suite")
    methods = kept(st.multiselect, "f_method", [], options.methods, label="Method")
    protocols = kept(st.multiselect, "f_protocol", [], options.protocols, label="Protocol")
    target = kept(
        st.number_input, "f_target", 0, label="Target trainable parameters (0: none)",
        min_value=0, step=1000,
    )  # fmt: skip
    band = kept(
        st.slider, "f_band", int(DEFAULT_BAND * 100), label="Budget band (+/- %)",
        min_value=1, max_value=BAND_MAX_PCT,
    ) / 100  # fmt: skip

filters = BoardFilters(
    models=tuple(models),
    suites=tuple(suites),
    methods=tuple(methods),
    protocols=tuple(protocols),
    target_params=int(target) or None,
    band=band,
)
view = board(store.url, filters)
if not view.rows:
    st.warning("No finished run matches these filters.")
    st.stop()

score_cols = view.score_columns()
# Only the open tab runs (on_change="rerun"), so the table never waits on plotly.js: its first
# evaluation in a browser takes 0.7-0.8 s (BENCHMARKS.md, leaderboard load time).
table_tab, charts_tab = st.tabs(["Table", "Charts"], key="view", on_change="rerun")
if table_tab.open:
    with table_tab:
        main_table(view, score_cols)
if charts_tab.open:
    with charts_tab:
        main_charts(view, score_cols)
