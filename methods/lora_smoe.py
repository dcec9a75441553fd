"""LoRA-SMoE (Xu and Diao 2025, arXiv 2505.06272): experts per module allocated by sensitivity.

Three stages; the first two run in `prepare`, on the unadapted model, before injection:

1. Sensitivity per task t of the training mixture (moebench.sensitivity), by `protocol`:
   `authors` (default: the procedure methods.md reads in the authors' get_sensitivity.py, which
   gave the paper's maps) holds the model in fp16, trains one decoder layer per step with BAdam's
   BlockOptimizer (AdamW lr 1e-5, top layer first, switching every step), gives each of the L
   layers its own `sensitivity_samples` examples (L times that per task), clips each step's
   gradient to norm 1.0 and sums its fp16 squares; it departs from the script only in using the
   run's prompt template and a seeded shuffle. `clean` is the formula itself:
   `S_t(W) = sum ||dL/dW||_F^2` over `sensitivity_samples` examples per task, all layers on the
   same ones, fp32, no clipping, no weight updates. Cached per (model, task, protocol, samples,
   seed, data); the model comes back unchanged either way.
2. Allocation: per task and per module group, `tau = percentile(S_t over the group, 100(1-p))`
   and `n(m) = #{t : S_t(m) > tau}`, so `n` is in 0..T and `sum n ~= p T M`. A budget in experts
   or in trainable parameters is met by searching p over every value at which the allocation
   can change (the allocation only grows with p) and keeping the closest.
3. Fine-tuning: n=0 no adapter, n=1 plain LoRA, n>=2 a LoRAMoE layer (dense softmax router, no
   LBC) with n rank-r experts. The authors did not release this layer; this is methods.md's.

The allocation is written into the config as `name=n` items, so the stored config rebuilds the
same modules without measuring again, and a user can pass an allocation to skip stages 1 and 2.
Trainable parameters: `sum_{n>=1} n r (d_in + d_out) + sum_{n>=2} n d_in`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from moebench.components import ALL_LINEARS, suffix
from moebench.config import check, doc
from moebench.errors import ConfigError, DataError
from moebench.method import (
    METHODS,
    BatchContext,
    LinearShape,
    Method,
    ModelShapes,
    PrepareContext,
    Prepared,
)
from moebench.methods.lora import LoRALinear
from moebench.methods.loramoe import LoRAMoELinear
from moebench.sensitivity import PROTOCOLS, measure_cached

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
SINGLE_TASK_NOTE = "n is 0 or 1 for every module: lora-smoe reduces to LoRA on the selected modules"
BUDGET_TOLERANCE = 0.05


@dataclass(frozen=True)
class LoRASMoEConfig:
    rank: int = doc("rank r of every expert (and of the plain LoRA where n=1)", 8, ge=1, le=2**16)
    alpha: float = doc(
        "scale numerator: each expert's update is multiplied by alpha / rank", 16.0, gt=0, le=1e6
    )
    dropout: float = doc(
        "dropout on the experts' input (router and frozen path see the raw x)", 0.05, ge=0, lt=1
    )
    fraction: float = doc(
        "p: share of each group's modules above the per-task threshold (authors' file: 0.6); "
        "a budget overrides it and the solved p is written here",
        0.6,
        gt=0,
        le=1,
    )
    budget_experts: int | None = doc(
        "solve p so the total number of experts (sum of n) is as close as possible to this",
        None,
        ge=1,
        le=10**7,
    )
    budget_params: int | None = doc(
        "solve p so trainable parameters land within 5% of this (the closest allocation wins)",
        None,
        ge=1,
        le=10**12,
    )
    groups: Literal["module", "attention"] = doc(
        "threshold groups: module = each of q/k/v/o/gate/up/down its own group; attention = "
        "the authors' released setting, one group of attention modules, FFN gets nothing",
        "module",
    )
    target_modules: tuple[str, ...] = doc(
        "module-name suffixes that may receive experts (comma-separated on the CLI)", ALL_LINEARS
    )
    protocol: Literal["authors", "clean"] = doc(
        "sensitivity pass: authors = the authors' script as methods.md reads it (fp16, BAdam one "
        "layer per step, 8 examples per layer, clipped to norm 1.0; run template, seeded "
        "shuffle); clean = sum of squared fp32 gradients, no clipping, no weight updates",
        "authors",
    )
    sensitivity_samples: int = doc(
        "examples per decoder layer under protocol=authors (L times this per task, each layer "
        "its own); per task under protocol=clean (every layer measured on the same ones)",
        8,
        ge=1,
        le=10_000,
    )
    allocation: tuple[str, ...] = doc(
        "experts per module as qualified.module.name=n items; filled by the preparation stage, "
        "or given to skip it",
        (),
    )

    def __post_init__(self) -> None:
        problems = []
        if self.budget_experts is not None and self.budget_params is not None:
            problems.append(
                f"budget_experts={self.budget_experts} and budget_params={self.budget_params} "
                "are both set; give at most one budget"
            )
        if self.groups not in ("module", "attention"):
            problems.append(f"groups={self.groups!r} must be 'module' or 'attention'")
        if not self.target_modules:
            problems.append("target_modules is empty; name at least one linear, e.g. q_proj")
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol={self.protocol!r} must be one of: {', '.join(PROTOCOLS)}")
        problems += _allocation_problems(self.allocation)
        check(problems, "lora-smoe", self)


def _allocation_problems(items: Sequence[str]) -> list[str]:
    problems, seen = [], set()
    for item in items:
        name, sep, count = item.partition("=")
        name = name.strip()
        try:
            n = int(count.strip())
        except ValueError:
            n = -1
        if not sep or not name or n < 0:
            problems.append(
                f"allocation item {item!r} is not of the form qualified.module.name=n with an "
                "integer n >= 0"
            )
        elif name in seen:
            problems.append(f"allocation names {name} twice")
        seen.add(name)
    return problems


@functools.lru_cache(maxsize=16)
def parse_allocation(items: tuple[str, ...]) -> dict[str, int]:
    """`("a.q_proj=2", ...)` -> `{"a.q_proj": 2}` (items were validated by the config)."""
    out = {}
    for item in items:
        name, _, count = item.partition("=")
        out[name.strip()] = int(count)
    return out


def format_allocation(allocation: Mapping[str, int]) -> tuple[str, ...]:
    return tuple(f"{name}={n}" for name, n in allocation.items())


# --- stage 2: allocation (pure functions of the sensitivity table) -----------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear interpolation) percentile, q in [0, 100]."""
    v = sorted(values)
    pos = q / 100.0 * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def group_of(module: str, groups: str) -> str | None:
    """The threshold group of a module, or None when its group receives no experts."""
    kind = suffix(module)
    if groups == "attention":
        return "attention" if kind in ATTENTION_LINEARS else None
    return kind


