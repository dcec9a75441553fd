"""LoRAMoE and partition LoRAMoE: reductions to LoRA, the one-matmul form against the literal sum
over experts, LBC against hand-computed numbers, configs, router statistics and bf16."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from moebench.data import Example
from moebench.errors import ConfigError
from moebench.inject import inject
from moebench.method import BatchContext, PrepareContext, get_method
from moebench.methods.lora import LoRALinear
from moebench.methods.loramoe import (
    NO_TASK_TYPES_NOTE,
    LoRAMoEConfig,
    LoRAMoELinear,
    router_probs,
)
from moebench.methods.loramoe_partition import LoRAMoEPartitionConfig
from moebench.models import load_model

D_IN, D_OUT = 16, 24


def _base(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT, bias=True).to(dtype)


def _x(shape: tuple[int, ...] = (3, 5, D_IN), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _randomise(*params: torch.Tensor, seed: int = 2, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _lora_with(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, alpha: float) -> LoRALinear:
    lora = LoRALinear(base, a.shape[0], alpha, 0.0)
    with torch.no_grad():
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)
    return lora


def test_one_expert_is_lora() -> None:
    base = _base()
    moe = LoRAMoELinear(base, 1, 4, 8.0, 0.0, BatchContext())
    _randomise(moe.lora_B, moe.router)
    lora = _lora_with(base, moe.lora_A, moe.lora_B, 8.0)
    x = _x()
    with torch.no_grad():
        assert torch.allclose(moe(x), lora(x), atol=1e-6, rtol=0)
        assert (moe(x) - base(x)).abs().max() > 1e-2  # the update is not vacuous


def test_one_expert_model_matches_lora_model() -> None:
    model, tok = load_model("tiny-llama")
    ours = inject(model, get_method("loramoe"), LoRAMoEConfig(num_experts=1, lbc_beta=0.0))
    _randomise(*[p for n, p in ours.adapter_parameters() if not n.endswith("lora_A")])
    ref_model, _ = load_model("tiny-llama")
    lora_cfg = get_method("lora").config_cls(
        rank=4, target_modules=("gate_proj", "up_proj", "down_proj")
    )
    ref = inject(ref_model, get_method("lora"), lora_cfg)
    ref_params = dict(ref.adapter_parameters())
    with torch.no_grad():
        for name, p in ours.adapter_parameters():
            if not name.endswith("router"):
                ref_params[name].copy_(p)
    model.eval()
    ref_model.eval()
    ids = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref_model(input_ids=ids).logits).abs().max() < 1e-5


def test_partition_with_uniform_gates_is_lora() -> None:
    base = _base()
    method = get_method("loramoe-partition")
    cfg = LoRAMoEPartitionConfig(rank=8, alpha=16.0, num_experts=4, dropout=0.0)
    moe = method.adapt_module("mlp.up_proj", base, cfg, BatchContext())
    assert moe is not None
    assert moe.lora_A.shape == (8, D_IN) and moe.lora_B.shape == (D_OUT, 8)
    assert moe.router.shape == (4, D_IN)
    _randomise(moe.lora_B)
    with torch.no_grad():
        moe.router.zero_()
    lora = _lora_with(base, moe.lora_A, moe.lora_B, 16.0)
    x = _x()
    with torch.no_grad():
        assert torch.allclose(moe(x), lora(x), atol=1e-6, rtol=0)
        assert (moe(x) - base(x)).abs().max() > 1e-2


@pytest.mark.parametrize(("experts", "rank"), [(3, 2), (6, 4)])
def test_one_matmul_form_equals_literal_sum_over_experts(experts: int, rank: int) -> None:
    base = _base()
    moe = LoRAMoELinear(base, experts, rank, 32.0, 0.0, BatchContext())
    _randomise(moe.lora_A, moe.lora_B, moe.router, scale=0.5)
    x = _x()
    s = 32.0 / rank
    with torch.no_grad():
        g = torch.softmax(x @ moe.router.t(), dim=-1)
        want = base(x)
        for i in range(experts):
            a_i = moe.lora_A[i * rank : (i + 1) * rank]
            b_i = moe.lora_B[:, i * rank : (i + 1) * rank]
            want = want + g[..., i : i + 1] * s * (x @ a_i.t() @ b_i.t())
        assert torch.allclose(moe(x), want, atol=1e-5, rtol=1e-5)


# --- LBC on a hand-computed batch: 3 samples of 4 positions, N = 4 experts --------------------
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]  # sample 1 has two padding positions
LABELS = [1, 0, -1]  # knowledge, general, unknown (takes no part)
DELTA, BETA = 0.1, 0.5


def _lbc_layer(mask_padding: bool) -> tuple[LoRAMoELinear, torch.Tensor, torch.Tensor]:
    ctx = BatchContext(
        attention_mask=torch.tensor(MASK),
        task_labels=torch.tensor(LABELS),
    )
    moe = LoRAMoELinear(
        _base(), 4, 2, 8.0, 0.0, ctx, lbc_delta=DELTA, lbc_beta=BETA, mask_padding=mask_padding
    )
    _randomise(moe.router, scale=0.5)
    x = _x((3, 4, D_IN))
    with torch.no_grad():
        gates = torch.softmax(x @ moe.router.t(), dim=-1)
    return moe, x, gates


def _hand_lbc(gates: torch.Tensor, mask_padding: bool) -> float:
    g = gates.tolist()
    z: list[float] = []
    for m in range(3):
        if LABELS[m] < 0:
            continue
        for n in range(4):
            q = sum(g[m][t][n] for t in range(4) if MASK[m][t] or not mask_padding)
            own_half = n < 2 if LABELS[m] == 1 else n >= 2
            z.append((1 + DELTA if own_half else 1 - DELTA) * q)
    assert len(z) == 8
    return statistics.variance(z) / (statistics.mean(z) ** 2 + 1e-10)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_lbc_equals_hand_computation(mask_padding: bool) -> None:
    moe, x, gates = _lbc_layer(mask_padding)
    moe.train()
    moe(x)
    loss = moe.aux_losses()["lbc"]
    assert loss.item() == pytest.approx(BETA * _hand_lbc(gates, mask_padding), rel=1e-5)
    other = BETA * _hand_lbc(gates, not mask_padding)
    assert abs(loss.item() - other) > 1e-4  # masking padding matters on this batch
    loss.backward()  # LBC trains the router
    assert moe.router.grad is not None and moe.router.grad.abs().sum() > 0


def test_lbc_only_when_training_and_labelled() -> None:
    moe, x, _ = _lbc_layer(True)
    moe.eval()
    moe(x)
    assert moe.aux_losses() == {}
    moe.train()
    moe.context.task_labels = torch.tensor([-1, -1, -1])
    moe(x)
    assert moe.aux_losses() == {}
    moe.context.task_labels[0] = 1  # an in-place change is seen
    moe(x)
    assert "lbc" in moe.aux_losses()
    moe.context.task_labels = None
    moe(x)
    assert moe.aux_losses() == {}


def test_model_sums_lbc_over_layers_and_skips_unlabelled_batches() -> None:
    model, tok = load_model("tiny-llama")
    adapted = inject(model, get_method("loramoe"), LoRAMoEConfig())
    model.train()
    ids = torch.randint(3, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    adapted.context.attention_mask = torch.ones(2, 7, dtype=torch.long)
    adapted.context.task_labels = torch.tensor([1, 0])
    model(input_ids=ids)
    total = adapted.collect_aux_losses()["lbc"]
    per_layer = [layer.aux_losses()["lbc"] for layer in adapted.layers.values()]
    assert len(per_layer) == 3 * model.config.num_hidden_layers
    assert torch.allclose(total, sum(per_layer))
    adapted.context.task_labels = torch.tensor([-1, -1])
    model(input_ids=ids)
    assert adapted.collect_aux_losses() == {}


def _prepare_ctx(labels: list[int], tasks: list[str | None]) -> PrepareContext:
    return PrepareContext(
        model=nn.Linear(2, 2),
        examples=[Example((5, 6), (5, 6), lab) for lab in labels],
        tasks=tasks,
        model_name="none",
        seed=0,
        cache_dir=Path("."),
        device=torch.device("cpu"),
        autocast=None,
    )


def test_prepare_notes_a_mixture_without_task_types() -> None:
    method = get_method("loramoe")
    cfg = LoRAMoEConfig()
    untyped = method.prepare(cfg, _prepare_ctx([-1, -1], [None, None]))
    assert untyped.notes == [NO_TASK_TYPES_NOTE] and untyped.config == cfg
    assert method.prepare(cfg, _prepare_ctx([1, -1], ["boolq", None])).notes == []
    off = LoRAMoEConfig(lbc_beta=0.0)
    assert method.prepare(off, _prepare_ctx([-1], [None])).notes == []


def test_task_label_overrides() -> None:
    method = get_method("loramoe")
    plain = LoRAMoEConfig()
    assert method.task_label(plain, "boolq") == 1
    assert method.task_label(plain, "gsm8k") == 0
    assert method.task_label(plain, "my-task") == -1
    assert method.task_label(plain, None) == -1
    cfg = LoRAMoEConfig(knowledge_tasks=("gsm8k", "my-task"), general_tasks=("boolq",))
    assert method.task_label(cfg, "gsm8k") == 1
    assert method.task_label(cfg, "my-task") == 1
    assert method.task_label(cfg, "boolq") == 0
    assert method.task_label(cfg, "piqa") == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 5}, r"num_experts=5 must be even while LBC is on"),
        ({"num_experts": 0}, r"num_experts=0 is out of range.*\[1, 1024\]"),
        ({"rank": 0}, r"rank=0 is out of range.*\[1, 65536\]"),
        ({"dropout": 1.0}, r"dropout=1.0 is out of range.*\[0, 1\)"),
        ({"lbc_delta": 1.0}, r"lbc_delta=1.0 is out of range.*\[0, 1\)"),
        ({"lbc_beta": -0.1}, r"lbc_beta=-0.1 is out of range.*\[0, 1000\]"),
        (
            {"knowledge_tasks": ("boolq",), "general_tasks": ("BoolQ",)},
            r"boolq appear in both knowledge_tasks and general_tasks",
        ),
    ],
)
def test_bad_loramoe_configs_are_named(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        LoRAMoEConfig(**kwargs)


def test_odd_experts_are_fine_without_lbc_and_partition_needs_divisible_rank() -> None:
    LoRAMoEConfig(num_experts=5, lbc_beta=0.0)
    with pytest.raises(ConfigError, match=r"rank=10 must be a multiple of num_experts=4"):
        LoRAMoEPartitionConfig(rank=10, num_experts=4)
    with pytest.raises(ConfigError, match=r"num_experts=0 is out of range.*\[1, 1024\]"):
        LoRAMoEPartitionConfig(num_experts=0)
    LoRAMoEPartitionConfig(rank=12, num_experts=3)


def test_router_stats_only_when_asked() -> None:
    ctx = BatchContext(attention_mask=torch.tensor(MASK))
    moe = LoRAMoELinear(_base(), 4, 2, 8.0, 0.0, ctx)
    _randomise(moe.router, scale=0.5)
    x = _x((3, 4, D_IN))
    moe.train()
    moe(x)
    assert moe.stats() == {}
    ctx.record_stats = True
    moe.eval()
    moe(x)
    assert moe.stats() == {}
    moe.train()
    moe(x)
    moe(x)
    stats = moe.stats()
    shares = [stats[f"share.{i}"] for i in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert 0 < stats["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    with torch.no_grad():  # the shares are the mean gate over real tokens only
        g = torch.softmax(x @ moe.router.t(), dim=-1)[torch.tensor(MASK).bool()]
    assert shares == pytest.approx(g.mean(0).tolist(), abs=1e-6)
    assert moe.stats() == {}  # reset after reading


def test_no_weight_decay_on_the_router_only() -> None:
    for name in ("loramoe", "loramoe-partition"):
        method = get_method(name)
        cfg = method.config_cls()
        assert method.no_weight_decay(cfg, "model.layers.0.mlp.up_proj.router")
        assert not method.no_weight_decay(cfg, "model.layers.0.mlp.up_proj.lora_A")


def test_bf16_base_and_input_with_fp32_adapters() -> None:
    ctx = BatchContext(
        attention_mask=torch.tensor(MASK),
        task_labels=torch.tensor(LABELS),
    )
    moe = LoRAMoELinear(_base(dtype=torch.bfloat16), 4, 2, 8.0, 0.05, ctx, lbc_beta=0.1)
    for p in moe.base.parameters():
        p.requires_grad_(False)
    _randomise(moe.lora_B, moe.router)
    assert moe.lora_A.dtype == torch.float32 and moe.router.dtype == torch.float32
    x = _x((3, 4, D_IN)).to(torch.bfloat16).requires_grad_(True)
    moe.train()
    out = moe(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    (out.float().sum() + moe.aux_losses()["lbc"]).backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    for p in (moe.lora_A, moe.lora_B, moe.router):
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_fp32_router_gradient_matches_plain_autograd() -> None:
    x = _x((2, 3, D_IN)).requires_grad_(True)
    w = torch.randn(4, D_IN, requires_grad=True)
    up = torch.randn(2, 3, 4)
    (router_probs(x, w) * up).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (torch.softmax(x @ w.t(), dim=-1) * up).sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router_probs(x.to(torch.bfloat16), w).dtype == torch.float32
