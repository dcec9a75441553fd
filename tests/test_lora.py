"""LoRA against peft's implementation, and merging."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from moebench.inject import inject
from moebench.method import get_method
from moebench.models import load_model
from tests.conftest import TINY_MODELS


def _adapted_with_random_b(model_name: str, **cfg):  # type: ignore[no-untyped-def]
    model, tok = load_model(model_name)
    method = get_method("lora")
    adapted = inject(model, method, method.config_cls(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.adapter_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapted, tok


@pytest.mark.parametrize("model_name", TINY_MODELS)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), None])
def test_lora_equals_peft_for_the_same_weights(model_name: str, targets) -> None:  # type: ignore[no-untyped-def]
    kw = {"rank": 8, "alpha": 16.0}
    if targets:
        kw["target_modules"] = targets
    ours, tok = _adapted_with_random_b(model_name, **kw)
    base, _ = load_model(model_name)
    peft_cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=list(ours.config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, peft_cfg)
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in ours.adapter_parameters():
            prefix, factor = name.rsplit(".", 1)
            peft_params[f"base_model.model.{prefix}.{factor}.default.weight"].copy_(p)
            copied += 1
    assert copied == sum(1 for n in peft_params if "lora_" in n)
    ours.model.eval()
    peft_model.eval()
    ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
        b = peft_model(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5
    # and the adapter really changes the output, so the comparison is not vacuous
    plain, _ = load_model(model_name)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - a).abs().max() > 1e-3


def test_merge_gives_the_same_function_and_unmerge_restores_weights() -> None:
    adapted, tok = _adapted_with_random_b("tiny-llama", rank=4, alpha=8.0)
    adapted.model.eval()
    ids = torch.randint(3, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in adapted.model.named_parameters() if ".base." in n}
    with torch.no_grad():
        unmerged = adapted.model(input_ids=ids).logits
        adapted.merge()
        merged = adapted.model(input_ids=ids).logits
        adapted.unmerge()
    assert (merged - unmerged).abs().max() <= 1e-5
    for n, p in adapted.model.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6)


def test_negative_rank_is_rejected_with_one_sentence() -> None:
    from moebench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"rank=-2 is out of range.*\[1, 65536\]"):
        get_method("lora").config_cls(rank=-2)


@pytest.mark.parametrize(
    ("out_dtype", "autocast"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
)
def test_add_low_rank_equals_the_plain_sum(out_dtype: torch.dtype, autocast: bool) -> None:
    """The one-addmm path and the cast-then-add fallback both give `out + h @ B^T`."""
    from moebench.components import add_low_rank

    torch.manual_seed(0)
    out = torch.randn(2, 5, 12).to(out_dtype)
    h, b = torch.randn(2, 5, 4), torch.randn(12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = add_low_rank(out, h, b)
    assert got.shape == out.shape and got.dtype == out_dtype
    expected = out.float() + h @ b.t()
    tol = 1e-6 if out_dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0.02)
