"""Multi-task training mixtures: how many rows of each task a run trains on, drawn reproducibly.

A suite offers a pool of labelled rows (its files, and the train parts of held-out test files).
`DataConfig` says how to draw the run's mixture from it: each file's own sample size first (the seed
paper's "75k of commonsense_170k"), then per-task sizes or weights. Every draw is seeded by
`mixture_seed`, not by the run's seed, so runs over several seeds train on the same rows and their
spread measures the method, not the data draw. The counts are stored with the run.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moebench.config import check, doc
from moebench.data import Row
from moebench.errors import ConfigError, did_you_mean

UNLABELLED = "(unlabelled)"


def _pairs(items: Sequence[str], field: str, number: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        try:
            parsed = number(value)
        except ValueError:
            parsed = None
        if not sep or not name or parsed is None or not math.isfinite(parsed) or parsed < 0:
            form = "task=N, with a whole number" if number is int else "task=w, with a number"
            raise ConfigError(f"data.{field} item '{item}' must read {form} >= 0 after the '='.")
        out[name.strip()] = parsed
    return out


@dataclass(frozen=True)
class DataConfig:
    train_rows: int | None = doc(
        "rows to draw from the suite's training pool, shared by task in proportion to "
        "weight x rows available (None: the whole pool after each file's own sample)",
        None,
        ge=1,
        le=10**9,
    )
    task_weights: tuple[str, ...] = doc(
        "'task=w' multipliers on a task's share when drawing train_rows (unlisted: 1)", ()
    )
    task_sizes: tuple[str, ...] = doc(
        "'task=N' rows of a task, drawn without replacement (more than it has: every row, "
        "then a draw of the rest); 0 drops the task; listed tasks are outside train_rows",
        (),
    )
    mixture_seed: int = doc(
        "seed of every draw from the pool (not the run seed: seeds of a sweep share data)",
        0,
        ge=0,
        le=2**32 - 1,
    )
    decontaminate: bool = doc(
        "drop training rows that match an eval question or share an n-gram with an eval item",
        False,
    )
    ngram: int = doc(
        "n of the n-gram overlap check (GPT-3's decontamination used 13)", 13, ge=4, le=1000
    )

    def __post_init__(self) -> None:
        problems = []
        check(problems, "data", self)
        _pairs(self.task_weights, "task_weights", float)
        _pairs(self.task_sizes, "task_sizes", int)


def _draw(n: int, k: int, seed: int, salt: str) -> list[int]:
    """k indices out of range(n): a seeded sample without replacement; past n, every index and
    then a sample of the rest again (upsampling a small task)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, salt)) * 7919 + n)
    out: list[int] = []
    while k > 0:
        take = min(k, n)
        out += torch.randperm(n, generator=g)[:take].tolist()
        k -= take
    return sorted(out) if len(out) <= n else out


def _largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    norm = sum(shares.values())
    if norm <= 0:
        return dict.fromkeys(shares, 0)
    exact = {t: total * s / norm for t, s in shares.items()}
    counts = {t: math.floor(v) for t, v in exact.items()}
    left = total - sum(counts.values())
    for t in sorted(exact, key=lambda t: (counts[t] - exact[t], t))[:left]:
        counts[t] += 1
    return counts


def build_mixture(
    rows: Sequence[Row],
    origin: Sequence[str],
    file_samples: Mapping[str, int | None],
    cfg: DataConfig,
) -> tuple[list[Row], dict[str, Any]]:
    """The run's training rows, and a record of how they were drawn (stored as an artifact).

    `origin[i]` names the suite file row i came from and `file_samples[name]` that file's own
    sample size (None or absent: all its rows). A file's sample is seeded by its name, so the
    seed paper's 75k of a file are the same rows in every suite that samples it. The rows come
    back in pool order (a row drawn twice, twice), so the default draw is the pool itself.
    """
    kept = list(range(len(rows)))
    by_file: dict[str, list[int]] = {}
    for i in kept:
        by_file.setdefault(origin[i], []).append(i)
    pool: list[int] = []
    for f, idx in by_file.items():
        want = file_samples.get(f)
        if want is not None and want < len(idx):
            idx = [idx[j] for j in _draw(len(idx), want, cfg.mixture_seed, f)]
        pool += idx

    by_task: dict[str, list[int]] = {}
    for i in pool:
        by_task.setdefault(rows[i].task or UNLABELLED, []).append(i)
    sizes = _pairs(cfg.task_sizes, "task_sizes", int)
    weights = _pairs(cfg.task_weights, "task_weights", float)
    for field, named in (("task_sizes", sizes), ("task_weights", weights)):
        for task in named:
            if task not in by_task:
                raise ConfigError(
                    f"data.{field} names task '{task}', which this suite's training pool does "
                    f"not have; it has {', '.join(sorted(by_task))}."
                    + did_you_mean(task, list(by_task))
                )

    counts = {t: len(idx) for t, idx in by_task.items() if t not in sizes}
    if cfg.train_rows is not None:
        counts = _largest_remainder(
            cfg.train_rows, {t: weights.get(t, 1.0) * n for t, n in counts.items()}
        )
    elif weights:
        raise ConfigError("data.task_weights needs data.train_rows (the total to share out).")
    counts.update(sizes)

    chosen: list[int] = []
    for task, idx in sorted(by_task.items()):
        k = counts.get(task, 0)
        chosen += [idx[j] for j in _draw(len(idx), k, cfg.mixture_seed, task)]
    chosen.sort()
    record = {
        "pool": dict(sorted(Counter(rows[i].task or UNLABELLED for i in kept).items())),
        "after_file_samples": {t: len(v) for t, v in sorted(by_task.items())},
        "drawn": dict(sorted(Counter(rows[i].task or UNLABELLED for i in chosen).items())),
        "rows": len(chosen),
        "mixture_seed": cfg.mixture_seed,
    }
    return [rows[i] for i in chosen], record