def module_scores(weight_scores: Mapping[str, float], modules: Iterable[str]) -> dict[str, float]:
    """Per-module sensitivity (that of its `.weight`) for the given qualified module names."""
    return {m: weight_scores[f"{m}.weight"] for m in modules}


def allocate(
    scores: Mapping[str, Mapping[str, float]], fraction: float, groups: str
) -> dict[str, int]:
    """Experts per module from per-task module sensitivities `scores[task][module]`.

    Every task's table must name the same modules; the result keeps the first table's order.
    The comparison is strict, as in the method's definition, so even p=1 (tau = the group's
    minimum) leaves each group's least sensitive module without that task's expert.
    """
    tasks = list(scores)
    if not tasks:
        raise ValueError("allocate needs the sensitivities of at least one task")
    modules = list(scores[tasks[0]])
    for t in tasks[1:]:
        if set(scores[t]) != set(modules):
            raise ValueError(f"task {t}'s sensitivities name other modules than {tasks[0]}'s")
    members: dict[str, list[str]] = {}
    for m in modules:
        g = group_of(m, groups)
        if g is not None:
            members.setdefault(g, []).append(m)
    n = dict.fromkeys(modules, 0)
    for t in tasks:
        for group in members.values():
            tau = percentile([scores[t][m] for m in group], 100.0 * (1.0 - fraction))
            for m in group:
                n[m] += scores[t][m] > tau
    return n


