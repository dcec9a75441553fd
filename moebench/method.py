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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from moebench.registry import METHOD_GROUP, METHOD_PACKAGE, Registry
from moebench.task import FAMILY_KNOWLEDGE, TASKS


@dataclass
class BatchContext:
    """What layers may read about the current forward; the loop sets it before each one.

    One object is shared by all layers of a model, so the loop writes it once per micro-batch.
    After training, `attention_mask` and `task_labels` are cleared (evaluation batches differ),
    while `phase` keeps the last phase: a trained model evaluates in the form it ended in.
    """

    attention_mask: torch.Tensor | None = None  # [batch, seq], 1 = real token
    task_labels: torch.Tensor | None = None  # [batch], per-sample task type (LoRAMoE's LBC)
    phase: str | None = None  # name of the current Phase; None outside the loop (= final form)
    record_stats: bool = False  # accumulate router statistics on this forward (logged steps)


@dataclass
class PrepareContext:
    """What a method's preparation stage may use (LoRA-SMoE's sensitivity pass).

    It runs after the base model loads and before `inject`, on the unadapted model.
    """

    model: nn.Module
    examples: Sequence[Any]  # moebench.data.Example, tokenised training rows
    tasks: Sequence[str | None]  # source task of each example (None: the mixture does not say)
    model_name: str
    seed: int
    cache_dir: Path  # where expensive, reusable results (sensitivities) may be cached
    device: torch.device
    autocast: torch.dtype | None
    pad_token_id: int = 0


@dataclass
class Prepared:
    """The outcome of a preparation stage: the config to inject with, and what to record.

    `config` may differ from the one given (e.g. with an allocation filled in); the runner stores
    it, so a resumed run rebuilds the same modules without preparing again. `notes` are sentences
    for the run's record; `artifacts` are JSON-able results stored with the run by name.
    """

    config: Any
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True)
class RankLayout:
    """Where rank components sit in one adapter tensor (the importance analysis reads this).

    Tensors of a layer that share `component` share its ranks: rank j's importance is the sum
    over every such tensor's slice at index j of `rank_dim` (LoRA: row j of A plus column j of
    B). `expert_dim` indexes independent sets of ranks in one tensor (MixLoRA's [E, r, d]
    factors); `ranks_per_expert` says that consecutive ranks along `rank_dim` belong to one
    expert (LoRAMoE's stacked [N r, d_in] A), for labels only.
    """

    rank_dim: int
    component: str = ""  # "" for a layer with one set of ranks; MixLoRA: "gate", "up", "down"
    expert_dim: int | None = None
    ranks_per_expert: int | None = None


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

    def rank_layout(self) -> dict[str, RankLayout]:
        """Optional: own parameter name -> how its elements map to rank components.

        Parameters left out (routers) are still scored, per tensor. The default, {}, gives a
        plugin per-tensor importance only.
        """
        return {}

    def stats(self) -> dict[str, float]:
        """Router statistics accumulated since the last call (then reset), for the log.

        Layers accumulate only on forwards where `BatchContext.record_stats` is set, so steps
        that are not logged pay nothing. Keys are short (`share.3`, `entropy`); the injector
        prefixes the layer's qualified name.
        """
        return {}

    def stat_sums(self) -> dict[str, torch.Tensor | None]:
        """The running sums `stats()` forms its means from, keyed by name, so that the ranks of
        one job (moebench.distributed) add theirs up first: a mean of per-rank means would
        weight ranks, not tokens. Default: the sums of every `RouterStats` the layer holds; a
        layer that accumulates anything else adds it (and takes it back in `set_stat_sums`)."""
        out: dict[str, torch.Tensor | None] = {}
        for attr, obj in vars(self).items():
            if callable(getattr(obj, "sums", None)) and callable(getattr(obj, "set_sums", None)):
                out.update({f"{attr}.{k}": v for k, v in obj.sums().items()})
        return out

    def set_stat_sums(self, sums: dict[str, torch.Tensor | None]) -> None:
        """Replace the running sums with `sums` (named as `stat_sums` names them)."""
        for attr, obj in vars(self).items():
            if callable(getattr(obj, "set_sums", None)):
                prefix = f"{attr}."
                obj.set_sums({k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)})


