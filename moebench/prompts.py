"""Prompt templates, looked up by id so that every stored score can name the one it used.

`alpaca` is the clean canonical Alpaca template, used for training and evaluation alike. The
`llm-adapters-*` ids reproduce LLM-Adapters' own strings byte for byte (AGI-Edgerunners/
LLM-Adapters: `generate_prompt` in finetune.py for training, in commonsense_evaluate.py and
evaluate.py for evaluation). Upstream's train and eval strings differ: two trailing spaces vs one
after "request." in the no-input form, one vs none in the with-input form, and a blank line holding
16 spaces vs an empty one. They are offered only to replicate published numbers, since a model
trained on one and scored on the other sees a prompt it was never trained on.

Every template ends with the response marker (plus, upstream, a newline and 16 spaces), so that
the model's continuation is the response and `prompt + completion` splits cleanly on the marker.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebench.errors import ConfigError, did_you_mean

RESPONSE_MARKER = "### Response:"

_ALPACA_HEAD = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
# Upstream writes its f-strings inside a function body, so every line after the first carries the
# 16 spaces of source indentation.
_UP = " " * 16


@dataclass(frozen=True)
class Template:
    """One prompt format: a no-input and a with-input form, `str.format` fields only.

    Rows whose `input` is empty use `no_input`, as upstream does (`if input:`), so a template must
    give both forms.
    """

    id: str
    no_input: str  # field: {instruction}
    with_input: str  # fields: {instruction}, {input}
    description: str

    def render(self, instruction: str, input: str = "") -> str:
        """Fill the template; substituted text is inserted literally (braces in it are safe)."""
        if input:
            return self.with_input.format(instruction=instruction, input=input)
        return self.no_input.format(instruction=instruction)


TEMPLATES: dict[str, Template] = {
    t.id: t
    for t in (
        Template(
            id="alpaca",
            no_input=_ALPACA_HEAD + "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
            with_input=_ALPACA_HEAD_INPUT
            + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
            description="canonical Alpaca template, one string for training and evaluation",
        ),
        Template(
            id="llm-adapters-train",
            no_input=_ALPACA_HEAD
            + "  \n\n"
            + f"{_UP}### Instruction:\n{_UP}{{instruction}}\n{_UP}\n{_UP}### Response:\n{_UP}",
            with_input=_ALPACA_HEAD_INPUT
            + " \n\n"
            + f"{_UP}### Instruction:\n{_UP}{{instruction}}\n{_UP}\n"
            + f"{_UP}### Input:\n{_UP}{{input}}\n{_UP}\n{_UP}### Response:\n{_UP}",
            description="LLM-Adapters finetune.py generate_prompt with an empty output, verbatim",
        ),
        Template(
            id="llm-adapters-eval",
            no_input=_ALPACA_HEAD
            + " \n\n"
            + f"{_UP}### Instruction:\n{_UP}{{instruction}}\n\n{_UP}### Response:\n{_UP}",
            with_input=_ALPACA_HEAD_INPUT
            + "\n\n"
            + f"{_UP}### Instruction:\n{_UP}{{instruction}}\n\n"
            + f"{_UP}### Input:\n{_UP}{{input}}\n\n{_UP}### Response:\n{_UP}",
            description="LLM-Adapters commonsense_evaluate.py / evaluate.py prompt, verbatim",
        ),
    )
}


def get_template(template_id: str) -> Template:
    """Look a template up, failing with the list of ids (the id comes from user config)."""
    try:
        return TEMPLATES[template_id]
    except KeyError:
        ids = sorted(TEMPLATES)
        raise ConfigError(
            f"Unknown prompt template '{template_id}'; expected one of: {', '.join(ids)}."
            + did_you_mean(template_id, ids)
        ) from None


def build_prompt(template_id: str, instruction: str, input: str = "") -> str:
    """The full prompt for one row; the model's continuation of it is the response."""
    return get_template(template_id).render(instruction, input)
