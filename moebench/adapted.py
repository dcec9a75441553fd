"""The one way a run's adapted model is made: for training, and for rebuilding a stored run
(the lm-eval bridge, the importance analysis), so a rebuilt model is the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moebench.inject import Adapted, inject
from moebench.method import Method, get_method
from moebench.models import load_model
from moebench.runspec import RunSpec
from moebench.train import autocast_dtype, resolve_device


@dataclass
class Built:
    """A run's adapted model and what it runs on."""

    adapted: Adapted
    tokenizer: Any
    method: Method
    method_config: Any
    device: torch.device
    amp: torch.dtype | None


def build_adapted(
    spec: RunSpec,
    method_config: Any = None,
    *,
    prepare: Any = None,
    adapter: Path | None = None,
) -> Built:
    """The one way a run's adapted model is made, for training and for rebuilding a stored run.

    The base model at the run's precision, `method_config` (or what `prepare(model, tokenizer,
    device, amp)` returns from the unadapted model; else the spec's), the seed set right before
    injection so whatever a method draws at init comes out the same, and, with `adapter` (a
    saved adapter folder), its fp32 weights loaded and the method's last phase set: the model
    as training left it, frozen and in eval mode.
    """
    device = resolve_device(spec.train)
    amp = autocast_dtype(spec.train, device)
    # Under bf16 autocast the frozen base is held in bf16; adapters stay fp32 (train() sees to it).
    model, tokenizer = load_model(spec.model, dtype=amp or torch.float32)
    method = get_method(spec.method)
    if method_config is None:
        method_config = prepare(model, tokenizer, device, amp) if prepare else spec.method_config
    torch.manual_seed(spec.seed)  # adapter init; data order has its own seeded generator
    adapted = inject(model, method, method_config)
    if adapter is not None:
        for _, p in adapted.adapter_parameters():
            p.data = p.data.float()
        adapted.load_adapter_state_dict(load_file(str(adapter / "adapter.safetensors")))
        adapted.context.phase = method.phases(method_config)[-1].name
        for p in model.parameters():
            p.requires_grad_(False)
        model.to(device)
        model.eval()
    return Built(adapted, tokenizer, method, method_config, device, amp)
