"""Properties every registered method must have; a new plugin is tested once registered."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from moebench.data import IGNORE_INDEX, collate
from moebench.method import ModelShapes, get_method
from moebench.models import count_parameters, load_model, tiny_config
from moebench.train import set_phase_trainable, token_loss_sum
from tests.conftest import METHOD_NAMES, TINY_MODELS, adapt, synthetic_examples


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
    adapted = adapt(model, method)
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
    adapted = adapt(model, method)
    trainable, _ = count_parameters(model)
    shapes = ModelShapes.from_config(model.config)
    assert m.trainable_parameters(adapted.config, shapes) == trainable
    assert 0 < m.active_parameters(adapted.config, shapes) <= trainable


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_phase_trains_exactly_its_trainable_set(method: str) -> None:
    """Two SGD steps per phase, through the loop's own loss and phase switch: every tensor the
    phase trains gets a non-zero gradient (B starts at zero, so A's only after a step); every
    tensor it holds back gets none and stays bitwise unchanged (LoRACoE's router in warm-up)."""
    model, tok = load_model("tiny-qwen2")
    adapted = adapt(model, method)
    examples, _ = synthetic_examples(len(tok))
    batch = collate(examples[:4], tok.pad_token_id)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    adapted.context.attention_mask = batch["attention_mask"]
    adapted.context.task_labels = batch["task_labels"]
    opt = torch.optim.SGD([p for _, p in adapted.adapter_parameters()], lr=1e-2)
    model.train()
    for phase in adapted.method.phases(adapted.config):
        adapted.context.phase = phase.name
        trainable = {id(p) for p in set_phase_trainable(adapted, phase)}
        frozen = {
            n: p.detach().clone() for n, p in adapted.adapter_parameters() if id(p) not in trainable
        }
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = token_loss_sum(adapted, batch) / n_tokens
            loss = loss + sum(adapted.collect_aux_losses().values(), torch.zeros(()))
            loss.backward()
            opt.step()
        for name, p in adapted.adapter_parameters():
            if id(p) in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{phase.name}: {name}"
            else:
                assert p.grad is None, f"{phase.name}: {name} got a gradient"
                assert torch.equal(p, frozen[name]), f"{phase.name}: {name} changed"
