"""Element importance -> the numbers behind the seed paper's Figures 2 to 4, for any method.

A method's layers say through `AdapterLayer.rank_layout` which tensor dimension holds the rank
index (moebench.method.RankLayout). From that, per module:

- per-rank importance: rank j's importance is the sum of every element at index j along the
  rank dimension over the tensors that share the rank set (LoRA: row j of A plus column j of
  B); tensors without a layout (routers, or a plugin without the hook) keep their total only;
- Figure 2's pair per tensor: the variance of importance along the rank dimension (across ranks
  at a fixed input or output index), averaged over that index, against the variance along the
  input or output dimension (across it at a fixed rank), averaged over the ranks. Unbiased
  variances, so the two sample sizes (r against d) are not told apart by the estimator.

The figures' numbers over a whole record (tasks pooled, correlations, sorted shares) are
computed from the stored record alone, without torch, in moebench.importance_figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moebench.components import suffix
from moebench.inject import Adapted
from moebench.method import RankLayout


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
