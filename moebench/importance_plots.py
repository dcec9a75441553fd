"""Plotly figures of stored importance records (the seed paper's Figures 2 to 4).

Plots only: every number drawn is read from `record["figures"]` (moebench.importance_figures), the
same numbers the CLI prints and the store keeps. Several records side by side are the comparison
mode (e.g. LoRA, LoRAMoE and LoRACoE on the same model and tasks). plotly is an optional
dependency (`pip install 'moebench[analysis]'`); PNG export also needs kaleido and a Chromium.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moebench.errors import ConfigError
from moebench.importance_figures import ALL


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        raise ConfigError(
            "Plots need plotly: `pip install 'moebench[analysis]'` (or scripts/setup.sh)."
        ) from None
    return go, make_subplots


def figure2(records: Mapping[str, Mapping[str, Any]]) -> Any:
    """Grouped bars per module type: mean variance along the rank dimension against along the
    input/output dimension (all tasks and both factors pooled), one pair of bars per run."""
    go, _ = _plotly()
    fig = go.Figure()
    for label, record in records.items():
        rows = [r for r in record["figures"]["figure2"] if r["task"] == ALL and r["tensor"] == ALL]
        kinds = [r["module_type"] for r in rows]
        for key, name in (("rank_avg", "rank"), ("d_or_k_avg", "d_in / d_out")):
            fig.add_bar(x=kinds, y=[r[key] for r in rows], name=f"{label}: {name}")
    fig.update_layout(
        title="Variance of importance along each dimension (Figure 2)",
        barmode="group",
        yaxis={"type": "log", "title": "mean variance"},
        xaxis_title="module type",
    )
    return fig


def _heatmaps(title: str, panels: list[tuple[str, Mapping[str, Any]]]) -> Any:
    go, make_subplots = _plotly()
    panels = [(name, p) for name, p in panels if p["matrix"]]
    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[name for name, _ in panels])
    for i, (_, p) in enumerate(panels):
        labels = [str(x) for x in p["labels"]]
        fig.add_trace(
            go.Heatmap(
                z=p["matrix"],
                x=labels,
                y=labels,
                zmin=-1,
                zmax=1,
                colorscale="RdBu_r",
                showscale=i == 0,
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_layout(title=title, height=320 * rows, width=330 * cols + 80)
    return fig


def figure3_tasks(label: str, record: Mapping[str, Any]) -> Any:
    """Task x task correlation of per-rank importance shares, per module type (Figure 3 top)."""
    panels = list(record["figures"]["task_correlation"].items())
    return _heatmaps(f"{label}: importance correlation between tasks (Figure 3, top)", panels)


def figure3_ranks(label: str, record: Mapping[str, Any]) -> Any:
    """Rank x rank correlation over tasks and modules, per module type (Figure 3 bottom)."""
    panels = list(record["figures"]["rank_correlation"].items())
    return _heatmaps(f"{label}: importance correlation between ranks (Figure 3, bottom)", panels)


def figure4(records: Mapping[str, Mapping[str, Any]], module_type: str = ALL) -> Any:
    """Sorted per-rank importance share, one line per run and task (Figure 4)."""
    go, _ = _plotly()
    fig = go.Figure()
    for label, record in records.items():
        for task, curve in record["figures"]["sorted_shares"].get(module_type, {}).items():
            fig.add_scatter(
                x=list(range(1, len(curve) + 1)),
                y=curve,
                mode="lines+markers",
                name=f"{label}: {task}",
            )
    fig.update_layout(
        title=f"Per-rank importance share, sorted (Figure 4; modules: {module_type})",
        xaxis_title="rank, by importance",
        yaxis_title="share of the module's importance",
    )
    return fig


def write_figures(
    records: Mapping[str, Mapping[str, Any]], out: Path, *, png: bool = False
) -> list[Path]:
    """Every figure as HTML under `out` (plotly.js written once beside them), and PNG with
    `png`; returns the files written."""
    figs = {"figure2": figure2(records), "figure4": figure4(records)}
    for label, record in records.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        figs[f"figure3-tasks-{safe}"] = figure3_tasks(label, record)
        figs[f"figure3-ranks-{safe}"] = figure3_ranks(label, record)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        path = out / f"{name}.html"
        fig.write_html(path, include_plotlyjs="directory")
        written.append(path)
        if png:
            written.append(_png(fig, out / f"{name}.png"))
    return written


def _png(fig: Any, path: Path) -> Path:
    try:
        fig.write_image(path, scale=2)
    except Exception as e:  # kaleido missing, or no Chromium for it to drive
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(
            f"PNG export failed ({reason}); `pip install kaleido` and a Chromium are needed, "
            "or leave out --png (the HTML files are written)."
        ) from e
    return path
