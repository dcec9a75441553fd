"""Bad input over every command and config field: one sentence, a non-zero exit, nothing lost.

The cases are generated from the registries and the config dataclasses (every numeric field gets
values past each end of its declared range and values of the wrong type; every choice field a
value it does not offer; every registry a misspelt name), plus a table of command-line flags that
cannot be honoured. Each case runs in-process through typer's CliRunner and must end with a
non-zero exit, no traceback (a `MoebenchError`, which `moebench.cli.main` prints as one line, or
click's own usage error), one sentence naming the bad value and what is accepted, and the store
of one real tiny run left exactly as it was: its rows and its files. All cases fail before any
weight loads, so the whole suite takes seconds; a few subprocess cases check the real command.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import sqlite3
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from moebench.evaluate import EvalConfig
from moebench.method import METHODS
from moebench.mixture import DataConfig
from moebench.suites import SUITES
from moebench.task import TASKS
from moebench.train import TrainConfig
from tests.conftest import invoke
from tests.test_cli import moebench

TINY_RUN = [
    "--model",
    "tiny-llama",
    "--max-steps",
    "1",
    "--limit",
    "1",
    "--set",
    "train.batch_size=4",
    "--set",
    "eval.num_beams=1",
    "--set",
    "eval.tasks=boolq",
]
SECTIONS = {"train": TrainConfig, "eval": EvalConfig, "data": DataConfig}


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # the class the count is reported by
    args: tuple[str, ...]  # after the command, before --db
    needles: tuple[str, ...]  # each must appear in the message
    absent: tuple[str, ...] = ()  # none may appear (a suggestion from another section)

    @property
    def id(self) -> str:
        return " ".join(self.args)


def _outside(bounds: Any, is_int: bool) -> list[float]:
    """Values just past each end of a range (the end itself where the end is open)."""
    low = bounds.ge - 1 if bounds.ge is not None else bounds.gt
    high = bounds.le + 1 if bounds.le is not None else bounds.lt
    if not is_int:
        low = bounds.ge - 0.5 if bounds.ge is not None else bounds.gt
        high = bounds.le * 2 + 1.0 if bounds.le is not None else bounds.lt
        return [float(low), float(high)]
    return [int(low), int(high)]


def _field_cases(prefix: str, cls: type, kind: str, head: tuple[str, ...]) -> list[Case]:
    hints = typing.get_type_hints(cls)
    cases = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        bounds = f.metadata.get("range")
        key = f"{prefix}.{f.name}"
        if bounds is not None:
            is_int = int in (tp, *get_args(tp))
            for value in _outside(bounds, is_int):
                cases.append(
                    Case(
                        f"{kind}: out of range",
                        (*head, "--set", f"{key}={value}"),
                        (f"{f.name}={value!r}", "accepted", str(bounds)),
                    )
                )
            wrong = ("1.5", "ten") if is_int else ("ten", "nan", "inf")
            for value in wrong:
                expected = "is not an integer" if is_int else "is not a"
                cases.append(
                    Case(f"{kind}: wrong type", (*head, "--set", f"{key}={value}"), (expected,))
                )
        literal = [a for a in (tp, *get_args(tp)) if get_origin(a) is Literal]
        if literal:
            allowed = get_args(literal[0])
            cases.append(
                Case(
                    f"{kind}: not a choice",
                    (*head, "--set", f"{key}=bogus"),
                    ("'bogus'", *map(str, allowed)),
                )
            )
        if f.metadata.get("names") == "task":
            cases.append(
                Case(
                    f"{kind}: unknown name",
                    (*head, "--set", f"{key}=boolqq"),
                    ("boolqq", "boolq"),
                )
            )
    return cases


def _config_cases() -> list[Case]:
    cases = []
    for name, m in METHODS:
        cases += _field_cases("method", m.config_cls, "method field", ("--method", name))
        cases.append(
            Case(
                "method field: unknown key",
                ("--method", name, "--set", "method.no_such_knob=1"),
                ("no_such_knob", "known:"),
            )
        )
    for section, cls in SECTIONS.items():
        cases += _field_cases(section, cls, f"{section} field", ())
        # a misspelt key is only matched against its own section's fields
        cases.append(
            Case(
                f"{section} field: unknown key",
                ("--set", f"{section}.rnak=4"),
                ("rnak", "known:"),
                absent=("did you mean 'rank'",),
            )
        )
    return cases


def _name_cases() -> list[Case]:
    cases = [
        Case("name: method", ("--method", name + "x"), (f"'{name}x'", f"'{name}'"))
        for name in METHODS.names()
    ]
    cases += [Case("name: suite", ("--suite", name + "x"), (f"'{name}x'", name)) for name in SUITES]
    cases += [
        Case("name: model", ("--model", "tiny-llamaa"), ("'tiny-llamaa'", "tiny-llama")),
        Case("name: model", ("--model", "./no/such/folder"), ("no/such/folder",)),
    ]
    cases += [
        Case("name: eval task", ("--set", f"eval.tasks={t}x"), (f"'{t}x'", t))
        for t in TASKS.names()
    ]
    return cases


RUN_FLAGS = [
    (("--seed", str(2**63)), (str(2**63), "[0, 2^32-1]")),
    (("--seed", "-1"), ("seed=-1", "accepted")),
    (("--set", "seed=1e3"), ("1e3", "not an integer")),
    (("--max-steps", "0"), ("max_steps=0", "accepted")),
    (("--limit", "-5"), ("limit=-5", "accepted")),
    (("--set", "train.max_grad_norm=-1"), ("max_grad_norm=-1.0", "accepted")),
    (("--set", "alpha=-1"), ("alpha=-1.0", "accepted")),
    (("--set", "rank=100000"), ("rank=100000", "[1, 65536]")),
    (("--set", "rank=65"), ("rank=65", "at most")),
    (("--method", "loramoe", "--set", "knowledge_tasks=boolq,nosuch"), ("'nosuch'", "accepted")),
    (("--method", "loramoe", "--set", "general_tasks=piqaa"), ("'piqaa'", "piqa")),
    (("--set", "target_modules=q_proj v_proj"), ("'q_proj v_proj'", "no spaces")),
    (("--set", "target_modules=q_proj,,v_proj"), ("empty item",)),
    (("--set", "target_modules=attn"), ("'attn'", "q_proj")),
    (("--method", "lora-smoe", "--set", "budget_experts=3", "--set", "budget_params=9"), ("both",)),
    (("--method", "mixlora", "--set", "top_k=9"), ("top_k=9", "num_experts=8")),
    (("--method", "loramoe-partition", "--set", "rank=10"), ("rank=10", "multiple")),
    (("--set", "train.batch_size=6"), ("batch_size=6", "multiple")),
    (("--set", "train.template=nosuch"), ("'nosuch'", "alpaca")),
    (("--set", "data.task_sizes=boolq"), ("boolq",)),
    (("--set", "data.task_weights=boolq=heavy"), ("heavy",)),
    (("--set", "data.task_sizes=nosuch=3"), ("'nosuch'",)),
    (("--set", "nosection.rank=4"), ("'nosection'", "method., train., eval. or data.")),
    (("--set", "=4"), ("'=4'", "key=value")),
    (("--set", "rank"), ("'rank'", "key=value")),
    (("--data-dir", "/tmp"), ("--data-dir /tmp", "packaged")),
    (("--suite", "la-commonsense4", "--data-dir", "/no/such/folder"), ("/no/such/folder",)),
    (("--resume", "1", "--seed", "3"), ("--resume", "--seed")),
    (("--rerun", "999"), ("999",)),
    (("--budget", "200%"), ("200%", "100%")),
    (("--budget", "lora:r=0"), ("rank=0", "accepted")),
    (("--budget", "lots"), ("'lots'", "0.5%")),
    (("--config", "/no/such/file.toml"), ("/no/such/file.toml", ".toml")),
]


BAD_FILES = {
    "malformed.toml": ("rank = = 3", ("malformed",)),
    "array.json": ("[1, 2]", ("top level",)),
    "section.json": (json.dumps({"train": [1, 2]}), ("'train'", "table")),
    "topkey.json": (json.dumps({"trian": {}}), ("'trian'", "train")),
}


def _flag_cases() -> list[Case]:
    cases = [
        Case("run flag", ("run", "--model", "tiny-llama", *args), needles)
        for args, needles in RUN_FLAGS
    ]
    for name, (_text, needles) in BAD_FILES.items():
        cases.append(Case("config file", ("run", "--config", "{tmp}/" + name), needles))
    cases += [
        Case("read command", ("runs", "list", "--limit", "-1"), ("--limit -1", "1 or more")),
        Case("read command", ("runs", "list", "--limit", "0"), ("--limit 0", "1 or more")),
        Case("read command", ("runs", "show", "999"), ("999",)),
        Case("read command", ("compare", "1", "1"), ("compare 1 1", "two different")),
        Case("read command", ("compare", "1", "2", "--flips", "-1"), ("--flips -1",)),
        Case("read command", ("compare", "1", "2", "--resamples", "5"), ("--resamples 5",)),
        Case("read command", ("compare", "1", "2", "--resamples", str(10**9)), ("1,000,000",)),
        Case("read command", ("compare", "1", "2", "--seed", "-3"), ("--seed -3", "2^63-1")),
        Case("read command", ("export", "--format", "csv", "--predictions"), ("--predictions",)),
        Case("read command", ("export", "--format", "xml"), ("'xml'", "csv")),
        Case("read command", ("eval", "1"), ("--lm-eval-tasks",)),
        Case("read command", ("eval", "1", "--lm-eval-tasks", "boolq", "--limit", "0"), ("0",)),
        Case(
            "read command",
            ("eval", "1", "--lm-eval-tasks", "boolq", "--num-fewshot", "-2"),
            ("--num-fewshot -2",),
        ),
        Case("budget", ("budget", "--model", "tiny-llama"), ("--target", "--params")),
        Case("budget", ("budget", "--model", "tiny-llama", "--params", "200%"), ("200%", "100%")),
        Case("budget", ("budget", "--model", "tiny-llama", "--params", "0"), ("'0'",)),
        Case(
            "budget",
            (
                "budget",
                "--model",
                "tiny-llama",
                "--target",
                "lora:r=4,target_modules=q_proj v_proj",
            ),
            ("'q_proj v_proj'", "no spaces"),
        ),
        Case(
            "budget",
            ("budget", "--model", "tiny-llama", "--target", "lora:r=1000"),
            ("rank=1000", "at most"),
        ),
        Case(
            "budget",
            ("budget", "--model", "tiny-llama", "--params", "1%", "--tolerance", "2"),
            ("2",),
        ),
        Case("budget", ("budget", "--model", "tiny-llama", "--target", "lroa:r=4"), ("'lroa'",)),
    ]
    return cases


def _cases() -> list[Case]:
    run_cases = [
        Case(c.kind, ("run", "--model", "tiny-llama", *c.args), c.needles, c.absent)
        for c in _config_cases() + _name_cases()
    ]
    return run_cases + _flag_cases()


def snapshot(db_file: Path, out_root: Path) -> dict[str, Any]:
    """Every row of every table, and a hash of every file under the run outputs."""
    con = sqlite3.connect(db_file)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    rows = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    con.close()
    files = {
        str(p.relative_to(out_root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out_root.rglob("*"))
        if p.is_file()
    }
    return {"rows": rows, "files": files}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real tiny run, done, whose rows and files every case must leave as they are."""
    tmp = tmp_path_factory.mktemp("bad_input")
    db_file, out_root = tmp / "keep.db", tmp / "runs"
    db = f"sqlite:///{db_file}"
    code, output = invoke(["run", *TINY_RUN, "--db", db, "--output-dir", str(out_root)])
    assert code == 0, output
    for name, (text, _needles) in BAD_FILES.items():
        (tmp / name).write_text(text)
    before = snapshot(db_file, out_root)
    assert before["files"] and any(before["rows"].values())
    return {"db": db, "file": db_file, "out": out_root, "before": before, "tmp": tmp}


