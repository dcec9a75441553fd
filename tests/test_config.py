"""Config resolution: precedence, coercion by annotation, and errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench.config import load_file
from moebench.errors import ConfigError, MoebenchError
from moebench.runspec import resolve


def test_precedence_field_suite_file_set_option(tmp_path: Path) -> None:
    spec = resolve()
    assert spec.method == "lora" and spec.model == "smollm2-135m" and spec.suite == "mini"
    assert spec.train.lr == 3e-4  # field default
    assert spec.train.epochs == 1.0  # mini suite default over the field's 4.0
    assert spec.eval.num_beams == 1

    f = tmp_path / "c.toml"
    f.write_text(
        'model = "tiny-llama"\n[train]\nepochs = 2.0\nlr = 1e-4\n[method_config]\nrank = 4\n'
    )
    spec = resolve(base=load_file(f))
    assert (spec.model, spec.train.epochs, spec.train.lr, spec.method_config.rank) == (
        "tiny-llama",
        2.0,
        1e-4,
        4,
    )

    spec = resolve(
        base=load_file(f),
        sets=[("lr", "5e-5"), ("method.rank", "8")],
        options={"max_steps": 3, "model": "tiny-qwen2"},
    )
    assert (spec.train.lr, spec.method_config.rank, spec.train.max_steps, spec.model) == (
        5e-5,
        8,
        3,
        "tiny-qwen2",
    )


def test_coercion_by_annotation() -> None:
    spec = resolve(
        sets=[
            ("target_modules", "q_proj,v_proj"),
            ("max_grad_norm", "none"),
            ("train_on_prompt", "true"),
            ("eval.limit", "5"),
        ]
    )
    assert spec.method_config.target_modules == ("q_proj", "v_proj")
    assert spec.train.max_grad_norm is None
    assert spec.train.train_on_prompt is True
    assert spec.eval.limit == 5


def test_stored_config_round_trips_to_the_same_hash() -> None:
    spec = resolve(sets=[("rank", "4")], options={"model": "tiny-llama", "seed": 3})
    again = resolve(base=json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.hash == spec.hash
    assert resolve(options={"seed": 4}).hash != resolve(options={"seed": 3}).hash


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        resolve(sets=[("rank", "0"), ("lr", "-1"), ("micro_batch_size", "3")])
    msg = str(e.value)
    assert "rank=0" in msg and "lr=-1.0" in msg and "multiple of micro_batch_size=3" in msg


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"options": {"method": "loar"}}, "Did you mean 'lora'?"),
        ({"options": {"suite": "big"}}, "Unknown suite 'big'"),
        ({"sets": [("rnak", "4")]}, "did you mean 'rank'"),
        ({"sets": [("batch_size", "4")]}, "ambiguous; write train.batch_size or eval.batch_size"),
        ({"sets": [("eval.mode", "vibes")]}, "expected one of: generate, loglik"),
        ({"base": {"trian": {}}}, "Did you mean 'train'?"),
        ({"sets": [("foo.bar", "1")]}, "Unknown config section 'foo'"),
        ({"base": {"train": [1, 2]}}, "Config section 'train' must be a table"),
        ({"sets": [("eval.template", "alpacca")]}, "template='alpacca' is not one of alpaca"),
        ({"sets": [("epochs", "inf")]}, "is not a finite number"),
        ({"sets": [("target_modules", "q_proj,")]}, "has an empty item"),
        ({"sets": [("rnak", "1"), ("lrr", "2")]}, "'rnak'"),
        ({"options": {"model": "gpt-nothing"}}, "Unknown model 'gpt-nothing'"),
    ],
)
def test_bad_keys_and_values_name_what_is_accepted(kw, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MoebenchError) as e:
        resolve(**kw)
    assert needle.lower() in str(e.value).lower()


def test_all_unknown_keys_are_reported_together() -> None:
    with pytest.raises(ConfigError) as e:
        resolve(sets=[("rnak", "1"), ("lrr", "2")])
    assert "'rnak'" in str(e.value) and "'lrr'" in str(e.value)


def test_a_misspelt_target_module_is_named() -> None:
    from moebench.inject import inject
    from moebench.method import get_method
    from moebench.models import load_model

    model, _ = load_model("tiny-llama")
    cfg = get_method("lora").config_cls(target_modules=("q_proj", "v_prj"))
    with pytest.raises(ConfigError, match=r"v_prj matched no module .* v_proj"):
        inject(model, get_method("lora"), cfg)