def allocation_parameters(
    allocation: Mapping[str, int], rank: int, linears: Mapping[str, LinearShape]
) -> int:
    """Closed-form trainable parameters of an allocation; shapes by module suffix."""
    total = 0
    for name, n in allocation.items():
        if n < 1:
            continue
        kind = suffix(name)
        if kind not in linears:
            raise ConfigError(
                f"lora-smoe allocation names {name}, whose kind {kind} is not one of the "
                f"model's linears ({', '.join(linears)})."
            )
        s = linears[kind]
        total += n * rank * (s.d_in + s.d_out) + (n * s.d_in if n >= 2 else 0)
    return total


def candidate_fractions(
    scores: Mapping[str, Mapping[str, float]], groups: str
) -> list[tuple[float, bool]]:
    """(p, is_breakpoint) covering every allocation that some p in (0, 1] gives.

    With group size M the threshold sits at sorted position (1-p)(M-1), so which modules pass
    can only change where that position is an integer. Between two consecutive breakpoints (of
    all group sizes together) the allocation is constant, so their midpoints plus the
    breakpoints themselves (where ties among scores may give an allocation of their own)
    reach every state.
    """
    sizes: dict[str, int] = {}
    for m in next(iter(scores.values())):
        g = group_of(m, groups)
        if g is not None:
            sizes[g] = sizes.get(g, 0) + 1
    points = {0.0, 1.0}
    for size in sizes.values():
        if size >= 2:
            points.update(1.0 - k / (size - 1) for k in range(size))
    ordered = sorted(points)
    out = [(p, True) for p in ordered if p > 0.0]
    out += [((a + b) / 2, False) for a, b in itertools.pairwise(ordered)]
    return sorted(out)


def solve_fraction(
    scores: Mapping[str, Mapping[str, float]],
    groups: str,
    cost: Callable[[Mapping[str, int]], int],
    target: int,
) -> tuple[float, dict[str, int]]:
    """The p (and its allocation) whose `cost` is closest to `target`; on a tie, a p inside an
    interval (robust to rounding) over a breakpoint, then the smaller p."""
    best: tuple[tuple[int, bool, float], float, dict[str, int]] | None = None
    for p, is_breakpoint in candidate_fractions(scores, groups):
        alloc = allocate(scores, p, groups)
        rank = (abs(cost(alloc) - target), is_breakpoint, p)
        if best is None or rank < best[0]:
            best = (rank, p, alloc)
    assert best is not None
    return best[1], best[2]


# --- stage 3: the layers -------------------------------------------------------------------------


