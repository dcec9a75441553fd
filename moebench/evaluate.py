"""Evaluation: run each task's protocol on an adapted model and keep every per-item prediction.

Generation mode replicates LLM-Adapters (beam search by default; greedy is a cheaper, separately
labelled protocol). Log-likelihood mode scores each offered label after "the correct answer is"
and cannot fail to parse. The protocol id and its details travel with every number so that two
scores are only compared when they were made the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from moebench.config import check, doc
from moebench.generation import continuation_logprobs, generate
from moebench.inject import Adapted
from moebench.prompts import TEMPLATES, build_prompt
from moebench.task import LOGLIK_PREFIX, Item, Task


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["generate", "loglik"] = doc(
        "commonsense scoring: generate + regex (LLM-Adapters) or label log-likelihood", "generate"
    )
    num_beams: int = doc("beams for generation (LLM-Adapters: 4; 1 = greedy)", 4)
    batch_size: int = doc("prompts per generation/scoring batch", 16)
    max_new_tokens: int | None = doc(
        "override every task's budget (None: commonsense 32, math 256)", None
    )
    limit: int | None = doc("score at most N items per set (smoke runs); None: all", None)
    template: str | None = doc("prompt template id for eval (None: the training template)", None)
    tasks: tuple[str, ...] | None = doc("eval sets to score (None: the suite's)", None)
    merge: bool = doc("merge mergeable adapters into the base weights while scoring", True)

    def __post_init__(self) -> None:
        problems = []
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} must be >= 1")
        if self.template is not None and self.template not in TEMPLATES:
            problems.append(f"template='{self.template}' is not one of {', '.join(TEMPLATES)}")
        check(problems, "eval")


@dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: list[dict[str, Any]]
    predictions: list[dict[str, Any]]


def protocol(task: Task, cfg: EvalConfig, template: str) -> tuple[str, dict[str, Any]]:
    """(short id, full description) of how a task's number is made."""
    if task.labels is not None and cfg.mode == "loglik":
        pid = f"llm-adapters-loglik/{template}"
        detail: dict[str, Any] = {"mode": "loglik", "context_suffix": LOGLIK_PREFIX}
    else:
        new = cfg.max_new_tokens or task.max_new_tokens
        decoding = "greedy" if cfg.num_beams == 1 else f"beam{cfg.num_beams}"
        pid = f"llm-adapters-gen/{template}/{decoding}/max{new}"
        detail = {
            "mode": "generate",
            "num_beams": cfg.num_beams,
            "max_new_tokens": new,
            "stop_strings": list(task.stop_strings),
            "upstream_num_beams": task.num_beams_upstream,
        }
    detail.update(template=template, scoring_rule=task.scoring_rule, split="test")
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
) -> TaskResult:
    pid, detail = protocol(task, cfg, template)
    prompts = [build_prompt(template, it.instruction, it.input) for it in items]
    preds: list[dict[str, Any]] = []
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
            preds.append(_prediction(it, p, best, best, best == it.answer, False, pid))
        on_batch(len(items))
    else:
        outputs = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=detail["max_new_tokens"],
            num_beams=cfg.num_beams,
            batch_size=cfg.batch_size,
            stop_strings=task.stop_strings,
            amp=amp,
            on_batch=on_batch,
        )
        for it, p, out in zip(items, prompts, outputs, strict=True):
            s = task.score(p, out, it.answer)
            preds.append(_prediction(it, p, out, s.extracted, s.correct, s.parse_failed, pid))
    n = len(preds)
    acc = sum(p["correct"] for p in preds) / n
    failures = sum(p["parse_failed"] for p in preds)
    detail.update(n=n, parse_failures=failures)
    metrics = [
        {
            "task": task.name,
            "metric": "accuracy",
            "value": acc,
            "n": n,
            "stderr": math.sqrt(acc * (1 - acc) / n),
            "protocol": pid,
            "protocol_detail": detail,
        },
        {
            "task": task.name,
            "metric": "parse_failure_rate",
            "value": failures / n,
            "n": n,
            "stderr": None,
            "protocol": pid,
            "protocol_detail": detail,
        },
    ]
    return TaskResult(task.name, metrics, preds)


def _prediction(
    it: Item, prompt: str, output: str, extracted: str | None, correct: bool, failed: bool, pid: str
) -> dict[str, Any]:
    return {
        "task": it.task,
        "item_id": it.item_id,
        "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest(),
        "output": output,
        "extracted": extracted,
        "gold": it.answer,
        "correct": bool(correct),
        "parse_failed": bool(failed),
        "protocol": pid,
    }


def group_average(results: list[TaskResult], tasks: dict[str, Task]) -> list[dict[str, Any]]:
    """Unweighted mean accuracy per family, as the papers report it (not pooled over items)."""
    by_family: dict[str, list[float]] = {}
    for r in results:
        acc = next(m for m in r.metrics if m["metric"] == "accuracy")
        by_family.setdefault(tasks[r.task].family, []).append(acc["value"])
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
                "protocol_detail": {"sets": len(accs)},
            }
        )
    return rows
