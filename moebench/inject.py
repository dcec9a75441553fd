"""The one place where a model's modules are swapped for a method's layers.

`inject` freezes the base model, asks the method about every submodule (outermost first, so a
method that replaces a whole FFN block is not also asked about the Linears inside it), swaps in
what it returns, and hands back an `Adapted` model that knows its adapter parameters by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moebench.errors import ConfigError
from moebench.method import AdapterLayer, BatchContext, Method, PrepareContext, Prepared


@dataclass
class Adapted:
    model: nn.Module
    method: Method
    config: Any
    layers: dict[str, AdapterLayer]
    context: BatchContext = field(default_factory=BatchContext)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter a method added (whether or not its phase trains it now)."""
        ids = _adapter_param_ids(self.layers)
        for name, p in self.model.named_parameters():
            if id(p) in ids:
                yield name, p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self.adapter_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.adapter_parameters())
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        if missing or extra:
            raise ConfigError(
                f"Adapter weights do not fit this model and method (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); resume with the run's own model and config."
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def collect_aux_losses(self) -> dict[str, torch.Tensor]:
        """The method's auxiliary losses for the last forward (by default summed over layers)."""
        return self.method.aux_losses(self.config, self.layers)

    def collect_stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, layer in self.layers.items():
            for k, v in layer.stats().items():
                out[f"{name}.{k}"] = v
        return out

    @property
    def mergeable(self) -> bool:
        return all(layer.mergeable for layer in self.layers.values())

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()


def _adapter_param_ids(layers: dict[str, AdapterLayer]) -> set[int]:
    # A layer keeps the module it replaced as `.base`; every other parameter in it is adapter.
    base = {id(p) for layer in layers.values() for p in layer.base.parameters()}
    return {id(p) for layer in layers.values() for p in layer.parameters()} - base


def inject(model: nn.Module, method: Method, config: Any) -> Adapted:
    """Freeze `model`, swap in the method's layers, and return the adapted model."""
    for p in model.parameters():
        p.requires_grad_(False)
    context = BatchContext()
    layers: dict[str, AdapterLayer] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            qualified = f"{prefix}.{child_name}" if prefix else child_name
            replacement = method.adapt_module(qualified, child, config, context)
            if replacement is None:
                visit(child, qualified)
                continue
            if not isinstance(replacement, AdapterLayer):
                raise TypeError(f"{method.name} returned {type(replacement)} for {qualified}")
            setattr(parent, child_name, replacement)
            layers[qualified] = replacement

    visit(model, "")
    found = {name.rsplit(".", 1)[-1] for name in layers}
    missing = [t for t in method.target_names(config) if t not in found]
    if missing and layers:
        linears = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"target_modules {', '.join(missing)} matched no module of "
            f"{type(model).__name__}; its linears are: {', '.join(linears)}."
        )
    if not layers:
        raise ConfigError(
            f"Method '{method.name}' found no module to adapt in {type(model).__name__}; "
            "check its target_modules against the model's module names."
        )
    for layer in layers.values():
        for p in layer.parameters():
            p.requires_grad_(True)
        for p in layer.base.parameters():
            p.requires_grad_(False)
    return Adapted(model=model, method=method, config=config, layers=layers, context=context)


def prepare_and_inject(
    model: nn.Module, method: Method, config: Any, ctx: PrepareContext
) -> tuple[Adapted, Prepared]:
    """Run the method's preparation stage on the unadapted model, then inject its config."""
    prepared = method.prepare(config, ctx)
    return inject(model, method, prepared.config), prepared
