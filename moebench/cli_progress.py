"""How a command shows progress: live bars on a terminal, plain lines in a pipe or a log file.

Rich draws nothing live when the output is not a terminal (a run under nohup, a sweep piped to
a file): the bars appear once, at the end. There, a plain line is printed instead, at most
every `MOEBENCH_PROGRESS_EVERY` seconds (default `PLAIN_EVERY_S`, 10): the step and total,
loss, learning rate, throughput and time elapsed; the same for each eval set, and its score
when it is done; for a sweep, how its jobs stand.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moebench.errors import ConfigError

PLAIN_EVERY_S = 10.0


def plain_every_s() -> float:
    """Seconds between two plain progress lines: `MOEBENCH_PROGRESS_EVERY`, else the default."""
    raw = os.environ.get("MOEBENCH_PROGRESS_EVERY")
    if raw is None:
        return PLAIN_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ConfigError(
            f"MOEBENCH_PROGRESS_EVERY={raw!r} is not a number of seconds; accepted: a number "
            f">= 0 (default {PLAIN_EVERY_S:g})."
        )
    return value


class Throttle:
    """Says when a plain line is due: the first time, then once `every` seconds have passed."""

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.clock = every, clock
        self.start = clock()
        self.last: float | None = None

    def due(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self.last is None or now - self.last >= self.every:
            self.last = now
            return True
        return False

    def elapsed(self) -> str:
        seconds = int(self.clock() - self.start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_bars(console: Console) -> Progress:
    """The live bars; switched off where they cannot be live (plain lines stand in)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


class ProgressObserver:
    """A run's progress: bars for training (loss, lr, tokens/s) and each eval set on a
    terminal, plain lines elsewhere."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.console = progress.console
        every = plain_every_s()  # checked on a terminal too: a bad value fails everywhere
        self.plain = None if self.console.is_terminal else Throttle(every)
        self.train_bar: Any = None
        self.eval_bar: Any = None
        self.eval_task, self.eval_total, self.eval_done = "", 0, 0

    def started(self, run_id: int, info: dict[str, Any]) -> None:
        pct = 100 * info["trainable"] / max(info["total"], 1)
        resumed = f", resuming from {info['resume_from']}" if info["resume_from"] else ""
        self.console.print(
            f"[bold]run {run_id}[/]: {info['model']} on {info['device']}, "
            f"{info['trainable']:,} trainable / {info['total']:,} parameters ({pct:.3f}%), "
            f"{info['rows']} training rows{resumed}\n  output: {escape(str(info['output_dir']))}"
        )
        if info.get("mixture"):
            drawn = ", ".join(f"{t} {n:,}" for t, n in info["mixture"]["drawn"].items())
            self.console.print(f"  training mixture: {drawn}")
        if info.get("overlap"):
            self.console.print(overlap_lines(info["overlap"]))

    def step(self, s: Any) -> None:
        aux = "".join(f" {k} {v:.4f}" for k, v in s.aux.items())
        line = f"[{s.phase}] loss {s.loss:.4f}{aux} lr {s.lr:.2e} {s.tokens_per_s:,.0f} tok/s"
        if self.plain is not None:
            if self.plain.due(force=s.step == s.total_steps):
                self._line(f"step {s.step}/{s.total_steps} {line}, elapsed {self.plain.elapsed()}")
            return
        if self.train_bar is None:
            self.train_bar = self.progress.add_task("train", total=s.total_steps)
        self.progress.update(self.train_bar, completed=s.step, description=escape(f"train {line}"))

    def eval_started(self, task: str, n: int) -> None:
        self.eval_task, self.eval_total, self.eval_done = task, n, 0
        if self.plain is None:
            self.eval_bar = self.progress.add_task(f"eval {task}", total=n)

    def eval_progress(self, n: int) -> None:
        self.eval_done += n
        if self.plain is None:
            self.progress.advance(self.eval_bar, n)
        elif self.eval_done < self.eval_total and self.plain.due():
            done = f"{self.eval_done}/{self.eval_total}"
            self._line(f"eval {self.eval_task} {done}, elapsed {self.plain.elapsed()}")

    def task_done(self, result: Any) -> None:
        from moebench.task import get_task

        head = get_task(result.task).headline_metric
        acc = next(m for m in result.metrics if m["metric"] == head)
        spread = f" ± {100 * acc['stderr']:.1f}" if acc["stderr"] is not None else ""
        score = f"eval {result.task}: {100 * acc['value']:.1f}%{spread} (n={acc['n']})"
        if self.plain is not None:
            self._line(f"{score}, elapsed {self.plain.elapsed()}")
        else:
            self.progress.update(self.eval_bar, description=escape(score))

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


def overlap_lines(overlap: dict[str, Any]) -> str:
    """The train/eval overlap report as a few lines: every set with overlap, or one 'none'."""
    sets = overlap.get("before_dropping") or overlap["sets"]
    hit = {k: v for k, v in sets.items() if v["either"]}
    if not hit:
        return f"  train/eval overlap ({overlap['ngram']}-grams, questions): none"
    if overlap.get("dropped"):
        head = (
            f"  train/eval overlap: {overlap['dropped']:,} training rows overlapped an eval item "
            "and were dropped (--decontaminate); before dropping:"
        )
    else:
        head = (
            f"  [yellow]train/eval overlap[/]: {overlap['flagged_training_rows']:,} training rows "
            "overlap an eval item, kept (--decontaminate drops them)"
        )
    rows = [
        f"    {k}: {v['either']:,} of {v['n']:,} eval items (question match "
        f"{v['question_matches']:,}, {overlap['ngram']}-gram {v['ngram_matches']:,})"
        for k, v in hit.items()
    ]
    return "\n".join([head, *rows])
