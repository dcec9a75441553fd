"""How stable LoRA-SMoE's allocation map is: modules whose expert count changes between two maps.

A map is `{qualified module name: n experts}`. Two maps are compared over the union of their
modules (a module a map does not name has n=0). The maps come either from two stored runs (their
`allocation` artifact, written by the method's preparation stage) or from measuring a model on
per-task examples under several (protocol, seed) settings, which is what `moebench analyze
allocation` reports: how much the sensitivity protocol and the seed decide which modules get
experts on a given model.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moebench.errors import NotFoundError
from moebench.methods.lora_smoe import allocate, module_scores
from moebench.sensitivity import measure_cached


def differing(a: Mapping[str, int], b: Mapping[str, int]) -> list[str]:
    """Modules whose expert count differs between the two maps, in sorted order."""
    return sorted(m for m in set(a) | set(b) if a.get(m, 0) != b.get(m, 0))


def compare(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, Any]:
    """The counts a user reads: modules, how many differ, experts on each side."""
    names = differing(a, b)
    return {
        "modules": len(set(a) | set(b)),
        "differ": len(names),
        "differ_names": names,
        "experts": [sum(a.values()), sum(b.values())],
    }


def run_allocation(store: Any, run_id: int) -> dict[str, Any]:
    """A stored run's `allocation` artifact (modules, p, protocol, seed, ...)."""
    from moebench.store import queries

    art = queries.get_artifacts(store, run_id).get("allocation")
    if not isinstance(art, dict) or not isinstance(art.get("modules"), dict):
        raise NotFoundError(
            f"Run {run_id} has no allocation map; only lora-smoe runs that reached their "
            "preparation stage store one."
        )
    return art


def measure_maps(
    model: nn.Module,
    examples: Mapping[str, Sequence[Any]],
    *,
    settings: Sequence[tuple[str, int]],
    samples: Mapping[str, int],
    fraction: float,
    groups: str,
    model_name: str,
    cache_dir: Path,
    pad_token_id: int,
    eos_token_id: int | None,
    device: torch.device | str = "cpu",
) -> dict[tuple[str, int], dict[str, int]]:
    """One allocation map per (protocol, seed), from per-task examples, through the cache;
    `samples[protocol]` is that protocol's `sensitivity_samples`."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    maps = {}
    for protocol, seed in settings:
        scores = {}
        for task, rows in examples.items():
            weight_scores, _ = measure_cached(
                cache_dir,
                {"model": model_name, "task": task},
                model=model,
                examples=rows,
                protocol=protocol,
                samples=samples[protocol],
                seed=seed,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                device=device,
            )
            modules = [m for m in linears if f"{m}.weight" in weight_scores]
            scores[task] = module_scores(weight_scores, modules)
        maps[(protocol, seed)] = allocate(scores, fraction, groups)
    return maps


def stability(maps: Mapping[tuple[str, int], Mapping[str, int]]) -> list[dict[str, Any]]:
    """Every pair of maps that differs in exactly one of protocol or seed, compared."""
    out = []
    for (pa, sa), (pb, sb) in itertools.combinations(maps, 2):
        if (pa == pb) == (sa == sb):
            continue
        kind = "seed" if pa == pb else "protocol"
        row = {"between": kind, "a": f"{pa} seed {sa}", "b": f"{pb} seed {sb}"}
        out.append(row | compare(maps[(pa, sa)], maps[(pb, sb)]))
    return out
