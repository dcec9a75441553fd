"""`moebench sweep --backend ray` on a real local Ray instance (CPU, loopback, started by the
sweep): the same numbers as the local worker pool, and a Ray worker killed mid-job costs one
resume from the job's checkpoint, never a second run of the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moebench import store as db
from moebench.store import jobs as q

pytest.importorskip("ray", reason="the `ray` extra (pip install 'moebench[ray]') is not installed")

# Two jobs of the smoke sweep (examples/sweeps/smoke.yaml), trained long enough to be killed
# between their first checkpoint and their end.
SWEEP = """\
name: smoke-ray
axes: {method: [lora, loracoe], model: tiny-llama, suite: mini, seed: 1}
set:
  train.max_steps: 12
  train.batch_size: 4
  train.checkpoint_every: 4
  train.warmup_steps: 1
  eval.limit: 1
  eval.tasks: [boolq, gsm8k]
  eval.max_new_tokens: 16
execution: {retries: 1}
"""


def _sweep(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "moebench", "sweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Sweeps a test starts; any still running at its end (a failed test) is stopped, and its
    workers and Ray instance with it."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def _parent(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent for {pid}")


def _outcome(url: str) -> dict[str, object]:
    """Per job (method and seed): its metrics, training losses, predictions and adapter."""
    s = db.open_store(url)
    out = {}
    for r in q.list_jobs(s):
        adapter = load_file(str(Path(r["output_dir"]) / "adapter" / "adapter.safetensors"))
        out[f"{r['method']} seed={r['seed']}"] = {
            "metrics": sorted(
                (m["task"], m["metric"], m["value"], m["n"]) for m in db.get_metrics(s, r["id"])
            ),
            "losses": [(t["step"], t["loss"]) for t in db.get_training_log(s, r["id"])],
            "predictions": sorted(
                (p["task"], p["item_id"], p["output"]) for p in db.get_predictions(s, r["id"])
            ),
            "adapter": adapter,
        }
    return out


@pytest.mark.slow
def test_ray_sweep_matches_the_local_runner_and_a_killed_ray_worker_costs_one_resume(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    sweep_file = tmp_path / "smoke-ray.yaml"
    sweep_file.write_text(SWEEP)
    local_url = f"sqlite:///{tmp_path / 'local.db'}"
    ray_url = f"sqlite:///{tmp_path / 'ray.db'}"
    s = db.open_store(ray_url)  # the schema made here, before the sweep opens the store too
    local = _sweep(
        str(sweep_file), "--db", local_url, "--output-dir", "local", "--workers", "2", cwd=tmp_path
    )
    ray = _sweep(
        str(sweep_file),
        "--db",
        ray_url,
        "--output-dir",
        "ray",
        "--backend",
        "ray",
        "--workers",
        "2",
        cwd=tmp_path,
    )
    started += [local, ray]
    deadline = time.monotonic() + 600
    while True:  # the first job to checkpoint loses its Ray worker
        row = next((r for r in q.list_jobs(s) if r["status"] == "running" and r["last_step"]), None)
        if row is not None:
            break
        assert time.monotonic() < deadline and ray.poll() is None, ray.communicate()[1][-3000:]
        time.sleep(0.02)
    job_pid = int(row["owner"].split(":")[1])
    ray_worker = _parent(job_pid)
    assert "ray" in Path(f"/proc/{ray_worker}/cmdline").read_text(), "not a Ray worker"
    os.kill(ray_worker, signal.SIGKILL)
    checkpoint_at_kill = db.get_run(s, row["id"])["last_step"]

    out, errs = ray.communicate(timeout=600)
    assert ray.returncode == 0, errs[-3000:]
    assert "2 of 2 jobs done" in out
    _, errs = local.communicate(timeout=600)
    assert local.returncode == 0, errs[-3000:]

    killed = db.get_run(s, row["id"])
    assert killed["status"] == "done" and killed["attempts"] == 2
    assert [f["kind"] for f in killed["failures"]] == ["died"]
    assert 0 < checkpoint_at_kill < 12
    assert killed["resumed_from_step"] == checkpoint_at_kill
    others = [r for r in q.list_jobs(s) if r["id"] != row["id"]]
    assert [(r["status"], r["attempts"]) for r in others] == [("done", 1)]
    assert len(db.get_metrics(s, row["id"])) == len(db.get_metrics(s, others[0]["id"]))

    want, got = _outcome(local_url), _outcome(ray_url)
    assert got.keys() == want.keys() and len(got) == 2
    for h, w in want.items():
        g = got[h]
        assert g["metrics"] == w["metrics"] and g["predictions"] == w["predictions"]
        assert [s for s, _ in g["losses"]] == list(range(1, 13))
        # Ray runs its tasks with OMP_NUM_THREADS=1 and the local pool with torch's default, so
        # float reductions may differ in the last bits (CI saw it): equal to rounding, not bits.
        assert g["losses"] == [(step, pytest.approx(loss, rel=1e-5)) for step, loss in w["losses"]]
        assert g["adapter"].keys() == w["adapter"].keys()
        assert all(
            torch.allclose(g["adapter"][k], w["adapter"][k], rtol=1e-4, atol=1e-6)
            for k in w["adapter"]
        )
    assert all(Path(r["output_dir"]).is_absolute() for r in q.list_jobs(s))


def test_without_ray_the_ray_backend_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from moebench.cli import main; sys.argv = ['moebench'] + sys.argv[1:]; main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "sweep", "nosuch.yaml", "--backend", "ray"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "pip install 'moebench[ray]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()


def test_an_unknown_backend_or_an_address_without_ray_is_one_sentence(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moebench.cli import app

    r = CliRunner().invoke(app, ["sweep", "x.yaml", "--backend", "slurm"])
    assert r.exit_code != 0 and "--backend 'slurm' is not one of: local, ray." in str(r.exception)
    r = CliRunner().invoke(app, ["sweep", "x.yaml", "--address", "10.0.0.1:6379"])
    assert r.exit_code != 0 and "add --backend ray" in str(r.exception)


def test_a_jobs_gpu_request_and_the_store_url_every_machine_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moebench.errors import ConfigError
    from moebench.ray_backend import gpus_for, shared_db_url

    assert gpus_for({"id": 1, "execution": {"gpus": 8}}, 8.0) == 8.0
    assert gpus_for({"id": 1, "execution": {}}, 4.0) == 1.0
    assert gpus_for({"id": 1, "execution": None}, 0.0) == 0.0
    with pytest.raises(
        ConfigError, match=r"Job 7 asks for gpus: 8, but the Ray cluster has 4 GPUs"
    ):
        gpus_for({"id": 7, "execution": {"gpus": 8}}, 4.0)
    monkeypatch.chdir(tmp_path)
    assert shared_db_url("sqlite:///runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"
    pg = "postgresql+psycopg://u:secret@db-host/moebench"
    assert shared_db_url(pg) == pg
