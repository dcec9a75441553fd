"""Sweep files: a YAML grid of runs, parsed, validated and expanded into jobs before any runs.

A sweep names axes (method, model, suite, seed, budget); every combination is one job, and
`include` entries add more. Each job is resolved exactly as `moebench run` resolves one
(`runspec.resolve`, then `budget.apply` for a budget), so a sweep job and a hand-typed run with the
same settings share a spec hash; jobs are deduplicated by it. What a job *is* lives in its RunSpec;
how the sweep executes (retries, workers) lives in SweepExecution and never enters a hash.

Every problem in a file (structure, types, names, values) is collected and raised as one
ConfigError, one sentence per problem, each prefixed with `file:line` from the YAML nodes' marks,
so a sweep is fixed in one pass and nothing starts half-valid. docs/sweeps.md is the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from moebench import budget as budgets
from moebench.config import check, coerce, doc
from moebench.errors import ConfigError, MoebenchError, did_you_mean
from moebench.method import get_method
from moebench.models import check_model_name
from moebench.runspec import TOP_LEVEL, RunSpec, resolve
from moebench.suites import get_suite

TOP_KEYS = ("name", "axes", "set", "methods", "include", "execution")
AXES = ("method", "model", "suite", "seed", "budget")  # product order: the last varies fastest
INCLUDE_KEYS = (*AXES, "set")
INHERITED = ("model", "suite", "seed")  # axes an include entry takes from the grid
RESERVED = (*TOP_LEVEL, "budget")  # what a job is made of: axes, never settings


@dataclass(frozen=True)
class SweepJob:
    spec: RunSpec  # fully resolved, budget applied
    budget: dict[str, Any] | None  # budget.apply's record when the job has a budget, else None
    label: str  # e.g. "loracoe tiny-llama seed=1 budget=lora:r=16"
    line: int  # 1-based line of the grid (`axes:`) or include entry the job comes from


@dataclass(frozen=True)
class SweepExecution:
    """How a sweep executes. Never part of a job's identity: changing it re-runs nothing."""

    retries: int = doc("attempts after a job's first failure (a crash, a lost worker)", 2)
    workers: int | None = doc("jobs run at once (None: one per visible GPU, else 1)", None)
    gpus: int = doc(
        "data-parallel ranks per job (moebench.distributed): GPUs each, or CPU processes", 1
    )

    def __post_init__(self) -> None:
        problems = []
        if self.gpus < 1:
            problems.append(f"gpus={self.gpus} must be >= 1")
        if self.retries < 0:
            problems.append(f"retries={self.retries} must be >= 0")
        if self.workers is not None and self.workers < 1:
            problems.append(f"workers={self.workers} must be >= 1 or null")
        check(problems, "execution")


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    jobs: list[SweepJob]  # deduplicated by spec.hash, in expansion order
    execution: SweepExecution


@dataclass(frozen=True)
class _Setting:
    """One `key: value` as `--set` text, with its line (0: it came from the command line)."""

    key: str
    value: str
    line: int


@dataclass(frozen=True)
class _Choice:
    value: Any  # None: the resolver's default (for budget: the method's own config)
    line: int


@dataclass
class _Entry:
    """The grid or one include entry: the values of each axis, and the entry's own settings."""

    line: int
    choices: dict[str, list[_Choice]]
    settings: list[_Setting] = field(default_factory=list)


@dataclass
class _Plan:
    name: str
    entries: list[_Entry]
    shared: list[_Setting]
    per_method: dict[str, list[_Setting]]
    cli: list[_Setting]
    execution: SweepExecution


