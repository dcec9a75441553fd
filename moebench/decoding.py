"""The decoding loop: greedy and beam search with one prefill per prompt.

`model.generate(num_beams=k)` repeats every prompt k times before the prefill, so the prompt's
keys and values are computed k times. Here each prompt is prefilled once and its cache rows are
copied per beam. And a prompt whose output can no longer change (beam search: no running beam can
beat its finished hypotheses; greedy: it hit EOS or a stop string) leaves the batch, where
`generate` keeps computing it until the whole batch is done.

The beam search follows `generate`'s rules for deterministic decoding (transformers 5.x): per step
the top 2k continuations over all beams; continuations that end (EOS, stop string, the length
budget) and rank among the top k join the finished hypotheses, scored as summed log-probability /
generated length ** length_penalty; the best k that did not end keep running; an item stops once
its best running beam, at the length reached so far, cannot beat its worst kept hypothesis (or,
with early_stopping=True, once k hypotheses are kept); and -1e9 marks excluded candidates, so
candidates order exactly alike. Outputs therefore equal `generate`'s token for token; scores may
differ by a rounding step, since a batch that shrinks sums in a different order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel, StoppingCriteriaList

# The score `generate` gives to excluded candidates; kept identical so that candidates order alike.
_EXCLUDED = -1.0e9

# Generation-config fields that make `generate` process scores (penalties, forced or banned
# tokens, ...); this loop does none of that, so a model that sets one is decoded by `generate`.
_SCORE_CHANGING = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "remove_invalid_values",
    "renormalize_logits",
    "guidance_scale",
    "watermarking_config",
    "max_time",
    "stop_strings",
)


def unsupported_settings(model: PreTrainedModel) -> list[str]:
    """Why the moebench loop cannot reproduce `model.generate` for this model (empty: it can)."""
    if model.config.is_encoder_decoder:
        return ["an encoder-decoder model"]
    if hasattr(model, "_reorder_cache"):
        return ["a model with its own cache reordering"]
    default = GenerationConfig()
    cfg = model.generation_config
    return [
        f"{name}={getattr(cfg, name)!r}"
        for name in _SCORE_CHANGING
        if getattr(cfg, name, None) != getattr(default, name, None)
    ]


@dataclass(frozen=True)
class Decoded:
    """Per prompt: the new token ids (the stopping token included) and, for beam search, the
    kept hypothesis' score (summed log-probability / length ** length_penalty)."""

    tokens: list[list[int]]
    scores: list[float] | None


class _Rows:
    """A KV cache and the per-row tensors that must move with it when rows are reordered."""

    def __init__(self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        # As in `generate`: without padding the mask is dropped (the attention takes its faster
        # causal path), and a padded row's positions count its real tokens only.
        self.mask: torch.Tensor | None = None if bool(mask.all()) else mask
        self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ids (rows x new tokens) on top of the cache; float32 logits of the last position."""
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1, :].float()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.forward(ids, self.positions)
        self.positions = self.positions[:, -1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        self.positions = self.positions + 1
        return self.forward(tokens[:, None], self.positions[:, None])

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows in this order; a repeated row is how one prompt becomes k beams."""
        self.cache.reorder_cache(rows)
        self.positions = self.positions[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    stop: StoppingCriteriaList,
) -> Decoded:
    """Greedy or beam decoding of a left-padded batch with one prefill per prompt.

    `stop` says, for full sequences (prompt + new tokens), which have ended (EOS, stop string);
    reaching max_new_tokens ends every sequence. Length penalty and early stopping come from the
    model's generation config, as in `generate`.
    """
    rows = _Rows(model, ids, mask)
    logits = rows.prefill(ids)
    if num_beams == 1:
        return _greedy(rows, logits, ids, max_new_tokens, stop)
    cfg = model.generation_config
    return _beam_search(
        rows,
        logits,
        ids,
        num_beams,
        max_new_tokens,
        stop,
        length_penalty=1.0 if cfg.length_penalty is None else float(cfg.length_penalty),
        early_stopping=False if cfg.early_stopping is None else cfg.early_stopping,
    )


def _greedy(
    rows: _Rows,
    logits: torch.Tensor,
    ids: torch.Tensor,
    max_new_tokens: int,
    stop: StoppingCriteriaList,
) -> Decoded:
    n, width = ids.shape
    seq = torch.cat([ids, ids.new_zeros((n, max_new_tokens))], dim=1)  # alive rows only
    alive = torch.arange(n, device=ids.device)  # each alive row's prompt index
    tokens: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_new_tokens):
        seq[:, width + t] = logits.argmax(-1)
        ended = stop(seq[:, : width + t + 1], None) | (t + 1 == max_new_tokens)
        for r in ended.nonzero()[:, 0].tolist():
            tokens[int(alive[r])] = seq[r, width : width + t + 1].tolist()
        keep = (~ended).nonzero()[:, 0]
        if len(keep) == 0:
            break
        if len(keep) < len(alive):
            rows.select(keep)
            seq, alive = seq[keep], alive[keep]
        logits = rows.step(seq[:, width + t])
    return Decoded(tokens, None)


