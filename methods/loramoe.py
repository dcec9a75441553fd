"""LoRAMoE (Dou et al. 2024, arXiv 2312.09979): N LoRA experts per FFN linear, mixed by a dense
softmax router, with the localized balancing constraint (LBC).

    g = softmax(W_r x)                        W_r: [N, d_in], fp32, sees the un-dropped x
    h = W0 x + sum_i g_i * s * B_i A_i drop(x),   s = alpha / r

The experts are stored stacked, `lora_A` [N r, d_in] and `lora_B` [d_out, N r], so the sum over
experts is one A matmul, a per-rank gate, and one B matmul: `s * B (repeat_interleave(g, r) * A x)`
equals the literal sum term by term, without a Python loop over experts or a [tokens, N, d_out]
intermediate. Kaiming-uniform on the stacked A is the per-expert init, since its bound depends only
on d_in.

LBC needs a task type per sample (1: world knowledge, experts [0, N/2); 0: general, [N/2, N)):
`Q[m, n]` is sample m's total gate mass on expert n, `I[m, n]` is 1+delta on its own half and
1-delta elsewhere, and the loss is `beta * var(I*Q) / mean(I*Q)^2` per layer (the authors' issue 3
settles var/mean^2 over the paper's var/mean). The authors' code sums padding into Q;
`lbc_mask_padding=False` does that, the default counts real tokens only. Samples without a type
(-1) take no part; a batch with none has no LBC term.

Trainable parameters per targeted linear: N r (d_in + d_out) + N d_in. Not mergeable: the gate
depends on the input.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moebench.components import (
    RouterStats,
    add_low_rank,
    fp32_matmul,
    init_lora_factors,
    init_router,
    make_dropout,
    suffix,
    token_mask,
)
from moebench.config import check, doc
from moebench.method import (
    METHODS,
    AdapterLayer,
    BatchContext,
    LinearMethod,
    LinearShape,
    PrepareContext,
    Prepared,
    RankLayout,
)

FFN_LINEARS = ("gate_proj", "up_proj", "down_proj")

NO_TASK_TYPES_NOTE = (
    "loramoe: the training mixture carries no task types, so the localized balancing constraint "
    "is 0 for this run."
)


@dataclass(frozen=True)
class LoRAMoEConfig:
    num_experts: int = doc("LoRA experts N per targeted linear", 6, ge=1, le=1024)
    rank: int = doc("rank r of each expert", 4, ge=1, le=2**16)
    alpha: float = doc(
        "scale numerator: each expert's update is multiplied by alpha / rank", 32.0, gt=0, le=1e6
    )
    dropout: float = doc(
        "dropout on the experts' input (router and frozen path see the raw x)", 0.05, ge=0, lt=1
    )
    target_modules: tuple[str, ...] = doc(
        "module-name suffixes to adapt (comma-separated on the CLI); the paper: the FFN linears",
        FFN_LINEARS,
    )
    lbc_delta: float = doc(
        "LBC importance margin: I is 1+delta on a sample's own expert half, 1-delta elsewhere",
        0.1,
        ge=0,
        lt=1,
    )
    lbc_beta: float = doc(
        "LBC weight in the loss (0 turns LBC off, as the authors' script)", 0.1, ge=0, le=1000
    )
    lbc_mask_padding: bool = doc(
        "count only real tokens in LBC's Q (false: the authors' code, padding included)", True
    )
    knowledge_tasks: tuple[str, ...] = doc(
        "task names given type 1 (world knowledge) whatever they declare", (), names="task"
    )
    general_tasks: tuple[str, ...] = doc(
        "task names given type 0 (general) whatever they declare", (), names="task"
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.target_modules:
            problems.append("target_modules is empty; name at least one linear, e.g. up_proj")
        if self.lbc_beta > 0.0 and self.num_experts >= 1 and self.num_experts % 2:
            problems.append(
                f"num_experts={self.num_experts} must be even while LBC is on (lbc_beta="
                f"{self.lbc_beta}): the experts split into two halves; set lbc_beta=0 or use an "
                "even count"
            )
        both = sorted(
            {t.lower() for t in self.knowledge_tasks} & {t.lower() for t in self.general_tasks}
        )
        if both:
            problems.append(
                f"task(s) {', '.join(both)} appear in both knowledge_tasks and general_tasks; "
                "give each task one type"
            )
        check(problems, "loramoe", self)


def router_probs(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dense softmax gates [..., N] in fp32 (routers are kept out of bf16 autocast)."""
    return torch.softmax(fp32_matmul(x, weight), dim=-1)


