"""The `authors` sensitivity protocol against a re-implementation written from methods.md §4.

methods.md: batch size 1; BAdam (AdamW lr 1e-5, weight decay 0.01), one decoder layer trainable
per step, switching every step, top layer first; 8*L steps, so each layer gets its own examples;
the score read after HF Trainer's clipping to norm 1.0; the model in fp16 without loss scaling,
so grad**2 is taken in fp16; the pad token appended as EOS.
"""

from __future__ import annotations

import copy

import pytest
import torch
from badam import BlockOptimizer

from moebench import sensitivity
from moebench.data import IGNORE_INDEX, Example
from moebench.models import load_model

PAD = 1


def _examples(vocab: int, eos: int, n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = (*torch.randint(3, vocab, (7 + i,), generator=g).tolist(), eos)
        out.append(Example(ids, (IGNORE_INDEX,) * 3 + ids[3:], -1))
    return out


def _by_hand(model, order: list[Example], layers: int):  # type: ignore[no-untyped-def]
    """Step k trains layer L-1-(k mod L) on order[k]; returns (scores, pre-clip norms)."""
    model = copy.deepcopy(model).half()
    model.train()
    named = list(model.named_parameters())
    opt = BlockOptimizer(
        torch.optim.AdamW([p for _, p in named], lr=1e-5, weight_decay=0.01),
        named,
        switch_block_every=1,
        switch_mode="descending",
        verbose=0,
    )
    scores: dict[str, float] = {}
    norms = []
    for k, e in enumerate(order):
        layer = layers - 1 - k % layers
        prefix = f"model.layers.{layer}."
        mine = [(n, p) for n, p in named if n.startswith(prefix)]
        assert {n for n, p in named if p.requires_grad} == {n for n, _ in mine}, k
        ids = [*e.input_ids[:-1], PAD]  # the pad token in place of the appended EOS
        labels = [*e.labels[:-1], PAD]
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        grads = torch.autograd.grad(out.loss, [p for _, p in mine])
        norm = float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))
        norms.append(norm)
        scale = min(1.0, 1.0 / (norm + 1e-6))
        for (n, p), g in zip(mine, grads, strict=True):
            clipped = (g.float() * scale).half()
            if p.dim() == 2:
                scores[n] = scores.get(n, 0.0) + float(clipped.pow(2).float().sum())
            p.grad = clipped
        opt.step()
        opt.zero_grad(set_to_none=True)
    return scores, norms


def test_authors_protocol_equals_a_re_implementation_with_the_real_badam() -> None:
    model, tok = load_model("tiny-llama")
    eos = model.config.eos_token_id
    assert eos != PAD  # so replacing the EOS is visible
    layers = model.config.num_hidden_layers
    examples = _examples(len(tok), eos, n=5)
    samples, seed = 3, 1  # 3 * 2 layers = 6 steps from a pool of 5: the second epoch reshuffles
    got = sensitivity.measure(
        model,
        examples,
        protocol="authors",
        samples=samples,
        seed=seed,
        pad_token_id=PAD,
        device="cpu",
        eos_token_id=eos,
    )
    # the sampler by hand: a seeded permutation per epoch over the pool
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(5, generator=g).tolist() + torch.randperm(5, generator=g).tolist()
    order = [examples[i] for i in perm[: samples * layers]]
    expected, norms = _by_hand(model, order, layers)
    assert set(got) == set(expected) == set(sensitivity.decoder_weights(model))
    assert any(n > 1.0 for n in norms)  # clipping really acts on some steps
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=5e-3), name
        assert got[name] > 0
    clean = sensitivity.measure(
        model,
        examples,
        protocol="clean",
        samples=samples,
        seed=seed,
        pad_token_id=PAD,
        device="cpu",
    )
    assert any(got[n] != pytest.approx(clean[n], rel=0.05) for n in got)


def test_pad_replaces_only_a_final_eos() -> None:
    e = Example((5, 6, 2), (IGNORE_INDEX, 6, 2), -1)
    assert sensitivity.with_pad_eos(e, 2, 0) == Example((5, 6, 0), (IGNORE_INDEX, 6, 0), -1)
    assert sensitivity.with_pad_eos(e, 9, 0) == e
    assert sensitivity.with_pad_eos(e, None, 0) == e
