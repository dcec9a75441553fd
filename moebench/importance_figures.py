"""The numbers behind the seed paper's Figures 2 to 4, from a stored importance record alone.

numpy only (no torch), so the leaderboard's run page and the plots can read a record without the
training stack. The record's per-tensor variances and per-rank importance come from
moebench.importance_stats; here they are pooled and correlated:

- Figure 2: per module type and tensor role, the layers' mean variance along the rank dimension
  and along the input/output dimension, and their ratio; task "all" pools the tasks;
- Figure 3: Pearson correlations of per-rank importance shares (a module's ranks divided by
  their sum, so that layers of larger importance do not dominate) between tasks, and between
  ranks over (task, module) observations;
- Figure 4: each module's rank shares sorted from largest, averaged over modules of a type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ALL = "all"


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
