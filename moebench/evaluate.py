"""Evaluation: run each task's protocol on an adapted model and keep every per-item prediction.

Generation mode replicates LLM-Adapters (beam search by default; greedy is a cheaper, separately
labelled protocol). Log-likelihood mode scores each offered label after "the correct answer is"
and cannot fail to parse. The protocol id and its details travel with every number so that two
scores are only compared when they were made the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from moebench.config import check, doc
from moebench.generation import ENGINES, continuation_logprobs, generate
from moebench.inject import Adapted
from moebench.prompts import TEMPLATES, build_prompt
from moebench.task import LOGLIK_PREFIX, Item, Score, Task


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["generate", "loglik"] = doc(
        "commonsense scoring: generate + regex (LLM-Adapters) or label log-likelihood", "generate"
    )
    num_beams: int = doc("beams for generation (LLM-Adapters: 4; 1 = greedy)", 4, ge=1, le=64)
    batch_size: int = doc("prompts per generation/scoring batch", 16, ge=1, le=2**16)
    max_new_tokens: int | None = doc(
        "override every task's budget (None: commonsense 32, math 256)", None, ge=1, le=2**16
    )
    limit: int | None = doc(
        "score at most N items per set (smoke runs); None: all", None, ge=1, le=10**9
    )
    template: str | None = doc("prompt template id for eval (None: the training template)", None)
    tasks: tuple[str, ...] | None = doc(
        "eval sets to score (None: the suite's)", None, names="task"
    )
    merge: bool = doc("merge mergeable adapters into the base weights while scoring", True)
    engine: Literal["auto", "moebench", "hf"] = doc(
        "decoding engine: moebench's loop (prefill once per prompt, finished rows leave the "
        "batch) or HF generate; auto picks moebench unless the model's generation config needs HF",
        "auto",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.template is not None and self.template not in TEMPLATES:
            problems.append(f"template='{self.template}' is not one of {', '.join(TEMPLATES)}")
        if self.engine not in ENGINES:
            problems.append(f"engine='{self.engine}' is not one of {', '.join(ENGINES)}")
        check(problems, "eval", self)


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: list[dict[str, Any]]
    predictions: list[dict[str, Any]]


def protocol(
    task: Task, cfg: EvalConfig, template: str, split: str = "test"
) -> tuple[str, dict[str, Any]]:
    """(short id, full description) of how a task's number is made.

    `split` is "test" for a whole test file; a suite that trains on part of a test file scores
    the rest, and says so (e.g. "heldout50-s0"), in the id too: such a number is not comparable
    with one on the full file.
    """
    if task.labels is not None and cfg.mode == "loglik":
        pid = f"{task.protocol_name}-loglik/{template}"
        detail: dict[str, Any] = {"mode": "loglik", "context_suffix": LOGLIK_PREFIX}
    else:
        new = cfg.max_new_tokens or task.max_new_tokens
        beams = task.fixed_num_beams or cfg.num_beams
        decoding = "greedy" if beams == 1 else f"beam{beams}"
        pid = f"{task.protocol_name}-gen/{template}/{decoding}/max{new}"
        detail = {
            "mode": "generate",
            "num_beams": beams,
            "max_new_tokens": new,
            "stop_strings": list(task.stop_strings),
            "upstream_num_beams": task.num_beams_upstream,
            "engine": cfg.engine,  # how, not what: both engines decode the same outputs
        }
    detail.update(
        template=template, scoring_rule=task.scoring_rule, split=split, source=task.data_source
    )
    if split != "test":
        pid = f"{pid}/{split}"
    return pid, detail


def evaluate_task(
    adapted: Adapted,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    items: list[Item],
    cfg: EvalConfig,
    template: str,
    amp: torch.dtype | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
    split: str = "test",
) -> TaskResult:
    pid, detail = protocol(task, cfg, template, split)
    prompts = [build_prompt(template, it.instruction, it.input) for it in items]
    preds: list[tuple[dict[str, Any], Score]] = []
    model = adapted.model
    if detail["mode"] == "loglik":
        labels = [task.candidate_labels(it) for it in items]
        requests = [
            (p + LOGLIK_PREFIX, " " + lab)
            for p, ls in zip(prompts, labels, strict=True)
            for lab in ls
        ]
        scores = continuation_logprobs(
            model, tokenizer, requests, batch_size=cfg.batch_size, amp=amp
        )
        k = 0
        for it, p, ls in zip(items, prompts, labels, strict=True):
            own = scores[k : k + len(ls)]
            k += len(ls)
            best = ls[max(range(len(ls)), key=own.__getitem__)]
            preds.append(_prediction(it, p, best, Score(best, best == it.answer, False), pid))
        on_batch(len(items))
    else:
        outputs = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=detail["max_new_tokens"],
            num_beams=detail["num_beams"],
            batch_size=cfg.batch_size,
            stop_strings=task.stop_strings,
            amp=amp,
            on_batch=on_batch,
            engine=cfg.engine,
        )
        for it, p, out in zip(items, prompts, outputs, strict=True):
            preds.append(_prediction(it, p, out, task.score_item(p, out, it), pid))
    verdicts = [v for _, v in preds]
    detail.update(n=len(preds), parse_failures=sum(v.parse_failed for v in verdicts))
    metrics = [
        {
            "task": task.name,
            "metric": m.metric,
            "value": m.value,
            "n": m.n,
            "stderr": m.stderr,
            "protocol": pid,
            "protocol_detail": detail,
        }
        for m in task.aggregate(verdicts)
    ]
    return TaskResult(task.name, metrics, [row for row, _ in preds])


def _prediction(
    it: Item, prompt: str, output: str, verdict: Score, pid: str
) -> tuple[dict[str, Any], Score]:
    row = {
        "task": it.task,
        "item_id": it.item_id,
        "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest(),
        "output": output,
        "extracted": verdict.extracted,
        "gold": it.answer,
        "correct": bool(verdict.correct),
        "parse_failed": bool(verdict.parse_failed),
        "protocol": pid,
        "detail": verdict.detail,
    }
    return row, verdict


def group_average(results: list[TaskResult], tasks: dict[str, Task]) -> list[dict[str, Any]]:
    """Unweighted mean accuracy per family, as the papers report it (not pooled over items)."""
    by_family: dict[str, list[float]] = {}
    for r in results:
        task = tasks[r.task]
        head = next(m for m in r.metrics if m["metric"] == task.headline_metric)
        by_family.setdefault(task.family, []).append(head["value"])
    rows = []
    for family, accs in sorted(by_family.items()):
        rows.append(
            {
                "task": f"{family}_avg",
                "metric": "accuracy",
                "value": sum(accs) / len(accs),
                "n": len(accs),
                "stderr": None,
                "protocol": "unweighted-mean-over-sets",
                "protocol_detail": {"sets": len(accs), "of": "each set's headline metric"},
            }
        )
    return rows
