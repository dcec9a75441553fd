"""`moebench sweep` for real: jobs queued once, worked by subprocess workers, a killed worker's job
resumed to the same adapter bit for bit, a bad sweep file queuing nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.store import jobs as q

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "sweeps" / "smoke.yaml"
ONE_JOB = """\
name: one
axes: {method: lora, model: tiny-llama, seed: 3}
set:
  train.max_steps: 30
  train.batch_size: 4
  train.checkpoint_every: 4
  train.warmup_steps: 1
  eval.limit: 1
  eval.tasks: boolq
"""


def _sweep(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "moebench", "sweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _adapter(row: dict[str, object]) -> dict[str, torch.Tensor]:
    return load_file(str(Path(str(row["output_dir"])) / "adapter" / "adapter.safetensors"))


def test_a_bad_sweep_file_queues_nothing_and_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes:\n  method: [lora, nosuchmethod]\n  model: tiny-llama\n")
    url = tmp_path / "s.db"
    r = CliRunner().invoke(app, ["sweep", str(bad), "--db", str(url)])
    assert r.exit_code != 0
    assert f"{bad}:2" in str(r.exception) and "nosuchmethod" in str(r.exception)
    assert not url.exists()


@pytest.mark.slow
def test_smoke_sweep_runs_every_job_once_and_a_resubmission_adds_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    p = _sweep(str(SMOKE), "--db", url, "--workers", "2", cwd=tmp_path)
    out, errs = p.communicate(timeout=900)
    assert p.returncode == 0, errs[-3000:]
    assert "queued 4 new" in out and "4 of 4 jobs done" in out
    rows = q.list_jobs(db.open_store(url), sweep="smoke")
    assert [r["status"] for r in rows] == ["done"] * 4 and {r["attempts"] for r in rows} == {1}
    assert all(
        (Path(r["output_dir"]).parent / "logs" / f"run-{r['id']}.log").is_file() for r in rows
    )
    p = _sweep(str(SMOKE), "--db", url, cwd=tmp_path)
    out, errs = p.communicate(timeout=300)
    assert p.returncode == 0, errs[-3000:]
    assert "queued 0 new" in out and "4 done" in out
    again = q.list_jobs(db.open_store(url), sweep="smoke")
    assert [(r["id"], r["attempts"]) for r in again] == [(r["id"], 1) for r in rows]


@pytest.mark.slow
def test_a_killed_workers_job_is_resumed_to_the_same_adapter(tmp_path: Path) -> None:
    sweep_file = tmp_path / "one.yaml"
    sweep_file.write_text(ONE_JOB)
    reference = f"sqlite:///{tmp_path / 'ref.db'}"
    p = _sweep(str(sweep_file), "--db", reference, "--output-dir", "ref", cwd=tmp_path)
    assert p.wait(timeout=600) == 0
    (ref,) = q.list_jobs(db.open_store(reference))

    url = f"sqlite:///{tmp_path / 'k.db'}"
    p = _sweep(str(sweep_file), "--db", url, "--output-dir", "killed", cwd=tmp_path)
    s = db.open_store(url)
    deadline = time.monotonic() + 600
    while True:  # kill the worker once it has written its first checkpoint, mid-training
        rows = q.list_jobs(s)
        row = rows[0] if rows else None
        if row and row["status"] == "running" and row["last_step"]:
            break
        assert time.monotonic() < deadline and p.poll() is None, p.stderr and p.stderr.read()
        time.sleep(0.02)
    os.kill(int(row["owner"].split(":")[1]), signal.SIGKILL)
    checkpoint_at_kill = q.list_jobs(s)[0]["last_step"]
    assert 0 < checkpoint_at_kill < 30
    _, errs = p.communicate(timeout=600)
    assert p.returncode == 0, errs[-3000:]
    (run,) = q.list_jobs(s)
    assert run["status"] == "done" and run["attempts"] == 2
    assert [f["kind"] for f in run["failures"]] == ["died"]
    assert db.get_run(s, run["id"])["resumed_from_step"] == checkpoint_at_kill
    got, want = _adapter(run), _adapter(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(db.get_predictions(s, run["id"])) == len(
        db.get_predictions(db.open_store(reference), ref["id"])
    )
