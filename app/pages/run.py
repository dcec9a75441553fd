"""One run: config, provenance, logs, per-item predictions, importance figures; or two runs item
by item."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from board_support import store_or_stop

from moebench import importance_plots
from moebench import store as db
from moebench.board import charts
from moebench.board.runs import (
    prediction_sets,
    predictions,
    run_choices,
    runs_with_artifact,
    side_by_side,
)
from moebench.importance_figures import ALL
from moebench.worker import log_path

LOG_LINES = 200
IMPORTANCE = "importance"  # the artifact `moebench analyze importance` stores

store = store_or_stop()
st.title("Run")
choices = run_choices(store)
if not choices:
    st.info("No runs recorded yet: `moebench run ...` or `moebench sweep FILE` makes some.")
    st.stop()
labels = {i: label for i, label, _ in choices}
ids = [i for i, _, _ in choices]
done = [i for i, _, status in choices if status == "done"]
wanted = st.query_params.get("run")
# The run in the link, else the newest finished one (a queued run has nothing to show yet).
first = int(wanted) if wanted and wanted.isdigit() and int(wanted) in ids else (done or ids)[0]
run_id = st.selectbox("Run", ids, index=ids.index(first), format_func=labels.get, key="run_a")
st.query_params["run"] = str(run_id)  # the address names the run shown: a reload or a link keeps it
run = db.get_run(store, run_id)
artifacts = db.get_artifacts(store, run_id)

st.markdown(
    f"**{run['method']}** on **{run['model']}**, suite {run['suite']}, seed {run['seed']}: "
    f"{run['status']}" + (f" ({run['status_reason']})" if run["status_reason"] else "")
)
metrics = db.get_metrics(store, run_id)
if metrics:
    st.dataframe(
        pd.DataFrame(metrics)[["task", "metric", "value", "n", "stderr", "protocol"]],
        hide_index=True,
        key="metrics",
    )

tab_config, tab_prov, tab_log, tab_text, tab_pred, tab_pair, tab_imp = st.tabs(
    [
        "Config",
        "Provenance",
        "Training log",
        "Log file",
        "Predictions",
        "Side by side",
        "Importance",
    ]
)
with tab_config:
    st.json(run["config"], expanded=True)
    if run["execution"]:
        st.caption("Execution settings (never part of the config hash)")
        st.json(run["execution"], expanded=False)
with tab_prov:
    st.json(
        {
            "git_sha": run["git_sha"],
            "versions": run["versions"],
            "hardware": run["hardware"],
            "data_fingerprint": run["data_fingerprint"],
            "config_hash": run["config_hash"],
            "trainable_params": run["trainable_params"],
            "total_params": run["total_params"],
            "wall_time_s": run["wall_time_s"],
            "peak_memory_bytes": run["peak_memory_bytes"],
            "failures": run["failures"],
        },
        expanded=True,
    )
    for name in ("data", "overlap", "budget", "notes"):
        if name in artifacts:
            st.caption(name)
            st.json(artifacts[name], expanded=False)
with tab_log:
    log = db.get_training_log(store, run_id)
    if log:
        curves = charts.training_curves(log, artifacts.get("phase_switches") or [])
        st.plotly_chart(curves, key="curves")
        for kind, title in (("load", "Router expert load"), ("share", "Router share")):
            heat = charts.router_load(log, kind)
            if heat is not None:
                st.caption(f"{title} per module and expert over training")
                st.plotly_chart(heat, key=f"router_{kind}")
    else:
        st.info("This run logged no training steps.")
    gate = charts.per_rank_gate(artifacts.get("router_stats"))
    if gate is not None and run["method"] == "loracoe":
        st.caption("LoRACoE: mean gate per rank, over training")
        st.plotly_chart(gate, key="rank_gate")
    allocation = charts.allocation_map(artifacts.get("prepared"))
    if allocation is not None:
        st.caption("LoRA-SMoE: experts allocated per module")
        st.plotly_chart(allocation, key="allocation")
with tab_text:
    path = log_path(run)
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        st.caption(f"{path}: last {min(len(lines), LOG_LINES)} of {len(lines)} lines")
        st.code("\n".join(lines[-LOG_LINES:]), language=None)
    else:
        st.info(f"No log file at {path} (runs started by `moebench sweep` write one).")
with tab_pred:
    sets = prediction_sets(store, run_id)
    c1, c2, c3 = st.columns(3)
    task = c1.selectbox("Set", ["(all)", *sets], key="pred_set")
    wrong = c2.checkbox("Wrong only", key="wrong_only")
    parse = c3.checkbox("Parse failures only", key="parse_only")
    rows = predictions(
        store,
        run_id,
        task=None if task == "(all)" else task,
        wrong_only=wrong,
        parse_failures_only=parse,
    )
    st.caption(f"{len(rows)} items shown (first 2,000 at most)")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="predictions")
with tab_pair:
    finished = set(done)  # finished runs first: a queued one has no items to compare
    others = sorted((i for i in ids if i != run_id), key=lambda i: i not in finished)
    if not others:
        st.info("Only one run is stored.")
    else:
        other = st.selectbox("Compare with", others, format_func=labels.get, key="run_b")
        flipped = st.checkbox("Flipped items only", value=True, key="flipped_only")
        pairs = side_by_side(store, run_id, other, flipped_only=flipped)
        st.caption(f"{len(pairs)} items" + (" that flipped" if flipped else " scored by both"))
        st.dataframe(pd.DataFrame(pairs), hide_index=True, key="pairs")
with tab_imp:
    record = artifacts.get(IMPORTANCE)
    if not record:
        st.info(
            f"No importance analysis is stored for this run: `moebench analyze importance "
            f"{run_id}` makes one (docs/importance.md)."
        )
    else:
        st.caption(
            "Figure 2's numbers, all analysed tasks pooled: mean variance of importance along "
            "the rank dimension and along the input/output dimension, over layers."
        )
        fig2 = [r for r in record["figures"]["figure2"] if r["task"] == ALL]
        keep = ["module_type", "tensor", "rank_avg", "d_or_k_avg", "ratio", "tensors"]
        st.dataframe(pd.DataFrame(fig2)[keep], hide_index=True, key="importance_figure2")
        others = [i for i in runs_with_artifact(store, IMPORTANCE) if i != run_id]
        compare = st.multiselect(
            "Compare with (Figures 2 and 4)", others, format_func=labels.get, key="imp_compare"
        )
        records = {labels[run_id]: record}
        records |= {labels[i]: db.get_artifacts(store, i)[IMPORTANCE] for i in compare}
        st.plotly_chart(importance_plots.figure2(records), key="imp_figure2")
        st.plotly_chart(importance_plots.figure4(records), key="imp_figure4")
        st.plotly_chart(importance_plots.figure3_tasks(labels[run_id], record), key="imp_tasks")
        st.plotly_chart(importance_plots.figure3_ranks(labels[run_id], record), key="imp_ranks")
