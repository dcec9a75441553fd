"""Gradient sensitivity of a decoder's weights, by one of two named protocols.

LoRA-SMoE's first stage (Xu and Diao 2025) ranks modules by it, and the seed paper's
parameter-importance analysis reuses it, so it knows nothing of methods: it takes a plain model
and tokenised examples. Each example is its own batch in both protocols (batch size 1), so a score
is a sum of per-example squared norms, never the square of a mean gradient.

- `clean`: `S(W) = sum over `samples` sampled examples of ||dL/dW||_F^2`, every decoder layer
  measured on the same examples, weights held in fp32, no clipping, no weight updates.
- `authors`: the procedure methods.md section 4 reads in the authors' get_sensitivity.py. The
  model is held in fp16 without loss scaling; BAdam's BlockOptimizer (the `badam` package, AdamW
  lr 1e-5, weight decay 0.01, constant lr) trains one decoder layer per step, switching every step,
  top layer first, optimizer state reset at each switch; `samples * L` examples per task, so each
  of the L layers gets gradients from its own `samples` examples. Each step's gradient is clipped
  to total norm 1.0 over the active layer (what HF Trainer's default clipping does when one layer
  has gradients), then squared in fp16 (entries below ~2.4e-4 square to zero or lose bits) and
  summed in fp32 into that layer's scores, before the optimizer step moves the layer's weights.
  The appended EOS token is replaced by the pad token. Two departures, by necessity: the examples
  come from the run's template (methods.md does not give the text of the script's own template),
  and the shuffle is seeded (the script's is not), so a measurement can be repeated and cached.

Both protocols restore the model bit for bit afterwards (weights, dtype, `requires_grad` flags,
`.grad`, train/eval mode). Measurements are cached per (model, task, protocol, samples, seed,
sampled data, weights): the key hashes the examples' tokens and labels, so changed data never hits
a stale file.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moebench.data import IGNORE_INDEX, Example, collate
from moebench.errors import ConfigError, DataError
from moebench.importance import GRAD_SQUARED_NORM, gradient_pass

log = logging.getLogger(__name__)

# A weight inside a numbered decoder block: Llama/Qwen2 `model.layers.3.`, GPT-style `h.3.`.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.\d+\.")
CACHE_VERSION = 2  # 2: the `protocol` (authors | clean) replaced `mode` and `precision`
PROTOCOLS = ("authors", "clean")
# The authors' script's settings, as methods.md section 4 reads them.
AUTHORS_LR = 1e-5
AUTHORS_WEIGHT_DECAY = 0.01
AUTHORS_MAX_NORM = 1.0


def decoder_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every 2-D weight of every decoder layer, by parameter name (not embeddings, norms, head)."""
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and _BLOCK.search(n)}


def _supervised(example: Example) -> bool:
    # The model shifts labels by one, so the first label never counts.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def _eligible(examples: Sequence[Example]) -> list[Example]:
    eligible = [e for e in examples if _supervised(e)]
    if not eligible:
        raise DataError(
            f"None of the {len(examples)} examples has a supervised token after truncation, so "
            "no sensitivity can be measured; raise cutoff_len or check the data."
        )
    return eligible


def sample_examples(examples: Sequence[Example], samples: int, seed: int) -> list[Example]:
    """`samples` examples with at least one supervised token, chosen without replacement by a
    seeded generator and kept in their original order (all of them if there are fewer)."""
    eligible = _eligible(examples)
    if len(eligible) <= samples:
        return eligible
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(eligible), generator=g)[:samples].tolist())
    return [eligible[i] for i in chosen]


def shuffled_examples(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    """`count` supervised examples in a seeded shuffled order, as a trainer's sampler draws them:
    one permutation per epoch, further epochs when the pool is smaller than `count`."""
    eligible = _eligible(examples)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(len(eligible), generator=g).tolist()
    return [eligible[i] for i in order[:count]]


def with_pad_eos(example: Example, eos_token_id: int | None, pad_token_id: int) -> Example:
    """The example with its final EOS token (and label) replaced by the pad token, as the
    authors' script appends the pad token; unchanged when it does not end in EOS."""
    if eos_token_id is None or not example.input_ids or example.input_ids[-1] != eos_token_id:
        return example
    labels = example.labels
    if labels[-1] != IGNORE_INDEX:
        labels = (*labels[:-1], pad_token_id)
    return Example((*example.input_ids[:-1], pad_token_id), labels, example.task_label)


def examples_digest(examples: Sequence[Example]) -> str:
    """sha256 of the examples' token ids and labels (the labels decide which tokens count)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


@contextlib.contextmanager
def _held_in(
    model: nn.Module, dtype: torch.dtype, *, copy: bool
) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Hold every parameter in `dtype` for the pass (a copy when the pass moves weights); restore
    each original tensor (so the weights bit for bit), `requires_grad` flag, `.grad` and the
    train/eval mode afterwards."""
    params = list(model.named_parameters())
    saved = [(p.data, p.requires_grad, p.grad) for _, p in params]
    was_training = model.training
    try:
        for _, p in params:
            p.grad = None
            p.data = p.data.to(dtype, copy=copy)
        yield params
    finally:
        for (_, p), (data, flag, grad) in zip(params, saved, strict=True):
            p.data = data
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def _loss(model: nn.Module, example: Example, pad_token_id: int, device: torch.device) -> Any:
    batch = collate([example], pad_token_id)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        labels=batch["labels"].to(device),
        use_cache=False,
    )
    return out.loss


