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
from collections.abc import Mapping
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


def doc(help_text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its one-line help; `default` may be a value or a factory."""
    if callable(default) and not isinstance(default, type) and default is not None:
        return dataclasses.field(default_factory=default, metadata={"help": help_text}, **kw)
    return dataclasses.field(default=default, metadata={"help": help_text}, **kw)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "comma-separated list"
    return getattr(tp, "__name__", str(tp))


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
        raise ValueError(f"{key}={value!r} is not a {_type_name(tp)}")
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


def check(problems: list[str], section: str) -> None:
    """Raise one ConfigError listing every validation problem of a config section."""
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