class Method:
    """A registered method. Subclass, set the class attributes, implement `adapt_module`."""

    name: ClassVar[str]
    help: ClassVar[str]
    config_cls: ClassVar[type]
    # Integer config fields the budget solver may vary to meet a parameter target, the first
    # preferred (moebench.budget). A method whose size is decided in `prepare` (LoRA-SMoE) names
    # instead the config field that takes the target parameter count.
    budget_knobs: ClassVar[tuple[str, ...]] = ("rank",)
    budget_target_field: ClassVar[str | None] = None

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

    def active_parameters(self, config: Any, shapes: ModelShapes) -> int:
        """Trainable parameters one token passes through (less than all under top-k routing)."""
        return self.trainable_parameters(config, shapes)

    def phases(self, config: Any) -> tuple[Phase, ...]:
        return (Phase("train", 1.0),)

    def identity(self, config: dict[str, Any]) -> dict[str, Any]:
        """The method config as the run's hash sees it (default: all of it). A switch added
        later may leave itself out while at its default, so runs that do not use it keep the
        hash they had before it existed."""
        return config

    def upgrade(self, values: dict[str, Any]) -> dict[str, Any]:
        """A method config as an earlier release stored it, in today's fields (default: as is).
        Stored runs must keep resolving after a field is removed or renamed."""
        return values

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        """Parameters excluded from weight decay (routers, typically)."""
        return False

    def aux_losses(self, config: Any, layers: dict[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, weighted, keyed by name; summed into the loss.

        Default: each layer's own `aux_losses()`, summed per name. A method whose loss is not a
        sum over layers (MixLoRA's balance loss over all layers' routing at once) overrides this.
        """
        total: dict[str, torch.Tensor] = {}
        for layer in layers.values():
            for k, v in layer.aux_losses().items():
                total[k] = total[k] + v if k in total else v
        return total

    def prepare(self, config: Any, ctx: PrepareContext) -> Prepared:
        """An optional stage before injection (default: nothing to do)."""
        return Prepared(config)

    def task_label(self, config: Any, task: str | None) -> int:
        """Per-sample task type a method's layers read from `BatchContext.task_labels`.

        Default: the task's declared knowledge flag (commonsense 1, math 0), -1 when unknown.
        A family name labels rows of a whole-family file (commonsense_170k carries no set name).
        """
        if task is None:
            return -1
        if task in TASKS:
            return TASKS.get(task).knowledge
        return FAMILY_KNOWLEDGE.get(task, -1)

    def config_fields(self) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(self.config_cls) if f.init]


class LinearMethod(Method):
    """A method that puts one layer on each targeted `nn.Linear` (`config.target_modules`).

    Matching by module suffix, the typo check and the per-layer sum of the closed-form count
    live here once; a subclass states only its layer (`make_layer`) and what one adapted linear
    of a given shape trains (`linear_parameters`).
    """

    def make_layer(self, module: nn.Linear, config: Any, context: BatchContext) -> AdapterLayer:
        raise NotImplementedError

    def linear_parameters(self, config: Any, shape: LinearShape) -> int:
        """Trainable parameters of one adapted linear of this shape."""
        raise NotImplementedError

    def adapt_module(
        self, qualified_name: str, module: nn.Module, config: Any, context: BatchContext
    ) -> nn.Module | None:
        name = qualified_name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and name in config.target_modules:
            return self.make_layer(module, config, context)
        return None

    def target_names(self, config: Any) -> tuple[str, ...]:
        return tuple(config.target_modules)

    def trainable_parameters(self, config: Any, shapes: ModelShapes) -> int:
        per_layer = sum(
            self.linear_parameters(config, s)
            for name, s in shapes.linears.items()
            if name in config.target_modules
        )
        return shapes.num_layers * per_layer


METHODS: Registry[Method] = Registry(
    "method", (), group=METHOD_GROUP, builtin_package=METHOD_PACKAGE
)


def get_method(name: str) -> Method:
    return METHODS.get(name)
