"""Suites: named, versioned bundles of a training mixture and evaluation sets.

A suite says which files to train on, which sets to score, and, for small suites only, loop
defaults that make it a sensible quick run (they sit below a config file and `--set`, and are
logged and stored like every other setting). Files come from the packaged `mini` folder, from
`--data-dir` / `MOEBENCH_DATA` (LLM-Adapters layout), or from the upstream repository when the
network allows, downloaded once into the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moebench import upstream as upstream_files
from moebench.errors import ConfigError, DataError, MoebenchError, unknown
from moebench.jsonfiles import iter_json_array, iter_json_lines, read_json_array
from moebench.paths import cache_dir
from moebench.prompts import build_prompt
from moebench.task import Item, Task, get_task, question_key

# moebench.data (and the row readers built on it) load torch and transformers: they are
# imported where rows are read, so `moebench tasks` lists suites without them.
if TYPE_CHECKING:
    from moebench.data import Row

log = logging.getLogger(__name__)

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
    """One training source of a suite."""

    path: str  # relative to the suite's data root
    task: str | None = None  # label for rows without their own "task" (a task or family name)
    upstream: str | None = None  # path in the upstream repository, when it can be downloaded
    fmt: str = "llm-adapters"  # reader in moebench.sources.READERS
    sample: int | None = None  # a seeded sample of this many rows (seed paper: 75k), None: all
    hub: tuple[str, str, tuple[str, ...]] | None = None  # (dataset id, split, columns) to export


@dataclass(frozen=True)
class HeldOut:
    """A test file that also feeds training, for a set that ships no training file.

    Rows are assigned by their normalised question (`task.question_key`), hashed with the suite's
    `split_seed`: a question lands on the same side in every held-out set of the suite, so a
    question that two sets share (AddSub, SingleEq and mawps share many) or that a file repeats
    never trains in one and scores in another. The seed is the suite's, not the run's, so every
    run of a suite version sees the same split. Only rows whose `output` the set's own rule scores
    as correct become training rows (LLM-Adapters' math outputs are model-written rationales,
    and many end on a wrong number); the rest of the train side is unused. Item ids keep their
    row index in the full file.
    """

    task: str
    train_fraction: float = 0.5


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
    held_out: tuple[HeldOut, ...] = ()
    split_seed: int = 0

    def describe(self) -> dict[str, Any]:
        """What the suite is, stored with every run so a number says what it was trained on."""
        return {
            "name": self.name,
            "version": self.version,
            "train": [
                {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                for f in self.train
            ],
            "held_out": [
                {"task": h.task, "train_fraction": h.train_fraction, "split_seed": self.split_seed}
                for h in self.held_out
            ],
            "eval_tasks": list(self.eval_tasks),
        }


@dataclass(frozen=True)
class ResolvedSuite:
    suite: Suite
    train_files: tuple[tuple[Path, TrainFile], ...]
    eval_files: dict[str, Path]
    data_root: Path
    held_files: dict[str, Path] = field(default_factory=dict)  # test files that feed training

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every file used: provenance that the data did not change between runs."""
        paths = [p for p, _ in self.train_files] + list(self.eval_files.values())
        paths += list(self.held_files.values())
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in dict.fromkeys(paths)}

    def held_out(self, task: str) -> HeldOut | None:
        return next((h for h in self.suite.held_out if h.task == task), None)

    def split(self, task: str, items: list[Item]) -> tuple[list[int], list[int]] | None:
        """(train rows, eval rows) of a held-out set's test file, or None if it is not split."""
        held = self.held_out(task)
        if held is None:
            return None
        train, test = [], []
        for i, it in enumerate(items):
            key = f"{self.suite.split_seed}:{question_key(it.instruction)}"
            u = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15
            (train if u < held.train_fraction else test).append(i)
        return train, test

    def split_label(self, task: str) -> str:
        """How a set's scored items were chosen, stored in its protocol id and detail."""
        held = self.held_out(task)
        if held is None:
            return "test"
        return f"heldout{round(100 * (1 - held.train_fraction))}-s{self.suite.split_seed}"

    def eval_items(self, limit: int | None) -> dict[str, tuple[Task, list[Item]]]:
        """Every eval set's items (held-out sets: only their eval part), validated in full."""
        if limit is not None and limit < 1:
            raise ConfigError(f"eval.limit={limit} must be a positive row count.")
        out = {}
        for name, path in self.eval_files.items():
            task = get_task(name)
            items = task.load_items(path)
            parts = self.split(name, items)
            if parts is not None:
                items = [items[i] for i in parts[1]]
            out[name] = (task, items if limit is None else items[:limit])
        return out

    def training_pool(self) -> tuple[list[Row], list[str], dict[str, int]]:
        """Every training row the suite offers, each with a task label where one is known (its
        files' rows, then the train side of held-out test files); for each row the suite file it
        came from ("held-out" for a split); and per held-out set, rows left out of training
        because their output does not score correct against the gold."""
        from moebench.data import Row
        from moebench.sources import read_rows

        rows: list[Row] = []
        origin: list[str] = []
        for path, f in self.train_files:
            read = read_rows(f.fmt, path, f.task)
            rows += read
            origin += [f.path] * len(read)
        unusable: dict[str, int] = {}
        for held in self.suite.held_out:
            task = get_task(held.task)
            items = task.load_items(self.held_files[held.task])
            parts = self.split(held.task, items)
            assert parts is not None
            good = [i for i in parts[0] if _trainable(task, items[i])]
            unusable[held.task] = len(parts[0]) - len(good)
            rows += [
                Row(items[i].instruction, items[i].input, items[i].output, held.task) for i in good
            ]
            origin += ["held-out"] * len(good)
        return rows, origin, unusable


