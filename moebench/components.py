"""Pieces shared by method plugins: LoRA factor init and the low-rank path.

Kept in one place so every method initialises and applies its factors identically; the
"zero B means base model" property of every method rests on `init_lora_factors`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def init_lora_factors(rank: int, d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A [r, d_in]: kaiming-uniform, a=sqrt(5), as peft and loralib do; B [d_out, r]: zeros."""
    a = torch.empty(rank, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, rank))


def add_low_rank(out: torch.Tensor, h: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """`out + h @ B^T` for the frozen output `out` [.., d_out] and rank activations h [.., r].

    One addmm when the dtypes agree or autocast picks them: the add then rides in the GEMM's
    accumulate instead of a further pass over the [tokens, d_out] output in forward. Otherwise
    (bf16 activations, fp32 adapters, no autocast) B's product is computed in the adapter's
    dtype and cast, as peft does. Callers apply the adapter's scale on h: r numbers per token,
    not d_out.
    """
    if out.dtype == h.dtype == lora_B.dtype or _autocast_on(out.device.type):
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.t())
        return flat.view(out.shape)
    return out + (h @ lora_B.t()).to(out.dtype)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type; False where it has no autocast at all."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # e.g. "meta"
        return False


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def suffix(qualified_name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`: targets are named by module suffix."""
    return qualified_name.rsplit(".", 1)[-1]


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def init_router(num_out: int, d_in: int, how: str = "kaiming") -> nn.Parameter:
    """A bias-free router weight [num_out, d_in]: kaiming-uniform (LoRAMoE), normal(0, 0.02)
    (MixLoRA) or zeros (LoRACoE: uniform gates at the start)."""
    w = torch.empty(num_out, d_in)
    if how == "kaiming":
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    elif how == "normal":
        nn.init.normal_(w, std=0.02)
    elif how == "zeros":
        nn.init.zeros_(w)
    else:
        raise ValueError(f"unknown router init '{how}'")
    return nn.Parameter(w)


def token_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """The flat [tokens] bool mask of real tokens for activations `x` [batch, seq, d], or None
    when there is no mask or it does not describe `x` (e.g. one cached decoding position)."""
    if attention_mask is None or attention_mask.shape != x.shape[:-1]:
        return None
    return attention_mask.reshape(-1).to(torch.bool)


class RouterStats:
    """Running sums of one router's gates over the forwards the loop asks to record.

    Kept as device tensors, with padding removed by multiplying with a 0/1 weight rather than by
    boolean indexing, so recording never waits on the device; floats are made only in `summary`.
    `share.i` is expert i's mean gate mass over real tokens; under top-k routing `load.i` is the
    fraction of routing slots that picked expert i; `entropy` is the mean entropy (nats) of the
    gate distribution(s).
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._reset()

    def _reset(self) -> None:
        self.mass: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    @torch.no_grad()
    def record(
        self,
        probs: torch.Tensor,
        mask: torch.Tensor | None = None,
        chosen: torch.Tensor | None = None,
        entropy_of: torch.Tensor | None = None,
    ) -> None:
        """probs [tokens, n] gate weights; mask [tokens] real tokens; chosen [tokens, k] top-k
        indices; entropy_of [tokens, ..., m] distributions whose entropy to log (default probs)."""
        probs = probs.detach().float().reshape(-1, self.num_experts)
        t = probs.shape[0]
        w = torch.ones(t, device=probs.device) if mask is None else mask.reshape(t).float()
        dist = (probs if entropy_of is None else entropy_of.detach().float()).reshape(
            t, -1, (probs if entropy_of is None else entropy_of).shape[-1]
        )
        ent = -(dist * dist.clamp_min(1e-20).log()).sum(-1).mean(-1)  # [tokens]
        self._add("mass", (probs * w[:, None]).sum(0))
        self._add("entropy", (ent * w).sum())
        self._add("tokens", w.sum())
        if chosen is not None:
            k = chosen.shape[-1]
            load = torch.zeros(self.num_experts, device=probs.device)
            load.scatter_add_(0, chosen.reshape(-1), w.repeat_interleave(k))
            self._add("load", load)

    def _add(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)

    def sums(self) -> dict[str, torch.Tensor | None]:
        """The running sums behind `summary`: what ranks of one job add up before it is formed."""
        return {
            "mass": self.mass,
            "load": self.load,
            "entropy": self.entropy,
            "tokens": self.tokens,
        }

    def set_sums(self, sums: dict[str, torch.Tensor | None]) -> None:
        for name, value in sums.items():
            setattr(self, name, value)

    def summary(self) -> dict[str, float]:
        """Means since the last summary (then reset); empty when nothing was recorded."""
        if self.tokens is None or float(self.tokens) == 0:
            self._reset()
            return {}
        tokens = float(self.tokens)
        assert self.mass is not None and self.entropy is not None
        out = {f"share.{i}": v / tokens for i, v in enumerate(self.mass.tolist())}
        out["entropy"] = float(self.entropy) / tokens
        if self.load is not None:
            slots = float(self.load.sum())
            out.update({f"load.{i}": v / slots for i, v in enumerate(self.load.tolist())})
        self._reset()
        return out


class _Fp32Matmul(torch.autograd.Function):
    """`x @ W.T` computed in fp32 whatever x's dtype or the autocast state.

    Autograd on `x.float() @ W.T` would keep the fp32 copy of x for W's gradient (twice a bf16
    activation's memory, per adapted linear); this keeps x as it came and re-casts in backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ weight.float().t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.float()
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ weight.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                flat_x = x.reshape(-1, x.shape[-1]).float()
                grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ flat_x).to(weight.dtype)
        return grad_x, grad_w


def fp32_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` in fp32 whatever x's dtype or the autocast state: router logits."""
    return _Fp32Matmul.apply(x, weight)
