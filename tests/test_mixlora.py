"""MixLoRA: routed-FFN arithmetic against hand-written references, and the balance loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from moebench.errors import ConfigError
from moebench.inject import inject
from moebench.method import BatchContext, get_method
from moebench.methods.lora import LoRALinear
from moebench.methods.mixlora import MixLoRAConfig, MixLoRAFFN, balance_loss
from moebench.models import load_model

D, FF = 16, 40


def _ffn(
    context: BatchContext | None = None, seed: int = 0, **cfg: object
) -> tuple[MixLoRAFFN, MixLoRAConfig]:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=FF, num_attention_heads=4))
    for p in mlp.parameters():
        p.requires_grad_(False)
    config = MixLoRAConfig(**{"dropout": 0.0, **cfg})  # type: ignore[arg-type]
    return MixLoRAFFN(mlp, config, context or BatchContext()), config


def _randomise(layer: MixLoRAFFN, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B", "router"):
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name == "router" else 0.1))


def _expert(layer: MixLoRAFFN, x: torch.Tensor, i: int) -> torch.Tensor:
    """Expert i on one token x [d], written out from the method's definition."""
    base, s = layer.base, layer.scaling
    g = base.gate_proj.weight @ x + s * (layer.gate_B[i] @ (layer.gate_A[i] @ x))
    u = base.up_proj.weight @ x + s * (layer.up_B[i] @ (layer.up_A[i] @ x))
    a = torch.nn.functional.silu(g) * u
    return base.down_proj.weight @ a + s * (layer.down_B[i] @ (layer.down_A[i] @ a))


def _naive(layer: MixLoRAFFN, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """One token at a time: softmax, keep the k largest, renormalise, mix the experts."""
    outs, picks = [], []
    for t in range(x.shape[0]):
        p = torch.softmax(layer.router.float() @ x[t].float(), dim=0)
        order = sorted(range(layer.num_experts), key=lambda e: -float(p[e].detach()))[: layer.top_k]
        total = sum(p[e] for e in order)
        outs.append(sum(p[e] / total * _expert(layer, x[t], e) for e in order))
        picks.append(order)
    return torch.stack(outs), picks


def test_dispatch_equals_a_naive_per_token_loop_with_idle_experts() -> None:
    layer, _ = _ffn(num_experts=4, top_k=2)
    _randomise(layer)
    with torch.no_grad():
        layer.router[3] = -5.0  # x > 0 below, so expert 3 is never among the top 2
    x = torch.rand(2, 7, D) + 0.1
    x_naive = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    weight = torch.randn(2, 7, D)

    out = layer(x)
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    ref, picks = _naive(layer, x_naive.reshape(-1, D))
    (ref.reshape(2, 7, D) * weight).sum().backward()

    assert not any(3 in p for p in picks), "expert 3 should get no token"
    assert len({e for p in picks for e in p}) >= 2
    assert torch.allclose(out, ref.reshape(2, 7, D), atol=1e-5, rtol=0)
    assert torch.allclose(x.grad, x_naive.grad, atol=1e-5, rtol=0)
    for name, g in grads.items():
        assert torch.allclose(g, getattr(layer, name).grad, atol=1e-5, rtol=0), name
    assert grads["gate_A"][3].abs().max() == 0  # an idle expert gets no gradient


def test_all_experts_identical_and_kept_equals_one_lora_ffn() -> None:
    layer, _ = _ffn(num_experts=3, top_k=3)
    _randomise(layer)
    with torch.no_grad():
        for name in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B"):
            p = getattr(layer, name)
            p.copy_(p[0].expand_as(p))
    x = torch.randn(3, 5, D)
    base, s = layer.base, layer.scaling
    g = x @ base.gate_proj.weight.t() + s * (x @ layer.gate_A[0].t() @ layer.gate_B[0].t())
    u = x @ base.up_proj.weight.t() + s * (x @ layer.up_A[0].t() @ layer.up_B[0].t())
    a = torch.nn.functional.silu(g) * u
    ref = a @ base.down_proj.weight.t() + s * (a @ layer.down_A[0].t() @ layer.down_B[0].t())
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-5, rtol=0)


