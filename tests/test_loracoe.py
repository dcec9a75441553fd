"""LoRACoE (the seed paper): the mean-gate form against the literal double sum, the fused
forward against the unfused one, and the two-phase schedule with its frozen router."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from moebench.errors import ConfigError
from moebench.method import BatchContext, get_method
from moebench.methods.lora import LoRALinear
from moebench.methods.loracoe import JOINT, WARMUP, LoRACoEConfig, LoRACoELinear
from moebench.models import load_model
from moebench.train import StepLog, TrainConfig, TrainHooks, train
from tests.conftest import adapt, synthetic_examples


def _layer(cfg: LoRACoEConfig, phase: str | None = None, seed: int = 0) -> LoRACoELinear:
    torch.manual_seed(seed)
    layer = LoRACoELinear(nn.Linear(24, 20), cfg, BatchContext(phase=phase))
    with torch.no_grad():  # random everything, so no term of the formula is trivially zero
        layer.lora_B.normal_()
        layer.router.normal_()
    return layer.eval()


def literal_double_sum(layer: LoRACoELinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula term by term, for tests: (1/E) sum_i sum_j G_ij B_j A_j x."""
    e, r = layer.num_experts, layer.rank
    logits = x.float() @ layer.router.t()
    total = torch.zeros(*x.shape[:-1], layer.lora_B.shape[0])
    for i in range(e):
        g_i = logits[..., i * r : (i + 1) * r].softmax(-1)
        for j in range(r):
            a_j, b_j = layer.lora_A[j], layer.lora_B[:, j]
            total = total + g_i[..., j : j + 1] * (x.float() @ a_j)[..., None] * b_j
    return layer.base(x) + layer.scaling * layer.gate_scale * total / e


@pytest.mark.parametrize("experts", [1, 2, 3])
def test_fused_equals_unfused_equals_the_literal_double_sum(experts: int) -> None:
    cfg = LoRACoEConfig(rank=5, num_experts=experts, dropout=0.0)
    fused = _layer(cfg)
    assert fused.fused  # the default
    unfused = _layer(dataclasses.replace(cfg, fused=False))
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        a, b, c = fused(x), unfused(x), literal_double_sum(fused, x)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(a, c, atol=1e-5, rtol=0)
    assert (a - fused.base(x)).abs().max() > 1e-2  # the adapter contributes


def test_under_dropout_unfused_routes_on_raw_x_and_fused_on_dropped_x() -> None:
    cfg = LoRACoEConfig(rank=4, dropout=0.5, fused=False)
    layer = _layer(cfg).train()
    x = torch.randn(2, 3, 24)
    torch.manual_seed(1)
    out = layer(x)
    # the same dropout mask, by hand, with gates from the raw x
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    g = (x @ layer.router.t()).unflatten(-1, (2, 4)).softmax(-1).mean(-2)
    expected = layer.base(x) + layer.scaling * ((dropped @ layer.lora_A.t()) * g) @ layer.lora_B.t()
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    fused = _layer(dataclasses.replace(cfg, fused=True)).train()
    torch.manual_seed(1)
    out = fused(x)
    g = (dropped @ fused.router.t()).unflatten(-1, (2, 4)).softmax(-1).mean(-2)
    expected = fused.base(x) + fused.scaling * ((dropped @ fused.lora_A.t()) * g) @ fused.lora_B.t()
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_warmup_is_plain_lora_and_uniform_gates_shrink_it_r_fold() -> None:
    cfg = LoRACoEConfig(rank=8, dropout=0.0)
    layer = _layer(cfg, phase=WARMUP)
    with torch.no_grad():
        layer.router.zero_()
    lora = LoRALinear(layer.base, 8, cfg.alpha, 0.0).eval()
    with torch.no_grad():
        lora.lora_A.copy_(layer.lora_A)
        lora.lora_B.copy_(layer.lora_B)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        base, plain = layer.base(x), lora(x)
        assert torch.allclose(layer(x), plain, atol=1e-6)
        layer.context.phase = JOINT
        assert torch.allclose(layer(x) - base, (plain - base) / 8, atol=1e-6)
        layer.gate_scale = 8.0  # the `gate_scale = r` switch: continuous at the switch
        assert torch.allclose(layer(x), plain, atol=1e-6)


