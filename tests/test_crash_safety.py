"""What a job survives: a truncated checkpoint (the previous one is used, the reason kept), no
usable checkpoint (a restart from step 0), a failure retried by policy, and the out-of-memory
policy's halved micro-batch (same effective batch, same job, same numbers as a fresh run at it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moebench import store as db
from moebench.runner import RunEnv, execute, resume, run_claimed, spec_of
from moebench.runspec import resolve
from moebench.store import jobs as q
from moebench.worker import log_path, retry_after_oom
from tests.conftest import StopAt, poisoned_model

OPTIONS = {"model": "tiny-llama", "max_steps": 6, "limit": 1}
SETS = [
    ("train.batch_size", "4"),
    ("train.micro_batch_size", "4"),
    ("train.checkpoint_every", "2"),
    ("train.keep_checkpoints", "3"),
    ("eval.tasks", "boolq"),
]


def _adapter(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run["output_dir"]) / "adapter" / "adapter.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("ref")
    url = f"sqlite:///{root / 'ref.db'}"
    run_id = execute(resolve(options=OPTIONS, sets=SETS), RunEnv(db=url, output_dir=str(root)))
    return _adapter(db.get_run(db.open_store(url), run_id))


def _interrupted(tmp_path: Path, at: int = 5) -> tuple[str, dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with pytest.raises(KeyboardInterrupt):
        spec = resolve(options=OPTIONS, sets=SETS)
        execute(spec, RunEnv(db=url, output_dir=str(tmp_path / "out")), StopAt(at))
    (run,) = db.list_runs(db.open_store(url))
    return url, run


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    url, run = _interrupted(tmp_path)
    assert run["last_step"] == 4
    newest = Path(run["output_dir"]) / "checkpoints" / "step-0000004" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert resume(run["id"], RunEnv(db=url)) == run["id"]
    s = db.open_store(url)
    done = db.get_run(s, run["id"])
    assert done["status"] == "done" and done["resumed_from_step"] == 2
    kinds = [(f["kind"], "step-0000004" in f["reason"]) for f in done["failures"]]
    assert kinds == [("interrupted", False), ("checkpoint", True)]
    assert _same(_adapter(done), uninterrupted)  # steps 3..6 re-run to the same weights


@pytest.mark.slow
def test_with_no_usable_checkpoint_left_the_job_restarts_from_step_zero(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    url, run = _interrupted(tmp_path)
    for ckpt in (Path(run["output_dir"]) / "checkpoints").glob("step-*"):
        (ckpt / "state.json").write_text("{not json")
    assert resume(run["id"], RunEnv(db=url)) == run["id"]
    done = db.get_run(db.open_store(url), run["id"])
    assert done["status"] == "done" and done["resumed_from_step"] is None
    assert sum(f["kind"] == "checkpoint" for f in done["failures"]) == 2
    assert _same(_adapter(done), uninterrupted)


@pytest.mark.slow
def test_the_oom_policy_halves_the_micro_batch_and_keeps_the_job(tmp_path: Path) -> None:
    """The policy as a worker applies it to a job that failed out of memory (CUDA OOM cannot be
    produced on a CPU; the failure is recorded as the runner records one)."""
    url, run = _interrupted(tmp_path)
    s = db.open_store(url)
    q.add_failure(s, run["id"], kind="oom", reason="out of memory: CUDA out of memory.")
    db.set_status(s, run["id"], "failed", "out of memory")
    assert retry_after_oom(s, run["id"])
    row = db.get_run(s, run["id"])
    assert row["status"] == "queued" and "micro batch size 4" in row["status_reason"]
    spec = spec_of(row)
    assert (spec.train.micro_batch_size, spec.train.accumulation) == (2, 2)
    assert row["config"] == run["config"]  # the same job: the spec as stored is untouched
    assert not (Path(row["output_dir"]) / "checkpoints").exists()  # set aside: other positions
    owner = q.new_owner()
    run_claimed(s, q.claim(s, owner, run_id=run["id"]), owner, RunEnv(db=url))
    done = db.get_run(s, run["id"])
    assert done["status"] == "done" and done["resumed_from_step"] is None
    assert done["execution"]["oom_retries"] == [{"knob": "micro_batch_size", "from": 4, "to": 2}]
    assert done["last_step"] == 6  # the set-aside checkpoints were forgotten, new ones written
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    fresh_spec = resolve(options=OPTIONS, sets=[*SETS, ("train.micro_batch_size", "2")])
    fresh = execute(fresh_spec, RunEnv(db=fresh_url, output_dir=str(tmp_path / "fresh")))
    assert _same(_adapter(done), _adapter(db.get_run(db.open_store(fresh_url), fresh)))


@pytest.mark.slow
def test_a_failing_job_is_retried_by_policy_and_each_reason_kept(tmp_path: Path) -> None:
    folder = poisoned_model(tmp_path / "poisoned")
    sweep = tmp_path / "fails.yaml"
    sweep.write_text(
        f"name: fails\naxes: {{method: lora, model: '{folder}'}}\n"
        "set: {train.max_steps: 3, eval.limit: 1}\nexecution: {retries: 1}\n"
    )
    url = f"sqlite:///{tmp_path / 'f.db'}"
    r = subprocess.run(
        [sys.executable, "-m", "moebench", "sweep", str(sweep), "--db", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 1, r.stderr[-2000:]
    (job,) = q.list_jobs(db.open_store(url))
    assert job["status"] == "failed" and job["attempts"] == 2
    assert [f["kind"] for f in job["failures"]] == ["error", "error"]
    assert all("non-finite" in f["reason"] for f in job["failures"])
    assert f"job {job['id']} failed" in r.stderr
    # the model is a local folder, so transformers loads it with its "Loading weights" bar; a
    # quiet sweep's job log (not a terminal) holds its own lines only, never the bar's frames
    log = (tmp_path / log_path(job)).read_text()
    assert "non-finite" in log and "Loading weights" not in log
