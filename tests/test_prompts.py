"""Prompt templates: exact strings, since a changed byte changes every score made with them."""

from __future__ import annotations

import pytest

from moebench.errors import ConfigError
from moebench.prompts import RESPONSE_MARKER, TEMPLATES, build_prompt
from moebench.task import LOGLIK_PREFIX

SIXTEEN = " " * 16


def test_alpaca_no_input_is_the_canonical_string() -> None:
    assert build_prompt("alpaca", "Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )


def test_alpaca_with_input_is_the_standard_form() -> None:
    assert build_prompt("alpaca", "Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


def test_llm_adapters_train_matches_finetune_py() -> None:
    # finetune.py: two spaces after "request.", and the blank line holds 16 spaces.
    assert build_prompt("llm-adapters-train", "Q") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.  \n\n"
        "                ### Instruction:\n"
        "                Q\n"
        "                \n"
        "                ### Response:\n"
        "                "
    )
    assert build_prompt("llm-adapters-train", "Q", "I") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request. \n\n"
        "                ### Instruction:\n"
        "                Q\n"
        "                \n"
        "                ### Input:\n"
        "                I\n"
        "                \n"
        "                ### Response:\n"
        "                "
    )


def test_llm_adapters_eval_matches_evaluate_py() -> None:
    # commonsense_evaluate.py / evaluate.py: one space after "request.", empty blank lines.
    assert build_prompt("llm-adapters-eval", "Q") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request. \n\n"
        "                ### Instruction:\n"
        "                Q\n"
        "\n"
        "                ### Response:\n"
        "                "
    )
    assert build_prompt("llm-adapters-eval", "Q", "I") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "                ### Instruction:\n"
        "                Q\n"
        "\n"
        "                ### Input:\n"
        "                I\n"
        "\n"
        "                ### Response:\n"
        "                "
    )


@pytest.mark.parametrize("template_id", sorted(TEMPLATES))
@pytest.mark.parametrize("input_text", ["", "some input"])
def test_every_prompt_ends_with_the_response_marker(template_id: str, input_text: str) -> None:
    prompt = build_prompt(template_id, "What is 2+2?", input_text)
    assert prompt.rstrip(" \n").endswith(RESPONSE_MARKER)
    assert prompt.count(RESPONSE_MARKER) == 1
    assert (prompt + "4").split(RESPONSE_MARKER)[1].strip() == "4"


@pytest.mark.parametrize("template_id", sorted(TEMPLATES))
def test_braces_in_the_text_are_kept_literally(template_id: str) -> None:
    prompt = build_prompt(template_id, "Solve {x} for {}", "{input}")
    assert "Solve {x} for {}" in prompt
    assert "{input}" in prompt


def test_loglik_context_rebuilds_the_training_text() -> None:
    prompt = build_prompt("alpaca", "Q")
    label = "answer1"
    assert prompt + LOGLIK_PREFIX + " " + label == prompt + "the correct answer is answer1"
    assert prompt.endswith("### Response:\n")


def test_unknown_template_is_one_sentence_listing_ids() -> None:
    with pytest.raises(ConfigError) as err:
        build_prompt("alpacca", "Q")
    message = str(err.value)
    assert "\n" not in message
    assert "alpaca, llm-adapters-eval, llm-adapters-train" in message
    assert "Did you mean 'alpaca'?" in message