CASES = _cases()


def test_enough_distinct_cases_by_class() -> None:
    counts = collections.Counter(c.kind.split(":")[0] for c in CASES)
    assert len({c.id for c in CASES}) == len(CASES) >= 200, counts


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_keeps_the_store(store: dict[str, Any], index: int) -> None:
    case = CASES[index]
    args = [a.replace("{tmp}", str(store["tmp"])) for a in case.args]
    if case.args[0] != "budget":  # the one command that reads no store
        args += ["--db", store["db"]]
    if case.args[0] == "run":
        args += ["--output-dir", str(store["out"])]
    if "--resume" in case.args:
        args.remove("--output-dir")
        args.remove(str(store["out"]))
    code, message = invoke(args)
    text = " ".join(message.split())
    assert code != 0, text
    assert "Traceback" not in message
    for needle in case.needles:
        assert needle in text, (needle, text)
    for needle in case.absent:
        assert needle not in text, (needle, text)
    assert snapshot(store["file"], store["out"]) == store["before"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--method", "lroa"], "Did you mean 'lora'?"),
        (["run", "--seed", str(2**64)], "[0, 2^32-1]"),
        (["runs", "list", "--limit", "-1"], "--limit -1"),
    ],
)
def test_the_real_command_prints_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    r = moebench(*args, "--db", f"sqlite:///{tmp_path / 'r.db'}", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_method_names_are_known_without_importing_a_plugin() -> None:
    """The CLI refuses a misspelt --method from the declared names, before torch loads."""
    from moebench.registry import declared_method_names

    assert declared_method_names() == METHODS.names()