def _trainable(task: Task, item: Item) -> bool:
    """A test row's `output` is a usable training target only if it reaches the gold answer."""
    if not item.output.strip():
        return False
    prompt = build_prompt("alpaca", item.instruction, item.input)
    return task.score_item(prompt, item.output, item).correct


# The seed paper's three training mixes (section 4.1): 75k of commonsense_170k, 75k of OrcaMath,
# and the instruction data of Dong et al. (2024), whose release the paper does not name.
_CS170K = TrainFile(
    "commonsense_170k.json", "commonsense", "ft-training_set/commonsense_170k.json", sample=75_000
)
_ORCA = TrainFile(
    "orca_math_200k.json",
    "math",
    fmt="orca-math",
    sample=75_000,
    hub=("microsoft/orca-math-word-problems-200k", "train", ("question", "answer")),
)
_AUTOIF = TrainFile("autoif.json", "instruction")

# The 4 commonsense sets whose training files ship with LLM-Adapters.
_LA_TRAIN = tuple(
    TrainFile(f"{folder}/train.json", task, f"dataset/{folder}/train.json")
    for folder, task in [
        ("boolq", "boolq"),
        ("ARC-Challenge", "arc_challenge"),
        ("ARC-Easy", "arc_easy"),
        ("openbookqa", "openbookqa"),
    ]
)
_LA_SPLIT = ("piqa", "social_i_qa", "winogrande", "gsm8k", "svamp", "addsub", "multiarith")
_LA_SPLIT += ("singleeq", "aqua", "mawps")

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
            name="la-offline",
            version="1",
            help=(
                "a local LLM-Adapters folder (--data-dir): its 4 training files, plus a seeded "
                "50/50 split by question of the test files of sets without one (piqa, siqa, "
                "winogrande, the math sets, AQuA, mawps; training keeps only rows whose output "
                "reaches the gold); eval on every test set, split sets on their other half"
            ),
            train=_LA_TRAIN,
            held_out=tuple(HeldOut(t) for t in _LA_SPLIT),
            eval_tasks=tuple(t for t in COMMONSENSE8 if t != "hellaswag")
            + MATH5
            + ("aqua", "mawps"),
        ),
        Suite(
            name="seed-commonsense",
            version="1",
            help="seed paper: 75k sampled from LLM-Adapters commonsense_170k -> the 8 sets",
            train=(_CS170K,),
            eval_tasks=COMMONSENSE8,
        ),
        Suite(
            name="seed-math",
            version="1",
            help="seed paper: 75k sampled from OrcaMath (hub) -> the 5 math sets",
            train=(_ORCA,),
            eval_tasks=MATH5,
        ),
        Suite(
            name="seed-ifeval",
            version="1",
            help=(
                "seed paper: instruction data of Dong et al. 2024 (AutoIF; a local "
                "autoif.json in LLM-Adapters format) -> IFEval"
            ),
            train=(_AUTOIF,),
            eval_tasks=("ifeval",),
        ),
        Suite(
            name="seed-all",
            version="1",
            help="seed paper's full mix: the three above together -> 8 + 5 sets + IFEval",
            train=(_CS170K, _ORCA, _AUTOIF),
            eval_tasks=COMMONSENSE8 + MATH5 + ("ifeval",),
        ),
        Suite(
            name="la-mawps",
            version="1",
            help=(
                "LLM-Adapters mawps/trainset.json -> AddSub, MultiArith, SingleEq, mawps: "
                "CONTAMINATED (it holds 327 of AddSub's 395 test questions); shows the overlap "
                "check, train with --decontaminate"
            ),
            train=(TrainFile("mawps/trainset.json", "mawps", fmt="mawps"),),
            eval_tasks=("addsub", "multiarith", "singleeq", "mawps"),
        ),
        Suite(
            name="commonsense-170k",
            version="2",  # 2: rows labelled with their family (LoRAMoE's task types)
            help="LLM-Adapters commonsense_170k (all of it) -> the 8 commonsense sets",
            train=(TrainFile("commonsense_170k.json", "commonsense", _CS170K.upstream),),
            eval_tasks=COMMONSENSE8,
        ),
        Suite(
            name="math-10k",
            version="2",  # 2: rows labelled with their family (LoRAMoE's task types)
            help="LLM-Adapters math_10k -> the 5 math sets (note: math_10k overlaps their tests)",
            train=(TrainFile("math_10k.json", "math", "ft-training_set/math_10k.json"),),
            eval_tasks=MATH5,
        ),
        Suite(
            name="la-commonsense4",
            version="1",
            help="the 4 commonsense sets whose train files ship with LLM-Adapters (local folder)",
            train=_LA_TRAIN,
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


def _locate(
    rel: str,
    upstream: str | None,
    root: Path | None,
    suite: str,
    hub: tuple[str, str, tuple[str, ...]] | None = None,
) -> Path:
    candidates = (
        [root / rel, root / "ft-training_set" / rel, root / "dataset" / rel] if root else []
    )
    download = cache_dir() / "data" / "llm-adapters" / rel
    for c in [*candidates, download]:
        if c.is_file():
            return c
    if upstream is not None:
        try:  # whole and verified, or nothing (moebench.fetch)
            return upstream_files.fetch(upstream, download)
        except DataError as e:
            if "sha256" in str(e):  # the bytes arrived but are not the recorded ones
                raise
            reason = f"the download from {upstream_files.base_url()} failed ({e})"
    elif hub is not None:
        from moebench.sources import export_hub_dataset

        try:
            log.info("exporting hub dataset %s", hub[0])
            export_hub_dataset(*hub, dest=download)
            return download
        except Exception as e:  # datasets raises many types when the hub is unreachable
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = f"the hub dataset {hub[0]} could not be fetched ({first})"
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
    train = tuple((_locate(f.path, f.upstream, root, suite.name, f.hub), f) for f in suite.train)
    evals = {}
    for t in tasks:
        task = get_task(t)
        packaged = task.packaged_file()
        evals[t] = packaged or _locate(
            f"{task.folder}/test.json", f"dataset/{task.folder}/test.json", root, suite.name
        )
    held = {}
    for h in suite.held_out:  # a held-out set feeds training even when it is not scored
        task = get_task(h.task)
        held[h.task] = _locate(
            f"{task.folder}/test.json", f"dataset/{task.folder}/test.json", root, suite.name
        )
    return ResolvedSuite(suite, train, evals, root or cache_dir() / "data" / "llm-adapters", held)


def row_counts(task: Task, root: Path | None) -> int | None:
    """Rows in a task's test file, counted without validating or downloading (None: not at
    hand); a listing must stay quick and must not stop on one broken file."""
    try:
        path = task.packaged_file()
    except MoebenchError:
        return None
    if path is None:
        for base in [root, mini_root()] if root else [mini_root()]:
            if (base / task.folder / "test.json").is_file():
                path = base / task.folder / "test.json"
                break
    if path is None or not path.is_file():
        return None
    try:
        rows = iter_json_lines(path) if path.suffix == ".jsonl" else iter_json_array(path)
        return sum(1 for _ in rows)
    except (MoebenchError, OSError):
        return None


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
