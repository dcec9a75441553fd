"""The leaderboard's plotly figures, built from board rows and a run's stored records.

Figures only: every number plotted comes from `moebench.board.table` or the store as it is,
so a chart and the table beside it show the same values.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import plotly.colors
import plotly.graph_objects as go

from moebench.board.table import OVERALL, BoardRow

_STAT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>load|share)\.(?P<index>\d+)$")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer parameters and a higher score, by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon")
OUT_OF_BAND_OPACITY = 0.25
PALETTE = plotly.colors.qualitative.Plotly
FRONT_DASHES = ("dot", "dash", "dashdot", "longdash")


def model_symbols(rows: Sequence[BoardRow]) -> dict[str, str]:
    """The marker shape of each model on the Pareto chart (colour is the method's)."""
    models = sorted({r.model for r in rows})
    return {m: SYMBOLS[i % len(SYMBOLS)] for i, m in enumerate(models)}


def accuracy_vs_params(rows: Sequence[BoardRow], column: str = OVERALL) -> go.Figure:
    """Score against trainable parameters: colour by method, shape by model (`model_symbols`),
    rows outside the budget band faded, and a Pareto line per comparison group (model and
    suite, as the table ranks them)."""
    fig = go.Figure()
    symbols = model_symbols(rows)
    by_method: dict[str, list[BoardRow]] = defaultdict(list)
    for r in rows:
        if r.trainable_params and column in r.scores:
            by_method[r.method].append(r)
    for i, (method, members) in enumerate(sorted(by_method.items())):
        colour = PALETTE[i % len(PALETTE)]  # fixed, so a method's faded points keep its colour
        parts = [[r for r in members if r.in_band], [r for r in members if not r.in_band]]
        for part, opacity in zip(parts, (1.0, OUT_OF_BAND_OPACITY), strict=True):
            if not part:
                continue
            fig.add_scatter(
                x=[r.trainable_params for r in part],
                y=[100 * r.scores[column].mean for r in part],
                error_y={**_errors([r.scores[column] for r in part]), "color": colour},
                mode="markers",
                name=method,
                legendgroup=method,
                showlegend=part is parts[0] or not parts[0],  # one legend entry a method
                opacity=opacity,
                marker={"symbol": [symbols[r.model] for r in part], "size": 9, "color": colour},
                text=[f"{r.model} / {r.suite}, {r.n_seeds} seeds" for r in part],
            )
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for members in by_method.values():
        for r in members:
            groups[r.model, r.suite].append((r.trainable_params, 100 * r.scores[column].mean))
    several_suites = len({suite for _, suite in groups}) > 1
    for j, ((model, suite), points) in enumerate(sorted(groups.items())):
        front = pareto_front(points)
        group = f"{model}, {suite}" if several_suites else model
        fig.add_scatter(
            x=[p[0] for p in front],
            y=[p[1] for p in front],
            mode="lines",
            name=f"Pareto front ({group})",
            # Grey, told apart by dash: the methods' colours stay theirs alone.
            line={"dash": FRONT_DASHES[j % len(FRONT_DASHES)], "color": "#555555", "width": 1.5},
        )
    fig.update_layout(
        xaxis_title="trainable parameters",
        yaxis_title=f"{column} (%)",
        xaxis_type="log",
        margin={"t": 30},
    )
    return fig


def _errors(summaries: Sequence[Any]) -> dict[str, Any]:
    plus = [100 * (s.high - s.mean) if s.high is not None else 0 for s in summaries]
    minus = [100 * (s.mean - s.low) if s.low is not None else 0 for s in summaries]
    return {"type": "data", "array": plus, "arrayminus": minus, "visible": True}


def accuracy_vs_cost(rows: Sequence[BoardRow], cost: str, column: str = OVERALL) -> go.Figure:
    """Score against step time (`step_time_s`) or peak memory (`peak_memory_bytes`)."""
    fig = go.Figure()
    label = {"step_time_s": "seconds per step", "peak_memory_bytes": "peak memory (MiB)"}[cost]
    scale = 1.0 if cost == "step_time_s" else 1 / 2**20
    measured = [r for r in rows if getattr(r, cost) is not None and column in r.scores]
    for method in sorted({r.method for r in measured}):
        members = [r for r in measured if r.method == method]
        fig.add_scatter(
            x=[getattr(r, cost) * scale for r in members],
            y=[100 * r.scores[column].mean for r in members],
            mode="markers",
            name=method,
        )
    fig.update_layout(xaxis_title=label, yaxis_title=f"{column} (%)")
    return fig


def per_set_bars(rows: Sequence[BoardRow], columns: Sequence[str]) -> go.Figure:
    """Grouped bars per set (and average), one group per row, with 95% intervals."""
    fig = go.Figure()
    for r in rows:
        shown = [c for c in columns if c in r.scores]
        fig.add_bar(
            x=shown,
            y=[100 * r.scores[c].mean for c in shown],
            error_y=_errors([r.scores[c] for c in shown]),
            name=f"{r.method} ({f'{r.trainable_params:,}' if r.trainable_params else '?'} params)",
        )
    fig.update_layout(barmode="group", yaxis_title="score (%)")
    return fig


def training_curves(
    log: Sequence[dict[str, Any]], switches: Sequence[dict[str, Any]] = ()
) -> go.Figure:
    """Loss, each auxiliary loss and the learning rate (right axis) by step; phase switches."""
    steps = [r["step"] for r in log]
    fig = go.Figure()
    fig.add_scatter(x=steps, y=[r["loss"] for r in log], name="loss")
    aux_names = sorted({k for r in log for k in (r.get("aux_losses") or {})})
    for name in aux_names:
        fig.add_scatter(x=steps, y=[(r.get("aux_losses") or {}).get(name) for r in log], name=name)
    fig.add_scatter(x=steps, y=[r["lr"] for r in log], name="lr", yaxis="y2")
    for s in switches:
        fig.add_vline(x=s["step"], line_dash="dash", annotation_text=f"{s.get('to', 'switch')}")
    fig.update_layout(
        xaxis_title="step",
        yaxis_title="loss",
        yaxis2={"title": "lr", "overlaying": "y", "side": "right"},
    )
    return fig


def router_load(log: Sequence[dict[str, Any]], kind: str = "load") -> go.Figure | None:
    """Heat map of each (module, expert) share of routed tokens over training (None: no router).

    `kind` is `load` (top-k routers: share of slots) or `share` (softmax mass per expert).
    """
    cells: dict[str, dict[int, float]] = defaultdict(dict)
    for r in log:
        for key, value in (r.get("stats") or {}).items():
            m = _STAT_KEY.match(key)
            if m and m["kind"] == kind:
                cells[f"{m['module']} e{m['index']}"][r["step"]] = value
    if not cells:
        return None
    steps = sorted({s for row in cells.values() for s in row})
    names = sorted(cells)
    z = [[cells[n].get(s) for s in steps] for n in names]
    fig = go.Figure(go.Heatmap(x=steps, y=names, z=z, colorbar={"title": kind}))
    fig.update_layout(xaxis_title="step", yaxis_title="module, expert")
    return fig


def per_rank_gate(router_summary: dict[str, Any] | None) -> go.Figure | None:
    """LoRACoE's mean gate per rank and module over training (the `share.j` means)."""
    means = (router_summary or {}).get("mean") or {}
    cells: dict[str, dict[int, float]] = defaultdict(dict)
    for key, value in means.items():
        m = _STAT_KEY.match(key)
        if m and m["kind"] == "share":
            cells[m["module"]][int(m["index"])] = value
    if not cells:
        return None
    ranks = sorted({j for row in cells.values() for j in row})
    names = sorted(cells)
    z = [[cells[n].get(j) for j in ranks] for n in names]
    fig = go.Figure(go.Heatmap(x=ranks, y=names, z=z, colorbar={"title": "mean gate"}))
    fig.update_layout(xaxis_title="rank j", yaxis_title="module")
    return fig


def allocation_map(prepared: dict[str, Any] | None) -> go.Figure | None:
    """LoRA-SMoE's experts per module (its prepared `allocation`), layer by module kind."""
    items = ((prepared or {}).get("method_config") or {}).get("allocation") or []
    grid: dict[str, dict[int, int]] = defaultdict(dict)
    for item in items:
        name, _, n = str(item).rpartition("=")
        m = re.search(r"layers\.(\d+)\.(.+)$", name)
        if m and n.isdigit():
            grid[m[2]][int(m[1])] = int(n)
    if not grid:
        return None
    layers = sorted({i for row in grid.values() for i in row})
    kinds = sorted(grid)
    z = [[grid[k].get(i) for i in layers] for k in kinds]
    fig = go.Figure(go.Heatmap(x=layers, y=kinds, z=z, colorbar={"title": "experts"}))
    fig.update_layout(xaxis_title="layer", yaxis_title="module")
    return fig
