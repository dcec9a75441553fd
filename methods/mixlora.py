"""MixLoRA (Li et al. 2024, arXiv 2404.15159; TUDB-Labs/MixLoRA and TUDB-Labs/MoE-PEFT): plain
LoRA on attention, and each FFN turned into E top-k routed experts that share its frozen weights.

    p = softmax(W_g x)   W_g: [E, d], N(0, 0.02^2), fp32;  keep the top k, renormalise to sum 1
    a_i = act(W_gate x + s B_g^i A_g^i drop(x)) * (W_up x + s B_u^i A_u^i drop(x))
    E_i = W_down a_i + s B_d^i A_d^i drop(a_i);   y = sum_{i in top-k} w_i E_i

`W_gate x` and `W_up x` are computed once per token and shared by every expert (the reference's
efficiency trick). Since the kept weights sum to 1 and `W_down` is linear, `sum_i w_i W_down a_i`
is `W_down (sum_i w_i a_i)`: the frozen down projection runs once per token, not once per routed
slot, and only the experts' own low-rank terms are computed per slot.

Dispatch. The (token, choice) slots are grouped by expert with one stable argsort, gathered into
one row each, and every expert's low-rank products run on its contiguous block of rows, a loop
over the E experts (never over tokens; experts without tokens are skipped). No row is padded and
no [tokens, E, d_ff] tensor exists; the loop costs a few small matmuls per expert, and reading the
group sizes is the layer's one device synchronisation. (A padded [E, capacity] batched-matmul
layout was measured slower: routing on real hidden states is skewed at init, so capacity * E was
2-3x the slot count.) Dropout draws a separate mask per slot, as the reference's per-expert
dropout modules do.

Load balance (Mixtral's form, as the reference computes it): the router logits of every layer's
last training forward, over real tokens, are concatenated; with `f[j, e]` the share of tokens
whose j-th choice is e and `P[e]` the mean probability of e,
`L = aux_coef * E * sum_{j,e} f[j, e] P[e]`, which is `aux_coef * k` under perfect balance. It is
one loss over all layers at once, so `MixLoRA.aux_losses` computes it rather than each layer.

Trainable parameters: `L [sum_attn r(d_in+d_out) + E sum_ffn r(d_in+d_out) + E d]`; per token only
k experts are active. The attention LoRAs are mergeable; the routed FFN is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moebench.components import (
    RouterStats,
    add_low_rank,
    fp32_matmul,
    make_dropout,
    suffix,
    token_mask,
)
from moebench.config import check, doc
from moebench.method import (
    METHODS,
    AdapterLayer,
    BatchContext,
    Method,
    ModelShapes,
    RankLayout,
)
from moebench.methods.lora import LoRALinear

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MixLoRAConfig:
    rank: int = doc(
        "rank r of every LoRA (attention linears and each expert's gate/up/down)",
        16,
        ge=1,
        le=2**16,
    )
    alpha: float = doc(
        "scale numerator: every low-rank update is multiplied by alpha / rank", 32.0, gt=0, le=1e6
    )
    dropout: float = doc(
        "dropout on each LoRA's input (the frozen path sees the raw input)", 0.05, ge=0, lt=1
    )
    num_experts: int = doc(
        "experts E per FFN, sharing its frozen weights, each with own LoRAs", 8, ge=1, le=1024
    )
    top_k: int = doc(
        "experts each token is sent to; their weights are renormalised to sum 1", 2, ge=1, le=1024
    )
    aux_coef: float = doc(
        "weight of the load-balance loss (the reference code's 0.001; its README shows 0.01)",
        0.001,
        ge=0,
        le=1000,
    )
    router_init_std: float = doc(
        "standard deviation of the router's normal init", 0.02, ge=0, le=10
    )
    attention_targets: tuple[str, ...] = doc(
        "attention linears given plain LoRA (comma-separated on the CLI; may be empty)",
        ATTENTION_LINEARS,
    )

    def __post_init__(self) -> None:
        problems = []
        if 1 <= self.num_experts < self.top_k:
            problems.append(
                f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}"
            )
        unknown = [t for t in self.attention_targets if t not in ATTENTION_LINEARS]
        if unknown:
            problems.append(
                f"attention_targets {', '.join(unknown)} are not attention linears; accepted: "
                f"{', '.join(ATTENTION_LINEARS)} (the FFN is always routed)"
            )
        check(problems, "mixlora", self)


def _expert_factors(
    num_experts: int, rank: int, d_in: int, d_out: int
) -> tuple[nn.Parameter, nn.Parameter]:
    """A [E, r, d_in], each expert's slice kaiming-uniform (a=sqrt(5)) on its own fan-in; B zeros.

    Zero B makes every expert the frozen FFN at step 0, so the routed FFN starts as the base one.
    """
    a = torch.empty(num_experts, rank, d_in)
    for i in range(num_experts):
        nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(num_experts, d_out, rank))


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` in fp32 even under bf16 autocast: top-k choices and the balance loss are
    sensitive to the logits' low bits."""
    return fp32_matmul(x, weight)  # keeps x, not an fp32 copy of it, for the backward


