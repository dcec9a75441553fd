"""The method plugin API: what a method declares, and nothing of the loop.

A method is one file in `methods/` holding a config dataclass, its layer(s), a closed-form
trainable-parameter count, and a `Method` object registered by name. The loop, the injector and the
evaluator only talk to the `Method` interface below, so they never name a method.

A method adapts a model by answering, for each named submodule, "replace this with what?"
(`adapt_module`). Linear wrappers (LoRA-style) and block replacements (an FFN turned into experts)
use the same hook. Per-batch information a layer may need (attention mask for padding-aware
statistics, per-sample task labels) is shared through one `BatchContext` that the loop fills
before each forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moebench.registry import Registry


@dataclass
class BatchContext:
    """What layers may read about the current batch; the loop sets it before each forward."""

    attention_mask: torch.Tensor | None = None  # [batch, seq], 1 = real token
    task_labels: torch.Tensor | None = None  # [batch], per-sample task type (LoRAMoE's LBC)


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own trainable set (e.g. LoRACoE's LoRA warm-up)."""

    name: str
    fraction: float  # share of the total optimizer steps; phases' fractions sum to 1
    trainable: Callable[[str], bool] | None = None  # adapter parameter name -> trains now?
    lr: float | None = None  # overrides the loop's peak lr for this phase when set


@dataclass(frozen=True)
class LinearShape:
    d_in: int
    d_out: int


@dataclass(frozen=True)
class ModelShapes:
    """Per-layer linear shapes of a decoder, the input of every closed-form parameter count."""

    num_layers: int
    hidden: int
    linears: dict[str, LinearShape] = field(default_factory=dict)  # module suffix -> shape

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        """Llama/Qwen2-family shapes; k/v use n_kv_heads * head_dim (GQA)."""
        d = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        ff = config.intermediate_size
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=d,
            linears={
                "q_proj": LinearShape(d, heads * head_dim),
                "k_proj": LinearShape(d, kv * head_dim),
                "v_proj": LinearShape(d, kv * head_dim),
                "o_proj": LinearShape(heads * head_dim, d),
                "gate_proj": LinearShape(d, ff),
                "up_proj": LinearShape(d, ff),
                "down_proj": LinearShape(ff, d),
            },
        )


class AdapterLayer(nn.Module):
    """Base of every module a method inserts.

    Subclasses keep the original module as `self.base` (frozen); every other parameter is an
    adapter parameter. `aux_losses` and `stats` are collected by the loop after each forward.
    """

    base: nn.Module
    mergeable: ClassVar[bool] = False

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, already weighted, keyed by name."""
        return {}

    def stats(self) -> dict[str, float]:
        """Router statistics of the last forward (expert shares, entropy), for the log."""
        return {}


class Method:
    """A registered method. Subclass, set the class attributes, implement `adapt_module`."""

    name: ClassVar[str]
    help: ClassVar[str]
    config_cls: ClassVar[type]

    def adapt_module(
        self, qualified_name: str, module: nn.Module, config: Any, context: BatchContext
    ) -> nn.Module | None:
        """Return the module that replaces `module`, or None to leave it alone."""
        raise NotImplementedError

    def trainable_parameters(self, config: Any, shapes: ModelShapes) -> int:
        """Closed-form count of the parameters this method trains on a model of these shapes."""
        raise NotImplementedError

    def target_names(self, config: Any) -> tuple[str, ...]:
        """Module-name suffixes the config asks for; each must match a module or it is a typo."""
        return ()

    def phases(self, config: Any) -> tuple[Phase, ...]:
        return (Phase("train", 1.0),)

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        """Parameters excluded from weight decay (routers, typically)."""
        return False

    def config_fields(self) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(self.config_cls) if f.init]


METHODS: Registry[Method] = Registry(
    "method", (), group="moebench.methods", builtin_package="moebench.methods"
)


def get_method(name: str) -> Method:
    return METHODS.get(name)