class _Problems:
    """Every problem found, once each, in file order; raised together as one ConfigError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._found: dict[tuple[int, str], None] = {}

    def add(self, line: int, message: str) -> None:
        self._found.setdefault((line, f"{self.path}:{line}: {_sentence(message)}"), None)

    def add_setting(self, setting: _Setting, message: str) -> None:
        if setting.line:
            self.add(setting.line, message)
        else:
            text = f"{self.path}: --set {setting.key}={setting.value}: {_sentence(message)}"
            self._found.setdefault((0, text), None)

    def raise_if_any(self) -> None:
        if self._found:
            raise ConfigError("\n".join(text for _, text in sorted(self._found)))


def load_sweep(path: Path, sets: Sequence[tuple[str, str]] = ()) -> Sweep:
    """Parse, validate and expand a sweep file; `sets` (the CLI's `--set`) win over the file's.

    Raises one ConfigError naming every problem; nothing is returned from a partly valid file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file '{path}' does not exist; pass a .yaml sweep file.")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        what = e.problem or e.context or "unreadable"
        raise ConfigError(f"{where}: malformed YAML: {what}.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not readable as YAML: {e}.") from None
    if root is None:
        raise ConfigError(f"{path}:1: the sweep file is empty; it needs axes: {{method: [...]}}.")
    problems = _Problems(path)
    plan = _parse(root, path, sets, problems)
    jobs = _expand(plan, problems)
    problems.raise_if_any()
    unique: dict[str, SweepJob] = {}
    for job in jobs:
        unique.setdefault(job.spec.hash, job)
    return Sweep(plan.name, path, list(unique.values()), plan.execution)


# --- parsing: YAML nodes -> a plan, every problem with its line ------------------------------


def _parse(root: Node, path: Path, sets: Sequence[tuple[str, str]], problems: _Problems) -> _Plan:
    top = {key: (line, node) for key, line, node in _mapping(root, "the sweep file", problems)}
    for key, (line, _) in top.items():
        if key not in TOP_KEYS:
            problems.add(line, _unknown(key, "the sweep file", TOP_KEYS))
    name = path.stem
    if "name" in top:
        line, node = top["name"]
        value = _value(node)
        if isinstance(value, str) and value.strip():
            name = value.strip()
        else:
            problems.add(line, f"name={value!r} must be a non-empty string")
    grid: _Entry | None = None
    if "axes" in top:
        line, node = top["axes"]
        grid = _entry(node, line, "axes", AXES, None, problems)
    elif isinstance(root, MappingNode):
        problems.add(_line(root), "the sweep has no 'axes'; give at least axes: {method: [...]}")
    shared = _settings(top["set"][1], "set", problems) if "set" in top else []
    per_method: dict[str, list[_Setting]] = {}
    if "methods" in top and not _is_null(top["methods"][1]):
        for key, line, node in _mapping(top["methods"][1], "methods", problems):
            try:
                method = get_method(key).name
            except MoebenchError as e:
                problems.add(line, str(e))
                continue
            per_method[method] = [] if _is_null(node) else _settings(node, key, problems)
    entries = [grid] if grid is not None else []
    if "include" in top and not _is_null(top["include"][1]):
        line, node = top["include"]
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                entry = _entry(item, _line(item), f"include[{i}]", INCLUDE_KEYS, grid, problems)
                if entry is not None:
                    entries.append(entry)
        else:
            problems.add(line, f"include must be a list of entries, not {_describe(node)}")
    cli = [_Setting(k, v, 0) for k, v in sets]
    for s in cli:
        if s.key in RESERVED:
            problems.add_setting(s, _reserved(s.key))
    execution = SweepExecution()
    if "execution" in top and not _is_null(top["execution"][1]):
        execution = _execution(top["execution"][1], problems)
    cli = [s for s in cli if s.key not in RESERVED]
    return _Plan(name, entries, shared, per_method, cli, execution)


def _entry(
    node: Node,
    line: int,
    what: str,
    keys: tuple[str, ...],
    grid: _Entry | None,
    problems: _Problems,
) -> _Entry | None:
    """The grid (`axes`) or an include entry; an include takes the model, suite and seed axes it
    omits from the grid (the same setting, another variant), and no budget unless it names one."""
    if not isinstance(node, MappingNode):
        problems.add(line, f"{what} must be a mapping of axis: values, not {_describe(node)}")
        return None
    choices: dict[str, list[_Choice]] = {}
    settings: list[_Setting] = []
    for key, key_line, value in _mapping(node, what, problems):
        if key == "set" and "set" in keys:
            settings = _settings(value, f"{what}.set", problems)
        elif key in keys:
            choices[key] = _choices(key, value, f"{what}.{key}", problems)
        else:
            problems.add(key_line, _unknown(key, what, keys))
    if "method" not in choices:
        problems.add(line, f"{what} has no 'method'; name at least one, e.g. method: [lora]")
        return None
    for axis in AXES:
        if axis not in choices:
            inherited = grid.choices.get(axis) if grid and axis in INHERITED else None
            choices[axis] = inherited or [_Choice(None, line)]
    return _Entry(line, choices, settings)


def _choices(axis: str, node: Node, what: str, problems: _Problems) -> list[_Choice]:
    """An axis' values (a scalar is a one-item list), each checked at its own line."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    if not items:
        problems.add(_line(node), f"{what} is an empty list; give a value or leave the axis out")
    out = []
    for item in items:
        if not isinstance(item, ScalarNode):
            problems.add(_line(item), f"{what} takes single values, not {_describe(item)}")
            continue
        try:
            out.append(_Choice(_check_choice(axis, _value(item)), _line(item)))
        except MoebenchError as e:
            problems.add(_line(item), str(e))
    return out


def _check_choice(axis: str, value: Any) -> Any:
    """The value an axis means, or the MoebenchError saying why it cannot be used."""
    if axis == "budget":
        if value is None or (isinstance(value, str | int | float) and not isinstance(value, bool)):
            return None if value is None else str(value)
        raise ConfigError(f"budget={value!r} must be a target such as lora:r=16, 0.5% or 2.3M")
    if axis == "seed":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"seed={value!r} is not an integer")
    if not isinstance(value, str):
        raise ConfigError(f"{axis}={value!r} is not a name")
    if axis == "method":
        return get_method(value).name
    if axis == "suite":
        return get_suite(value).name
    check_model_name(value)
    return value


def _settings(node: Node, what: str, problems: _Problems) -> list[_Setting]:
    """`key: value` pairs as `--set` text; a mapping value is a section (`train: {lr: 1e-4}`)."""
    if _is_null(node):
        return []
    pairs: list[tuple[str, int, Node]] = []
    for key, line, value in _mapping(node, what, problems):
        if isinstance(value, MappingNode):
            pairs += [(f"{key}.{k}", kl, v) for k, kl, v in _mapping(value, key, problems)]
        else:
            pairs.append((key, line, value))
    out = []
    for key, line, value in pairs:
        if key in RESERVED:
            problems.add(line, _reserved(key))
            continue
        try:
            out.append(_Setting(key, _as_text(value), line))
        except ValueError as e:
            problems.add(line, f"{key}: {e}")
    return out


def _as_text(node: Node) -> str:
    """The `--set` text meaning the same as a YAML value: lists comma-joined, null as none."""
    if isinstance(node, SequenceNode):
        items = [_scalar_text(item) for item in node.value]
        if not items:
            raise ValueError("an empty list cannot be given (nor with --set); leave the key out")
        if any("," in item for item in items):
            raise ValueError("a list item holds a comma, which would split it in two")
        return ",".join(items)
    return _scalar_text(node)


def _scalar_text(node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise ValueError(f"takes a single value or a list of them, not {_describe(node)}")
    value = _value(node)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def _execution(node: Node, problems: _Problems) -> SweepExecution:
    hints = typing.get_type_hints(SweepExecution)
    names = tuple(f.name for f in dataclasses.fields(SweepExecution))
    values: dict[str, Any] = {}
    for key, line, value in _mapping(node, "execution", problems):
        if key not in names:
            problems.add(line, _unknown(key, "execution", names))
            continue
        try:
            values[key] = coerce(_value(value), hints[key], f"execution.{key}")
            SweepExecution(**{key: values[key]})  # each field is checked on its own line
        except (ValueError, ConfigError) as e:
            problems.add(line, str(e))
            values.pop(key, None)
    return SweepExecution(**values)


def _mapping(node: Node, what: str, problems: _Problems) -> list[tuple[str, int, Node]]:
    """(key, line, value node) of a YAML mapping; a non-mapping or a repeated key is a problem."""
    if not isinstance(node, MappingNode):
        problems.add(_line(node), f"{what} must be a mapping of key: value, not {_describe(node)}")
        return []
    out: list[tuple[str, int, Node]] = []
    seen: dict[str, int] = {}
    for key_node, value in node.value:
        key = _value(key_node) if isinstance(key_node, ScalarNode) else None
        if not isinstance(key, str):
            problems.add(_line(key_node), f"{what} has a key that is not a name: {key!r}")
        elif key in seen:
            problems.add(_line(key_node), f"{what} has '{key}' twice (also line {seen[key]})")
        else:
            seen[key] = _line(key_node)
            out.append((key, seen[key], value))
    return out


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _value(node: Node) -> Any:
    return SafeConstructor().construct_object(node, deep=True)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and _value(node) is None


def _describe(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return repr(_value(node))


def _unknown(key: str, what: str, allowed: Sequence[str]) -> str:
    hint = did_you_mean(key, allowed).strip().rstrip("?")
    return f"unknown key '{key}' in {what}; it takes {', '.join(allowed)}" + (
        f" ({hint.lower()}?)" if hint else ""
    )


def _reserved(key: str) -> str:
    return f"'{key}' is an axis, not a setting; give it under axes or in an include entry"


def _sentence(message: str) -> str:
    text = message.strip()
    if text.endswith("?."):  # resolve() puts a full stop after its did-you-mean question
        text = text[:-1]
    return text if text.endswith((".", "?")) else text + "."


# --- expansion: the grid and includes -> resolved jobs -----------------------------------------


def _expand(plan: _Plan, problems: _Problems) -> list[SweepJob]:
    suites = {c.value for e in plan.entries for c in e.choices["suite"]}
    jobs = []
    for entry in plan.entries:
        for method, model, suite, seed, target in itertools.product(
            *(entry.choices[axis] for axis in AXES)
        ):
            options = {"method": method.value, "model": model.value}
            options |= {"suite": suite.value, "seed": seed.value}
            # Lowest first: shared `set`, `methods.<name>`, the entry's `set`, the CLI's --set.
            settings = [*plan.shared, *plan.per_method.get(method.value, [])]
            settings += [*entry.settings, *plan.cli]
            spec = _resolve(options, settings, entry.line, problems)
            if spec is None:
                continue
            record = None
            if target.value is not None:
                try:
                    spec, record = budgets.apply(spec, target.value)
                except MoebenchError as e:
                    problems.add(target.line, str(e))
                    continue
            parts = [spec.method, spec.model, *([spec.suite] if len(suites) > 1 else [])]
            parts += [f"seed={spec.seed}"] + ([f"budget={target.value}"] if record else [])
            parts += [f"{s.key}={s.value}" for s in entry.settings]
            jobs.append(SweepJob(spec, record, " ".join(parts), entry.line))
    for method, settings in plan.per_method.items():
        if not any(j.spec.method == method for j in jobs):  # checked even when no job uses it
            _resolve({"method": method}, settings, 0, problems)
    return jobs


def _resolve(
    options: dict[str, Any], settings: list[_Setting], line: int, problems: _Problems
) -> RunSpec | None:
    """`resolve`, with a failure blamed on the settings that cause it, else on the entry's line.

    A setting is to blame when leaving it out mends the job; failing that (several bad settings),
    each setting that fails on its own is; failing that (settings that clash), the entry is.
    """
    full = _try(options, settings)
    if isinstance(full, RunSpec):
        return full
    blamed = [s for s in settings if isinstance(_try(options, _without(settings, s)), RunSpec)]
    for s in blamed:
        problems.add_setting(s, full)
    if not blamed:
        for s in settings:
            alone = _try(options, [s])
            if not isinstance(alone, RunSpec):
                problems.add_setting(s, alone)
                blamed.append(s)
    if not blamed and line:
        problems.add(line, full)
    return None


def _try(options: dict[str, Any], settings: list[_Setting]) -> RunSpec | str:
    try:
        return resolve(sets=[(s.key, s.value) for s in settings], options=options)
    except MoebenchError as e:
        return str(e)


def _without(settings: list[_Setting], setting: _Setting) -> list[_Setting]:
    return [s for s in settings if s is not setting]
