"""Partition-based LoRAMoE, the baseline of the LoRACoE paper (its section 2.3): one rank-r LoRA
split along the rank into N experts of r_e = r / N ranks, mixed by a dense softmax router.

    g = softmax(W_r x)                                         W_r: [N, d_in], fp32, raw x
    h = W0 x + s_e * B (repeat_interleave(g, r_e) * (A drop(x))),   s_e = alpha / r_e

This is LoRAMoE (section 2 of the methods reference) with N experts of rank r_e and no LBC, so it
reuses that layer: `lora_A` [r, d_in] and `lora_B` [d_out, r] are the LoRA's factors, and the
forward is one A and one B matmul. With s_e = alpha / r_e (the LoRAMoE convention) a uniform gate,
1/N per expert, gives s_e / N = alpha / r: exactly the plain LoRA of the same A and B.

Trainable parameters per targeted linear: r (d_in + d_out) + N d_in. Default targets are LoRA's
(all seven linears), so it compares with the LoRA of the same rank. Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moebench.components import ALL_LINEARS, suffix
from moebench.config import check, doc
from moebench.method import (
    METHODS,
    AdapterLayer,
    BatchContext,
    LinearMethod,
    LinearShape,
)
from moebench.methods.loramoe import LoRAMoELinear


@dataclass(frozen=True)
class LoRAMoEPartitionConfig:
    rank: int = doc("total rank r of the LoRA that the experts partition", 16, ge=1, le=2**16)
    alpha: float = doc(
        "scale numerator: the update is multiplied by alpha / (rank / experts)", 32.0, gt=0, le=1e6
    )
    num_experts: int = doc("experts N; each owns rank / N of the ranks", 4, ge=1, le=1024)
    dropout: float = doc(
        "dropout on the adapter's input (router and frozen path see the raw x)", 0.05, ge=0, lt=1
    )
    target_modules: tuple[str, ...] = doc(
        "module-name suffixes to adapt (comma-separated on the CLI)", ALL_LINEARS
    )

    def __post_init__(self) -> None:
        problems = []
        if self.rank >= 1 and self.num_experts >= 1 and self.rank % self.num_experts:
            problems.append(
                f"rank={self.rank} must be a multiple of num_experts={self.num_experts}, "
                "since the experts split the ranks evenly"
            )
        if not self.target_modules:
            problems.append("target_modules is empty; name at least one linear, e.g. q_proj")
        check(problems, "loramoe-partition", self)


class LoRAMoEPartition(LinearMethod):
    name = "loramoe-partition"
    help = "Partition LoRAMoE: one rank-r LoRA split into N router-mixed rank groups."
    config_cls = LoRAMoEPartitionConfig
    budget_knobs = ("rank", "num_experts")

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        n = config.num_experts
        return LoRAMoELinear(module, n, config.rank // n, config.alpha, config.dropout, context)

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return config.rank * (shape.d_in + shape.d_out) + config.num_experts * shape.d_in

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        return suffix(param_name) == "router"


METHODS.add(LoRAMoEPartition.name, LoRAMoEPartition())