def _beam_search(
    rows: _Rows,
    logits: torch.Tensor,
    ids: torch.Tensor,
    k: int,
    max_new_tokens: int,
    stop: StoppingCriteriaList,
    *,
    length_penalty: float,
    early_stopping: bool | str,
) -> Decoded:
    """Beam search over prompts still alive; shapes are (alive prompts A, beams k or 2k, ...)."""
    n, width = ids.shape
    dev = ids.device
    # The prefill ran once per prompt; each beam gets its own copy of the prompt's cache rows.
    rows.select(torch.arange(n, device=dev).repeat_interleave(k))
    logits = logits.repeat_interleave(k, dim=0)
    vocab = logits.shape[-1]
    span = width + max_new_tokens
    run_seq = torch.cat([ids, ids.new_zeros((n, max_new_tokens))], dim=1)[:, None].repeat(1, k, 1)
    run_score = torch.zeros((n, k), device=dev)
    run_score[:, 1:] = _EXCLUDED  # all beams start identical: only the first may expand
    fin_seq = ids.new_zeros((n, k, max_new_tokens))
    fin_score = torch.full((n, k), _EXCLUDED, device=dev)
    fin_len = torch.zeros((n, k), dtype=torch.long, device=dev)
    fin_done = torch.zeros((n, k), dtype=torch.bool, device=dev)
    improvable = torch.ones(n, dtype=torch.bool, device=dev)
    first_k = torch.arange(2 * k, device=dev) < k  # finished candidates count only from the top k
    alive = torch.arange(n, device=dev)
    tokens: list[list[int]] = [[] for _ in range(n)]
    scores = [0.0] * n

    def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return t.gather(1, index.expand(*index.shape[:2], *t.shape[2:]))

    for t in range(max_new_tokens):
        a = len(alive)
        logp = torch.log_softmax(logits, dim=-1).view(a, k, vocab) + run_score[:, :, None]
        top_score, top_idx = logp.view(a, k * vocab).topk(2 * k)
        src = top_idx // vocab
        cand = pick(run_seq, src)
        cand[:, :, width + t] = top_idx % vocab
        ended = stop(cand[:, :, : width + t + 1].reshape(a * 2 * k, -1), None).view(a, 2 * k)
        ended |= t + 1 == max_new_tokens
        # The best k candidates that did not end keep running.
        live = top_score + ended.float() * _EXCLUDED
        nxt = live.topk(k).indices
        run_seq, run_score, run_src = pick(cand, nxt), pick(live, nxt), pick(src, nxt)
        # Ended candidates among the top k join the finished ones if they score better.
        final = top_score / float(t + 1) ** length_penalty
        final += (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * _EXCLUDED
        final += (~improvable[:, None]).float() * _EXCLUDED
        just = ended & first_k
        final += (~just).float() * _EXCLUDED
        merged = torch.cat([fin_score, final], dim=1)
        best = merged.topk(k).indices
        fin_score = pick(merged, best)
        fin_seq = pick(torch.cat([fin_seq, cand[:, :, width:span]], dim=1), best)
        fin_len = pick(
            torch.cat([fin_len, torch.full_like(final, t + 1, dtype=torch.long)], 1), best
        )
        fin_done = pick(torch.cat([fin_done, just], dim=1), best)
        # Can the best running beam still beat the worst kept hypothesis? (`generate`'s heuristic:
        # it assumes the length reached so far, unless early_stopping="never".)
        horizon = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
        hope = run_score[:, :1] / float(horizon) ** length_penalty
        worst = torch.where(fin_done, fin_score.min(dim=1, keepdim=True).values, _EXCLUDED)
        improvable &= (hope > worst).any(dim=-1)
        # A prompt whose kept hypotheses can no longer change leaves the batch: none can improve,
        # or every candidate ended (its running beams then carry -1e9 and never beat a kept one).
        over = ~improvable | ended.all(dim=-1)
        if early_stopping is True:
            over |= fin_done.all(dim=-1)
        for r in over.nonzero()[:, 0].tolist():
            tokens[int(alive[r])] = fin_seq[r, 0, : int(fin_len[r, 0])].tolist()
            scores[int(alive[r])] = float(fin_score[r, 0])
        keep = (~over).nonzero()[:, 0]
        if len(keep) == 0:
            break
        rows.select((keep[:, None] * k + run_src[keep]).flatten())
        alive, run_seq, run_score = alive[keep], run_seq[keep], run_score[keep]
        fin_seq, fin_score, fin_len = fin_seq[keep], fin_score[keep], fin_len[keep]
        fin_done, improvable = fin_done[keep], improvable[keep]
        logits = rows.step(run_seq[:, :, width + t].flatten())
    return Decoded(tokens, scores)
