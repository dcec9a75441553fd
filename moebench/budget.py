"""Parameter-budget matching: the config of each method whose trainable count meets a target.

Methods at the same rank differ in size (LoRACoE r=16, E=2 is about twice LoRA r=16), so a fair
comparison fixes the trainable-parameter count instead. A target is either another method's
config (`lora:r=16`), a share of the base model (`0.5%`), or a count (`2.3M`). Each method names
the integer fields the solver may vary (`Method.budget_knobs`, the first preferred); the solver
keeps the other knobs at their defaults when it can and otherwise moves them as little as
possible. Counts come from the methods' closed forms on `ModelShapes`, so GQA's narrower k/v
projections are counted as they are. A method sized by its own preparation stage (LoRA-SMoE)
takes the target count in a config field and meets it when it runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from moebench.config import build, to_dict
from moebench.errors import ConfigError
from moebench.fits import fit_problems
from moebench.method import METHODS, Method, ModelShapes, get_method
from moebench.runspec import RunSpec

DEFAULT_TOLERANCE = 0.05
KNOB_ALIASES = {"r": "rank", "e": "num_experts", "n": "num_experts", "k": "top_k"}
KNOB_RANGE = range(1, 4097)
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


@dataclass(frozen=True)
class Target:
    text: str  # as the user wrote it
    params: int  # trainable parameters to match
    method: str | None = None  # the reference method, when the target is a config
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Solution:
    method: str
    config: Any
    target: int
    achieved: int | None  # None: decided by the method's preparation stage at run time
    active: int | None  # parameters one token passes through (MoE top-k routing)
    knobs: dict[str, Any]

    @property
    def error(self) -> float | None:
        return None if self.achieved is None else self.achieved / self.target - 1.0

    def within(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return self.error is None or abs(self.error) <= tolerance + 1e-12

    def record(self, target: Target) -> dict[str, Any]:
        """What a run stores about the budget it was solved for."""
        return {
            "target": target.text,
            "target_params": self.target,
            "achieved_params": self.achieved,
            "active_params": self.active,
            "relative_error": self.error,
            "knobs": self.knobs,
        }


def parse_target(text: str, shapes: ModelShapes, total_params: int) -> Target:
    """`lora:r=16`, `loracoe:rank=8,num_experts=2`, `0.5%`, `2.3M` or `123456` -> a Target."""
    raw = text.strip()
    if ":" in raw or raw in METHODS:
        name, _, args = raw.partition(":")
        method = get_method(name.strip())
        values: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in args.split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(
                    f"Budget target '{text}' has '{pair}', not key=value; write e.g. lora:r=16."
                )
            values[KNOB_ALIASES.get(key.strip().lower(), key.strip())] = value.strip()
        config = build(method.config_cls, values, section=method.name)
        if method.budget_target_field is not None:
            raise ConfigError(
                f"Budget target '{text}': {method.name} is sized at run time, so it cannot be a "
                "target; use another method's config, a share (0.5%) or a count (2.3M)."
            )
        problems = fit_problems(method, config, shapes, "this model")
        if problems:
            raise ConfigError(f"Budget target '{text}': " + "; ".join(problems) + ".")
        count = method.trainable_parameters(config, shapes)
        if count < 1:
            raise ConfigError(
                f"Budget target '{text}' trains no parameter on this model; name linears it "
                f"has ({', '.join(shapes.linears)})."
            )
        return Target(raw, count, method.name, to_dict(config))
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[kKmMbBgG])?", raw)
    if not match:
        raise ConfigError(
            f"Budget target '{text}' is not understood; write a method config (lora:r=16), "
            "a share of the base model (0.5%) or a count (2.3M)."
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        count = round(number / 100 * total_params)
    else:
        count = round(number * _SUFFIX.get((unit or "").lower(), 1))
    if count < 1:
        raise ConfigError(f"Budget target '{text}' is below one parameter.")
    if count > total_params:
        raise ConfigError(
            f"Budget target '{text}' is {count:,} parameters, more than the whole base model "
            f"({total_params:,}); accepted: a share in (0%, 100%] or a count up to that."
        )
    return Target(raw, count)


def _candidates(base: Any, knob: str) -> list[int]:
    """Values for a secondary knob, nearest the configured value first, larger first on ties
    (fewer experts than configured changes a method more than more of them)."""
    start = getattr(base, knob)
    return sorted(KNOB_RANGE[:256], key=lambda v: (abs(v - start), -v))


def _try(base: Any, values: dict[str, int]) -> Any | None:
    try:
        return dataclasses.replace(base, **values)
    except ConfigError:
        return None


def solve(
    method: Method,
    base: Any,
    shapes: ModelShapes,
    target: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Solution:
    """The config nearest `base` whose closed-form count is within tolerance of `target`.

    For each setting of the secondary knobs (nearest the configured values first), the
    preferred knob is scanned; the first setting with a value within tolerance wins, and within
    it the value nearest the target. If no setting gets within tolerance, the nearest overall.
    """
    if method.budget_target_field is not None:
        config = dataclasses.replace(base, **{method.budget_target_field: target})
        return Solution(method.name, config, target, None, None, {})
    if not method.budget_knobs:
        count = method.trainable_parameters(base, shapes)
        return Solution(
            method.name, base, target, count, method.active_parameters(base, shapes), {}
        )
    primary, *secondary = method.budget_knobs
    best: tuple[float, Any] | None = None
    for combo in _secondary_settings(method, base, secondary):
        within: tuple[float, Any] | None = None
        for v in KNOB_RANGE:
            config = _try(base, {**combo, primary: v})
            if config is None:
                continue
            count = method.trainable_parameters(config, shapes)
            err = abs(count / target - 1.0)
            if best is None or err < best[0]:
                best = (err, config)
            if err <= tolerance + 1e-12 and (within is None or err < within[0]):
                within = (err, config)
            if count > target * (1 + tolerance) and v > 1:
                break  # counts grow with the preferred knob: nothing further can fit
        if within is not None:
            best = within
            break
    if best is None:
        raise ConfigError(f"No valid {method.name} config found for a budget of {target}.")
    config = best[1]
    knobs = {k: getattr(config, k) for k in method.budget_knobs}
    return Solution(
        method.name,
        config,
        target,
        method.trainable_parameters(config, shapes),
        method.active_parameters(config, shapes),
        knobs,
    )


def _secondary_settings(method: Method, base: Any, knobs: list[str]) -> list[dict[str, int]]:
    if not knobs:
        return [{}]
    if len(knobs) == 1:
        return [{knobs[0]: v} for v in _candidates(base, knobs[0])]
    raise ConfigError(f"{method.name}: the budget solver varies at most two knobs.")


def solve_all(
    shapes: ModelShapes, target: int, tolerance: float = DEFAULT_TOLERANCE
) -> list[Solution]:
    """One solution per registered method, from its default config."""
    return [solve(method, method.config_cls(), shapes, target, tolerance) for _, method in METHODS]


def model_shapes(model: str) -> tuple[ModelShapes, int]:
    """(shapes, total parameters) of a model, from its config alone."""
    from moebench.models import model_config, total_parameters

    config = model_config(model)
    return ModelShapes.from_config(config), total_parameters(config)


def apply(
    spec: RunSpec, text: str, tolerance: float = DEFAULT_TOLERANCE
) -> tuple[RunSpec, dict[str, Any]]:
    """Re-size a run's method to a budget: the solved spec and the record to store with it."""
    shapes, total = model_shapes(spec.model)
    target = parse_target(text, shapes, total)
    solution = solve(get_method(spec.method), spec.method_config, shapes, target.params, tolerance)
    if not solution.within(tolerance):
        raise ConfigError(
            f"No {spec.method} config lands within {tolerance:.0%} of the budget '{text}' "
            f"({target.params:,} parameters on {spec.model}); the nearest, "
            f"{_knob_text(solution.knobs)}, has {solution.achieved:,} "
            f"({solution.error:+.1%}); widen --tolerance or change the target."
        )
    record = {**solution.record(target), "model": spec.model, "tolerance": tolerance}
    return dataclasses.replace(spec, method_config=solution.config), record


def _knob_text(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "its default"
