"""Batched decoding and log-likelihood scoring for evaluation.

Prompts are sorted by length so each batch pads little, and left-padded so that every sequence's
next token sits in the last column. Stop strings end a sequence early (the next `### Instruction`
a base model tends to invent) and are cut from the returned text. Results come back in input order.

Two engines decode a batch. "moebench" (`moebench.decoding`) prefills each prompt once, also
under beam search, and drops finished prompts from the batch; its outputs equal those of
`model.generate`. "hf" calls `model.generate`: kept for comparison, and used by "auto" for a model
whose generation config asks for logits processing (repetition penalty, banned tokens, ...) that
the loop does not do.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from transformers import (
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

from moebench.decoding import decode, unsupported_settings
from moebench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Engine = Literal["auto", "moebench", "hf"]
ENGINES: tuple[str, ...] = ("auto", "moebench", "hf")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every row right-aligned, so all next tokens share a column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _resolve_engine(model: PreTrainedModel, engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"engine='{engine}' is not one of {', '.join(ENGINES)}.")
    if engine == "hf":
        return engine
    blockers = unsupported_settings(model)
    if not blockers:
        return "moebench"
    if engine == "moebench":
        raise ConfigError(
            f"engine='moebench' cannot decode this model ({', '.join(blockers)} in its generation "
            "config); use engine='hf' or 'auto'."
        )
    log.info("decoding with model.generate: %s", ", ".join(blockers))
    return "hf"


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
    engine: Engine = "auto",
) -> list[str]:
    """Decode every prompt (greedy if num_beams is 1), returning the new text, stop strings cut.

    engine: "moebench" (the loop below), "hf" (`model.generate`), or "auto" (the loop unless the
    model's generation config asks for logits processing it does not do).
    """
    chosen = _resolve_engine(model, engine)
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts))["input_ids"]  # one batched call to the fast tokenizer
    # `generate`'s own criteria classes, so that a sequence ends exactly where it would there;
    # built once for all batches (the stop-string one pre-processes the whole vocabulary).
    criteria = StoppingCriteriaList()
    if chosen == "moebench" and tokenizer.eos_token_id is not None:
        criteria.append(EosTokenCriteria(tokenizer.eos_token_id))
    if chosen == "moebench" and stop_strings:
        criteria.append(StopStringCriteria(tokenizer, list(stop_strings)))
    out: list[str] = [""] * len(prompts)
    for idx in _length_batches([len(e) for e in encoded], batch_size):
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        with _autocast(device, amp):
            if chosen == "hf":
                tokens = _hf_generate(
                    model, tokenizer, ids, mask, max_new_tokens, num_beams, stop_strings
                )
            else:
                tokens = decode(
                    model,
                    ids,
                    mask,
                    num_beams=num_beams,
                    max_new_tokens=max_new_tokens,
                    stop=criteria,
                ).tokens
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = cut_at_stop(text, stop_strings)
        on_batch(len(idx))
    return out


def _hf_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    stop_strings: Sequence[str],
) -> list[list[int]]:
    seqs = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=list(stop_strings) or None,
        tokenizer=tokenizer if stop_strings else None,
    )
    # Rows that stopped early are filled with padding, which decoding drops as a special token.
    return seqs[:, ids.shape[1] :].tolist()


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
    shared_prefix: bool = True,
) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Context and continuation are tokenised apart and joined, so the continuation's tokens are
    exactly the ones scored, whatever the tokenizer would merge across the boundary.

    shared_prefix=True computes each distinct context once: the contexts are prefilled (at most
    `batch_size` continuations' worth of contexts per batch, a context with more continuations
    than that in a batch of its own), and every continuation is scored on a copy of its context's
    cached keys and values. Commonsense items offer 2 to 5 labels after one long prompt, so this
    saves most of the work. shared_prefix=False runs one full forward of context + continuation
    per request (`batch_size` requests per batch): the plain reference the first is tested against.
    """
    if not requests:
        return []
    contexts = list(dict.fromkeys(ctx for ctx, _ in requests))  # distinct, first-seen order
    ctx_ids = tokenizer(contexts)["input_ids"]
    for ctx, ids in zip(contexts, ctx_ids, strict=True):
        if not ids:
            raise DataError(
                f"The context {ctx!r} has no tokens; a continuation is scored after at least one "
                "context token, so give every request a non-empty context."
            )
    index = {ctx: i for i, ctx in enumerate(contexts)}
    ctx_of = [index[ctx] for ctx, _ in requests]
    cont_ids = tokenizer([cont for _, cont in requests], add_special_tokens=False)["input_ids"]
    score = _shared_prefix_scores if shared_prefix else _full_forward_scores
    return score(model, tokenizer.pad_token_id, ctx_ids, ctx_of, cont_ids, batch_size, amp)


def _full_forward_scores(
    model: PreTrainedModel,
    pad: int,
    ctx_ids: list[list[int]],
    ctx_of: list[int],
    cont_ids: list[list[int]],
    batch_size: int,
    amp: torch.dtype | None,
) -> list[float]:
    """One right-padded forward of context + continuation per request."""
    device = next(model.parameters()).device
    pairs = [(ctx_ids[c], k) for c, k in zip(ctx_of, cont_ids, strict=True)]
    scores = [0.0] * len(pairs)
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


def _context_batches(
    lengths: Sequence[int], rows: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Contexts longest first, packed so that a batch's continuations fill at most batch_size
    rows: the expanded cache then holds no more rows than the full-forward path's batch."""
    batches: list[list[int]] = []
    filled = 0
    for c in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not batches or filled + rows[c] > batch_size:
            batches.append([])
            filled = 0
        batches[-1].append(c)
        filled += rows[c]
    return batches


def _shared_prefix_scores(
    model: PreTrainedModel,
    pad: int,
    ctx_ids: list[list[int]],
    ctx_of: list[int],
    cont_ids: list[list[int]],
    batch_size: int,
    amp: torch.dtype | None,
) -> list[float]:
    """Prefill each context once (left-padded), then score its continuations on its cache rows.

    The first continuation token's log-probability comes from the prefill's last column; only
    continuations of two or more tokens need a second forward, fed all their tokens but the last.
    """
    device = next(model.parameters()).device
    keep_last = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    requests_of: list[list[int]] = [[] for _ in ctx_ids]
    for i, c in enumerate(ctx_of):
        requests_of[c].append(i)
    scores = [0.0] * len(ctx_of)
    for group in _context_batches(
        [len(c) for c in ctx_ids], [len(r) for r in requests_of], batch_size
    ):
        ids, mask = left_pad([ctx_ids[c] for c in group], pad)
        ids, mask = ids.to(device), mask.to(device)
        # Left padding puts every context's last token in the last column; positions count real
        # tokens only, as in an unpadded forward (RoPE would otherwise see the padding).
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with _autocast(device, amp):
            out = model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=None if bool(mask.all()) else mask,
                past_key_values=cache,
                use_cache=True,
                **keep_last,
            )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (contexts, vocab)
        members = [(row, i) for row, c in enumerate(group) for i in requests_of[c]]
        for row, i in members:
            if cont_ids[i]:
                scores[i] = float(first[row, cont_ids[i][0]])
        longer = [(row, i) for row, i in members if len(cont_ids[i]) > 1]
        if longer:
            src = torch.tensor([row for row, _ in longer], device=device)
            cache.reorder_cache(src)  # each request gets its own copy of its context's rows
            rest = _continue(model, cache, mask[src], [cont_ids[i] for _, i in longer], pad, amp)
            for (_, i), value in zip(longer, rest, strict=True):
                scores[i] += value
    return scores


def _continue(
    model: PreTrainedModel,
    cache: DynamicCache,
    ctx_mask: torch.Tensor,
    continuations: list[list[int]],
    pad: int,
    amp: torch.dtype | None,
) -> list[float]:
    """Summed log-probabilities of each continuation's tokens after its first, on cache rows
    that already hold its context (left-padded as in `ctx_mask`)."""
    device = ctx_mask.device
    feed = [k[:-1] for k in continuations]  # the last token is only predicted, never fed
    width = max(len(f) for f in feed)
    ids = torch.full((len(feed), width), pad, dtype=torch.long)
    for row, f in enumerate(feed):
        ids[row, : len(f)] = torch.tensor(f)
    # Right-padded after the context: a real token never attends to the padding that follows it,
    # so those columns need no masking; each row continues from its count of real tokens.
    positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
    mask = torch.cat([ctx_mask, ctx_mask.new_ones((len(feed), width))], dim=1)
    with _autocast(device, amp):
        logits = model(
            input_ids=ids.to(device),
            position_ids=positions,
            attention_mask=None if bool(mask.all()) else mask,
            past_key_values=cache,
            use_cache=True,
        ).logits
    out = []
    for row, k in enumerate(continuations):
        logp = torch.log_softmax(logits[row, : len(k) - 1].float(), dim=-1)
        target = torch.tensor(k[1:], device=logits.device)
        out.append(float(logp.gather(1, target[:, None]).sum()))
    return out
