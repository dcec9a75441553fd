"""Runs sharing one `--output-dir` keep apart: each writes only into its own folder, whose marker
names it, and its stored checkpoint and adapter paths hold its own tensors.

The truth a run's files are checked against is the same spec run alone in a fresh root and store
(runs are deterministic on CPU: tests/test_crash_safety.py relies on the same)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moebench import store as db
from moebench.errors import ConfigError
from moebench.paths import MARKER, check_owned, claim_run_folder, run_folder_name
from moebench.runner import RunEnv, execute, resume, run_claimed, submit
from moebench.runspec import RunSpec, resolve
from moebench.store import jobs as q
from tests.conftest import StopAt

OPTIONS = {"model": "tiny-llama", "max_steps": 2, "limit": 1}
SETS = [
    ("train.batch_size", "4"),
    ("train.micro_batch_size", "4"),
    ("train.checkpoint_every", "1"),
    ("eval.tasks", "boolq"),
]


def _spec(seed: int) -> RunSpec:
    return resolve(options={**OPTIONS, "seed": seed}, sets=SETS)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _files(url: str, run_id: int) -> dict[str, Any]:
    """A run's stored paths and what they hold: the final adapter and each checkpoint's."""
    s = db.open_store(url)
    row = db.get_run(s, run_id)
    ckpts = {
        c["step"]: _tensors(Path(c["path"]) / "adapter.safetensors")
        for c in db.get_checkpoints(s, run_id)
    }
    return {
        "row": row,
        "adapter": _tensors(Path(row["output_dir"]) / "adapter" / "adapter.safetensors"),
        "checkpoints": ckpts,
        "log": [r["step"] for r in db.get_training_log(s, run_id)],
    }


@pytest.mark.slow
def test_runs_sharing_an_output_dir_keep_their_own_files(tmp_path: Path) -> None:
    alone = {}
    for seed in (1, 2):  # each spec alone: what its files must hold
        url = f"sqlite:///{tmp_path / f'alone{seed}.db'}"
        run_id = execute(_spec(seed), RunEnv(db=url, output_dir=str(tmp_path / f"alone{seed}")))
        alone[seed] = _files(url, run_id)

    shared = tmp_path / "shared"
    a_url, b_url = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    a = execute(_spec(1), RunEnv(db=a_url, output_dir=str(shared)))
    b = execute(_spec(2), RunEnv(db=b_url, output_dir=str(shared)))  # also run 1, of another store
    assert a == b == 1
    # The store at a.db deleted and made again: its run 1 is a new run, not the old one resumed.
    db.open_store(a_url).close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp_path / "a.db") + suffix).unlink(missing_ok=True)
    again = execute(_spec(2), RunEnv(db=a_url, output_dir=str(shared)))
    assert again == 1

    got_b = _files(b_url, b)
    got_again = _files(a_url, again)
    folders = {got_b["row"]["output_dir"], got_again["row"]["output_dir"]}
    assert len(folders) == 2 and all(Path(f).parent == shared.resolve() for f in folders)
    for got in (got_b, got_again):
        truth = alone[2]
        assert got["row"]["resumed_from_step"] is None and got["log"] == [1, 2]
        assert _same(got["adapter"], truth["adapter"])
        assert got["checkpoints"].keys() == truth["checkpoints"].keys() == {1, 2}
        assert all(_same(got["checkpoints"][k], truth["checkpoints"][k]) for k in (1, 2))
    first = shared.resolve() / Path(got_b["row"]["output_dir"]).name
    assert first != Path(got_again["row"]["output_dir"])
    # run 1 of the first a.db: its folder is still there, untouched, holding its own adapter
    (old,) = set(shared.iterdir()) - {Path(f) for f in folders} - {shared / "logs"}
    assert json.loads((old / MARKER).read_text())["run_id"] == 1
    assert _same(_tensors(old / "adapter" / "adapter.safetensors"), alone[1]["adapter"])
    assert not _same(alone[1]["adapter"], alone[2]["adapter"])  # the comparison can fail


def test_a_resume_refuses_a_folder_another_run_owns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    root = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        execute(_spec(1), RunEnv(db=url, output_dir=str(root)), StopAt(1))
    s = db.open_store(url)
    (row,) = db.list_runs(s)
    folder = Path(row["output_dir"])
    assert folder.parent == root.resolve() and folder.name.startswith("run-1-")
    # another run's marker in its folder (the folder replaced by someone else's)
    other = {"run_id": 7, "created": "2020-01-01T00:00:00.000000+00:00", "store": "sqlite:/x.db"}
    (folder / MARKER).write_text(json.dumps(other))
    with pytest.raises(
        ConfigError, match=r"belongs to run 7 of sqlite:/x\.db.*another --output-dir"
    ):
        resume(row["id"], RunEnv(db=url))
    after = db.get_run(s, row["id"])
    assert after["status"] == "interrupted" and after["owner"] is None  # as it was
    assert json.loads((folder / MARKER).read_text()) == other  # nothing written into it


def test_a_queued_job_finds_no_folder_to_take(tmp_path: Path) -> None:
    """A folder of the run's own name that was not made by it: refused, nothing written."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    root = tmp_path / "out"
    s = db.open_store(url)
    run_id = submit(s, _spec(1), RunEnv(db=url, output_dir=str(root)))
    squatter = root / run_folder_name(db.get_run(s, run_id))
    squatter.mkdir(parents=True)
    (squatter / "notes.txt").write_text("mine")
    owner = q.new_owner()
    claimed = q.claim(s, owner, run_id=run_id)
    with pytest.raises(ConfigError, match=r"was not made for run 1 .*no \.moebench-run\.json"):
        run_claimed(s, claimed, owner, RunEnv(db=url))
    assert sorted(p.name for p in squatter.iterdir()) == ["notes.txt"]
    assert db.get_run(s, run_id)["status"] == "failed"


def test_two_claims_of_one_name_race_and_one_wins(tmp_path: Path) -> None:
    """Of many threads claiming one folder name for different runs, exactly one gets it."""
    owners = [{"run_id": i, "created": f"t{i}", "store": "s"} for i in range(8)]
    won: list[int] = []
    refused: list[str] = []
    barrier = threading.Barrier(len(owners))

    def claim(owner: dict[str, Any]) -> None:
        barrier.wait()
        try:
            claim_run_folder(tmp_path, owner, "run-1-abcdef12")
            won.append(owner["run_id"])
        except ConfigError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == len(owners) - 1
    marker = json.loads((tmp_path / "run-1-abcdef12" / MARKER).read_text())
    assert marker["run_id"] == won[0]


def test_markers_written_before_creation_times_still_match_their_run(tmp_path: Path) -> None:
    folder = tmp_path / "1"
    folder.mkdir()
    (folder / MARKER).write_text(json.dumps({"run_id": 1, "store": "sqlite:/a.db"}))
    check_owned(folder, {"run_id": 1, "created": "t", "store": "sqlite:/a.db"})
    with pytest.raises(ConfigError, match=r"belongs to run 1 of sqlite:/a\.db"):
        check_owned(folder, {"run_id": 1, "created": "t", "store": "sqlite:/b.db"})
