"""LoRACoE (the seed paper): one LoRA read as r rank-1 components, mixed by composite experts.

Each of E experts is a softmax over the r ranks, `G_i(x) = softmax(W_i x)`, and the layer applies
the experts' mean gate to the rank components:

    h = W0 x + s * (1/E) sum_i sum_j G_ij B_j A_j x  =  W0 x + s * B (gbar * (A x)),
    gbar = mean_i G_i

The right-hand form is what runs (a test checks it against the literal double sum). By default
the router rows are stacked under A and x meets `[A; W_1; ...; W_E]` in ONE matmul (the paper's
appendix C), then the result is split. The fused path is one autograd Function with a
hand-written backward (`_FusedCoE`) that keeps x and the matmul's [T, r(1+E)] output for
backward and recomputes the rest. That matmul has one input, so
with dropout > 0 the router routes on the dropped x, as the paper's fused kernel must;
`fused=false` keeps the two-matmul autograd path, router on the raw x as the formula says. With
dropout 0 the two are equal, forward and gradients (tests, plus gradcheck in float64).

Training has two phases (paper §3.3 and appendix A): a LoRA warm-up in which the layer is plain
LoRA (`h = W0 x + s B A x`) and the router neither trains nor decays, then joint training of
LoRA and router with gates on. Router init is zero, so gates start uniform and `gbar = 1/r`:
at the switch the adapter's output shrinks r-fold relative to the warmed-up LoRA, which the
paper does not discuss. The literal formula is the default; `gate_scale=r` multiplies gbar by
r so the switch is continuous. Each layer logs its adapter-output norm, and the runner reports
it on both sides of the switch.

Two ablation switches of the paper, off by default and then left out of the run's hash (so runs
stored before they existed keep theirs): `eval_gates=uniform` scores the trained model with the
router removed, gates 1/r (Table 2's last row; training is unchanged), and `warmup_router=true`
gates the warm-up and trains the router in it too (Table 3's "LoRA & Router warmup").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from moebench.components import (
    ALL_LINEARS,
    RouterStats,
    add_low_rank,
    fp32_matmul,
    init_lora_factors,
    init_router,
    make_dropout,
    token_mask,
)
from moebench.config import check, doc
from moebench.method import (
    METHODS,
    AdapterLayer,
    BatchContext,
    LinearMethod,
    LinearShape,
    Phase,
    RankLayout,
)

WARMUP, JOINT = "lora-warmup", "joint"
# Ablation switches added after runs were stored: at these values they stay out of the hash.
HASH_NEUTRAL = {"eval_gates": "router", "warmup_router": False}


@dataclass(frozen=True)
class LoRACoEConfig:
    rank: int = doc(
        "rank r of the shared LoRA, i.e. the number of rank-1 components", 16, ge=1, le=2**16
    )
    alpha: float = doc(
        "scale numerator: the update is multiplied by alpha / rank", 32.0, gt=0, le=1e6
    )
    num_experts: int = doc(
        "composite experts E, each a softmax over the r ranks (paper: 2)", 2, ge=1, le=1024
    )
    dropout: float = doc(
        "dropout on the adapter's input (paper setting not stated)", 0.05, ge=0, lt=1
    )
    target_modules: tuple[str, ...] = doc(
        "module-name suffixes to adapt (comma-separated on the CLI)", ALL_LINEARS
    )
    warmup_fraction: float = doc(
        "share of training spent as plain LoRA before the router joins (paper: 2 of 4 epochs)",
        0.5,
        ge=0,
        lt=1,
    )
    warmup_lr: float | None = doc(
        "peak lr of the warm-up phase (paper: 2e-4; None: the run's train.lr)", 2e-4, gt=0, le=1
    )
    joint_lr: float | None = doc(
        "peak lr of the joint phase (paper: 5e-5; None: the run's train.lr)", 5e-5, gt=0, le=1
    )
    gate_scale: float = doc(
        "multiplies the mean gate; 1 is the paper's formula, rank keeps the switch continuous",
        1.0,
        gt=0,
        le=1e6,
    )
    router_init: Literal["zeros", "kaiming", "normal"] = doc(
        "router weight init; zeros gives uniform gates at the start of the joint phase",
        "zeros",
    )
    eval_gates: Literal["router", "uniform"] = doc(
        "gates when not training: router, or uniform 1/r (Table 2's 'inference w/o router': "
        "the trained ranks with the router removed)",
        "router",
    )
    warmup_router: bool = doc(
        "warm-up trains the router too, gates on (Table 3's 'LoRA & Router warmup'); false: "
        "the warm-up is plain LoRA",
        False,
    )
    fused: bool = doc(
        "one matmul of x with [A; W_route] (paper appendix C); under dropout the router then "
        "sees the dropped x; false: the exact formula, router on the raw x",
        True,
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.target_modules:
            problems.append("target_modules is empty; name at least one linear, e.g. q_proj")
        check(problems, "loracoe", self)


class LoRACoELinear(AdapterLayer):
    def __init__(self, base: nn.Linear, config: LoRACoEConfig, context: BatchContext) -> None:
        super().__init__()
        self.base = base
        r, e = config.rank, config.num_experts
        self.rank, self.num_experts = r, e
        self.lora_A, self.lora_B = init_lora_factors(r, base.in_features, base.out_features)
        # [E*r, d_in]: row block i is expert i's W_i, so A and the router stack into one matmul.
        self.router = init_router(e * r, base.in_features, config.router_init)
        self.scaling = config.alpha / r
        self.gate_scale = config.gate_scale
        self.dropout = make_dropout(config.dropout)
        self.fused = config.fused
        self.uniform_eval = config.eval_gates == "uniform"
        self.warmup_router = config.warmup_router
        self.context = context
        self.router_stats = RouterStats(r)
        self._norm_sum: torch.Tensor | None = None
        self._norm_tokens: torch.Tensor | None = None

    def rank_layout(self) -> dict[str, RankLayout]:
        """The shared ranks (row j of A, column j of B); the router is scored on its own."""
        return {"lora_A": RankLayout(0), "lora_B": RankLayout(1)}

    def gated(self) -> bool:
        return self.context.phase != WARMUP or self.warmup_router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.uniform_eval and not self.training and self.gated():
            # the router removed: gbar = 1/r, what zero router weights would give
            h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()
            h = h * (self.scaling * self.gate_scale / self.rank)
        elif self.gated() and self.fused:
            h = self._fused_gated(x)  # [T, r], gates and scale applied
        else:
            h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.t()
            if self.gated():
                h = h * self._mean_gate(fp32_matmul(x, self.router), x)
            h = h * self.scaling
        if self.training and self.context.record_stats:
            self._record_norm(h, x)  # on logged steps only: it costs a matmul
        return add_low_rank(out, h, self.lora_B)

    def _fused_gated(self, x: torch.Tensor) -> torch.Tensor:
        gated, gates = _FusedCoE.apply(
            self.dropout(x),
            self.lora_A,
            self.router,
            self.num_experts,
            self.scaling * self.gate_scale,
        )
        if self.training and self.context.record_stats:
            self._record_gates(gates, x)
        return gated

    def _mean_gate(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """gbar = mean over experts of softmax over ranks, in fp32."""
        g = logits.float().unflatten(-1, (self.num_experts, self.rank)).softmax(-1)
        if self.training and self.context.record_stats:
            self._record_gates(g, x)
        return g.mean(-2) * self.gate_scale

    def _record_gates(self, g: torch.Tensor, x: torch.Tensor) -> None:
        """g [..., E, r]: each expert's softmax over the ranks."""
        mask = token_mask(self.context.attention_mask, x)
        self.router_stats.record(g.mean(-2).reshape(-1, self.rank), mask, entropy_of=g)

    @torch.no_grad()
    def _record_norm(self, h: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulates the adapter output's L2 norm per real token; h is B's [.., r] input."""
        norms = (h.float() @ self.lora_B.float().t()).norm(dim=-1).reshape(-1)
        mask = token_mask(self.context.attention_mask, x)
        w = torch.ones_like(norms) if mask is None else mask.float()
        total, count = (norms * w).sum(), w.sum()  # no boolean indexing: no device sync
        self._norm_sum = total if self._norm_sum is None else self._norm_sum + total
        self._norm_tokens = count if self._norm_tokens is None else self._norm_tokens + count

    def stat_sums(self) -> dict[str, torch.Tensor | None]:
        return {**super().stat_sums(), "norm_sum": self._norm_sum, "norm_tokens": self._norm_tokens}

    def set_stat_sums(self, sums: dict[str, torch.Tensor | None]) -> None:
        super().set_stat_sums(sums)
        self._norm_sum, self._norm_tokens = sums.get("norm_sum"), sums.get("norm_tokens")

    def stats(self) -> dict[str, float]:
        """Per-rank mean gate (`share.j`), gate entropy, and the adapter output's mean L2 norm."""
        out = self.router_stats.summary() if self.gated() else {}
        if self._norm_sum is not None and self._norm_tokens is not None:
            tokens = float(self._norm_tokens)
            if tokens:
                out["out_norm"] = float(self._norm_sum) / tokens
        self._norm_sum = self._norm_tokens = None
        return out


class _FusedCoE(torch.autograd.Function):
    """The gated rank activations `k * gbar(x) * (A x)` [T, r] (k = alpha/r * gate_scale) as one op.

    Why a hand-written backward: autograd over the same lines keeps every intermediate ([T, r]
    A x, [T, E, r] gates, [T, r] mean gate) alive until backward and walks a dozen small kernels
    each way. This keeps only x (which LoRA's A keeps too, for its gradient) and the
    [T, r(1+E)] output of the one matmul with [A; W_route], and recomputes the softmax from it
    in backward (a few hundred flops per token against the matmuls' thousands). Only first
    derivatives: the backward is not itself differentiable. It computes in fp32 (or the factors'
    wider dtype, so gradcheck can run it in float64) whatever x's dtype: routers stay out of bf16.
    The second output, the gates [T, E, r], feeds router statistics and carries no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        router: torch.Tensor,
        num_experts: int,
        k: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = lora_A.shape[0]
        dtype = torch.promote_types(lora_A.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            w = torch.cat([lora_A, router]).to(dtype)  # [r(1+E), d_in]
            both = x.reshape(-1, x.shape[-1]).to(dtype) @ w.t()
            h, gates, gbar = _split_gates(both, r, num_experts)
            gated = h * gbar * k
        ctx.save_for_backward(x, w, both)
        ctx.num_experts, ctx.k = num_experts, k
        ctx.mark_non_differentiable(gates)
        return gated, gates

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_gated: torch.Tensor, _grad_gates: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        x, w, both = ctx.saved_tensors
        e, k = ctx.num_experts, ctx.k
        r = w.shape[0] // (1 + e)
        need_x, need_a, need_router = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_router = None
        with torch.autocast(x.device.type, enabled=False):
            h, gates, gbar = _split_gates(both, r, e)
            grad = grad_gated.to(w.dtype) * k  # d loss / d (h * gbar)
            grad_g = (grad * h / e).unsqueeze(-2)  # each expert's share of d gbar
            grad_logits = gates * (grad_g - (gates * grad_g).sum(-1, keepdim=True))
            grad_both = torch.cat([grad * gbar, grad_logits.flatten(-2)], dim=-1)
            if need_a or need_router:
                grad_w = grad_both.t() @ x.reshape(-1, x.shape[-1]).to(w.dtype)
                grad_a, grad_router = grad_w[:r], grad_w[r:]
            if need_x:
                grad_x = (grad_both @ w).to(x.dtype).view(x.shape)
        return grad_x, grad_a, grad_router, None, None


def _split_gates(
    both: torch.Tensor, r: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, r(1+E)] -> A x [T, r], gates [T, E, r] (softmax over ranks), mean gate [T, r]."""
    h, logits = both.split([r, r * num_experts], dim=-1)
    gates = logits.unflatten(-1, (num_experts, r)).softmax(-1)
    return h, gates, gates.mean(-2)


class LoRACoE(LinearMethod):
    name = "loracoe"
    help = "LoRACoE: composite experts over one LoRA's rank-1 components (the seed paper)."
    config_cls = LoRACoEConfig
    budget_knobs = ("rank", "num_experts")

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        return LoRACoELinear(module, config, context)

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return (
            config.rank * (shape.d_in + shape.d_out) + config.num_experts * config.rank * shape.d_in
        )

    def phases(self, config: Any) -> tuple[Phase, ...]:
        joint = Phase(JOINT, 1.0 - config.warmup_fraction, None, config.joint_lr)
        if config.warmup_fraction == 0:
            return (dataclasses.replace(joint, fraction=1.0),)
        trains = None if config.warmup_router else _not_router
        warmup = Phase(WARMUP, config.warmup_fraction, trains, config.warmup_lr)
        return (warmup, joint)

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if HASH_NEUTRAL.get(k, ...) != v}

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        return _is_router(param_name)


def _is_router(param_name: str) -> bool:
    return param_name.endswith(".router")


def _not_router(param_name: str) -> bool:
    return not _is_router(param_name)


METHODS.add(LoRACoE.name, LoRACoE())
