"""The seed paper's ablations as configurations: LoRACoE without its router at inference
(Table 2's last row), the router warmed up with LoRA (Table 3), and the sweep files that list
them. The switches are new fields: at their defaults they must leave every run's hash as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from moebench.config import config_hash, without_execution
from moebench.method import BatchContext, get_method
from moebench.methods.loracoe import JOINT, WARMUP, LoRACoELinear
from moebench.runspec import resolve
from moebench.sweep import load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
OPTIONS = {"method": "loracoe", "model": "tiny-llama"}


def test_the_switches_at_their_defaults_leave_the_hash_as_before_they_existed() -> None:
    spec = resolve(options=OPTIONS)
    before = without_execution(spec.to_dict())
    for key in ("eval_gates", "warmup_router"):
        assert key in before["method_config"]  # stored with the run all the same
        del before["method_config"][key]
    assert spec.hash == config_hash(before)
    assert resolve(options=OPTIONS, sets=[("eval_gates", "router")]).hash == spec.hash
    for key, value in (("eval_gates", "uniform"), ("warmup_router", "true")):
        assert resolve(options=OPTIONS, sets=[(key, value)]).hash != spec.hash, key


def _layer(**changes: object) -> tuple[LoRACoELinear, BatchContext]:
    config = dataclasses.replace(get_method("loracoe").config_cls(dropout=0.0), **changes)
    g = torch.Generator().manual_seed(0)
    context = BatchContext(phase=JOINT)
    torch.manual_seed(0)  # the same base weights in every layer made here
    layer = LoRACoELinear(nn.Linear(6, 5), config, context)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.router):
            p.copy_(torch.randn(p.shape, generator=g))
    return layer, context


def test_uniform_eval_gates_drop_the_router_only_when_not_training() -> None:
    layer, _ = _layer(eval_gates="uniform", gate_scale=3.0)
    routed, _ = _layer(gate_scale=3.0)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = layer.base(x) + layer.scaling * 3.0 / layer.rank * (x @ layer.lora_A.t()) @ (
        layer.lora_B.t()
    )
    layer.eval()
    routed.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
        assert (routed(x) - want).abs().max() > 1e-3  # the router does change the output
        layer.train()
        torch.testing.assert_close(layer(x), routed(x))  # training still routes


def test_router_warmup_gates_and_trains_the_router_in_the_warmup() -> None:
    method = get_method("loracoe")
    on = method.phases(method.config_cls(warmup_router=True))
    off = method.phases(method.config_cls())
    assert [p.name for p in on] == [WARMUP, JOINT] and on[0].trainable is None
    assert off[0].trainable is not None and not off[0].trainable("model.layers.0.q_proj.router")
    layer, context = _layer(warmup_router=True)
    context.phase = WARMUP
    assert layer.gated()
    plain, context = _layer()
    context.phase = WARMUP
    assert not plain.gated()


@pytest.mark.parametrize("name", ["ablation-table2", "ablation-table3"])
def test_the_ablation_sweeps_expand(name: str) -> None:
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    configs = [j.spec.method_config for j in sweep.jobs]
    if name == "ablation-table2":
        grid = {(c.rank, c.num_experts, c.eval_gates) for c in configs}
        assert grid == {
            (8, 2, "router"), (16, 2, "router"), (32, 2, "router"), (16, 4, "router"),
            (16, 8, "router"), (16, 2, "uniform"),
        }  # fmt: skip
    else:
        coe = [c for j, c in zip(sweep.jobs, configs, strict=True) if j.spec.method == "loracoe"]
        assert {(c.warmup_fraction, c.warmup_router) for c in coe} == {
            (0.5, True),
            (0.5, False),
            (0.0, False),
        }
        assert {j.spec.method for j in sweep.jobs} == {"lora", "loramoe-partition", "loracoe"}
