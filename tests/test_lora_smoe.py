"""LoRA-SMoE: the sensitivity pass, its cache, the allocation and its budget solver, the layers."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moebench import sensitivity
from moebench.config import build, to_dict
from moebench.data import IGNORE_INDEX, Example, load_training_rows, tokenize_row
from moebench.errors import ConfigError
from moebench.inject import inject, prepare_and_inject
from moebench.method import ModelShapes, PrepareContext, get_method
from moebench.methods.lora import LoRALinear
from moebench.methods.lora_smoe import (
    SINGLE_TASK_NOTE,
    LoRASMoEConfig,
    allocate,
    allocation_parameters,
    percentile,
    solve_fraction,
)
from moebench.methods.loramoe import LoRAMoELinear
from moebench.models import count_parameters, load_model, tiny_config
from moebench.suites import mini_root

METHOD = get_method("lora-smoe")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _examples(vocab: int, n: int = 4, seed: int = 0) -> list[Example]:
    """Random rows whose first tokens are an unsupervised prompt, as in real training data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = tuple(torch.randint(3, vocab, (9 + i,), generator=g).tolist())
        labels = (IGNORE_INDEX,) * 4 + ids[4:]
        out.append(Example(ids, labels, -1))
    return out


def _measure(model: nn.Module, examples: list[Example], **kw) -> dict[str, float]:  # type: ignore[no-untyped-def]
    args = dict(protocol="clean", samples=8, seed=0, pad_token_id=0, device="cpu") | kw
    return sensitivity.measure(model, examples, **args)


# --- stage 1: sensitivity ------------------------------------------------------------------------


def test_sensitivity_equals_per_example_squared_gradient_norms() -> None:
    model, tok = load_model("tiny-llama")
    examples = _examples(len(tok), n=3)
    scores = _measure(model, examples)
    assert len(scores) == model.config.num_hidden_layers * len(KINDS)
    assert all(k.startswith("model.layers.") and k.endswith(".weight") for k in scores)
    assert not any("norm" in k or "embed" in k or "lm_head" in k for k in scores)
    # Independently: the response tokens' mean cross-entropy, by hand, one example at a time.
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    expected = dict.fromkeys(names, 0.0)
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=IGNORE_INDEX)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            expected[n] += float(g.double().pow(2).sum())
    for n in names:
        assert scores[n] == pytest.approx(expected[n], rel=1e-4), n
        assert scores[n] > 0


@pytest.mark.parametrize("protocol", ["clean", "authors"])
def test_sensitivity_restores_flags_grads_mode_and_weights_bitwise(protocol: str) -> None:
    model, tok = load_model("tiny-llama")
    for n, p in model.named_parameters():  # a mixed pattern, to see that each flag comes back
        p.requires_grad_("layers.1" in n or "embed" in n)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    examples = _examples(len(tok), n=3)
    _measure(model, examples, protocol=protocol, samples=2)
    assert model.training
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
        assert p.dtype == torch.float32, n
        assert torch.equal(p, before[n]), n


def test_sampling_is_seeded_sorted_and_skips_unsupervised_rows() -> None:
    examples = _examples(100, n=10)
    dead = Example((5, 6, 7), (IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX), -1)
    pool = [dead, *examples]
    a = sensitivity.sample_examples(pool, 4, seed=3)
    assert a == sensitivity.sample_examples(pool, 4, seed=3)
    assert dead not in a and len(a) == 4
    assert [pool.index(e) for e in a] == sorted(pool.index(e) for e in a)
    assert sensitivity.sample_examples(pool, 50, seed=3) == examples