def measure(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    protocol: str,
    samples: int,
    seed: int,
    pad_token_id: int,
    device: torch.device | str,
    eos_token_id: int | None = None,
) -> dict[str, float]:
    """S(W) for every decoder-layer weight by `protocol` (see the module docstring).

    The model must already be on `device`; it comes back exactly as it was given.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"sensitivity protocol {protocol!r} is not one of: {', '.join(PROTOCOLS)}."
        )
    if not decoder_weights(model):
        raise ValueError(f"{type(model).__name__} has no decoder-layer weights to measure")
    device = torch.device(device)
    if protocol == "clean":
        return _measure_clean(model, sample_examples(examples, samples, seed), pad_token_id, device)
    return _measure_authors(model, examples, samples, seed, pad_token_id, eos_token_id, device)


def _measure_clean(
    model: nn.Module, chosen: Sequence[Example], pad_token_id: int, device: torch.device
) -> dict[str, float]:
    """The clean protocol is the general gradient pass (moebench.importance) with the squared
    norm folded in per example, over the fp32-held decoder weights."""
    batches = [collate([e], pad_token_id) for e in chosen]
    with _held_in(model, torch.float32, copy=False):
        scores, _ = gradient_pass(
            model, batches, decoder_weights(model), GRAD_SQUARED_NORM, device=device
        )
    return {n: float(v) for n, v in scores.items()}


def _block_optimizer(params: list[tuple[str, nn.Parameter]]) -> Any:
    try:
        from badam import BlockOptimizer
    except ImportError:
        raise ConfigError(
            "lora-smoe's protocol=authors needs the badam package (a moebench dependency): "
            "pip install 'badam>=1.4,<2', or set protocol=clean."
        ) from None
    base = torch.optim.AdamW(
        [p for _, p in params], lr=AUTHORS_LR, weight_decay=AUTHORS_WEIGHT_DECAY
    )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about fp32 weights outside the decoder layers
        return BlockOptimizer(
            base, params, switch_block_every=1, switch_mode="descending", verbose=0
        )


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """BlockOptimizer runs gc.collect() at every switch (so every step here); freezing the
    objects that exist now keeps each collection to what the pass allocates (seconds -> ms)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_gc_frozen()
def _measure_authors(
    model: nn.Module,
    examples: Sequence[Example],
    samples: int,
    seed: int,
    pad_token_id: int,
    eos_token_id: int | None,
    device: torch.device,
) -> dict[str, float]:
    names = list(decoder_weights(model))
    scores = dict.fromkeys(names, 0.0)
    with _held_in(model, torch.float16, copy=True) as params:
        weights = dict(params)
        opt = _block_optimizer(params)  # makes the top layer trainable, every other one frozen
        chosen = authors_examples(
            examples, samples * opt.block_num, seed, eos_token_id, pad_token_id
        )
        model.train()  # as a Trainer does (Llama/Qwen2 have no dropout at their defaults)
        with torch.enable_grad():
            for e in chosen:
                _loss(model, e, pad_token_id, device).backward()
                active = [p for _, p in params if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(active, AUTHORS_MAX_NORM)
                for n in names:
                    g = weights[n].grad
                    if g is not None:
                        scores[n] += float(g.pow(2).sum(dtype=torch.float32))  # fp16 squares
                with contextlib.redirect_stdout(io.StringIO()):  # it prints at every switch
                    opt.step()
                opt.zero_grad(set_to_none=True)
    return scores


def authors_examples(
    examples: Sequence[Example], count: int, seed: int, eos_token_id: int | None, pad: int
) -> list[Example]:
    """The authors protocol's examples in step order: step k trains layer L-1-(k mod L)."""
    return [with_pad_eos(e, eos_token_id, pad) for e in shuffled_examples(examples, count, seed)]


def _num_blocks(model: nn.Module) -> int:
    return len({m.group(0) for n in decoder_weights(model) if (m := _BLOCK.search(n))})


def cache_key(key_parts: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """What a cached measurement is valid for: the caller's parts plus how it was measured."""
    model, protocol = kwargs["model"], kwargs["protocol"]
    samples, seed = kwargs["samples"], kwargs["seed"]
    if protocol == "authors":
        count = samples * _num_blocks(model)
        chosen = authors_examples(
            kwargs["examples"], count, seed, kwargs.get("eos_token_id"), kwargs["pad_token_id"]
        )
    else:
        chosen = sample_examples(kwargs["examples"], samples, seed)
    return {
        **key_parts,
        "version": CACHE_VERSION,
        "protocol": protocol,
        "samples": samples,
        "seed": seed,
        "examples_sha256": examples_digest(chosen),
        "weights_sha256": weights_digest(model),
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
    key = cache_key(key_parts, **kwargs)
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