def _gated_ranks(
    x: torch.Tensor, gates: torch.Tensor, lora_A: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`scaling * repeat_interleave(gates, r_e) * (A x)` [.., N r_e]: B's input, so that the N
    gated rank groups cost two matmuls in all (B's is `add_low_rank`).

    The gate is broadcast over each group's ranks instead of materialising the repeat, and the
    scale rides on the [.., N r_e] tensor rather than the [.., d_out] one.
    """
    h = x.to(lora_A.dtype) @ lora_A.t()  # [.., N r_e]
    n = gates.shape[-1]
    return (h.unflatten(-1, (n, -1)) * (gates * scaling).unsqueeze(-1)).flatten(-2)


# (weak reference to the labels tensor, its version, the answer); weak, so the cache never keeps
# a batch's tensor (or its device memory) alive after the loop has dropped it.
_labelled_cache: (
    tuple[weakref.ref[torch.Tensor], int, tuple[torch.Tensor, torch.Tensor] | None] | None
) = None


def _labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(indices, types) of the samples that carry a task type, or None when none does.

    Deciding "none" needs the host, i.e. one device sync; every layer of a forward sees the same
    labels tensor, so the answer is kept for it and the sync happens once per batch, not per layer
    (the tensor's version counter catches an in-place change).
    """
    global _labelled_cache
    cached = _labelled_cache
    if cached is not None and cached[0]() is labels and cached[1] == labels._version:
        return cached[2]
    rows = torch.nonzero(labels >= 0).squeeze(1)
    result = (rows, labels.index_select(0, rows)) if rows.numel() else None
    _labelled_cache = (weakref.ref(labels), labels._version, result)
    return result


def lbc_loss(
    gates: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor,
    delta: float,
) -> torch.Tensor | None:
    """Unweighted LBC, `var_unbiased(I*Q) / (mean(I*Q)^2 + 1e-10)`, for gates [batch, seq, N]
    and mask [batch, seq] (None: every position counts); None when no sample has a type."""
    labelled = _labelled_rows(labels)
    if labelled is None:
        return None
    rows, types = labelled
    n = gates.shape[-1]
    if mask is not None:
        q = torch.einsum("bsn,bs->bn", gates, mask.to(gates.dtype))
    else:
        q = gates.sum(1)
    q = q.index_select(0, rows)  # [M, N]
    first_half = torch.arange(n, device=gates.device) < n // 2
    own = first_half.unsqueeze(0) == (types == 1).unsqueeze(1)  # type 1 owns [0, N/2)
    importance = torch.where(own, 1.0 + delta, 1.0 - delta).to(q.dtype)
    z = (importance * q).flatten()
    return z.var() / (z.mean() ** 2 + 1e-10)


class LoRAMoELinear(AdapterLayer):
    """A frozen linear plus N router-mixed LoRA experts of rank r (LBC optional)."""

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float,
        context: BatchContext,
        *,
        lbc_delta: float = 0.0,
        lbc_beta: float = 0.0,
        mask_padding: bool = True,
        router_init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.base = base
        self.num_experts = num_experts
        self.rank = rank
        self.lora_A, self.lora_B = init_lora_factors(
            num_experts * rank, base.in_features, base.out_features
        )
        self.router = init_router(num_experts, base.in_features, router_init)
        self.scaling = alpha / rank
        self.dropout = make_dropout(dropout)
        self.context = context
        self.lbc_delta = lbc_delta
        self.lbc_beta = lbc_beta
        self.mask_padding = mask_padding
        self.router_stats = RouterStats(num_experts)
        self._aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gates = router_probs(x, self.router)  # [.., N] fp32
        h = _gated_ranks(self.dropout(x), gates, self.lora_A, self.scaling)
        self._aux = {}
        if self.training:
            ctx = self.context
            if ctx.record_stats:
                self.router_stats.record(
                    gates.reshape(-1, self.num_experts), token_mask(ctx.attention_mask, x)
                )
            if self.lbc_beta > 0:
                self._lbc(x, gates)
        return add_low_rank(out, h, self.lora_B)

    def _lbc(self, x: torch.Tensor, gates: torch.Tensor) -> None:
        labels = self.context.task_labels
        if x.dim() != 3 or labels is None or labels.shape != x.shape[:1]:
            return
        mask = token_mask(self.context.attention_mask, x) if self.mask_padding else None
        if mask is not None:
            mask = mask.view(x.shape[:2])
        loss = lbc_loss(gates, mask, labels, self.lbc_delta)
        if loss is not None:
            self._aux = {"lbc": self.lbc_beta * loss}

    def aux_losses(self) -> dict[str, torch.Tensor]:
        return self._aux

    def rank_layout(self) -> dict[str, RankLayout]:
        """Expert i owns ranks [i r, (i+1) r) of the stacked factors; the router is apart."""
        per = self.rank
        return {
            "lora_A": RankLayout(0, ranks_per_expert=per),
            "lora_B": RankLayout(1, ranks_per_expert=per),
        }

    def stats(self) -> dict[str, float]:
        return self.router_stats.summary()


class LoRAMoE(LinearMethod):
    name = "loramoe"
    help = "LoRAMoE: N router-mixed LoRA experts per FFN linear, with LBC (Dou et al. 2024)."
    config_cls = LoRAMoEConfig
    budget_knobs = ("rank", "num_experts")

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        return LoRAMoELinear(
            module,
            config.num_experts,
            config.rank,
            config.alpha,
            config.dropout,
            context,
            lbc_delta=config.lbc_delta,
            lbc_beta=config.lbc_beta,
            mask_padding=config.lbc_mask_padding,
        )

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        return config.num_experts * (config.rank * (shape.d_in + shape.d_out) + shape.d_in)

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        return suffix(param_name) == "router"

    def task_label(self, config: Any, task: str | None) -> int:
        if task is not None:
            if task.lower() in {t.lower() for t in config.knowledge_tasks}:
                return 1
            if task.lower() in {t.lower() for t in config.general_tasks}:
                return 0
        return super().task_label(config, task)

    def prepare(self, config: Any, ctx: PrepareContext) -> Prepared:
        if config.lbc_beta <= 0:
            return Prepared(config)
        # The examples' labels are what the layers will see (the runner sets them with
        # `task_label` above), so they, not the task names, decide.
        typed = any(e.task_label >= 0 for e in ctx.examples)
        return Prepared(config) if typed else Prepared(config, notes=[NO_TASK_TYPES_NOTE])


METHODS.add(LoRAMoE.name, LoRAMoE())
