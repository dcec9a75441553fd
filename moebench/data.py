"""Training data: LLM-Adapters JSON rows -> tokenised examples -> length-grouped batches.

The loss covers response tokens only unless `train_on_prompt` is set (LLM-Adapters' own
finetune.py trains on the prompt too; the switch replicates it). The prompt and the response are
tokenised separately and concatenated, so the mask boundary is exact whatever the tokenizer merges.
Batches are grouped by length inside shuffled windows: far less padding than a plain shuffle, and
the order is a pure function of (seed, epoch), which is what makes a resumed run identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from moebench.errors import DataError
from moebench.jsonfiles import iter_json_array
from moebench.prompts import build_prompt

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")


@dataclass(frozen=True)
class Row:
    instruction: str
    input: str
    output: str
    task: str | None  # source task name when the mixture says so


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    task_label: int  # per-sample task type (LoRAMoE's knowledge flag); -1 when unknown


def load_training_rows(path: Path, task: str | None = None) -> list[Row]:
    """The file's rows, validated as they are read (`task` labels rows that carry none)."""
    out = []
    for i, r in enumerate(iter_json_array(path)):
        if not _is_row(r):
            raise DataError(_bad_row(path, i, r))
        label = (r.get("task") or task) if task else r.get("task")
        out.append(Row(r["instruction"], str(r.get("input") or ""), r["output"], label))
    return out


def _is_row(r: object) -> bool:
    """One expression, as the loop over a million rows runs it a million times."""
    return (
        isinstance(r, dict)
        and isinstance(r.get("instruction"), str)
        and isinstance(r.get("output"), str)
        and isinstance(r.get("task"), str | None)
    )


def _bad_row(path: Path, i: int, r: object) -> str:
    """What is wrong with a row `_is_row` refused."""
    if not isinstance(r, dict):
        return f"Data file '{path}' row {i} is not an object."
    for key in REQUIRED_FIELDS:
        if not isinstance(r.get(key), str):
            return (
                f"Data file '{path}' row {i} has no string field '{key}' "
                "(LLM-Adapters rows need instruction, input, output, answer)."
            )
    return f"Data file '{path}' row {i} has a non-string 'task' ({r['task']!r})."


def tokenize_row(
    row: Row,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    cutoff_len: int,
    train_on_prompt: bool,
    task_label: int,
) -> Example:
    prompt_ids = tokenizer(build_prompt(template, row.instruction, row.input))["input_ids"]
    response_ids = tokenizer(row.output, add_special_tokens=False)["input_ids"]
    ids = [*prompt_ids, *response_ids, tokenizer.eos_token_id][:cutoff_len]
    prompt_len = min(len(prompt_ids), len(ids))
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    return Example(tuple(ids), tuple(labels), task_label)


def epoch_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    seed: int,
    epoch: int,
    grouped: bool = True,
    window: int = 64,
) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, grouped by length unless `grouped=False`.

    Shuffle (seeded by seed and epoch), cut into windows of `window` micro-batches, sort each
    window by length so a batch holds similar lengths, then shuffle the batch order so long and
    short batches are interleaved across the epoch.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not grouped:
        return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    span = micro_batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[j : j + micro_batch_size] for j in range(0, len(chunk), micro_batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


@dataclass(frozen=True)
class StepBatches:
    """The micro-batches of one optimizer step and where the data stands after it."""

    epoch: int
    first: int  # index of the step's first micro-batch within its epoch
    micro_batches: list[list[int]]
    next_position: tuple[int, int]  # (epoch, micro-batch index) of the following step


def step_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    accumulation: int,
    seed: int,
    grouped: bool = True,
    position: tuple[int, int] = (0, 0),
) -> Iterator[StepBatches]:
    """Endless per-step groups of micro-batches from `position` on, rolling into new epochs.

    A step takes up to `accumulation` micro-batches and never spans two epochs. Because the order
    is a pure function of (seed, epoch), a checkpoint needs only `next_position` to continue.
    """
    epoch, first = position
    order = epoch_batches(lengths, micro_batch_size, seed, epoch, grouped)
    while True:
        if first >= len(order):
            epoch, first = epoch + 1, 0
            order = epoch_batches(lengths, micro_batch_size, seed, epoch, grouped)
        group = order[first : first + accumulation]
        after = first + len(group)
        yield StepBatches(
            epoch, first, group, (epoch + 1, 0) if after >= len(order) else (epoch, after)
        )
        first = after


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding never counts in the loss."""
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    task = torch.tensor([e.task_label for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "task_labels": task}
