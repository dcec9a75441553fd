"""Log-likelihood scoring with a shared prefix: each context prefilled once, its continuations
scored from the cached keys and values. Checked on the tiny models (real forwards, fp32) against
the one-forward-per-request reference path and against a hand computation; plus the evaluator's
log-likelihood mode end to end and its `engine` setting."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moebench.errors import ConfigError, DataError
from moebench.evaluate import EvalConfig, evaluate_task
from moebench.generation import continuation_logprobs
from moebench.models import load_model
from moebench.prompts import build_prompt
from moebench.task import LOGLIK_PREFIX, get_task
from moebench.tasks import MINI_DIR
from tests.conftest import TINY_MODELS, adapt

QUESTIONS = [
    "Is the sky blue?",
    "Please choose the correct answer to the question: which is heavier, a kilogram of feathers "
    "or a kilogram of iron, when both are weighed at sea level on the same day?",
    "2 + 2 = ?",
    "A question of middling length, so that three context lengths share a batch.",
]
CONTEXTS = [build_prompt("alpaca", q) + LOGLIK_PREFIX for q in QUESTIONS]
# Continuations of one to several tokens; context i offers the first 2 + i of them (2 to 5).
CONTINUATIONS = [" true", " answer2", " solution1 with a longer tail", " no", " ending4 is it"]


def _requests(shuffle_seed: int | None = 0) -> list[tuple[str, str]]:
    reqs = [(c, k) for i, c in enumerate(CONTEXTS) for k in CONTINUATIONS[: 2 + i]]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(reqs)
    return reqs


def _model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tok = load_model(name)
    model.eval()
    return model, tok


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_shared_prefix_equals_the_full_forward_reference(name: str, batch_size: int) -> None:
    model, tok = _model(name)
    reqs = _requests()
    lengths = {len(tok(c)["input_ids"]) for c in CONTEXTS}
    multi = [k for _, k in reqs if len(tok(k, add_special_tokens=False)["input_ids"]) > 1]
    assert len(lengths) == len(CONTEXTS) and multi  # premise: mixed lengths, multi-token labels
    shared = continuation_logprobs(model, tok, reqs, batch_size=batch_size)
    reference = continuation_logprobs(model, tok, reqs, batch_size=batch_size, shared_prefix=False)
    assert shared == pytest.approx(reference, abs=1e-4)
    assert len(set(round(s, 3) for s in shared)) > len(reqs) // 2  # not one value repeated


def test_scores_come_back_in_input_order() -> None:
    model, tok = _model("tiny-qwen2")
    reqs = _requests(shuffle_seed=None)
    base = dict(zip(reqs, continuation_logprobs(model, tok, reqs, batch_size=6), strict=True))
    for seed in (1, 2):
        shuffled = _requests(shuffle_seed=seed)
        assert shuffled != reqs
        got = continuation_logprobs(model, tok, shuffled, batch_size=6)
        assert got == pytest.approx([base[r] for r in shuffled], abs=1e-5)


def _forward_log(model: PreTrainedModel):  # type: ignore[no-untyped-def]
    """Per forward call: (input rows without their padding, cached columns before the call)."""
    calls: list[tuple[list[list[int]], int]] = []

    def record(module, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else cache.get_seq_length()
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[:, past:].bool()
        calls.append(([r[m].tolist() for r, m in zip(ids, real, strict=True)], past))

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("batch_size", [5, 64])
def test_each_distinct_context_is_prefilled_once(batch_size: int) -> None:
    model, tok = _model("tiny-llama")
    reqs = _requests()
    calls, handle = _forward_log(model)
    try:
        continuation_logprobs(model, tok, reqs, batch_size=batch_size)
        ours = list(calls)
        calls.clear()
        continuation_logprobs(model, tok, reqs, batch_size=batch_size, shared_prefix=False)
        reference = list(calls)
    finally:
        handle.remove()
    prefill_rows = [tuple(row) for rows, past in ours if past == 0 for row in rows]
    assert Counter(prefill_rows) == Counter(tuple(tok(c)["input_ids"]) for c in CONTEXTS)
    # Every later call runs on a cache and feeds continuation tokens only, at most one row per
    # request and never more rows than batch_size (a context's 5 continuations may exceed 4).
    later = [(rows, past) for rows, past in ours if past > 0]
    assert later and all(len(rows) <= max(batch_size, 5) for rows, _ in later)
    assert sum(len(rows) for rows, _ in later) <= len(reqs)
    longest = max(len(tok(k, add_special_tokens=False)["input_ids"]) for k in CONTINUATIONS)
    assert max(len(row) for rows, _ in later for row in rows) == longest - 1  # last never fed
    # What this saves: the reference runs every context once per continuation.
    assert sum(len(rows) for rows, _ in reference) == len(reqs)


def test_one_score_equals_a_hand_computation_from_one_plain_forward() -> None:
    model, tok = _model("tiny-qwen2")
    reqs = _requests()
    got = continuation_logprobs(model, tok, reqs, batch_size=64)
    pick = next(i for i, (_, k) in enumerate(reqs) if k == " solution1 with a longer tail")
    ctx, cont = reqs[pick]
    c = tok(ctx)["input_ids"]
    k = tok(cont, add_special_tokens=False)["input_ids"]
    assert len(k) > 2
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([c + k])).logits[0].double(), -1)
    expected = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(k))
    assert got[pick] == pytest.approx(expected, abs=1e-4)


def test_empty_context_is_a_data_error_and_no_requests_no_scores() -> None:
    model, tok = _model("tiny-llama")
    with pytest.raises(DataError, match="context '' has no tokens"):
        continuation_logprobs(model, tok, [("", " true")], batch_size=2)
    assert continuation_logprobs(model, tok, [], batch_size=2) == []


@pytest.mark.parametrize("task_name", ["arc_challenge", "piqa"])
def test_evaluate_task_loglik_predicts_as_the_reference_path(task_name: str) -> None:
    model, tok = load_model("tiny-llama")
    task = get_task(task_name)
    items = task.load_items(task.test_file(MINI_DIR), limit=6)
    result = evaluate_task(
        adapt(model, "lora"), tok, task, items, EvalConfig(mode="loglik", batch_size=8), "alpaca"
    )
    # The reference, built as Task documents the protocol and scored one forward per label.
    labels = [task.candidate_labels(it) for it in items]
    reqs = [
        (build_prompt("alpaca", it.instruction, it.input) + LOGLIK_PREFIX, " " + lab)
        for it, ls in zip(items, labels, strict=True)
        for lab in ls
    ]
    scores = iter(continuation_logprobs(model, tok, reqs, batch_size=8, shared_prefix=False))
    expected = []
    for ls in labels:
        own = [next(scores) for _ in ls]
        expected.append(ls[own.index(max(own))])
    assert [p["extracted"] for p in result.predictions] == expected
    assert [p["item_id"] for p in result.predictions] == [it.item_id for it in items]
    assert "engine" not in result.metrics[0]["protocol_detail"]  # no decoding in this mode


def test_engine_is_validated_and_recorded_but_not_in_the_protocol_id() -> None:
    with pytest.raises(ConfigError, match="engine='vllm' is not one of auto, moebench, hf"):
        EvalConfig(engine="vllm")  # type: ignore[arg-type]
    model, tok = load_model("tiny-llama")
    adapted = adapt(model, "lora")
    task = get_task("boolq")
    items = task.load_items(task.test_file(MINI_DIR), limit=3)
    cfgs = {e: EvalConfig(num_beams=2, max_new_tokens=6, engine=e) for e in ("moebench", "hf")}
    runs = {e: evaluate_task(adapted, tok, task, items, c, "alpaca") for e, c in cfgs.items()}
    ours, theirs = runs["moebench"], runs["hf"]
    assert [p["output"] for p in ours.predictions] == [p["output"] for p in theirs.predictions]
    assert ours.metrics[0]["protocol"] == theirs.metrics[0]["protocol"]
    assert ours.metrics[0]["protocol_detail"]["engine"] == "moebench"
    assert theirs.metrics[0]["protocol_detail"]["engine"] == "hf"