def _grouped(
    rows: torch.Tensor, weight: torch.Tensor, counts: list[int], add: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows grouped by expert ([S, n_in], counts[i] of them for expert i) times their expert's
    weight ([E, n_out, n_in]), plus `add` [S, n_out] when given (in the GEMM, `add_low_rank`).

    A loop over experts on contiguous views: no padding, and experts without rows are skipped.
    `split`/`unbind`/`cat` keep the backward to one gradient copy each, where slicing per expert
    would build a full-size zero gradient per expert.
    """
    extras = add.split(counts) if add is not None else [None] * len(counts)
    outs = []
    for part, wt, extra, n in zip(
        rows.split(counts), weight.unbind(0), extras, counts, strict=True
    ):
        if n == 0:
            continue
        outs.append(part @ wt.t() if extra is None else add_low_rank(extra, part, wt))
    return torch.cat(outs)


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama/Qwen2-style MLP: act(gate(x)) * up(x) -> down."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in FFN_LINEARS) and callable(
        getattr(module, "act_fn", None)
    )


class MixLoRAFFN(AdapterLayer):
    """A gated MLP whose frozen weights are shared by E routed LoRA experts."""

    def __init__(self, base: nn.Module, config: MixLoRAConfig, context: BatchContext) -> None:
        super().__init__()
        self.base = base
        d = base.gate_proj.in_features
        ff = base.gate_proj.out_features
        e, r = config.num_experts, config.rank
        self.num_experts, self.rank, self.top_k = e, r, config.top_k
        self.scaling = config.alpha / r
        self.record_logits = config.aux_coef > 0
        self.router = nn.Parameter(torch.empty(e, d).normal_(0.0, config.router_init_std))
        self.gate_A, self.gate_B = _expert_factors(e, r, d, ff)
        self.up_A, self.up_B = _expert_factors(e, r, d, ff)
        self.down_A, self.down_B = _expert_factors(e, r, ff, d)
        self.dropout = make_dropout(config.dropout)
        self.context = context
        self.router_stats = RouterStats(e)
        # Router logits [real tokens, E] of the last training forward, for the balance loss.
        self.last_logits: torch.Tensor | None = None

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], kept weights [T, k] renormalised, chosen experts [T, k]), all fp32
        but the indices; choices sorted by probability, highest first."""
        logits = router_logits(flat, self.router)
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, chosen = self.route(flat)
        self.last_logits = None
        if self.training:
            mask = token_mask(self.context.attention_mask, x)
            if self.record_logits:
                self.last_logits = logits if mask is None else logits[mask]
            if self.context.record_stats:
                self.router_stats.record(logits.softmax(-1), mask, chosen=chosen)
        out = self.mix(flat, weights, chosen)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def mix(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The routed FFN for tokens `flat` [T, d] given their kept weights and experts [T, k]."""
        base = self.base
        gate, up = base.gate_proj(flat), base.up_proj(flat)  # [T, ff], shared by all experts
        if flat.shape[0] == 0:
            return base.down_proj(base.act_fn(gate) * up)
        r, s = self.rank, self.scaling
        # the (token, choice) slots grouped by expert, one row each
        flat_e = chosen.reshape(-1)
        order = flat_e.argsort(stable=True)
        counts = torch.bincount(flat_e, minlength=self.num_experts).tolist()  # one host sync
        tok = order // self.top_k  # token of each row
        w = weights.reshape(-1)[order].unsqueeze(-1)  # [S, 1] fp32

        # gate/up experts: A for both factors at once, s applied on the rank-r side, and B's
        # product added onto the gathered frozen projection in the same matmul
        x_rows = self.dropout(flat.index_select(0, tok).to(self.gate_A.dtype))
        gate_up_A = torch.cat([self.gate_A, self.up_A], dim=1)  # [E, 2r, d]
        h_gate, h_up = (_grouped(x_rows, gate_up_A, counts) * s).split(r, dim=-1)
        g = _grouped(h_gate, self.gate_B, counts, add=gate.index_select(0, tok))
        u = _grouped(h_up, self.up_B, counts, add=up.index_select(0, tok))
        # each slot's expert activation, already times its gate weight: dropout commutes with a
        # per-row scale, so the down LoRA may read the weighted activation as well
        a = base.act_fn(g) * u * w.to(g.dtype)

        # the frozen W_down once per token on the weighted sum; the experts' down LoRAs per slot
        out = base.down_proj(a.new_zeros(flat.shape[0], a.shape[-1]).index_add(0, tok, a))
        h_down = _grouped(self.dropout(a).to(self.down_A.dtype), self.down_A, counts) * s
        d_down = _grouped(h_down, self.down_B, counts)
        return out.index_add(0, tok, d_down.to(out.dtype))

    def rank_layout(self) -> dict[str, RankLayout]:
        """Each expert's own ranks per FFN factor: A [E, r, n_in] row j, B [E, n_out, r] col j."""
        out = {}
        for factor in ("gate", "up", "down"):
            out[f"{factor}_A"] = RankLayout(1, factor, expert_dim=0)
            out[f"{factor}_B"] = RankLayout(2, factor, expert_dim=0)
        return out

    def stats(self) -> dict[str, float]:
        return self.router_stats.summary()


def balance_loss(logits: torch.Tensor, top_k: int, coef: float) -> torch.Tensor:
    """Mixtral's load-balance loss on router logits [tokens, E] pooled over layers:
    `coef * E * sum_{j,e} f[j,e] P[e]`, f[j,e] the share of tokens whose j-th choice is e."""
    e = logits.shape[-1]
    probs = logits.float().softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices  # [tokens, k], highest first
    share = F.one_hot(chosen, e).float().mean(0)  # [k, E]
    mean_prob = probs.mean(0)  # [E]
    return coef * e * (share * mean_prob).sum()


class MixLoRA(Method):
    name = "mixlora"
    help = (
        "MixLoRA: LoRA on attention, top-k routed LoRA experts sharing each FFN (Li et al. 2024)."
    )
    config_cls = MixLoRAConfig
    budget_knobs = ("rank", "num_experts")

    def adapt_module(
        self, qualified_name: str, module: nn.Module, config: Any, context: BatchContext
    ) -> nn.Module | None:
        name = suffix(qualified_name)
        if isinstance(module, nn.Linear) and name in config.attention_targets:
            return LoRALinear(module, config.rank, config.alpha, config.dropout)
        if name == "mlp" and is_gated_mlp(module):
            return MixLoRAFFN(module, config, context)
        return None

    def target_names(self, config: Any) -> tuple[str, ...]:
        return (*config.attention_targets, "mlp")

    def _count(self, config: Any, shapes: ModelShapes, experts: int) -> int:
        lin = shapes.linears
        attn = sum(config.rank * (lin[n].d_in + lin[n].d_out) for n in config.attention_targets)
        ffn = sum(config.rank * (lin[n].d_in + lin[n].d_out) for n in FFN_LINEARS)
        return shapes.num_layers * (attn + experts * ffn + config.num_experts * shapes.hidden)

    def trainable_parameters(self, config: Any, shapes: ModelShapes) -> int:
        return self._count(config, shapes, config.num_experts)

    def active_parameters(self, config: Any, shapes: ModelShapes) -> int:
        return self._count(config, shapes, config.top_k)

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        return suffix(param_name) == "router"

    def aux_losses(self, config: Any, layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        logits = [
            layer.last_logits
            for layer in layers.values()
            if isinstance(layer, MixLoRAFFN) and layer.last_logits is not None
        ]
        if not logits or sum(t.shape[0] for t in logits) == 0:
            return {}
        return {"balance": balance_loss(torch.cat(logits), config.top_k, config.aux_coef)}


METHODS.add(MixLoRA.name, MixLoRA())
