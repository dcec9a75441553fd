"""LoRA (Hu et al. 2021, arXiv 2106.09685): a frozen linear plus a trainable rank-r update.

    h = W0 x + s * B (A drop(x)),  s = alpha / r,  A: [r, d_in] kaiming-uniform,  B: [d_out, r] = 0

Trainable parameters per targeted linear: r * (d_in + d_out). Mergeable: W0 + s * B @ A gives the
same function with no extra latency. Numerically the same as peft's LoRA for the same weights
(a test loads identical A, B into both). Default targets are all seven linears, as the MoE
papers' LoRA baselines use; `target_modules=q_proj,v_proj` gives the original paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moebench.components import ALL_LINEARS, add_low_rank, init_lora_factors, make_dropout
from moebench.config import check, doc
from moebench.method import (
    METHODS,
    AdapterLayer,
    BatchContext,
    LinearMethod,
    LinearShape,
    RankLayout,
)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = doc("rank r of the update B @ A", 16, ge=1, le=2**16)
    alpha: float = doc(
        "scale numerator: the update is multiplied by alpha / rank", 32.0, gt=0, le=1e6
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
        check(problems, "lora", self)


class LoRALinear(AdapterLayer):
    mergeable = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A, self.lora_B = init_lora_factors(rank, base.in_features, base.out_features)
        self.scaling = alpha / rank
        self.dropout = make_dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) * self.scaling  # [.., r]
        return add_low_rank(out, h, self.lora_B)

    def rank_layout(self) -> dict[str, RankLayout]:
        return {"lora_A": RankLayout(0), "lora_B": RankLayout(1)}  # row j of A, column j of B

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class LoRA(LinearMethod):
    name = "lora"
    help = "LoRA: one rank-r update per targeted linear (Hu et al. 2021)."
    config_cls = LoRAConfig

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        return LoRALinear(module, config.rank, config.alpha, config.dropout)

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return config.rank * (shape.d_in + shape.d_out)


METHODS.add(LoRA.name, LoRA())
