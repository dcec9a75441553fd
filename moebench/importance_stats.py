"""Element importance -> the numbers behind the seed paper's Figures 2 to 4, for any method.

A method's layers say through `AdapterLayer.rank_layout` which tensor dimension holds the rank
index (moebench.method.RankLayout). From that, per module:

- per-rank importance: rank j's importance is the sum of every element at index j along the
  rank dimension over the tensors that share the rank set (LoRA: row j of A plus column j of
  B); tensors without a layout (routers, or a plugin without the hook) keep their total only;
- Figure 2: per tensor, the variance of importance along the rank dimension (across ranks at a
  fixed input or output index), averaged over that index, against the variance along the input
  or output dimension (across it at a fixed rank), averaged over the ranks. Unbiased variances,
  so the two sample sizes (r against d) are not told apart by the estimator;
- Figure 3: Pearson correlations of per-rank importance shares (a module's ranks divided by
  their sum, so that layers of larger importance do not dominate) between tasks, and between
  ranks over (task, module) observations;
- Figure 4: each module's rank shares sorted from largest, averaged over modules of a type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moebench.components import suffix
from moebench.inject import Adapted
from moebench.method import RankLayout

ALL = "all"


@dataclass(frozen=True)
class RankGroup:
    """One module's set of ranks and the tensors (full parameter names) that share it."""

    key: str  # the layer's qualified name, plus ":component" when a layer has several sets
    module_type: str  # q_proj, ..., or mlp.gate for a MixLoRA FFN's gate factors
    tensors: tuple[tuple[str, RankLayout], ...]

    @property
    def ranks_per_expert(self) -> int | None:
        return self.tensors[0][1].ranks_per_expert


def rank_groups(adapted: Adapted) -> list[RankGroup]:
    """Every layer's rank sets, from its `rank_layout` hook (none for a layer without it)."""
    out = []
    for name, layer in adapted.layers.items():
        by_component: dict[str, list[tuple[str, RankLayout]]] = {}
        for local, layout in layer.rank_layout().items():
            by_component.setdefault(layout.component, []).append((f"{name}.{local}", layout))
        for component, tensors in by_component.items():
            key = f"{name}:{component}" if component else name
            kind = f"{suffix(name)}.{component}" if component else suffix(name)
            out.append(RankGroup(key, kind, tuple(tensors)))
    return out


def _expert_rank_rest(t: torch.Tensor, layout: RankLayout) -> torch.Tensor:
    """The tensor as [experts, ranks, everything else] (experts 1 without an expert dim)."""
    dims = [layout.rank_dim] if layout.expert_dim is None else [layout.expert_dim, layout.rank_dim]
    rest = [d for d in range(t.dim()) if d not in dims]
    view = t.permute(*dims, *rest)
    if layout.expert_dim is None:
        view = view.unsqueeze(0)
    return view.reshape(view.shape[0], view.shape[1], -1)