def test_config_defaults_and_validation() -> None:
    cfg = LoRACoEConfig()
    assert (cfg.rank, cfg.alpha, cfg.num_experts, cfg.router_init) == (16, 32.0, 2, "zeros")
    assert (cfg.warmup_fraction, cfg.warmup_lr, cfg.joint_lr, cfg.gate_scale) == (
        0.5,
        2e-4,
        5e-5,
        1.0,
    )
    with pytest.raises(ConfigError, match=r"num_experts=0 is out of range.*\[1, 1024\]"):
        LoRACoEConfig(num_experts=0)
    with pytest.raises(ConfigError, match=r"warmup_fraction=1\.0 is out of range.*\[0, 1\)"):
        LoRACoEConfig(warmup_fraction=1.0)


def _run(tmp: Path, cfg: LoRACoEConfig, steps: int = 6, **train_kw):  # type: ignore[no-untyped-def]
    model, tok = load_model("tiny-llama")
    adapted = adapt(model, "loracoe", cfg)
    examples, _ = synthetic_examples(len(tok), n=16)
    logs: list[StepLog] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {0: adapted.adapter_state_dict()}

    def on_step(s: StepLog) -> None:
        logs.append(s)
        snapshots[s.step] = adapted.adapter_state_dict()

    tc = TrainConfig(
        max_steps=steps,
        batch_size=4,
        micro_batch_size=2,
        warmup_steps=0,
        checkpoint_every=None,
        stats_every=100,
        **{"lr": 1e-2, **train_kw},
    )
    train(adapted, examples, tc, seed=0, checkpoint_root=tmp, hooks=TrainHooks(on_step=on_step))
    return adapted, logs, snapshots


def test_router_is_bitwise_frozen_and_undecayed_in_warmup_then_trains(tmp_path: Path) -> None:
    # a non-zero router, so decay (which leaves zeros at zero) would show if it were applied
    cfg = LoRACoEConfig(warmup_lr=None, joint_lr=None, router_init="normal")
    adapted, logs, snaps = _run(tmp_path, cfg, weight_decay=0.1)
    assert [s.phase for s in logs] == [WARMUP] * 3 + [JOINT] * 3
    routers = [k for k in snaps[0] if k.endswith(".router")]
    others = [k for k in snaps[0] if not k.endswith(".router")]
    assert routers and others
    for k in routers:
        assert torch.equal(snaps[3][k], snaps[0][k]), k  # through all of warm-up, decay on
        assert not torch.equal(snaps[6][k], snaps[3][k]), k
    assert all(not torch.equal(snaps[3][k], snaps[0][k]) for k in others if "lora_B" in k)
    assert adapted.method.no_weight_decay(cfg, routers[0])


def test_phase_learning_rates_follow_the_paper(tmp_path: Path) -> None:
    _, logs, _ = _run(tmp_path, LoRACoEConfig())
    assert [s.lr for s in logs[:3]] == pytest.approx([2e-4, 2e-4 * 2 / 3, 2e-4 / 3])
    assert [s.lr for s in logs[3:]] == pytest.approx([5e-5, 5e-5 * 2 / 3, 5e-5 / 3])


@pytest.mark.parametrize(("gate_scale", "expected"), [(1.0, 1 / 16), (16.0, 1.0)])
def test_adapter_norm_is_logged_on_both_sides_of_the_switch(
    tmp_path: Path, gate_scale: float, expected: float
) -> None:
    cfg = LoRACoEConfig(gate_scale=gate_scale, dropout=0.0, warmup_lr=None, joint_lr=1e-9)
    _, logs, _ = _run(tmp_path, cfg, lr=1e-3)
    last_warm, first_joint = logs[2], logs[3]
    norms = {
        step.phase: [v for k, v in step.stats.items() if k.endswith(".out_norm")]
        for step in (last_warm, first_joint)
    }
    assert len(norms[WARMUP]) == len(norms[JOINT]) > 0
    ratio = sum(norms[JOINT]) / sum(norms[WARMUP])
    # one lr=1e-3 step separates the two measurements, so the ratio is close, not exact
    assert ratio == pytest.approx(expected, rel=0.15)
    gates = [v for k, v in first_joint.stats.items() if ".share." in k]
    assert len(gates) == 16 * len(norms[JOINT])  # per-rank mean gate, for every layer
    assert all(v == pytest.approx(1 / 16, abs=1e-3) for v in gates)  # zero router: uniform
    assert not any(".share." in k for k in last_warm.stats)  # no gates in warm-up


