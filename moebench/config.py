"""Typed configuration: dataclass schemas, loading, `--set` overrides and validation.

Config flows one way: field defaults < suite defaults < config file < `--set key=value` < the
first-class CLI options. Defaults live only in dataclass fields. Every problem found while
resolving is collected and reported together, as one sentence per problem, so a user fixes a
config in one pass rather than one error at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from moebench.errors import ConfigError, did_you_mean

C = TypeVar("C")

# Settings that say how a run executes, not what it is: left out of the hash, so the same
# experiment checkpointed more often, or scored by another engine or batch size, is the same job.
# tests/test_execution_settings.py proves, setting by setting, that each leaves metrics and
# predictions unchanged (on CPU in fp32; bf16 batches on a GPU are not covered by that proof); a
# setting that fails it belongs in the hash. `train.device` stays in the hash: with precision
# `auto` it decides bf16 (cuda) or fp32 (cpu), which changes numbers.
EXECUTION_FIELDS: dict[str, tuple[str, ...]] = {
    "train": ("checkpoint_every", "keep_checkpoints", "stats_every"),
    "eval": ("engine", "batch_size"),
}


def without_execution(config: Mapping[str, Any]) -> dict[str, Any]:
    """A spec dict (`RunSpec.to_dict()` or a stored config) without its execution settings."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    for section, names in EXECUTION_FIELDS.items():
        for name in names:
            if isinstance(out.get(section), dict):
                out[section].pop(name, None)
    return out


def field_help(cls: type, name: str) -> str:
    """Each field documents itself once, in its `metadata["help"]`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    return ""


@dataclass(frozen=True)
class Range:
    """The accepted values of a numeric field, declared beside it: `doc(..., ge=1, le=4096)`.

    Every numeric field has both ends: a value past a sane upper end (a rank of 10^9, a seed past
    2^63) would otherwise fail deep inside torch with a traceback, or run for days.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})"
        return f"{low}, {high}"


def _num(x: float | None) -> str:
    if x is None:
        return "inf"
    if float(x).is_integer() and abs(x) >= 10_000:
        exp = math.log2(x + 1) if x > 0 else 0
        return f"2^{int(exp)}-1" if exp.is_integer() else str(int(x))
    return f"{x:g}"


def doc(
    help_text: str,
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    names: str | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field with its one-line help and, for a number, its accepted range (for names,
    the registry they come from); `default` may be a value or a factory."""
    metadata: dict[str, Any] = {"help": help_text}
    if names is not None:
        metadata["names"] = names
    if (ge, gt, le, lt) != (None, None, None, None):
        if (ge is None) == (gt is None) or (le is None) == (lt is None):
            raise TypeError("a range needs one lower end (ge or gt) and one upper (le or lt)")
        metadata["range"] = Range(ge=ge, gt=gt, le=le, lt=lt)
    if callable(default) and not isinstance(default, type) and default is not None:
        return dataclasses.field(default_factory=default, metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def field_range(cls: type, name: str) -> Range | None:
    """The declared range of a numeric field, or None for a field that is not a number."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range")
    return None


def accepted_values(cls: type, name: str) -> str:
    """What a field accepts, in words, for `moebench methods`: its range, choices or registry."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    tp = typing.get_type_hints(cls)[name]
    optional = type(None) in get_args(tp)
    if "range" in f.metadata:
        kind = "integer" if int in (tp, *get_args(tp)) else "number"
        text = f"{kind} in {f.metadata['range']}"
    elif "names" in f.metadata:
        text = f"{f.metadata['names']} names (`moebench tasks`)"
    else:
        text = _type_name(tp).replace(" or None", "")
    return text + (" or None" if optional and "None" not in text else "")


def range_problems(cfg: Any) -> list[str]:
    """One sentence per field of a config whose value is outside its declared range."""
    problems = []
    for f in dataclasses.fields(cfg):
        bounds = f.metadata.get("range")
        value = getattr(cfg, f.name)
        if bounds is None or value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float) or value not in bounds:
            kind = "an integer" if isinstance(value, int) else "a number"
            problems.append(f"{f.name}={value!r} is out of range; accepted: {kind} in {bounds}")
    return problems


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _type_name(tp: Any) -> str:
    """A type as a user reads it: 'an integer or None', "'linear' | 'cosine'"."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "a comma-separated list"
    if tp is type(None):
        return "None"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a CLI string or a parsed file value to the annotated type, or raise ValueError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"{key}={value!r} is not {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ValueError(
            f"{key}={value!r} is not allowed; expected one of: {', '.join(map(str, allowed))}"
        )
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        if any(isinstance(v, str) and not v.strip() for v in items):
            raise ValueError(f"{key}={value!r} has an empty item; write e.g. q_proj,v_proj")
        (item_tp, *_rest) = get_args(tp) or (str,)
        return tuple(coerce(v.strip() if isinstance(v, str) else v, item_tp, key) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"{key}={value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}={value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{key}={value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}={value!r} is not a string")
    return value


def build(cls: type[C], values: Mapping[str, Any], section: str) -> C:
    """Instantiate a config dataclass from loosely typed values, collecting every problem."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            problems.append(
                f"unknown {section} key '{key}' (known: {', '.join(sorted(names))})"
                + did_you_mean(key, names).rstrip("?").replace(" Did you mean", "; did you mean")
            )
            continue
        try:
            kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {section} config: {e}.") from None


def name_problems(cfg: Any, registries: Mapping[str, Collection[str]]) -> list[str]:
    """One sentence per name in a config field that its registry does not know; a field says
    which registry its names belong to with `doc(..., names="task")`."""
    problems = []
    for f in dataclasses.fields(cfg):
        kind = f.metadata.get("names")
        value = getattr(cfg, f.name)
        if kind is None or value is None:
            continue
        known = registries[kind]
        for name in (value,) if isinstance(value, str) else value:
            if name not in known and name.lower() not in known:
                problems.append(
                    f"{f.name} names {kind} '{name}', which is not registered; accepted: "
                    + ", ".join(sorted(known))
                    + did_you_mean(name, known).rstrip("?").replace(" Did", "; did")
                )
    return problems


def check(problems: list[str], section: str, cfg: Any = None) -> None:
    """Raise one ConfigError listing every problem of a config section: each field outside its
    declared range (when `cfg` is given), then the cross-field problems the section found."""
    problems = (range_problems(cfg) if cfg is not None else []) + problems
    if problems:
        raise ConfigError(f"Invalid {section} config: " + "; ".join(problems) + ".")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable identity of what determines a run's numbers (not where it writes)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def load_file(path: Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a nested dict."""
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass a .json or .toml file.")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"Config file '{path}' is malformed: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a table/object at the top level.")
    return data


def parse_sets(pairs: list[str]) -> list[tuple[str, str]]:
    """Split `key=value` strings; a pair without '=' is reported with the accepted form."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{pair}' is not of the form key=value (e.g. --set rank=8).")
        out.append((key.strip(), value.strip()))
    return out
