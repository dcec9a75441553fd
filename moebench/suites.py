"""Suites: named, versioned bundles of a training mixture and evaluation sets.

A suite says which files to train on, which sets to score, and, for small suites only, loop
defaults that make it a sensible quick run (they sit below a config file and `--set`, and are
logged and stored like every other setting). Files come from the packaged `mini` folder, from
`--data-dir` / `MOEBENCH_DATA` (LLM-Adapters layout), or from the upstream repository when the
network allows, downloaded once into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moebench.errors import DataError, unknown
from moebench.jsonfiles import read_json_array
from moebench.models import cache_dir
from moebench.task import get_task

log = logging.getLogger(__name__)

UPSTREAM = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
COMMONSENSE8 = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
MATH5 = ("gsm8k", "svamp", "addsub", "multiarith", "singleeq")


@dataclass(frozen=True)
class TrainFile:
    path: str  # relative to the suite's data root
    task: str | None = None  # task label for every row (rows may also carry their own "task")
    upstream: str | None = None  # path in the upstream repository, when it can be downloaded


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    help: str
    train: tuple[TrainFile, ...]
    eval_tasks: tuple[str, ...]
    packaged: bool = False
    train_defaults: dict[str, Any] = field(default_factory=dict)
    eval_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSuite:
    suite: Suite
    train_files: tuple[tuple[Path, str | None], ...]
    eval_files: dict[str, Path]
    data_root: Path

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every file used: provenance that the data did not change between runs."""
        paths = [p for p, _ in self.train_files] + list(self.eval_files.values())
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite(
            name="mini",
            version="1",
            help="packaged: ~240 training rows (commonsense + math), 12 small eval sets; CPU-sized",
            train=(TrainFile("train.json"),),
            eval_tasks=tuple(t for t in COMMONSENSE8 if t != "hellaswag") + MATH5,
            packaged=True,
            train_defaults={"epochs": 1.0, "warmup_steps": 2, "checkpoint_every": 5},
            eval_defaults={"num_beams": 1},
        ),
        Suite(
            name="commonsense-170k",
            version="1",
            help="LLM-Adapters commonsense_170k -> the 8 commonsense sets (needs the files)",
            train=(
                TrainFile("commonsense_170k.json", None, "ft-training_set/commonsense_170k.json"),
            ),
            eval_tasks=COMMONSENSE8,
        ),
        Suite(
            name="math-10k",
            version="1",
            help="LLM-Adapters math_10k -> the 5 math sets (note: math_10k overlaps their tests)",
            train=(TrainFile("math_10k.json", None, "ft-training_set/math_10k.json"),),
            eval_tasks=MATH5,
        ),
        Suite(
            name="la-commonsense4",
            version="1",
            help="the 4 commonsense sets whose train files ship with LLM-Adapters (local folder)",
            train=tuple(
                TrainFile(f"{folder}/train.json", task, f"dataset/{folder}/train.json")
                for folder, task in [
                    ("boolq", "boolq"),
                    ("ARC-Challenge", "arc_challenge"),
                    ("ARC-Easy", "arc_easy"),
                    ("openbookqa", "openbookqa"),
                ]
            ),
            eval_tasks=("boolq", "arc_challenge", "arc_easy", "openbookqa"),
        ),
    ]
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise unknown("suite", name, SUITES)
    return SUITES[name]


def mini_root() -> Path:
    return Path(str(importlib.resources.files("moebench.tasks").joinpath("data", "mini")))


def data_root(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("MOEBENCH_DATA")
    if chosen is None:
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Data folder '{root}' does not exist; pass --data-dir (or MOEBENCH_DATA) pointing at "
            "an LLM-Adapters-style folder (<set>/test.json, training files), or use --suite mini."
        )
    return root


def _locate(rel: str, upstream: str | None, root: Path | None, suite: str) -> Path:
    candidates = (
        [root / rel, root / "ft-training_set" / rel, root / "dataset" / rel] if root else []
    )
    download = cache_dir() / "data" / "llm-adapters" / rel
    for c in [*candidates, download]:
        if c.is_file():
            return c
    if upstream is not None:
        url = UPSTREAM + upstream
        try:
            log.info("downloading %s", url)
            download.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=20) as r:
                blob = r.read()
            tmp = download.with_suffix(".part")
            tmp.write_bytes(blob)
            tmp.replace(download)
            return download
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = f"the download from the LLM-Adapters repository failed ({e})"
    else:
        reason = "it has no upstream copy"
    where = f"in '{root}'" if root else "without --data-dir"
    raise DataError(
        f"Suite '{suite}' needs '{rel}', which is not {where} and {reason}; pass --data-dir "
        "with an LLM-Adapters folder, or use --suite mini."
    )


def resolve(
    suite: Suite, data_dir: str | None, eval_tasks: tuple[str, ...] | None = None
) -> ResolvedSuite:
    """Find every file the suite needs, or raise one DataError naming the first missing one."""
    tasks = eval_tasks or suite.eval_tasks
    for t in tasks:
        get_task(t)
    if suite.packaged:
        root: Path | None = mini_root()
    else:
        root = data_root(data_dir)
    train = tuple((_locate(f.path, f.upstream, root, suite.name), f.task) for f in suite.train)
    evals = {}
    for t in tasks:
        folder = get_task(t).folder
        evals[t] = _locate(f"{folder}/test.json", f"dataset/{folder}/test.json", root, suite.name)
    return ResolvedSuite(suite, train, evals, root or cache_dir() / "data" / "llm-adapters")


def mini_corpus() -> list[str]:
    """Text of the packaged suite: the corpus the tiny test models' tokenizer is trained on."""
    from moebench.prompts import build_prompt

    root = mini_root()
    texts = []
    for path in [root / "train.json", *sorted(root.glob("*/test.json"))]:
        for row in read_json_array(path):
            texts.append(build_prompt("alpaca", row["instruction"], row.get("input") or ""))
            texts.append(row["output"])
    return texts