class LoRASMoE(Method):
    name = "lora-smoe"
    help = "LoRA-SMoE: experts per module allocated by per-task gradient sensitivity."
    config_cls = LoRASMoEConfig
    # The allocation, and so the size, is decided in `prepare`; the budget solver hands the target
    # parameter count to `budget_params` instead of varying a knob.
    budget_knobs: ClassVar[tuple[str, ...]] = ()
    budget_target_field: ClassVar[str | None] = "budget_params"

    def upgrade(self, values: dict[str, Any]) -> dict[str, Any]:
        """Configs stored before the `protocol` field: `sensitivity_update_lr=None` was the
        fp32, unclipped, no-update pass over 8 examples per task, which is `protocol=clean`.
        A set rate was a mode that did not follow the authors' script; it has no equivalent."""
        if "sensitivity_update_lr" not in values:
            return values
        rate = values.pop("sensitivity_update_lr")
        if rate is not None:
            raise ConfigError(
                f"sensitivity_update_lr={rate} (a stored config of an earlier release) is no "
                "longer a mode: it did not reproduce the authors' script; set protocol=authors "
                "or protocol=clean instead"
            )
        values.setdefault("protocol", "clean")
        return values

    def adapt_module(
        self, qualified_name: str, module: nn.Module, config: Any, context: BatchContext
    ) -> nn.Module | None:
        alloc = _require_allocation(config)
        if not isinstance(module, nn.Linear):
            return None
        n = alloc.get(qualified_name, 0)
        if n == 0:
            return None
        if n == 1:
            return LoRALinear(module, config.rank, config.alpha, config.dropout)
        return LoRAMoELinear(
            module, n, config.rank, config.alpha, config.dropout, context, lbc_beta=0.0
        )

    def trainable_parameters(self, config: Any, shapes: ModelShapes) -> int:
        return allocation_parameters(_require_allocation(config), config.rank, shapes.linears)

    def no_weight_decay(self, config: Any, param_name: str) -> bool:
        return suffix(param_name) == "router"

    def prepare(self, config: Any, ctx: PrepareContext) -> Prepared:
        linears = {n: m for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear)}
        if config.allocation:
            if config.budget_params is not None or config.budget_experts is not None:
                raise ConfigError(
                    "lora-smoe was given both an allocation and a budget (budget_params="
                    f"{config.budget_params}, budget_experts={config.budget_experts}); a given "
                    "allocation fixes the size, so drop the budget or the allocation."
                )
            given = parse_allocation(config.allocation)
            unknown = [n for n in given if n not in linears]
            if unknown:
                raise ConfigError(
                    f"lora-smoe allocation names {', '.join(unknown[:3])}, which "
                    f"{'is' if len(unknown) == 1 else 'are'} not a linear of "
                    f"{type(ctx.model).__name__} (e.g. {next(iter(linears), '-')})."
                )
            _require_experts(given)
            return Prepared(
                config,
                notes=["lora-smoe: allocation given in the config; no sensitivity pass."],
                artifacts={"allocation": {"modules": dict(given), "p": None, "source": "config"}},
            )
        return _measure_and_allocate(config, ctx, linears)


def _eos_id(model: nn.Module) -> int | None:
    eos = getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def _require_allocation(config: Any) -> dict[str, int]:
    alloc = parse_allocation(config.allocation)
    if not alloc:
        raise ConfigError(
            "lora-smoe needs its preparation stage (sensitivity pass and allocation) before "
            "injection, or an allocation=name=n,... in its config; run it through the runner "
            "(moebench.inject.prepare_and_inject)."
        )
    return alloc


def _require_experts(alloc: Mapping[str, int]) -> None:
    if not any(n > 0 for n in alloc.values()):
        raise ConfigError(
            "lora-smoe allocation gives no module an expert; raise fraction or the budget."
        )


def _no_target(config: Any, model: nn.Module, linears: Mapping[str, nn.Linear]) -> ConfigError:
    return ConfigError(
        f"lora-smoe target_modules {', '.join(config.target_modules)} matched no decoder "
        f"linear of {type(model).__name__}; its linears are: "
        f"{', '.join(sorted({suffix(n) for n in linears}))}."
    )


