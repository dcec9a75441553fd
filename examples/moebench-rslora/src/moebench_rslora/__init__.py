"""rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): LoRA with a rank-stabilised scaling factor.

    h = W0 x + s * B (A drop(x)),  s = alpha / sqrt(r)   (LoRA: s = alpha / r)

The paper shows that with s = alpha / r the update's scale collapses as r grows, so larger ranks
learn no better; alpha / sqrt(r) keeps activations and gradients of order one in r. Everything else
is LoRA: the same factors and init (A kaiming-uniform, B zero, so the adapted model starts as the
base one), r * (d_in + d_out) trainable parameters per targeted linear, mergeable into W0.

The default alpha is 8, so at the default rank 16 the scale equals moebench LoRA's default
(32 / 16 = 8 / sqrt(16) = 2) and the two differ only as the rank moves away from 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from moebench.components import ALL_LINEARS
from moebench.config import check, doc
from moebench.method import (
    AdapterLayer,
    BatchContext,
    LinearMethod,
    LinearShape,
)
from moebench.methods.lora import LoRALinear

__all__ = ["METHOD", "RsLoRA", "RsLoRAConfig", "RsLoRALinear"]


@dataclass(frozen=True)
class RsLoRAConfig:
    rank: int = doc("rank r of the update B @ A", 16, ge=1, le=2**16)
    alpha: float = doc(
        "scale numerator: the update is multiplied by alpha / sqrt(rank)", 8.0, gt=0, le=1e6
    )
    dropout: float = doc(
        "dropout on the adapter's input (the frozen path sees the raw x)", 0.05, ge=0, lt=1
    )
    target_modules: tuple[str, ...] = doc(
        "module-name suffixes to adapt (comma-separated on the CLI)", ALL_LINEARS
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.target_modules:
            problems.append("target_modules is empty; name at least one linear, e.g. q_proj")
        check(problems, "rslora", self)


class RsLoRALinear(LoRALinear):
    """moebench's LoRA layer with s = alpha / sqrt(r); forward, merge and unmerge all read
    `self.scaling`, so nothing else changes."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.scaling = alpha / math.sqrt(rank)  # the paper's rank-stabilised gamma_r


class RsLoRA(LinearMethod):
    name = "rslora"
    help = "rsLoRA: LoRA scaled by alpha / sqrt(rank) (Kalajdzievski 2023)."
    config_cls = RsLoRAConfig

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        return RsLoRALinear(module, config.rank, config.alpha, config.dropout)

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return config.rank * (shape.d_in + shape.d_out)


# The entry point `rslora = moebench_rslora:METHOD` registers this object under its name, which
# must equal `RsLoRA.name`. (An in-tree plugin in methods/ calls `METHODS.add` instead.)
METHOD = RsLoRA()
