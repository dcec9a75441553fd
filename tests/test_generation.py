"""Batched decoding and log-likelihood scoring against one-at-a-time, hand-computed references."""

from __future__ import annotations

import torch

from moebench.generation import continuation_logprobs, cut_at_stop, generate
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


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time() -> None:
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
