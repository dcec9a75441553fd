"""`moebench analyze importance`: a stored run's adapter importance per task, kept with the run.

The run's adapted model is rebuilt as training left it (moebench.lmeval_bridge.rebuild_run, the
one rebuild path); each task's evaluation items are tokenised with the run's training template and
cutoff, the loss covering the gold response only (the item's `output`; its `answer` where a file
has no output, as mawps); the first `batches` batches of `batch_size` items (file order, grouped
by length) give L. Importance `|dL/dtheta * theta|` (moebench.importance.TAYLOR) of every
adapter tensor is summarised per tensor, per module and per rank (moebench.importance_stats) and
stored as the run's artifact `importance`, with the figures' numbers beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moebench import store as db
from moebench.data import IGNORE_INDEX, Example, Row, collate, tokenize_row
from moebench.errors import ConfigError
from moebench.importance import TAYLOR, gradient_pass
from moebench.importance_figures import figures
from moebench.importance_stats import layout_record, summarize
from moebench.inject import Adapted
from moebench.runspec import RunSpec
from moebench.suites import get_suite
from moebench.suites import resolve as resolve_suite
from moebench.task import Item

log = logging.getLogger(__name__)

ARTIFACT = "importance"
RECORD_VERSION = 1
DEFINITION = (
    "I = |dL/dtheta * theta| per element (seed paper eq. 3), L = token-mean loss on the gold "
    "response over the task's analysed eval items; rank j = sum over row j of A and column j of B"
)


def gold_example(item: Item, tokenizer: Any, spec: RunSpec) -> Example:
    """An eval item as a training row: prompt from the run's template, the gold response."""
    response = item.output if item.output.strip() else item.answer
    row = Row(item.instruction, item.input, response, item.task)
    t = spec.train
    return tokenize_row(
        row,
        tokenizer,
        template=t.template,
        cutoff_len=t.cutoff_len,
        train_on_prompt=False,
        task_label=-1,
    )


def length_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of examples sorted by length (least padding; order is deterministic)."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [
        collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)
    ]


def task_importance(
    adapted: Adapted,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Per-element importance of every adapter tensor on these batches, and their loss."""
    context = adapted.context

    def on_batch(batch: Any) -> None:
        context.attention_mask = batch["attention_mask"].to(device)
        context.task_labels = None

    try:
        return gradient_pass(
            adapted.model,
            batches,
            dict(adapted.adapter_parameters()),
            TAYLOR,
            device=device,
            autocast=amp,
            on_batch=on_batch,
        )
    finally:
        context.attention_mask = None


def _eval_sets(
    store: db.Store,
    row: dict[str, Any],
    spec: RunSpec,
    tasks: Sequence[str] | None,
    data_dir: str | None,
) -> dict[str, list[Item]]:
    produced = db.get_produced(store, row["id"])
    stored_root = (produced.data or {}).get("root")
    execution = row.get("execution") or {}
    root = data_dir or execution.get("data_dir") or stored_root
    names = tuple(tasks) if tasks else spec.eval.tasks
    suite = resolve_suite(get_suite(spec.suite), root, names)
    return {name: items for name, (_, items) in suite.eval_items(None).items()}


def analyze_run(
    store: db.Store,
    run_id: int,
    *,
    tasks: Sequence[str] | None = None,
    batches: int = 4,
    batch_size: int = 8,
    data_dir: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Importance of run `run_id`'s adapter on each task, stored as its `importance` artifact
    (and returned). `progress(task, items)` is called as each task starts."""
    from moebench.lmeval_bridge import rebuild_run  # heavy imports only once a run is analysed

    if batches < 1 or batch_size < 1:
        raise ConfigError(
            f"--batches {batches} and --batch-size {batch_size} must both be positive integers."
        )
    row = db.get_run(store, run_id)
    rebuilt = rebuild_run(store, run_id)
    sets = _eval_sets(store, row, rebuilt.spec, tasks, data_dir)
    adapted, tok = rebuilt.adapted, rebuilt.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "definition": DEFINITION,
        "method": rebuilt.spec.method,
        "model": rebuilt.spec.model,
        "batches": batches,
        "batch_size": batch_size,
        "layout": layout_record(adapted),
        "tasks": {},
    }
    for task, items in sets.items():
        chosen = [gold_example(it, tok, rebuilt.spec) for it in items[: batches * batch_size]]
        if progress is not None:
            progress(task, len(chosen))
        started = time.perf_counter()
        scores, loss = task_importance(
            adapted, length_batches(chosen, batch_size, pad), rebuilt.device, rebuilt.amp
        )
        summary = summarize(adapted, scores)
        summary.update(
            items=len(chosen),
            tokens=sum(1 for e in chosen for label in e.labels[1:] if label != IGNORE_INDEX),
            loss=loss,
            seconds=round(time.perf_counter() - started, 2),
        )
        record["tasks"][task] = summary
    record["figures"] = figures(record)
    db.put_artifact(store, run_id, ARTIFACT, record)
    return record


def stored_record(store: db.Store, run_id: int) -> dict[str, Any]:
    """A run's stored importance record, or a sentence saying how to make one."""
    db.get_run(store, run_id)
    record = db.get_artifacts(store, run_id).get(ARTIFACT)
    if record is None:
        raise ConfigError(
            f"Run {run_id} has no importance analysis yet; run "
            f"`moebench analyze importance {run_id}` first."
        )
    return record