def test_kept_weights_are_the_renormalised_top_k() -> None:
    layer, _ = _ffn(num_experts=5, top_k=2)
    _randomise(layer)
    x = torch.randn(11, D)
    _, weights, chosen = layer.route(x)
    probs = torch.softmax(x @ layer.router.t(), dim=-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(chosen, top.indices)
    assert torch.allclose(weights.sum(-1), torch.ones(11), atol=1e-6)
    assert torch.allclose(weights, top.values / top.values.sum(-1, keepdim=True), atol=1e-6)
    assert (weights[:, 0] >= weights[:, 1]).all()


def test_initial_routed_ffn_equals_the_frozen_ffn() -> None:
    layer, _ = _ffn(dropout=0.05)
    layer.eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.base(x), atol=1e-6, rtol=0)


def _balanced_tokens(e: int) -> torch.Tensor:
    """Token e: first choice e, second choice e+1 (cyclically); the cyclic symmetry makes each
    choice's share and the mean probability uniform over experts."""
    row = torch.tensor([3.0, 1.5] + [0.0] * (e - 2))
    return torch.stack([row.roll(i) for i in range(e)])


def test_balance_loss_is_coef_times_k_when_balanced_and_ignores_padding() -> None:
    e, k, coef = 4, 2, 0.01
    context = BatchContext()
    layer, config = _ffn(context, num_experts=e, top_k=k, aux_coef=coef)
    mlp2, _ = _ffn(context, num_experts=e, top_k=k, aux_coef=coef)
    method = get_method("mixlora")
    with torch.no_grad():  # logits = x[:, :e]: the router reads the first e features
        for lay in (layer, mlp2):
            lay.router.zero_()
            lay.router[:, :e] = torch.eye(e)
    tokens = torch.zeros(e, D)
    tokens[:, :e] = _balanced_tokens(e)
    layer.train()
    mlp2.train()

    layer(tokens.unsqueeze(0))
    mlp2(tokens.flip(0).unsqueeze(0))
    plain = method.aux_losses(config, {"a": layer, "b": mlp2})["balance"]
    assert math.isclose(float(plain.detach()), coef * k, rel_tol=1e-6)

    # the same real tokens with padding positions full of large arbitrary hidden states
    padded = torch.randn(2, e + 3, D) * 50
    padded[0, :e] = tokens
    padded[1, 3:] = tokens.flip(0)
    mask = torch.zeros(2, e + 3, dtype=torch.long)
    mask[0, :e] = 1
    mask[1, 3:] = 1
    context.attention_mask = mask
    layer(padded)
    mlp2(padded)
    with_pad = method.aux_losses(config, {"a": layer, "b": mlp2})["balance"]
    assert math.isclose(float(with_pad.detach()), coef * k, rel_tol=1e-6)
    context.attention_mask = None  # not vacuous: counting the padding changes the loss
    layer(padded)
    assert not math.isclose(
        float(method.aux_losses(config, {"a": layer})["balance"].detach()), coef * k
    )

    layer.eval()
    layer(tokens.unsqueeze(0))
    assert method.aux_losses(config, {"a": layer}) == {}