def test_cache_hit_returns_the_same_numbers_without_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = load_model("tiny-llama")
    calls = []
    real = sensitivity.measure

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure", counted)
    examples = _examples(len(tok), n=3)
    kw = dict(model=model, samples=2, seed=0, pad_token_id=0, device="cpu")
    key = {"model": "tiny-llama", "task": "boolq"}
    clean = {"protocol": "clean"}
    first, hit1 = sensitivity.measure_cached(tmp_path, key, examples=examples, **clean, **kw)
    second, hit2 = sensitivity.measure_cached(tmp_path, key, examples=examples, **clean, **kw)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert first == second
    files = list((tmp_path / "sensitivity").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary file left behind
    assert json.loads(files[0].read_text())["key"]["task"] == "boolq"
    # one changed token in a sampled example is other data: a miss, not the stale file
    changed = [Example((*e.input_ids[:-1], 7), e.labels, -1) for e in examples]
    _, hit3 = sensitivity.measure_cached(tmp_path, key, examples=changed, **clean, **kw)
    # another task or protocol is another measurement too
    other = key | {"task": "gsm8k"}
    _, hit4 = sensitivity.measure_cached(tmp_path, other, examples=examples, **clean, **kw)
    _, hit5 = sensitivity.measure_cached(tmp_path, key, examples=examples, protocol="authors", **kw)
    assert (hit3, hit4, hit5) == (False, False, False) and len(calls) == 4


# --- stage 2: allocation -------------------------------------------------------------------------


def _hand_table() -> dict[str, dict[str, float]]:
    """3 tasks x 8 modules: q_proj and up_proj of 4 layers (two groups of 4)."""
    q = {"a": [4, 3, 2, 1], "b": [1, 4, 3, 2], "c": [1, 2, 3, 4]}
    up = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4], "c": [4, 1, 2, 3]}
    table: dict[str, dict[str, float]] = {}
    for t in "abc":
        row = {f"model.layers.{i}.self_attn.q_proj": float(q[t][i]) for i in range(4)}
        row |= {f"model.layers.{i}.mlp.up_proj": float(up[t][i]) for i in range(4)}
        table[t] = row
    return table


def _counts(alloc: dict[str, int], kind: str) -> list[int]:
    return [alloc[m] for m in sorted(alloc) if m.endswith(kind)]


def test_allocation_known_answer_on_a_hand_made_table() -> None:
    table = _hand_table()
    # p=0.5: tau between each group's 2nd and 3rd largest, so each task picks its top 2 per group
    half = allocate(table, 0.5, "module")
    assert _counts(half, "q_proj") == [1, 2, 2, 1]
    assert _counts(half, "up_proj") == [1, 0, 2, 3]
    assert sum(half.values()) == 0.5 * 3 * 8
    quarter = allocate(table, 0.25, "module")  # top 1 per task and group
    assert _counts(quarter, "q_proj") == [1, 1, 0, 1]
    assert _counts(quarter, "up_proj") == [1, 0, 0, 2]
    attention = allocate(table, 0.5, "attention")  # the FFN gets nothing
    assert _counts(attention, "q_proj") == [1, 2, 2, 1]
    assert _counts(attention, "up_proj") == [0, 0, 0, 0]


def test_percentile_is_numpys_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 5, 32):
        values = rng.random(size).tolist()
        for q in (0.0, 12.5, 40.0, 60.0, 99.0, 100.0):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def _module(layer: int, kind: str) -> str:
    block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{kind}"


