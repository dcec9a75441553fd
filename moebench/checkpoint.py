"""Checkpoints: everything a run needs to continue exactly where it stopped.

Tensors (adapter, optimizer moments, RNG states) go to safetensors, never pickle, so a
checkpoint from an untrusted source cannot execute code; scalars and positions go to JSON. A
checkpoint is written into a temporary folder and renamed into place, so a crash mid-write never
leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moebench.errors import ConfigError


@dataclass(frozen=True)
class TrainState:
    step: int  # optimizer steps completed
    epoch: int  # epoch of the next micro-batch
    batch_in_epoch: int  # index of the next micro-batch within that epoch
    tokens_seen: int


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory holds (its name, as `step_dir` wrote it)."""
    return int(path.name.removeprefix("step-"))


def save_checkpoint(
    root: Path,
    state: TrainState,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    keep: int,
) -> Path:
    final = step_dir(root, state.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapter, str(tmp / "adapter.safetensors"))

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slot in opt["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))

    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))

    meta = {
        "state": asdict(state),
        "optimizer_param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "python_random": _jsonable(random.getstate()),
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(o) for o in obj)
    return obj


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore optimizer and RNG state in place; return the position and the adapter weights."""
    needed = ("state.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors")
    missing = [f for f in needed if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"Checkpoint '{path}' is incomplete (missing {', '.join(missing)}).")
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta["optimizer_scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})

    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python_random"]))
    adapter = load_file(str(path / "adapter.safetensors"))
    return TrainState(**meta["state"]), adapter
