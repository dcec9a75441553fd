"""Decoding and log-likelihood scoring, checked against `model.generate`, one-at-a-time runs and
hand-computed references on the tiny models (real forwards, fp32)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import PreTrainedModel, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria

from moebench.decoding import decode, unsupported_settings
from moebench.errors import ConfigError
from moebench.generation import (
    continuation_logprobs,
    cut_at_stop,
    generate,
    left_pad,
)
from moebench.models import load_model
from moebench.prompts import build_prompt

PROMPTS = [
    build_prompt("alpaca", q)
    for q in [
        "Is the sky blue?",
        "Please choose the correct answer to the question: which is heavier, a kilogram of "
        "feathers or a kilogram of iron, when both are weighed at sea level on the same day?",
        "2 + 2 = ?",
        "Name a colour.",
        "A much longer question with many words so that left padding really matters here, "
        "because the batch mixes lengths.",
    ]
]
NEW = 16


def _batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)


def _hf(model: PreTrainedModel, ids, mask, k: int, eos: int | None, pad: int):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        num_beams=k,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
        return_dict_in_generate=True,
        output_scores=True,
    )


def _frequent_token(model: PreTrainedModel, ids, mask, pad: int) -> int:
    """A token the model generates often, so that as EOS it ends hypotheses mid-generation."""
    free = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=4,
        pad_token_id=pad, eos_token_id=None,
    )  # fmt: skip
    return Counter(free[:, ids.shape[1] :].flatten().tolist()).most_common(1)[0][0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_decode_equals_hf_generate_token_for_token_with_eos_mid_generation(
    name: str, k: int
) -> None:
    model, tok = load_model(name)
    model.eval()
    ids, mask = _batch(tok)
    width = ids.shape[1]
    eos = _frequent_token(model, ids, mask, tok.pad_token_id)
    ours = decode(
        model, ids, mask, num_beams=k, max_new_tokens=NEW,
        stop=StoppingCriteriaList([EosTokenCriteria(eos)]),
    )  # fmt: skip
    ref = _hf(model, ids, mask, k, eos, tok.pad_token_id)
    for row, tokens in zip(ref.sequences[:, width:].tolist(), ours.tokens, strict=True):
        assert row[: len(tokens)] == tokens
        assert set(row[len(tokens) :]) <= {tok.pad_token_id}  # generate's filler after the end
        assert len(tokens) == NEW or tokens[-1] == eos
    ended_early = [t for t in ours.tokens if len(t) < NEW]
    assert ended_early, "the chosen EOS never ended a hypothesis: the test would prove nothing"
    if k > 1:
        # Summation order differs by a rounding step where finished prompts leave the batch.
        assert ours.scores == pytest.approx(ref.sequences_scores.tolist(), abs=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_prompt_is_prefilled_once_not_once_per_beam(k: int) -> None:
    model, tok = load_model("tiny-llama")
    model.eval()
    ids, mask = _batch(tok)
    seen: list[tuple[int, int]] = []

    def record(module, args, kwargs) -> None:
        seen.append(tuple(kwargs["input_ids"].shape))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        decode(model, ids, mask, num_beams=k, max_new_tokens=NEW, stop=StoppingCriteriaList())
        ours, seen[:] = list(seen), []
        _hf(model, ids, mask, k, None, tok.pad_token_id)
        theirs = list(seen)
    finally:
        handle.remove()
    n, width = ids.shape
    assert ours[0] == (n, width)  # one prefill row per prompt
    assert all(cols == 1 for _, cols in ours[1:])  # afterwards one new token per beam per step
    assert max(rows for rows, _ in ours[1:]) == n * k
    assert theirs[0] == (n * k, width)  # what this saves: generate prefills every beam


@pytest.mark.parametrize("k", [1, 4])
def test_stop_strings_end_hypotheses_like_hf_and_are_cut(k: int) -> None:
    model, tok = load_model("tiny-qwen2")
    model.eval()
    stops = [" found", "### Instruction"]
    free = generate(model, tok, PROMPTS, max_new_tokens=NEW, num_beams=k, batch_size=5)
    assert any(" found" in text for text in free), "premise: the stop string must occur"
    ours = generate(
        model, tok, PROMPTS, max_new_tokens=NEW, num_beams=k, batch_size=5, stop_strings=stops
    )
    theirs = generate(
        model, tok, PROMPTS, max_new_tokens=NEW, num_beams=k, batch_size=5, stop_strings=stops,
        engine="hf",
    )  # fmt: skip
    assert ours == theirs
    assert all(" found" not in text for text in ours)
    assert any(len(a) < len(b) for a, b in zip(ours, free, strict=True))


def test_engines_agree_through_generate_in_input_order() -> None:
    model, tok = load_model("tiny-llama")
    model.eval()
    for k in (1, 3):
        ours = generate(model, tok, PROMPTS, max_new_tokens=8, num_beams=k, batch_size=2)
        theirs = generate(
            model, tok, PROMPTS, max_new_tokens=8, num_beams=k, batch_size=2, engine="hf"
        )
        assert ours == theirs
        assert len(set(ours)) == len(PROMPTS)  # distinct outputs, so an order mix-up would show


def test_batchedleft_pad_greedy_equals_one_prompt_at_a_time() -> None:
    model, tok = load_model("tiny-qwen2")
    model.eval()
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, num_beams=1, batch_size=5)
    single = [
        generate(model, tok, [p], max_new_tokens=12, num_beams=1, batch_size=1)[0] for p in PROMPTS
    ]
    assert batched == single
    assert any(batched)  # something was generated


def test_beam_search_runs_batched_and_matches_single() -> None:
    model, tok = load_model("tiny-llama")
    model.eval()
    batched = generate(model, tok, PROMPTS[:3], max_new_tokens=6, num_beams=3, batch_size=3)
    single = [
        generate(model, tok, [p], max_new_tokens=6, num_beams=3, batch_size=1)[0]
        for p in PROMPTS[:3]
    ]
    assert batched == single
    assert any(batched)


def test_score_changing_generation_config_falls_back_to_hf() -> None:
    model, tok = load_model("tiny-llama")
    model.eval()
    assert unsupported_settings(model) == []
    model.generation_config.repetition_penalty = 1.5
    assert unsupported_settings(model) == ["repetition_penalty=1.5"]
    auto = generate(model, tok, PROMPTS[:2], max_new_tokens=8, num_beams=2, batch_size=2)
    hf = generate(model, tok, PROMPTS[:2], max_new_tokens=8, num_beams=2, batch_size=2, engine="hf")
    assert auto == hf
    with pytest.raises(ConfigError, match="repetition_penalty"):
        generate(
            model, tok, PROMPTS[:1], max_new_tokens=4, num_beams=2, batch_size=1, engine="moebench"
        )


def test_unknown_engine_is_a_config_error() -> None:
    model, tok = load_model("tiny-llama")
    with pytest.raises(ConfigError, match="engine='vllm'"):
        generate(
            model, tok, PROMPTS[:1], max_new_tokens=2, num_beams=1, batch_size=1, engine="vllm"
        )


def test_stop_strings_end_and_are_cut() -> None:
    assert cut_at_stop("the answer is 4\n### Instruction: more", ["### Instruction"]) == (
        "the answer is 4\n"
    )
    assert cut_at_stop("no stop here", ["### Instruction"]) == "no stop here"


def test_continuation_logprobs_equal_a_hand_computation() -> None:
    model, tok = load_model("tiny-llama")
    model.eval()
    requests = [
        (p + "the correct answer is", " " + lab)
        for p in PROMPTS[:2]
        for lab in ("true", "false", "answer3")
    ]
    got = continuation_logprobs(model, tok, requests, batch_size=4)
    for (ctx, cont), value in zip(requests, got, strict=True):
        c = tok(ctx)["input_ids"]
        k = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([c + k])).logits[0], -1)
        expected = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(k))
        assert abs(value - expected) < 1e-4
