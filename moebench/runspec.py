"""The resolved description of one run, and how it is assembled from defaults and overrides.

Precedence, lowest first: dataclass defaults, the suite's defaults, a config file, `--set
key=value`, then the first-class CLI options. The result is a frozen `RunSpec` whose `to_dict()`
is what the store keeps: feeding that dict back through `from_dict` reproduces the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moebench.config import Range, build, config_hash, name_problems, to_dict, without_execution
from moebench.errors import ConfigError, did_you_mean
from moebench.evaluate import EvalConfig
from moebench.method import get_method
from moebench.mixture import DataConfig
from moebench.models import check_model_name
from moebench.suites import get_suite
from moebench.task import TASKS
from moebench.train import TrainConfig

SECTIONS = ("method_config", "train", "eval", "data")
TOP_LEVEL = ("method", "model", "suite", "seed")
ALIASES = {"method": "method_config"}  # `--set method.rank=8` reads naturally
# The data order seeds a torch generator with seed * 100_003 + epoch, which must stay below 2^64.
SEED_RANGE = Range(ge=0, le=2**32 - 1)


@dataclass(frozen=True)
class RunSpec:
    method: str
    model: str
    suite: str
    seed: int
    method_config: Any
    train: TrainConfig
    eval: EvalConfig
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.model,
            "suite": self.suite,
            "seed": self.seed,
            "method_config": to_dict(self.method_config),
            "train": to_dict(self.train),
            "eval": to_dict(self.eval),
            "data": to_dict(self.data),
        }

    def identity(self) -> dict[str, Any]:
        """`to_dict()` without the execution settings: what the hash covers."""
        out = without_execution(self.to_dict())
        out["method_config"] = get_method(self.method).identity(out["method_config"])
        return out

    @property
    def hash(self) -> str:
        """The job's key: equal for runs that must produce the same numbers."""
        return config_hash(self.identity())


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def resolve(
    *,
    base: Mapping[str, Any] | None = None,
    sets: list[tuple[str, str]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Layer a config dict (file or stored run), `--set` pairs and CLI options into a RunSpec."""
    base = dict(base or {})
    unknown_top = set(base) - set(TOP_LEVEL) - set(SECTIONS)
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise ConfigError(
            f"Unknown config key '{key}'; the top level takes {', '.join(TOP_LEVEL + SECTIONS)}."
            + did_you_mean(key, TOP_LEVEL + SECTIONS)
        )
    top: dict[str, Any] = {"method": "lora", "model": "smollm2-135m", "suite": "mini", "seed": 42}
    top.update({k: base[k] for k in TOP_LEVEL if k in base})
    for s in SECTIONS:
        if not isinstance(base.get(s) or {}, dict):
            raise ConfigError(
                f"Config section '{s}' must be a table/object of key = value, "
                f"not {type(base[s]).__name__}."
            )
    sections: dict[str, dict[str, Any]] = {s: dict(base.get(s) or {}) for s in SECTIONS}

    # Top-level choices first: which method's fields exist depends on them.
    pending = list(sets or [])
    for key, value in list(pending):
        if key in TOP_LEVEL:
            top[key] = value
            pending.remove((key, value))
    for key in TOP_LEVEL:
        if options and options.get(key) is not None:
            top[key] = options[key]
    try:
        top["seed"] = int(top["seed"])
    except (TypeError, ValueError):
        raise ConfigError(f"seed={top['seed']!r} is not an integer.") from None
    if top["seed"] not in SEED_RANGE:
        raise ConfigError(
            f"seed={top['seed']} is out of range; accepted: an integer in {SEED_RANGE}."
        )

    check_model_name(str(top["model"]))
    method = get_method(str(top["method"]))
    suite = get_suite(str(top["suite"]))
    classes = {
        "method_config": method.config_cls,
        "train": TrainConfig,
        "eval": EvalConfig,
        "data": DataConfig,
    }
    layered = {
        "method_config": {},
        "train": dict(suite.train_defaults),
        "eval": dict(suite.eval_defaults),
        "data": {},
    }
    for s in SECTIONS:
        layered[s].update(sections[s])

    problems = []
    for key, value in pending:
        try:
            section, name = _locate_key(key, classes, method.name)
        except ConfigError as e:
            problems.append(str(e).rstrip("."))
            continue
        layered[section][name] = value
    for key in ("max_steps",):
        if options and options.get(key) is not None:
            layered["train"][key] = options[key]
    for key in ("limit",):
        if options and options.get(key) is not None:
            layered["eval"][key] = options[key]
    if options and options.get("decontaminate"):
        layered["data"]["decontaminate"] = True

    try:
        layered["method_config"] = method.upgrade(dict(layered["method_config"]))
    except ConfigError as e:
        problems.append(str(e).rstrip("."))
    built: dict[str, Any] = {}
    for s, cls in classes.items():
        try:
            built[s] = build(cls, layered[s], section=method.name if s == "method_config" else s)
        except ConfigError as e:
            problems.append(str(e).rstrip("."))
    for cfg in built.values():
        problems += name_problems(cfg, {"task": TASKS.names()})
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    return RunSpec(
        method=method.name,
        model=str(top["model"]),
        suite=suite.name,
        seed=top["seed"],
        method_config=built["method_config"],
        train=built["train"],
        eval=built["eval"],
        data=built["data"],
    )


def _locate_key(key: str, classes: dict[str, type], method: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        section = ALIASES.get(section, section)
        if section not in classes:
            raise ConfigError(
                f"Unknown config section '{section}' in --set {key}; "
                "use method., train., eval. or data."
            )
        return section, name
    owners = [s for s, cls in classes.items() if key in _field_names(cls)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        choices = " or ".join(f"{'method' if o == 'method_config' else o}.{key}" for o in owners)
        raise ConfigError(f"--set {key} is ambiguous; write {choices}.")
    known = set().union(*(_field_names(c) for c in classes.values()))
    raise ConfigError(
        f"Unknown config key '{key}' for method '{method}'; `moebench methods` lists every "
        "method, train and eval field." + did_you_mean(key, known)
    )
