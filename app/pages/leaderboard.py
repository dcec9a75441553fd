"""Main table: which method wins at a parameter budget, on which sets, and does it hold."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from board_support import board, store_or_stop

from moebench.board import charts
from moebench.board.export import records, to_csv, to_latex, to_markdown
from moebench.board.reference import chance_row, table1_rows
from moebench.board.runs import filter_options
from moebench.board.table import DEFAULT_BAND, OVERALL, BoardFilters

BAR_ROWS = 12

store = store_or_stop()
st.title("moebench leaderboard")
options = filter_options(store)
if not options.methods:
    st.info(
        "No finished runs yet. `moebench run ...` or `moebench sweep FILE` records some; "
        "the Jobs page shows what is queued or running."
    )
    st.stop()

with st.sidebar:
    models = st.multiselect("Model", key="f_model", options=options.models)
    suites = st.multiselect("Suite", key="f_suite", options=options.suites)
    methods = st.multiselect("Method", key="f_method", options=options.methods)
    protocols = st.multiselect("Protocol", key="f_protocol", options=options.protocols)
    target = st.number_input(
        "Target trainable parameters (0: none)", min_value=0, step=1000, key="f_target"
    )
    band = st.slider("Budget band (+/- %)", 1, 50, int(DEFAULT_BAND * 100), key="f_band") / 100

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
frame = pd.DataFrame(records(view))
identity = ["rank", "method", "model", "n_seeds", "trainable_params", "pct_of_base"]
default = identity + [c for c in score_cols if c.endswith("_avg")]
default += [OVERALL, f"{OVERALL}_low", f"{OVERALL}_high", "vs_lora", "vs_lora_verdict"]
default = [c for c in default if c in frame.columns]
shown = st.multiselect("Columns", list(frame.columns), default=default)
sort_by = st.selectbox("Sort by", ["rank", *[c for c in shown if c != "rank"]])
# In-band rows first; names and ranks ascending, scores descending.
ascending = sort_by in ("rank", "method", "model", "suite")
frame = frame.sort_values(
    ["in_band", sort_by], ascending=[False, ascending], na_position="last", kind="stable"
)
table = frame[shown].reset_index(drop=True)
grey = frame["in_band"].tolist()
styled = table.style.apply(
    lambda row: ["" if grey[row.name] else "color: #9a9a9a"] * len(row), axis=1
)
if filters.target_params:
    st.caption(
        f"Compared: rows within ±{band:.0%} of {filters.target_params:,} trainable parameters; "
        "others are greyed, their budget shown."
    )
score_like = [c for c in table.columns if c.split("_low")[0].split("_high")[0] in score_cols]
formats = {c: st.column_config.NumberColumn(format="%.2f") for c in score_like}
formats["vs_lora"] = st.column_config.NumberColumn(format="%+.2f")
formats["rank"] = st.column_config.NumberColumn(format="%d")
formats["pct_of_base"] = st.column_config.NumberColumn("% of base", format="%.3f")
for c in ("trainable_params", "active_params"):
    formats[c] = st.column_config.NumberColumn(format="localized")
st.dataframe(styled, hide_index=True, key="main_table", column_config=formats)
st.caption(
    "Scores in %, mean over seeds with the 95% Student-t interval. vs_lora: paired bootstrap "
    "difference against LoRA at the same budget; a verdict only where its interval excludes 0. "
    "Rows that no paired test separates share a rank."
)

shown_rows = [r for r in view.rows if r.in_band]
c1, c2, c3 = st.columns(3)
c1.download_button("CSV", to_csv(records(view)), "leaderboard.csv", "text/csv")
c2.download_button(
    "Markdown", to_markdown(records(view, rows=shown_rows), score_cols), "leaderboard.md"
)
c3.download_button("LaTeX", to_latex(records(view, rows=shown_rows), score_cols), "leaderboard.tex")

st.subheader("Accuracy against trainable parameters")
st.plotly_chart(charts.accuracy_vs_params(view.rows), key="pareto")
st.subheader("Per set, with 95% intervals")
# Bars for the best in-band rows only: more groups than this are unreadable anyway.
best = sorted(shown_rows, key=lambda r: r.rank or len(shown_rows))[:BAR_ROWS]
st.caption(f"The {len(best)} best-ranked rows in the band; the table has them all.")
st.plotly_chart(charts.per_set_bars(best, score_cols), key="per_set")
for cost in ("step_time_s", "peak_memory_bytes"):
    if any(getattr(r, cost) is not None for r in view.rows):
        st.plotly_chart(charts.accuracy_vs_cost(view.rows, cost), key=f"cost_{cost}")

with st.expander("External reference rows (not measured here)"):
    sets = [c for c in score_cols if not c.endswith("_avg") and c != OVERALL]
    refs = [chance_row(sets), *table1_rows(models[0] if len(models) == 1 else None)]
    ref_frame = pd.DataFrame(records(view, refs, rows=[]))
    keep = ["method", "model", "source", *[c for c in score_cols if c in ref_frame.columns]]
    st.dataframe(ref_frame[keep], hide_index=True, key="reference_table")