def _measure_and_allocate(
    config: LoRASMoEConfig, ctx: PrepareContext, linears: Mapping[str, nn.Linear]
) -> Prepared:
    candidates = [n for n in linears if suffix(n) in config.target_modules]
    by_task: dict[str, list[Any]] = {}
    for example, task in zip(ctx.examples, ctx.tasks, strict=True):
        by_task.setdefault("all" if task is None else task, []).append(example)
    tasks = sorted(by_task)
    if not tasks:
        raise DataError(
            "lora-smoe's sensitivity pass needs training examples, and none were given; pass "
            "training data or an allocation=name=n,... in the method config."
        )
    if not candidates:
        raise _no_target(config, ctx.model, linears)
    ctx.model.to(ctx.device)  # where training puts it anyway; the pass is the costly part
    scores: dict[str, dict[str, float]] = {}
    hits = 0
    for task in tasks:
        weight_scores, hit = measure_cached(
            ctx.cache_dir,
            {"model": ctx.model_name, "task": task},
            model=ctx.model,
            examples=by_task[task],
            protocol=config.protocol,
            samples=config.sensitivity_samples,
            seed=ctx.seed,
            pad_token_id=ctx.pad_token_id,
            eos_token_id=_eos_id(ctx.model),
            device=ctx.device,
        )
        hits += hit
        modules = [m for m in candidates if f"{m}.weight" in weight_scores]
        if not modules:
            raise _no_target(config, ctx.model, linears)
        scores[task] = module_scores(weight_scores, modules)
    shapes = {suffix(n): LinearShape(m.in_features, m.out_features) for n, m in linears.items()}
    notes = [
        f"lora-smoe: sensitivity by protocol={config.protocol} on "
        + (
            f"{config.sensitivity_samples} examples per decoder layer"
            if config.protocol == "authors"
            else f"up to {config.sensitivity_samples} examples"
        )
        + f" for each of {len(tasks)} task(s) ({', '.join(tasks)}); {hits} from the cache."
    ]
    if len(tasks) == 1:
        notes.append(f"lora-smoe: a single training task ({tasks[0]}), so {SINGLE_TASK_NOTE}.")

    def params(alloc: Mapping[str, int]) -> int:
        return allocation_parameters(alloc, config.rank, shapes)

    budget: dict[str, Any] | None = None
    if config.budget_experts is not None:
        target = config.budget_experts
        p, alloc = solve_fraction(scores, config.groups, lambda a: sum(a.values()), target)
        got = sum(alloc.values())
        budget = {"kind": "experts", "target": target, "achieved": got}
        notes.append(
            f"lora-smoe: budget_experts={target} solved to p={p:.4f}, giving {got} experts"
            + ("." if got == target else f" (the closest reachable; {target} is not).")
        )
    elif config.budget_params is not None:
        target = config.budget_params
        p, alloc = solve_fraction(scores, config.groups, params, target)
        got = params(alloc)
        off = (got - target) / target
        within = abs(off) <= BUDGET_TOLERANCE
        budget = {"kind": "params", "target": target, "achieved": got, "within_5pct": within}
        notes.append(
            f"lora-smoe: budget_params={target} solved to p={p:.4f}, giving {got} trainable "
            f"parameters ({off:+.1%})"
            + ("." if within else "; no allocation comes within 5%, this is the closest.")
        )
    else:
        p = config.fraction
        alloc = allocate(scores, p, config.groups)
    _require_experts(alloc)
    counts = [alloc[m] for m in alloc]
    notes.append(
        f"lora-smoe: {sum(counts)} experts over {sum(n > 0 for n in counts)} of {len(counts)} "
        f"modules (n=0: {counts.count(0)}, n=1: {counts.count(1)}, n>=2: "
        f"{sum(n >= 2 for n in counts)}); {params(alloc)} trainable parameters."
    )
    artifact: dict[str, Any] = {
        "modules": dict(alloc),
        "p": p,
        "tasks": tasks,
        "groups": config.groups,
        "cache_hits": hits,
        "samples": config.sensitivity_samples,
        "protocol": config.protocol,
        "seed": ctx.seed,
        "trainable_parameters": params(alloc),
    }
    if budget is not None:
        artifact["budget"] = budget
    prepared = dataclasses.replace(config, fraction=p, allocation=format_allocation(alloc))
    return Prepared(prepared, notes=notes, artifacts={"allocation": artifact})


METHODS.add(LoRASMoE.name, LoRASMoE())