def test_balance_loss_against_a_hand_computation() -> None:
    e, k, coef = 5, 2, 0.003
    logits = torch.randn(13, e, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n = logits.shape[0]
    share = [[0.0] * e for _ in range(k)]
    mean_p = [0.0] * e
    for t in range(n):
        z = [math.exp(v) for v in logits[t].tolist()]
        p = [v / sum(z) for v in z]
        for j, ex in enumerate(sorted(range(e), key=lambda i: -p[i])[:k]):
            share[j][ex] += 1 / n
        for ex in range(e):
            mean_p[ex] += p[ex] / n
    hand = coef * e * sum(share[j][ex] * mean_p[ex] for j in range(k) for ex in range(e))
    assert math.isclose(float(balance_loss(logits, k, coef)), hand, rel_tol=1e-6)

    # the method pools the layers' logits before computing it
    context = BatchContext()
    layers = {f"l{i}": _ffn(context, num_experts=e, top_k=k, aux_coef=coef)[0] for i in range(2)}
    x = torch.randn(2, 4, D)
    pooled = []
    for lay in layers.values():
        lay.train()
        lay(x)
        pooled.append(x.reshape(-1, D) @ lay.router.t())
    got = get_method("mixlora").aux_losses(
        MixLoRAConfig(num_experts=e, top_k=k, aux_coef=coef), layers
    )
    assert torch.allclose(got["balance"], balance_loss(torch.cat(pooled), k, coef), atol=1e-7)
    got["balance"].backward()
    assert all(lay.router.grad.abs().sum() > 0 for lay in layers.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_router_logits_are_fp32_when_activations_are_bf16(autocast: bool) -> None:
    layer, _ = _ffn(dropout=0.05)
    _randomise(layer)
    layer.base.to(torch.bfloat16)
    layer.train()
    x = torch.randn(2, 5, D).to(torch.bfloat16)
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    else:
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert layer.last_logits is not None and layer.last_logits.dtype == torch.float32
    exact = x.reshape(-1, D).double() @ layer.router.double().t()
    assert torch.allclose(layer.last_logits.double(), exact, atol=1e-5)
    out.float().sum().backward()
    assert layer.router.grad is not None and layer.router.grad.dtype == torch.float32


def test_router_stats_are_recorded_only_when_asked() -> None:
    context = BatchContext()
    layer, _ = _ffn(context, num_experts=4, top_k=2)
    layer.train()
    x = torch.randn(2, 6, D)
    layer(x)
    assert layer.stats() == {}
    context.record_stats = True
    layer(x)
    stats = layer.stats()
    assert math.isclose(sum(stats[f"load.{i}"] for i in range(4)), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(stats[f"share.{i}"] for i in range(4)), 1.0, rel_tol=1e-6)
    assert "entropy" in stats
    layer.eval()
    layer(x)
    assert layer.stats() == {}


def test_injection_layout_and_model_balance_loss() -> None:
    model, tok = load_model("tiny-llama")
    method = get_method("mixlora")
    adapted = inject(model, method, MixLoRAConfig(rank=4, num_experts=4, top_k=2))
    kinds = {name.rsplit(".", 1)[-1]: type(layer) for name, layer in adapted.layers.items()}
    assert kinds == {
        "q_proj": LoRALinear,
        "k_proj": LoRALinear,
        "v_proj": LoRALinear,
        "o_proj": LoRALinear,
        "mlp": MixLoRAFFN,
    }
    assert not adapted.mergeable
    assert method.no_weight_decay(adapted.config, "model.layers.0.mlp.router")
    assert not method.no_weight_decay(adapted.config, "model.layers.0.mlp.gate_A")
    model.train()
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    aux = adapted.collect_aux_losses()
    assert set(aux) == {"balance"} and float(aux["balance"].detach()) >= 0.001 * 2 * 0.999


def test_top_k_above_num_experts_is_rejected_naming_the_value() -> None:
    with pytest.raises(ConfigError, match=r"top_k=9 must be between 1 and num_experts=8"):
        MixLoRAConfig(top_k=9)
    with pytest.raises(ConfigError, match=r"attention_targets gate_proj"):
        MixLoRAConfig(attention_targets=("q_proj", "gate_proj"))


def test_active_parameters_count_only_the_routed_experts() -> None:
    method = get_method("mixlora")
    model, _ = load_model("tiny-qwen2")
    from moebench.method import ModelShapes

    shapes = ModelShapes.from_config(model.config)
    cfg = MixLoRAConfig()
    ffn = sum(
        cfg.rank * (shapes.linears[n].d_in + shapes.linears[n].d_out)
        for n in ("gate_proj", "up_proj", "down_proj")
    )
    diff = method.trainable_parameters(cfg, shapes) - method.active_parameters(cfg, shapes)
    assert diff == shapes.num_layers * (cfg.num_experts - cfg.top_k) * ffn


def test_unrelated_modules_are_left_alone() -> None:
    method = get_method("mixlora")
    assert (
        method.adapt_module("model.layers.0.mlp", nn.Linear(4, 4), MixLoRAConfig(), BatchContext())
        is None
    )
    assert method.target_names(MixLoRAConfig()) == ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")