def _random_table(tasks: int = 3, layers: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    return {
        f"task{t}": {_module(i, k): rng.random() for i in range(layers) for k in KINDS}
        for t in range(tasks)
    }


@pytest.mark.parametrize("p", [0.1, 0.37, 0.6, 0.83, 1.0])
def test_allocation_is_deterministic_bounded_and_sums_to_about_p_t_m(p: float) -> None:
    table = _random_table()
    tasks, groups, per_group = 3, len(KINDS), 10
    alloc = allocate(table, p, "module")
    shuffled = {t: dict(reversed(list(row.items()))) for t, row in reversed(table.items())}
    assert allocate(shuffled, p, "module") == alloc  # independent of the order given
    assert all(0 <= n <= tasks for n in alloc.values())
    # With distinct scores each (task, group) passes exactly ceil(p (M_g - 1)) modules, which is
    # within one module of p M_g; so |sum n - p T M| <= T * (number of groups).
    total = sum(alloc.values())
    assert total == tasks * groups * math.ceil(round(p * (per_group - 1), 9))
    assert abs(total - p * tasks * len(alloc)) <= tasks * groups


TINY_LINEARS = ModelShapes.from_config(tiny_config("llama", 2048)).linears


def test_budget_solver_hits_a_reachable_budget() -> None:
    table = _random_table()
    rank = 8

    def params(a):  # type: ignore[no-untyped-def]
        return allocation_parameters(a, rank, TINY_LINEARS)

    reachable = params(allocate(table, 0.45, "module"))
    for target in (reachable, int(reachable * 1.03), int(reachable * 0.97)):
        p, alloc = solve_fraction(table, "module", params, target)
        assert abs(params(alloc) - target) <= 0.05 * target
        assert alloc == allocate(table, p, "module")  # the reported p gives that allocation
    experts = sum(allocate(table, 0.55, "module").values())
    p, alloc = solve_fraction(table, "module", lambda a: sum(a.values()), experts)
    assert sum(alloc.values()) == experts
    assert allocate(table, p, "module") == alloc
    # an unreachable budget gives the closest allocation (p=1 here: as many as the rule allows)
    _, most = solve_fraction(table, "module", lambda a: sum(a.values()), 10**6)
    assert sum(most.values()) == 3 * 7 * 9


# --- config and stage 3 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fraction": 0.0}, r"fraction=0.0 is out of range; accepted: a number in \(0, 1\]"),
        ({"budget_experts": 5, "budget_params": 100}, "give at most one budget"),
        ({"allocation": ("model.layers.0.mlp.up_proj",)}, "is not of the form"),
        ({"allocation": ("x=-1",)}, "integer n >= 0"),
        ({"allocation": ("x=1", "x=2")}, "names x twice"),
        ({"groups": "ffn"}, "must be 'module' or 'attention'"),
    ],
)
def test_bad_config_is_rejected(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRASMoEConfig(**kw)


def test_injection_without_preparation_says_so() -> None:
    model, _ = load_model("tiny-llama")
    with pytest.raises(ConfigError, match="needs its preparation stage"):
        inject(model, METHOD, LoRASMoEConfig())


def _ctx(model: nn.Module, examples, tasks, cache: Path, name: str = "tiny-llama", pad: int = 0):  # type: ignore[no-untyped-def]
    return PrepareContext(
        model=model,
        examples=examples,
        tasks=tasks,
        model_name=name,
        seed=0,
        cache_dir=cache,
        device=torch.device("cpu"),
        autocast=None,
        pad_token_id=pad,
    )


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen2"])
def test_given_allocation_builds_the_right_layers_and_count(
    model_name: str, tmp_path: Path
) -> None:
    model, tok = load_model(model_name)
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    alloc = (
        "model.layers.0.self_attn.q_proj=1",
        "model.layers.0.self_attn.k_proj=3",
        "model.layers.1.mlp.down_proj=3",
        "model.layers.1.self_attn.v_proj=0",
        "model.layers.1.mlp.gate_proj=1",
    )
    cfg = LoRASMoEConfig(allocation=alloc)
    adapted, prepared = prepare_and_inject(model, METHOD, cfg, _ctx(model, [], [], tmp_path))
    assert prepared.config == cfg  # used as given: no sensitivity pass
    layers = adapted.layers
    assert set(layers) == {a.split("=")[0] for a in alloc if not a.endswith("=0")}
    assert type(layers["model.layers.0.self_attn.q_proj"]) is LoRALinear
    moe = layers["model.layers.1.mlp.down_proj"]
    assert isinstance(moe, LoRAMoELinear) and moe.num_experts == 3 and moe.lbc_beta == 0.0
    assert type(model.model.layers[1].self_attn.v_proj) is nn.Linear
    trainable, _ = count_parameters(model)
    assert METHOD.trainable_parameters(cfg, ModelShapes.from_config(model.config)) == trainable
    names = [n for n, _ in adapted.adapter_parameters()]
    assert [n for n in names if METHOD.no_weight_decay(cfg, n)] == [
        "model.layers.0.self_attn.k_proj.router",
        "model.layers.1.mlp.down_proj.router",
    ]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-5, rtol=0)


def test_given_allocation_with_an_unknown_module_is_a_config_error(tmp_path: Path) -> None:
    model, _ = load_model("tiny-llama")
    cfg = LoRASMoEConfig(allocation=("model.layers.0.self_attn.qproj=2",))
    with pytest.raises(ConfigError, match=r"qproj, which is not a linear"):
        METHOD.prepare(cfg, _ctx(model, [], [], tmp_path))


def _mini_examples(tok, per_task: int = 2) -> tuple[list[Example], list[str]]:  # type: ignore[no-untyped-def]
    rows = load_training_rows(mini_root() / "train.json")
    examples, tasks, seen = [], [], {}
    for r in rows:
        if r.task in ("arc_easy", "boolq", "gsm8k") and seen.get(r.task, 0) < per_task:
            seen[r.task] = seen.get(r.task, 0) + 1
            examples.append(
                tokenize_row(
                    r, tok, template="alpaca", cutoff_len=256, train_on_prompt=False, task_label=-1
                )
            )
            tasks.append(r.task)
    return examples, tasks


