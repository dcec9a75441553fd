"""A checkpoint that a crash or a failing disk damaged is skipped for the one before it.

The checkpoints are real: a Linear trained with AdamW, saved by `save_checkpoint` after every
step as the loop does, then damaged on disk the ways a crash or a full disk leaves them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moebench.checkpoint import (
    TrainState,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from moebench.errors import ConfigError

KEEP = 3
STEPS = 4  # one more than KEEP, so pruning has run: steps 2, 3 and 4 remain on disk


@dataclass
class Saved:
    """What one checkpoint was given, cloned at save time, to compare a reload against."""

    adapter: dict[str, torch.Tensor]
    optimizer_state: dict[int, dict[str, torch.Tensor]]
    rng: torch.Tensor


def _model_and_optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _clone_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {
        idx: {k: v.clone() for k, v in slot.items()}
        for idx, slot in optimizer.state_dict()["state"].items()
    }


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[int, Saved]]:
    """A checkpoint folder after STEPS optimizer steps, and what each kept step saved."""
    torch.manual_seed(0)
    model, optimizer = _model_and_optimizer()
    root = tmp_path / "checkpoints"
    saved: dict[int, Saved] = {}
    for step in range(1, STEPS + 1):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        adapter = {k: v.detach().clone() for k, v in model.state_dict().items()}
        saved[step] = Saved(adapter, _clone_state(optimizer), torch.get_rng_state())
        state = TrainState(step=step, epoch=0, batch_in_epoch=step, tokens_seen=8 * step)
        save_checkpoint(root, state, adapter, optimizer, keep=KEEP)
    return root, saved


def _truncate(name: str) -> Callable[[Path], None]:
    """Keep the first half of a file (for these small tensors, the cut lands in the header)."""

    def damage(folder: Path) -> None:
        file = folder / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    return damage


def _cut_tail(name: str) -> Callable[[Path], None]:
    """Drop the last bytes only: the header is intact and only the tensor data is short."""

    def damage(folder: Path) -> None:
        file = folder / name
        file.write_bytes(file.read_bytes()[:-4])

    return damage


def _garbage_state_json(folder: Path) -> None:
    (folder / "state.json").write_bytes(b"\x00\xff{step: 4,,")


def _state_json_without_optimizer(folder: Path) -> None:
    meta = json.loads((folder / "state.json").read_text())
    del meta["optimizer_scalars"]
    (folder / "state.json").write_text(json.dumps(meta))


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "adapter-truncated": (_truncate("adapter.safetensors"), "adapter.safetensors is truncated"),
    "optimizer-truncated": (
        _truncate("optimizer.safetensors"),
        "optimizer.safetensors is truncated",
    ),
    "adapter-data-short": (_cut_tail("adapter.safetensors"), "adapter.safetensors is truncated"),
    "rng-truncated": (_truncate("rng.safetensors"), "rng.safetensors is truncated"),
    "state-json-garbage": (_garbage_state_json, "state.json does not parse"),
    "state-json-missing-key": (_state_json_without_optimizer, "optimizer_scalars"),
    "file-missing": (_remove("optimizer.safetensors"), "missing optimizer.safetensors"),
}


def _is_one_sentence(text: str, *, names: Path) -> bool:
    return f"'{names}'" in text and text.endswith(".") and "\n" not in text


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    run: tuple[Path, dict[int, Saved]], damage: str
) -> None:
    root, _ = run
    newest = step_dir(root, STEPS)
    apply, problem = DAMAGES[damage]
    apply(newest)

    found, reasons = find_resumable(root)

    assert found == step_dir(root, STEPS - 1)
    (reason,) = reasons
    assert _is_one_sentence(reason, names=newest), reason
    assert problem in reason and "falling back to an earlier one" in reason


def test_a_good_newest_checkpoint_is_used_without_reasons(
    run: tuple[Path, dict[int, Saved]],
) -> None:
    root, _ = run
    assert find_resumable(root) == (step_dir(root, STEPS), [])


def test_a_half_written_tmp_folder_is_not_a_candidate(run: tuple[Path, dict[int, Saved]]) -> None:
    root, _ = run
    crashed = step_dir(root, STEPS + 1).with_name(step_dir(root, STEPS + 1).name + ".tmp")
    crashed.mkdir()
    (crashed / "adapter.safetensors").write_bytes(b"\x00" * 10)
    assert find_resumable(root) == (step_dir(root, STEPS), [])


def test_when_every_checkpoint_is_damaged_there_is_none_and_a_reason_for_each(
    run: tuple[Path, dict[int, Saved]],
) -> None:
    root, _ = run
    kept = [step_dir(root, s) for s in range(STEPS, STEPS - KEEP, -1)]  # newest first
    for folder in kept:
        _truncate("adapter.safetensors")(folder)

    found, reasons = find_resumable(root)

    assert found is None
    assert len(reasons) == KEEP
    for folder, reason in zip(kept, reasons, strict=True):
        assert _is_one_sentence(reason, names=folder), reason
    assert reasons[-1].endswith("no earlier one is left.")


def test_an_empty_or_absent_folder_has_nothing_to_resume(tmp_path: Path) -> None:
    assert find_resumable(tmp_path / "never-written") == (None, [])


def test_loading_a_truncated_checkpoint_is_a_config_error_naming_it_and_restores_nothing(
    run: tuple[Path, dict[int, Saved]],
) -> None:
    root, _ = run
    newest = step_dir(root, STEPS)
    _truncate("optimizer.safetensors")(newest)
    _, optimizer = _model_and_optimizer()

    with pytest.raises(ConfigError) as caught:
        load_checkpoint(newest, optimizer)

    message = str(caught.value)
    assert _is_one_sentence(message, names=newest), message
    assert "optimizer.safetensors is truncated or corrupt" in message
    assert optimizer.state_dict()["state"] == {}


def test_the_fallback_checkpoint_restores_exactly_what_its_step_saved(
    run: tuple[Path, dict[int, Saved]],
) -> None:
    root, saved = run
    _truncate("adapter.safetensors")(step_dir(root, STEPS))
    found, _ = find_resumable(root)
    assert found is not None
    model, optimizer = _model_and_optimizer()
    torch.manual_seed(12345)  # a different generator state, which the load must overwrite

    state, adapter = load_checkpoint(found, optimizer)

    expected = saved[STEPS - 1]
    assert state == TrainState(STEPS - 1, 0, STEPS - 1, 8 * (STEPS - 1))
    assert adapter.keys() == expected.adapter.keys()
    assert all(torch.equal(adapter[k], expected.adapter[k]) for k in adapter)
    restored = _clone_state(optimizer)
    assert restored.keys() == expected.optimizer_state.keys()
    for idx, slot in expected.optimizer_state.items():
        assert restored[idx].keys() == slot.keys()  # step, exp_avg, exp_avg_sq
        for name, value in slot.items():
            assert torch.equal(restored[idx][name], value), (idx, name)
    assert torch.equal(torch.get_rng_state(), expected.rng)
    model.load_state_dict(adapter)
