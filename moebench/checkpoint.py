"""Checkpoints: everything a run needs to continue exactly where it stopped.

Tensors (adapter, optimizer moments, RNG states) go to safetensors, never pickle, so a
checkpoint from an untrusted source cannot execute code; scalars and positions go to JSON. A
checkpoint is written into a temporary folder and renamed into place, so a crash mid-write never
leaves a checkpoint that looks complete. What the rename cannot guard against (a disk that fills
or fails later, a file cut short by a copy) `find_resumable` catches by reading every file in
full before a run trusts it, falling back to the newest checkpoint that still reads.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moebench.errors import ConfigError

CHECKPOINT_FILES = ("state.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors")
# The keys of state.json that load_checkpoint reads, and the JSON type each must have.
_META_TYPES: dict[str, type] = {
    "state": dict,
    "optimizer_param_groups": list,
    "optimizer_scalars": dict,
    "python_random": list,
}


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


# Suffix of a checkpoint folder found unusable: kept for a post-mortem, never resumed from, and
# not counted by pruning (which would otherwise delete each new good checkpoint in its place).
UNUSABLE = ".unusable"


def _finished(root: Path) -> list[Path]:
    """Checkpoint folders whose rename completed, oldest first (zero-padded names sort by step)."""
    return sorted(p for p in root.glob("step-*") if not p.name.endswith((".tmp", UNUSABLE)))


def latest_checkpoint(root: Path) -> Path | None:
    done = _finished(root)
    return done[-1] if done else None


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """Newest checkpoint under root that verifies, and one sentence per newer one skipped and why.

    A run that crashed, or whose disk failed, may leave its newest checkpoint truncated; resuming
    from the one before loses a few steps, where trusting the newest would crash the resume.
    (None, reasons) means no checkpoint reads, and the caller starts again from step 0. Each
    skipped folder is renamed with the suffix `.unusable`, out of resuming's and pruning's way.
    """
    reasons: list[str] = []
    candidates = _finished(root)[::-1]
    for i, path in enumerate(candidates):
        try:
            _read(path)
        except _Unusable as e:
            then = (
                "falling back to an earlier one"
                if i + 1 < len(candidates)
                else "no earlier one is left"
            )
            reasons.append(f"Checkpoint '{path}' is unusable ({e}); {then}.")
            shutil.rmtree(path.with_name(path.name + UNUSABLE), ignore_errors=True)
            path.rename(path.with_name(path.name + UNUSABLE))
            continue
        return path, reasons
    return None, reasons


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` could not be resumed from, or None when it verifies (every
    file read in full and checked, as a resume reads it; nothing is renamed)."""
    try:
        _read(path)
    except _Unusable as e:
        return str(e)
    return None


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore optimizer and RNG state in place; return the position and the adapter weights.

    Every file is read and checked before anything is restored, so a checkpoint that turns out
    to be corrupt leaves the optimizer and the random generators as they were.
    """
    missing = _missing(path)
    if missing:
        raise ConfigError(f"Checkpoint '{path}' is incomplete (missing {', '.join(missing)}).")
    try:
        loaded = _read(path)
    except _Unusable as e:
        raise ConfigError(f"Checkpoint '{path}' is unusable ({e}).") from e
    meta = loaded.meta
    optimizer.load_state_dict(
        {"state": loaded.optimizer_state, "param_groups": meta["optimizer_param_groups"]}
    )
    torch.set_rng_state(loaded.rng["torch_cpu"])
    cuda = [loaded.rng[k] for k in sorted(k for k in loaded.rng if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python_random"]))
    return TrainState(**meta["state"]), loaded.adapter


class _Unusable(Exception):
    """Why a checkpoint cannot be loaded, as a phrase that reads inside a sentence."""


@dataclass(frozen=True)
class _Loaded:
    """A checkpoint's contents, every file read in full and checked, nothing applied yet."""

    meta: dict[str, Any]
    optimizer_state: dict[int, dict[str, Any]]
    rng: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]


def _missing(path: Path) -> list[str]:
    return [f for f in CHECKPOINT_FILES if not (path / f).is_file()]


def _read(path: Path) -> _Loaded:
    missing = _missing(path)
    if missing:
        raise _Unusable(f"missing {', '.join(missing)}")
    meta = _read_meta(path)
    optimizer_state = _optimizer_state(
        _read_tensors(path, "optimizer.safetensors"), meta["optimizer_scalars"]
    )
    rng = _read_tensors(path, "rng.safetensors")
    if "torch_cpu" not in rng:
        raise _Unusable("rng.safetensors lacks the CPU generator state 'torch_cpu'")
    return _Loaded(meta, optimizer_state, rng, _read_tensors(path, "adapter.safetensors"))


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one file, read in full: a cut-short file only fails once its data is read."""
    try:
        with safe_open(str(path / name), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable, unlike a dict
            return {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as e:
        raise _Unusable(f"{name} is truncated or corrupt: {_first_line(e)}") from e


def _read_meta(path: Path) -> dict[str, Any]:
    """state.json, parsed and checked for every key load_checkpoint reads."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers JSON and UTF-8 decoding errors
        raise _Unusable(f"state.json does not parse: {_first_line(e)}") from e
    if not isinstance(meta, dict):
        raise _Unusable(f"state.json holds a {type(meta).__name__}, not an object")
    wrong = [k for k, kind in _META_TYPES.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise _Unusable(f"state.json lacks or mistypes {', '.join(wrong)}")
    expected = {f.name for f in fields(TrainState)}
    position = meta["state"]
    if set(position) != expected or not all(type(v) is int for v in position.values()):
        raise _Unusable(f"state.json's state is not the integers {', '.join(sorted(expected))}")
    return meta


def _optimizer_state(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """Regroup the flat '<param index>.<name>' tensors and the JSON scalars per parameter."""
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        for idx, extra in scalars.items():
            state.setdefault(int(idx), {}).update(extra)
    except (ValueError, TypeError) as e:
        raise _Unusable(f"the optimizer state is malformed: {_first_line(e)}") from e
    return state


def _first_line(error: BaseException) -> str:
    """A library error cut to one short line, so it fits inside a one-sentence message."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
