"""Batched decoding and log-likelihood scoring for evaluation.

Prompts are sorted by length so each batch pads little, left-padded so that every sequence's
next token sits in the last column, and decoded with the KV cache through `model.generate`
(greedy or beam search). Stop strings end a sequence early (the next `### Instruction` a base
model tends to invent) and are cut from the returned text. Results come back in input order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
    amp: torch.dtype | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> list[str]:
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts))["input_ids"]  # one batched call to the fast tokenizer
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for idx in _length_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with _autocast(device, amp):
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                stop_strings=list(stop_strings) or None,
                tokenizer=tokenizer if stop_strings else None,
            )
        texts = tokenizer.batch_decode(seqs[:, width:], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = cut_at_stop(text, stop_strings)
        on_batch(len(idx))
    return out


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return text if cut < 0 else text[:cut]


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int,
    amp: torch.dtype | None = None,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Context and continuation are tokenised apart and joined, so the continuation's tokens are
    exactly the ones scored, whatever the tokenizer would merge across the boundary.
    """
    device = next(model.parameters()).device
    pairs = []
    for ctx, cont in requests:
        c = tokenizer(ctx)["input_ids"]
        k = tokenizer(cont, add_special_tokens=False)["input_ids"]
        pairs.append((c, k))
    scores = [0.0] * len(requests)
    pad = tokenizer.pad_token_id
    for idx in _length_batches([len(c) + len(k) for c, k in pairs], batch_size):
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = pairs[i][0] + pairs[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with _autocast(device, amp):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(idx):
            c, k = pairs[i]
            # Only the continuation's positions are normalised: a full-vocab log-softmax over
            # every position would cost batch x length x vocab floats for nothing.
            positions = torch.arange(len(c) - 1, len(c) + len(k) - 1, device=logits.device)
            logp = torch.log_softmax(logits[row, positions].float(), dim=-1)
            target = torch.tensor(k, device=logits.device)
            scores[i] = float(logp.gather(1, target[:, None]).sum())
    return scores
