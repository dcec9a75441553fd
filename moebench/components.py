"""Pieces shared by method plugins: LoRA factor init and the low-rank path.

Kept in one place so every method initialises and applies its factors identically; the
"zero B means base model" property of every method rests on `init_lora_factors`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def init_lora_factors(rank: int, d_in: int, d_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """A [r, d_in]: kaiming-uniform, a=sqrt(5), as peft and loralib do; B [d_out, r]: zeros."""
    a = torch.empty(rank, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, rank))


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def suffix(qualified_name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`: targets are named by module suffix."""
    return qualified_name.rsplit(".", 1)[-1]


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
