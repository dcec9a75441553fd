"""Budget matching: targets, the solver, the seed paper's Table 8 observation, GQA shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moebench.budget import parse_target, solve, solve_all
from moebench.errors import MoebenchError
from moebench.inject import inject
from moebench.method import ModelShapes, get_method
from moebench.models import count_parameters, model_config, total_parameters
from tests.conftest import METHOD_NAMES
from tests.test_cli import moebench


def _shapes(name: str) -> tuple[ModelShapes, int]:
    config = model_config(name)
    return ModelShapes.from_config(config), total_parameters(config)


def test_known_shapes_give_the_published_model_sizes() -> None:
    assert _shapes("llama2-7b")[1] == 6_738_415_616
    assert _shapes("qwen2-0.5b")[1] == 494_032_768
    assert _shapes("smollm2-135m")[1] == 134_515_008


def test_lora_count_on_qwen2_counts_the_narrow_gqa_projections() -> None:
    shapes, _ = _shapes("qwen2-0.5b")
    # Qwen2-0.5B: d=896, 14 heads of 64, 2 KV heads -> k/v project to 128; d_ff=4864; 24 layers.
    per_rank = (896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896)
    cfg = get_method("lora").config_cls(rank=16)
    assert get_method("lora").trainable_parameters(cfg, shapes) == 24 * 16 * per_rank


def test_table8_loracoe_r8_e2_matches_lora_r16() -> None:
    """The seed paper's Table 8: LoRACoE r=8, E=2 has LoRA r=16's trainable-parameter ratio.

    Exactly so when every adapted linear pairs with its transpose (q,k,v,o,up,down on Llama-2);
    within 5% with all seven linears, where gate_proj has no partner.
    """
    shapes, _ = _shapes("llama2-7b")
    lora, coe = get_method("lora"), get_method("loracoe")
    paired = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    a = lora.trainable_parameters(lora.config_cls(rank=16, target_modules=paired), shapes)
    b = coe.trainable_parameters(
        coe.config_cls(rank=8, num_experts=2, target_modules=paired), shapes
    )
    assert a == b
    target = parse_target("lora:r=16", shapes, 1)
    solution = solve(coe, coe.config_cls(), shapes, target.params)
    assert solution.knobs == {"rank": 8, "num_experts": 2}
    assert solution.within(0.05)


def test_moebench_budget_prints_table8(tmp_path: Path) -> None:
    r = moebench("budget", "--model", "llama2-7b", "--target", "lora:r=16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "loracoe" in line)
    assert "rank=8, num_experts=2" in row and "yes" in row
    assert "39,976,960" in r.stdout  # LoRA r=16 on all seven linears of Llama-2-7B


@pytest.mark.parametrize("model", ["qwen2-0.5b", "llama2-7b"])
def test_every_method_lands_within_five_percent_of_lora_r16(model: str) -> None:
    shapes, total = _shapes(model)
    target = parse_target("lora:r=16", shapes, total).params
    for s in solve_all(shapes, target):
        method = get_method(s.method)
        if s.achieved is None:
            assert method.budget_target_field is not None
            assert getattr(s.config, method.budget_target_field) == target
            continue
        assert s.achieved == method.trainable_parameters(s.config, shapes)
        assert abs(s.achieved / target - 1) <= 0.05, (s.method, s.knobs, s.achieved, target)
        assert s.active is not None and 0 < s.active <= s.achieved


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_solved_counts_equal_real_tensors_on_a_gqa_model(method: str) -> None:
    """Inject each solved config into a Qwen2-0.5B-shaped model (weights on the meta device)
    and count the adapter tensors it really creates."""
    m = get_method(method)
    if m.budget_target_field is not None:
        pytest.skip(f"{method} is sized by its preparation stage")
    config = model_config("qwen2-0.5b")
    shapes = ModelShapes.from_config(config)
    s = solve(m, m.config_cls(), shapes, parse_target("lora:r=8", shapes, 1).params)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inject(model, m, s.config)
    assert count_parameters(model)[0] == s.achieved


def test_targets_parse_as_shares_counts_and_configs() -> None:
    shapes, total = _shapes("smollm2-135m")
    assert parse_target("0.5%", shapes, total).params == round(0.005 * total)
    assert parse_target("2.3M", shapes, total).params == 2_300_000
    assert parse_target("1500", shapes, total).params == 1500
    t = parse_target("loracoe:r=8,E=2", shapes, total)
    assert t.method == "loracoe" and t.config is not None and t.config["rank"] == 8
    for bad, needle in [
        ("lots", "is not understood"),
        ("lora:r", "not key=value"),
        ("lora:rank=-1", r"rank=-1 is out of range; accepted: an integer in \[1, 65536\]"),
        ("lroa:r=4", "Unknown method 'lroa'"),
    ]:
        with pytest.raises(MoebenchError, match=needle):
            parse_target(bad, shapes, total)


def test_budget_cli_bad_input_is_one_sentence(tmp_path: Path) -> None:
    r = moebench("budget", "--model", "tiny-llama", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "Give exactly one of --target" in r.stderr
