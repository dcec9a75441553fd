"""Sizes that cannot fit the model, refused from its config before any weight loads.

A field's declared range cannot know the model: rank 4096 is fine on a 7B model and meaningless
on one whose linears are 64 wide (a rank-r update of a d_in x d_out linear has rank at most
min(d_in, d_out)), and a target module the model lacks would adapt nothing. Both are checked
here against `ModelShapes`, which the model's config alone gives.
"""

from __future__ import annotations

from typing import Any

from moebench.errors import ConfigError
from moebench.method import LinearMethod, Method, ModelShapes


def fit_problems(method: Method, config: Any, shapes: ModelShapes, model: str) -> list[str]:
    """One sentence per size of `config` that the model's linears cannot hold."""
    targets = method.target_names(config)
    # A block method (MixLoRA) names blocks too ("mlp"); only a linear method's names are linears.
    missing = [t for t in targets if t not in shapes.linears and isinstance(method, LinearMethod)]
    problems = []
    if missing:
        problems.append(
            f"target module(s) {', '.join(repr(t) for t in missing)} are not linears of {model}; "
            f"accepted: {', '.join(shapes.linears)} (comma-separated, no spaces inside a name)"
        )
    rank = getattr(config, "rank", None)
    present = [t for t in targets if t in shapes.linears] or list(shapes.linears)
    if isinstance(rank, int) and present:
        width = min(min(shapes.linears[t].d_in, shapes.linears[t].d_out) for t in present)
        if rank > width:
            problems.append(
                f"rank={rank} is past the width of {model}'s targeted linears; accepted: at "
                f"most {width} (the smaller side of the narrowest targeted linear)"
            )
    return problems


def check_fits(method: Method, config: Any, model: str) -> None:
    """Raise one ConfigError when `config` cannot fit `model`; models whose config does not give
    Llama-family shapes are not checked here (their injection reports what matched)."""
    from moebench.budget import model_shapes

    try:
        shapes, _ = model_shapes(model)
    except (AttributeError, KeyError, TypeError):
        return
    problems = fit_problems(method, config, shapes, model)
    if problems:
        raise ConfigError(f"Invalid {method.name} config for {model}: " + "; ".join(problems) + ".")
