"""Properties every registered method must have; a new plugin is tested once registered."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moebench.inject import inject
from moebench.method import ModelShapes, get_method
from moebench.models import count_parameters, load_model, tiny_config
from tests.conftest import METHOD_NAMES, TINY_MODELS


def _ids(tok, n: int = 3, length: int = 12) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, len(tok), (n, length), generator=g)


def _default(name: str):  # type: ignore[no-untyped-def]
    return get_method(name).config_cls()


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_initial_adapter_reproduces_base_logits(method: str, model_name: str) -> None:
    model, tok = load_model(model_name)
    ids = _ids(tok)
    with torch.no_grad():
        base = model(input_ids=ids).logits.clone()
    adapted = inject(model, get_method(method), _default(method))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.allclose(out, base, atol=1e-5, rtol=0)
    assert adapted.layers, "the method adapted nothing"


def _odd_ffn_model():  # type: ignore[no-untyped-def]
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg)


SHAPES = {
    "llama-mha": lambda: AutoModelForCausalLM.from_config(tiny_config("llama", 512)),
    "qwen2-gqa": lambda: AutoModelForCausalLM.from_config(tiny_config("qwen2", 512)),
    "gqa-dff-200": _odd_ffn_model,
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_closed_form_count_matches_trainable_tensors(method: str, shape: str) -> None:
    model = SHAPES[shape]()
    m = get_method(method)
    cfg = _default(method)
    inject(model, m, cfg)
    trainable, _ = count_parameters(model)
    assert m.trainable_parameters(cfg, ModelShapes.from_config(model.config)) == trainable


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_step_gives_every_trainable_tensor_a_gradient(method: str) -> None:
    model, tok = load_model("tiny-qwen2")
    m = get_method(method)
    adapted = inject(model, m, _default(method))
    # B starts at zero, so A's gradient is zero at step 0: take one step first, as training does.
    opt = torch.optim.SGD([p for _, p in adapted.adapter_parameters()], lr=1e-2)
    ids = _ids(tok)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in adapted.adapter_parameters():
            assert p.grad is not None, name
        opt.step()
    for name, p in adapted.adapter_parameters():
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