def test_prepare_on_real_rows_allocates_real_modules_and_caches(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    examples, tasks = _mini_examples(tok)
    ctx = _ctx(model, examples, tasks, tmp_path, pad=tok.pad_token_id)
    prepared = METHOD.prepare(LoRASMoEConfig(sensitivity_samples=2), ctx)
    alloc = dict(a.split("=") for a in prepared.config.allocation)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n}
    assert set(alloc) == linears  # every decoder linear, n=0 included (for the heat map)
    assert all(0 <= int(n) <= 3 for n in alloc.values())
    art = prepared.artifacts["allocation"]
    assert art["tasks"] == ["arc_easy", "boolq", "gsm8k"] and art["cache_hits"] == 0
    assert art["modules"] == {k: int(v) for k, v in alloc.items()} and art["p"] == 0.6
    # the runner stores the prepared config as JSON and rebuilds it on resume
    stored = json.loads(json.dumps(to_dict(prepared.config)))
    assert build(LoRASMoEConfig, stored, "lora-smoe") == prepared.config
    # The same data again comes from the cache, and a budget is solved without measuring. With
    # 2 layers a module group has 2 members, so only one attention-wide group of 8 leaves room
    # to choose: each task passes ceil(7p) of them, so 12 = 3 tasks x 4 is reachable.
    cfg = LoRASMoEConfig(sensitivity_samples=2, budget_experts=12, groups="attention")
    again = METHOD.prepare(cfg, ctx)
    art2 = again.artifacts["allocation"]
    assert art2["cache_hits"] == 3 and sum(art2["modules"].values()) == 12
    assert again.config.fraction == art2["p"]
    assert any("budget_experts=12 solved to p=" in n for n in again.notes)
    assert all(n == 0 for k, n in art2["modules"].items() if ".mlp." in k)
    adapted = inject(model, METHOD, prepared.config)
    trainable, _ = count_parameters(model)
    shapes = ModelShapes.from_config(model.config)
    assert METHOD.trainable_parameters(prepared.config, shapes) == trainable
    assert {type(m) for m in adapted.layers.values()} <= {LoRALinear, LoRAMoELinear}


def test_a_single_task_gives_plain_lora_and_says_so(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    examples, _ = _mini_examples(tok)
    ctx = _ctx(model, examples, [None] * len(examples), tmp_path, pad=tok.pad_token_id)
    prepared = METHOD.prepare(LoRASMoEConfig(sensitivity_samples=3), ctx)
    assert any(SINGLE_TASK_NOTE in n for n in prepared.notes)
    assert prepared.artifacts["allocation"]["tasks"] == ["all"]
    counts = prepared.artifacts["allocation"]["modules"].values()
    assert set(counts) == {0, 1}


def test_budget_params_through_prepare_lands_within_five_percent(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    examples, tasks = _mini_examples(tok)
    ctx = _ctx(model, examples, tasks, tmp_path, pad=tok.pad_token_id)
    base = LoRASMoEConfig(sensitivity_samples=2, groups="attention", fraction=0.5)
    reachable = METHOD.prepare(base, ctx).artifacts["allocation"]["trainable_parameters"]
    target = int(reachable * 1.02)
    cfg = dataclasses.replace(base, budget_params=target)
    prepared = METHOD.prepare(cfg, ctx)
    budget = prepared.artifacts["allocation"]["budget"]
    assert budget["within_5pct"] and abs(budget["achieved"] - target) <= 0.05 * target
    shapes = ModelShapes.from_config(model.config)
    assert METHOD.trainable_parameters(prepared.config, shapes) == budget["achieved"]


def test_a_config_stored_before_the_protocol_field_still_resolves_as_the_clean_pass():
    """Runs stored by an earlier release carry `sensitivity_update_lr`; None was the fp32,
    unclipped, update-free pass, i.e. protocol=clean. A set rate has no equivalent: refused."""
    from moebench.runspec import resolve

    old = {"method": "lora-smoe", "model": "tiny-llama", "method_config": {"rank": 4}}
    old["method_config"]["sensitivity_update_lr"] = None
    spec = resolve(base=old)
    assert spec.method_config.protocol == "clean"
    assert resolve(base={**old, "method_config": {"rank": 4}}).method_config.protocol == "authors"
    old["method_config"]["sensitivity_update_lr"] = 1e-5
    with pytest.raises(ConfigError, match=r"sensitivity_update_lr=1e-05 .*protocol=clean"):
        resolve(base=old)
