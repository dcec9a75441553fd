"""Gradient sensitivity of a decoder's weights: S(W) = sum over sampled examples of ||dL/dW||_F^2.

LoRA-SMoE's first stage (Xu and Diao 2025) ranks modules by this score, and the seed paper's
parameter-importance analysis reuses it, so it knows nothing of methods: it takes a plain model
and tokenised examples. Each example is its own batch, so S is a sum of per-example squared norms
(a batch would square the mean gradient instead, a different and smaller quantity).

Scores accumulate in fp32 from a gradient hook that drops each gradient as soon as it is read, so
the pass never holds more than a few weight-sized gradients at once. With `update_lr` set, the
authors' script is reproduced: Adam steps on the measured weights between examples, so later
examples see slightly moved weights; the original weights are copied back bit for bit afterwards.
That mode holds Adam's state (twice the measured weights) and a CPU copy of them while it runs.

Measurements are cached per (model, task, samples, seed, mode, precision, sampled data): the key
carries a hash of the sampled examples' tokens and labels, so changed data never hits a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moebench.data import IGNORE_INDEX, Example, collate
from moebench.errors import DataError

log = logging.getLogger(__name__)

# A weight inside a numbered decoder block: Llama/Qwen2 `model.layers.3.`, GPT-style `h.3.`.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.\d+\.")
CACHE_VERSION = 1


def decoder_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every 2-D weight of every decoder layer, by parameter name (not embeddings, norms, head)."""
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and _BLOCK.search(n)}


def _supervised(example: Example) -> bool:
    # The model shifts labels by one, so the first label never counts.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def sample_examples(examples: Sequence[Example], samples: int, seed: int) -> list[Example]:
    """`samples` examples with at least one supervised token, chosen without replacement by a
    seeded generator and kept in their original order (all of them if there are fewer)."""
    eligible = [e for e in examples if _supervised(e)]
    if not eligible:
        raise DataError(
            f"None of the {len(examples)} examples has a supervised token after truncation, so "
            "no sensitivity can be measured; raise cutoff_len or check the data."
        )
    if len(eligible) <= samples:
        return eligible
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(eligible), generator=g)[:samples].tolist())
    return [eligible[i] for i in chosen]


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' token ids and labels (the labels decide which tokens count)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def mode_name(update_lr: float | None) -> str:
    return "measure" if update_lr is None else f"adam-lr={update_lr!r}"


def measure(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    samples: int,
    seed: int,
    pad_token_id: int,
    device: torch.device | str,
    autocast: torch.dtype | None,
    update_lr: float | None = None,
) -> dict[str, float]:
    """S(W) for every decoder-layer weight, summed over `samples` sampled examples.

    The model must already be on `device`. It runs in eval mode (no dropout); its training flag,
    every `requires_grad` flag, any existing `.grad` and (with `update_lr`) every weight are
    restored afterwards.
    """
    device = torch.device(device)
    chosen = sample_examples(examples, samples, seed)
    weights = decoder_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no decoder-layer weights to measure")
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    old_grads = {n: p.grad for n, p in params.items()}
    originals = (
        {n: p.detach().to("cpu", copy=True) for n, p in weights.items()}
        if update_lr is not None
        else {}
    )
    names = list(weights)
    acc = torch.zeros(len(names), dtype=torch.float32, device=device)
    keep_grads = update_lr is not None
    was_training = model.training
    handles = []

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        def hook(p: torch.Tensor) -> None:
            assert p.grad is not None
            acc[i] += torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
            if not keep_grads:
                p.grad = None  # free it now: peak memory stays near one weight's gradient

        return hook

    try:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(n in weights)
        handles = [
            weights[n].register_post_accumulate_grad_hook(hook_for(i)) for i, n in enumerate(names)
        ]
        opt = (
            torch.optim.Adam(list(weights.values()), lr=update_lr)
            if update_lr is not None
            else None
        )
        model.eval()
        amp = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.enable_grad():
            for e in chosen:
                batch = collate([e], pad_token_id)
                with amp:
                    out = model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device),
                        use_cache=False,
                    )
                out.loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        scores = acc.tolist()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, saved in originals.items():
                weights[n].copy_(saved)
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = old_grads[n]
        model.train(was_training)
    return dict(zip(names, scores, strict=True))


def cache_key(
    key_parts: dict[str, Any], chosen: Sequence[Example], **kwargs: Any
) -> dict[str, Any]:
    """What a cached measurement is valid for: the caller's parts plus how it was measured."""
    autocast = kwargs.get("autocast")
    return {
        **key_parts,
        "version": CACHE_VERSION,
        "samples": kwargs["samples"],
        "seed": kwargs["seed"],
        "mode": mode_name(kwargs.get("update_lr")),
        "precision": str(autocast).removeprefix("torch.") if autocast else "fp32",
        "examples_sha256": examples_digest(chosen),
        "weights_sha256": weights_digest(kwargs["model"]),
    }


def weights_digest(model: nn.Module) -> str:
    """A cheap fingerprint of the measured weights (shape and a strided sample of each), so a
    retrained local folder or a new hub revision under the same name never hits a stale cache."""
    h = hashlib.sha256()
    for name, w in decoder_weights(model).items():
        flat = w.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 257)][:257].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def measure_cached(
    cache_dir: Path, key_parts: dict[str, Any], **kwargs: Any
) -> tuple[dict[str, float], bool]:
    """`measure(**kwargs)` through a JSON cache; returns (scores, whether it was a cache hit).

    `key_parts` names what the caller knows and `measure` cannot see (model name, task). A file
    whose weight names differ from the model's (another model under the same name) is ignored.
    """
    chosen = sample_examples(kwargs["examples"], kwargs["samples"], kwargs["seed"])
    key = cache_key(key_parts, chosen, **kwargs)
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    key = json.loads(blob)  # as it reads back from the file
    path = Path(cache_dir) / "sensitivity" / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"
    names = set(decoder_weights(kwargs["model"]))
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            scores = {str(k): float(v) for k, v in stored["scores"].items()}
            if stored["key"] == key and set(scores) == names:
                return scores, True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring unreadable sensitivity cache %s", path)
    scores = measure(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "scores": scores}, indent=1))
    tmp.replace(path)
    return scores, False