def test_method_declares_two_phases_with_a_router_free_warmup() -> None:
    m = get_method("loracoe")
    warm, joint = m.phases(LoRACoEConfig())
    assert (warm.name, warm.fraction, joint.fraction) == (WARMUP, 0.5, 0.5)
    assert warm.trainable is not None
    assert not warm.trainable("model.layers.0.self_attn.q_proj.router")
    assert warm.trainable("model.layers.0.self_attn.q_proj.lora_A")
    assert joint.trainable is None
    (only,) = m.phases(LoRACoEConfig(warmup_fraction=0.0))
    assert only.name == JOINT and only.fraction == 1.0


def test_fused_backward_matches_finite_differences_in_float64() -> None:
    """The fused path's hand-written backward against torch.autograd.gradcheck, every input."""
    from moebench.methods.loracoe import _FusedCoE

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    router = torch.randn(3 * 4, 6, dtype=torch.float64, requires_grad=True)

    def gated(x: torch.Tensor, a: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
        return _FusedCoE.apply(x, a, router, 3, 0.7)[0]

    assert torch.autograd.gradcheck(gated, (x, a, router))


@pytest.mark.parametrize("gate_scale", [1.0, 5.0])
def test_fused_and_unfused_give_the_same_gradients(gate_scale: float) -> None:
    cfg = LoRACoEConfig(rank=5, num_experts=3, dropout=0.0, gate_scale=gate_scale)
    layers = [_layer(cfg).train(), _layer(dataclasses.replace(cfg, fused=False)).train()]
    x = torch.randn(3, 7, 24)
    target = torch.randn(3, 7, 20)
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        ((layer(xi) - target) ** 2).sum().backward()
        names = ("lora_A", "lora_B", "router")
        grads.append([getattr(layer, n).grad for n in names] + [xi.grad])
    for fused, unfused in zip(*grads, strict=True):
        assert fused.abs().max() > 0
        torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)  # fp32 rounding


def test_fused_path_records_the_same_router_statistics_as_unfused() -> None:
    cfg = LoRACoEConfig(rank=4, num_experts=2, dropout=0.0)
    x = torch.randn(2, 5, 24)
    summaries = []
    for fused in (True, False):
        layer = _layer(dataclasses.replace(cfg, fused=fused)).train()
        layer.context.record_stats = True
        layer(x)
        summaries.append(layer.stats())
    assert summaries[0].keys() == summaries[1].keys() >= {"share.0", "entropy", "out_norm"}
    for key in summaries[0]:
        assert summaries[0][key] == pytest.approx(summaries[1][key], rel=1e-5)


def test_fused_path_under_bf16_autocast_keeps_router_math_in_fp32() -> None:
    """bf16 activations and fp32 adapters as the GPU runner has them, on CPU autocast."""
    from moebench.methods.loracoe import _FusedCoE

    cfg = LoRACoEConfig(rank=4, dropout=0.0)
    layer = _layer(cfg).train()
    layer.base.to(torch.bfloat16)
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        gated, gates = _FusedCoE.apply(x, layer.lora_A, layer.router, 2, layer.scaling)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert layer.router.grad is not None and layer.router.grad.dtype == torch.float32
    with torch.no_grad():  # the fp32 formula on the same (bf16-valued) input
        xf = x.float()
        expected_gates = (xf @ layer.router.t()).unflatten(-1, (2, 4)).softmax(-1)
        expected = (xf @ layer.lora_A.t()) * expected_gates.mean(-2) * layer.scaling
    # bf16 router logits would be off by ~1e-2 here; fp32 agrees to rounding
    assert gates.dtype == gated.dtype == torch.float32
    torch.testing.assert_close(gates.view(2, 5, 2, 4), expected_gates, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gated.view(2, 5, 4), expected, atol=1e-5, rtol=1e-5)
