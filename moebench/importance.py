"""One gradient pass over a model, general over which parameters and what is accumulated.

The seed paper's importance analysis (its section 2.2, eq. 3) needs `|dL/dtheta * theta|` per
element of every adapter tensor, with L the loss over a task's whole evaluation set; LoRA-SMoE's
sensitivity stage (moebench.sensitivity) needs `sum over examples of ||dL/dW||^2` per decoder
weight. Both are "run batches forward and backward, and fold each parameter's gradient into a
running total": a `Reduction` says how to fold, `gradient_pass` does the rest. Sensitivity's
`clean` protocol is this pass; its `authors` protocol keeps its own loop, because it clips each
step's gradient and moves the weights with an optimizer step between examples.

How L is scaled decides what is measured. `loss_scale="dataset"` divides each batch's summed
token loss by the supervised tokens of ALL batches, so the accumulated gradient is exactly the
gradient of the dataset's token-mean loss, whatever the batching (eq. 3's L(D, theta));
`"batch"` keeps each batch's own mean, which is what a sum of per-batch squared norms wants.
Each gradient is folded in and dropped by a post-accumulate hook, so at most a few
parameter-sized gradients exist at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from moebench.data import IGNORE_INDEX

LossScale = Literal["batch", "dataset"]


@dataclass(frozen=True)
class Reduction:
    """How one parameter's gradient becomes its score.

    `per_batch(grad, param)` is summed over batches (it may keep the parameter's shape or reduce
    it to a scalar); `finish` maps the sum to the score.
    """

    name: str
    per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    loss_scale: LossScale


def _taylor_term(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return grad.float() * param.detach().float()


def _squared_norm(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(grad, dtype=torch.float32).square()


# eq. 3 of the seed paper: |dL/dtheta * theta| per element, L over the whole set (abs at the end:
# the Taylor term of the set's loss, not a sum of per-batch magnitudes).
TAYLOR = Reduction("taylor", _taylor_term, torch.abs, "dataset")
# LoRA-SMoE's S(W) = sum over batches of ||dL/dW||_F^2 (batch size 1: per example).
GRAD_SQUARED_NORM = Reduction("grad-squared-norm", _squared_norm, lambda t: t, "batch")


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that count in a causal LM's loss: labels are shifted by one, so column 0 never."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def gradient_pass(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    params: Mapping[str, nn.Parameter],
    reduction: Reduction,
    *,
    device: torch.device | str,
    autocast: torch.dtype | None = None,
    on_batch: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """(score per named parameter, the loss over the batches) from one forward and backward
    per batch of `input_ids`, `attention_mask`, `labels` (moebench.data.collate's output).

    Only `params` receive gradients. The model runs in eval mode (no dropout); its training
    flag, every `requires_grad` flag and any existing `.grad` are restored afterwards.
    `on_batch` runs before each forward (an adapted model's BatchContext wants the mask).
    The returned loss is the token mean over all batches (dataset scale) or the mean of the
    batches' means (batch scale), whichever the reduction differentiates.
    """
    device = torch.device(device)
    counts = [supervised_tokens(b["labels"]) for b in batches]
    if not batches or sum(counts) == 0:
        raise ValueError("the batches hold no supervised token, so there is no loss to take")
    everything = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in everything.items()}
    old_grads = {n: p.grad for n, p in everything.items()}
    chosen = set(map(id, params.values()))
    acc: dict[str, torch.Tensor] = {}
    was_training = model.training
    handles = []

    def hook_for(name: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            assert p.grad is not None
            term = reduction.per_batch(p.grad, p)
            acc[name] = acc[name] + term if name in acc else term
            p.grad = None  # drop it now: only a few parameter-sized gradients live at once

        return hook

    total_loss = 0.0
    try:
        for p in everything.values():
            p.grad = None
            p.requires_grad_(id(p) in chosen)
        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
        model.eval()
        amp = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.enable_grad():
            for batch, n in zip(batches, counts, strict=True):
                if n == 0:
                    continue
                if on_batch is not None:
                    on_batch(batch)
                with amp:
                    out = model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device),
                        use_cache=False,
                    )
                # HF's loss is the batch's token mean; rescaled, the batches sum to the set's mean.
                weight = n / sum(counts) if reduction.loss_scale == "dataset" else 1.0
                loss = out.loss.float() * weight
                loss.backward()
                total_loss += float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for n, p in everything.items():
            p.requires_grad_(flags[n])
            p.grad = old_grads[n]
        model.train(was_training)
    if reduction.loss_scale == "batch":
        total_loss /= sum(1 for n in counts if n)
    for n, p in params.items():  # a parameter no gradient reached (an expert no token chose)
        if n not in acc:
            acc[n] = reduction.per_batch(torch.zeros_like(p), p)
    return {n: reduction.finish(acc[n]) for n in params}, total_loss