def per_rank(group: RankGroup, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Importance of each rank of the group, flattened expert-major: [experts * ranks]."""
    total: torch.Tensor | None = None
    for name, layout in group.tensors:
        ranks = _expert_rank_rest(scores[name], layout).sum(-1).flatten()
        if total is not None and total.shape != ranks.shape:
            raise ValueError(
                f"{name} has {ranks.numel()} ranks but its rank set {group.key} has "
                f"{total.numel()}; its layer's rank_layout is inconsistent"
            )
        total = ranks if total is None else total + ranks
    assert total is not None
    return total


def variance_along(t: torch.Tensor, layout: RankLayout) -> tuple[float | None, float | None]:
    """(variance along the rank dimension, variance along the input/output dimension), each
    averaged over the other index; None where that dimension has a single entry."""
    view = _expert_rank_rest(t.double(), layout)
    rank_var = float(view.var(dim=1).mean()) if view.shape[1] > 1 else None
    dim_var = float(view.var(dim=2).mean()) if view.shape[2] > 1 else None
    return rank_var, dim_var


def summarize(adapted: Adapted, scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """One task's stored numbers: each tensor's total, each rank set's per-rank importance, and
    each rank-mapped tensor's Figure 2 pair [rank variance, input/output variance]."""
    groups = rank_groups(adapted)
    variance = {
        name: list(variance_along(scores[name], layout))
        for g in groups
        for name, layout in g.tensors
    }
    return {
        "tensors": {n: float(t.sum()) for n, t in scores.items()},
        "ranks": {g.key: per_rank(g, scores).tolist() for g in groups},
        "variance": variance,
    }


def layout_record(adapted: Adapted) -> dict[str, Any]:
    """What the stored numbers are keyed by: rank sets (type, experts) and each tensor's role."""
    groups = rank_groups(adapted)
    mapped = {name: g for g in groups for name, _ in g.tensors}
    tensors = {}
    for name, _ in adapted.adapter_parameters():
        g = mapped.get(name)
        layer = next(k for k in adapted.layers if name.startswith(f"{k}."))
        tensors[name] = {
            "module_type": g.module_type if g else suffix(layer),
            "role": name[len(layer) + 1 :],
            "rank_set": g.key if g else None,
        }
    return {
        "rank_sets": {
            g.key: {"module_type": g.module_type, "ranks_per_expert": g.ranks_per_expert}
            for g in groups
        },
        "tensors": tensors,
    }


# --- the figures' numbers, from stored summaries ----------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def figure2(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (task, module_type, tensor, rank_avg, d_or_k_avg, ratio): mean variances over
    layers, per tensor role ("lora_A") and over both roles ("all"); task "all" pools tasks."""
    tensors = record["layout"]["tensors"]
    pooled: dict[tuple[str, str, str], list[list[float | None]]] = {}
    for task, summary in record["tasks"].items():
        for name, pair in summary["variance"].items():
            info = tensors[name]
            for t in (task, ALL):
                for role in (info["role"].rsplit(".", 1)[-1], ALL):
                    pooled.setdefault((t, info["module_type"], role), []).append(pair)
    rows = []
    for (task, kind, role), pairs in sorted(pooled.items()):
        rank = _mean([p[0] for p in pairs if p[0] is not None])
        dim = _mean([p[1] for p in pairs if p[1] is not None])
        ratio = rank / dim if rank is not None and dim else None
        rows.append(
            {
                "task": task,
                "module_type": kind,
                "tensor": role,
                "rank_avg": rank,
                "d_or_k_avg": dim,
                "ratio": ratio,
                "tensors": len(pairs),
            }
        )
    return rows


def _shares(record: Mapping[str, Any], task: str, module_type: str) -> dict[str, np.ndarray]:
    sets = record["layout"]["rank_sets"]
    out = {}
    for key, ranks in record["tasks"][task]["ranks"].items():
        if module_type in (ALL, sets[key]["module_type"]):
            v = np.asarray(ranks, dtype=np.float64)
            out[key] = v / v.sum() if v.sum() > 0 else v
    return out


def _corr(columns: np.ndarray) -> list[list[float | None]]:
    """Pearson correlation of the columns of [observations, variables]; None where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(columns, rowvar=False)
    c = np.atleast_2d(c)
    return [[None if not np.isfinite(x) else float(x) for x in row] for row in c]


def module_types(record: Mapping[str, Any]) -> list[str]:
    return sorted({s["module_type"] for s in record["layout"]["rank_sets"].values()})


def task_correlation(record: Mapping[str, Any], module_type: str = ALL) -> dict[str, Any]:
    """Figure 3 (top): tasks x tasks, each task a vector of rank shares over all modules of the
    type (modules in one fixed order, ranks within them)."""
    tasks = sorted(record["tasks"])
    keys = sorted(_shares(record, tasks[0], module_type)) if tasks else []
    vectors = [np.concatenate([_shares(record, t, module_type)[k] for k in keys]) for t in tasks]
    matrix = _corr(np.stack(vectors, axis=1)) if len(tasks) > 1 and keys else []
    return {"labels": tasks, "matrix": matrix, "module_type": module_type}


def rank_correlation(record: Mapping[str, Any], module_type: str) -> dict[str, Any]:
    """Figure 3 (bottom): ranks x ranks over (task, module) observations of one module type;
    modules of another rank count than the type's commonest are left out."""
    rows = [v for t in sorted(record["tasks"]) for v in _shares(record, t, module_type).values()]
    if not rows:
        return {"labels": [], "matrix": [], "module_type": module_type}
    width = Counter(len(v) for v in rows).most_common(1)[0][0]
    rows = [v for v in rows if len(v) == width]
    matrix = _corr(np.stack(rows)) if len(rows) > 1 else []
    return {"labels": list(range(width)), "matrix": matrix, "module_type": module_type}


def sorted_shares(record: Mapping[str, Any], module_type: str = ALL) -> dict[str, list[float]]:
    """Figure 4: per task, each module's rank shares sorted descending, averaged over modules
    (those of the commonest rank count); a flat line at 1/r means importance is spread evenly."""
    out = {}
    for task in sorted(record["tasks"]):
        rows = [np.sort(v)[::-1] for v in _shares(record, task, module_type).values()]
        if not rows:
            continue
        width = Counter(len(v) for v in rows).most_common(1)[0][0]
        out[task] = np.mean([v for v in rows if len(v) == width], axis=0).tolist()
    return out


def figures(record: Mapping[str, Any]) -> dict[str, Any]:
    """Every figure's numbers for one run's importance record (what the artifact stores)."""
    kinds = module_types(record)
    return {
        "figure2": figure2(record),
        "task_correlation": {k: task_correlation(record, k) for k in [ALL, *kinds]},
        "rank_correlation": {k: rank_correlation(record, k) for k in kinds},
        "sorted_shares": {k: sorted_shares(record, k) for k in [ALL, *kinds]},
    }
