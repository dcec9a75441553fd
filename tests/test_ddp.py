"""One job on two data-parallel ranks (two CPU processes, gloo) against the same job in one
process at the same effective batch: per-step losses, auxiliary losses and router statistics
within 1e-4 (fp32, dropout 0: only the order of float sums differs), the same eval scores and
predictions; and a 2-rank run interrupted mid-training and resumed ends where the uninterrupted
2-rank run ends. MixLoRA is the hard case: its balance loss and top-k experts without tokens."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moebench import store
from moebench.errors import ConfigError
from moebench.runner import RunEnv, execute, resume
from moebench.runspec import RunSpec, resolve

TOL = 1e-4
SETS = [
    ("train.batch_size", "4"),
    ("train.micro_batch_size", "1"),  # 4 micro-batches a step: 2 per rank, accumulated
    ("train.cutoff_len", "40"),
    ("train.checkpoint_every", "2"),
    ("train.stats_every", "2"),
    ("train.warmup_steps", "1"),
    ("method.dropout", "0"),  # each rank draws its own dropout masks: equal only in distribution
    ("eval.tasks", "boolq"),
    ("eval.max_new_tokens", "8"),  # short answers: scoring is not what is compared here
]


def _spec(method: str) -> RunSpec:
    return resolve(
        options={"method": method, "model": "tiny-llama", "max_steps": 4, "limit": 3}, sets=SETS
    )


class _StopAt:
    """An observer that interrupts the run (as Ctrl-C would) after training step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def started(self, run_id: int, info: dict[str, Any]) -> None: ...
    def eval_started(self, task: str, n: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def task_done(self, result: Any) -> None: ...

    def step(self, s: Any) -> None:
        if s.step == self.at:
            raise KeyboardInterrupt


def _outcome(url: str, run_id: int) -> dict[str, Any]:
    s = store.open_store(url)
    run = store.get_run(s, run_id)
    log = {r["step"]: r for r in store.get_training_log(s, run_id)}  # a resumed step: the last
    return {
        "run": run,
        "log": [log[k] for k in sorted(log)],
        "metrics": sorted(
            (m["task"], m["metric"], m["value"]) for m in store.get_metrics(s, run_id)
        ),
        "predictions": [
            (p["task"], p["item_id"], p["output"], p["correct"])
            for p in store.get_predictions(s, run_id)
        ],
        "adapter": load_file(str(Path(run["output_dir"]) / "adapter" / "adapter.safetensors")),
    }


def _run(tmp: Path, name: str, spec: RunSpec, gpus: int, observer: Any = None) -> dict[str, Any]:
    url = f"sqlite:///{tmp / f'{name}.db'}"
    env = RunEnv(db=url, output_dir=str(tmp / name))
    if observer is None:
        return _outcome(url, execute(spec, env, gpus=gpus))
    with pytest.raises(KeyboardInterrupt):
        execute(spec, env, observer, gpus=gpus)
    (row,) = store.list_runs(store.open_store(url))
    assert row["status"] == "interrupted"
    return _outcome(url, resume(row["id"], env))


def _close(a: dict[str, float] | None, b: dict[str, float] | None, what: str) -> None:
    a, b = a or {}, b or {}
    assert set(a) == set(b), what
    for k in a:
        assert abs(a[k] - b[k]) <= TOL, f"{what} {k}: {a[k]} vs {b[k]}"


def _same(one: dict[str, Any], two: dict[str, Any]) -> None:
    assert [r["step"] for r in one["log"]] == [r["step"] for r in two["log"]] == [1, 2, 3, 4]
    for r1, r2 in zip(one["log"], two["log"], strict=True):
        assert abs(r1["loss"] - r2["loss"]) <= TOL, (r1["step"], r1["loss"], r2["loss"])
        assert r1["tokens"] == r2["tokens"]
        _close(r1["aux_losses"], r2["aux_losses"], f"step {r1['step']} aux")
        _close(r1["stats"], r2["stats"], f"step {r1['step']} stats")
    assert one["metrics"] == two["metrics"]
    assert one["predictions"] == two["predictions"]
    assert set(one["adapter"]) == set(two["adapter"])
    for k, v in one["adapter"].items():
        torch.testing.assert_close(v, two["adapter"][k], rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["lora", "mixlora"])
def test_two_ranks_equal_one_process_at_the_same_effective_batch(
    tmp_path: Path, method: str
) -> None:
    spec = _spec(method)
    one, two = _run(tmp_path, "one", spec, 1), _run(tmp_path, "two", spec, 2)
    assert two["run"]["execution"]["gpus"] == 2 and two["run"]["config_hash"] == spec.hash
    _same(one, two)
    if method == "mixlora":  # the cases that matter were exercised
        assert all("balance" in r["aux_losses"] for r in two["log"])
        assert any(k.endswith("load.0") for k in two["log"][1]["stats"])
        # Killed after step 3 (checkpoint at 2) and resumed on 2 ranks: as if never stopped.
        resumed = _run(tmp_path, "resumed", spec, 2, _StopAt(3))
        assert resumed["run"]["resumed_from_step"] == 2
        _same(two, resumed)


def test_accelerate_holds_a_jobs_ranks_and_the_process_is_clean_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both ranks' places come from accelerate's state (CPU ranks over gloo), and the calling
    process, a long-lived worker, ends each job without a process group, launcher variables or
    accelerate state of it: two jobs back to back, the second after something in the process
    made an undistributed state of its own (kept), train alike."""
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    from moebench.distributed import LAUNCH_VARS

    spec = resolve(options={"method": "lora", "model": "tiny-llama", "max_steps": 2}, sets=SETS)
    env = {k: os.environ.get(k) for k in LAUNCH_VARS}
    assert not PartialState._shared_state and not dist.is_initialized()
    caplog.set_level(logging.INFO, logger="moebench.distributed")
    try:
        first = _run(tmp_path, "first", spec, 2)
        assert not PartialState._shared_state and not dist.is_initialized()
        assert {k: os.environ.get(k) for k in LAUNCH_VARS} == env
        mine = PartialState()
        second = _run(tmp_path, "second", spec, 2)
        assert PartialState().distributed_type == DistributedType.NO and mine.num_processes == 1
        assert not dist.is_initialized() and {k: os.environ.get(k) for k in LAUNCH_VARS} == env
    finally:
        PartialState._reset_state()
    for one in (first, second):
        helper = Path(one["run"]["output_dir"]) / "ranks" / "rank1.log"
        assert "rank 1 of 2 under accelerate: MULTI_CPU over gloo" in helper.read_text()
    rank0 = [r.getMessage() for r in caplog.records if "under accelerate" in r.getMessage()]
    assert [m.split(", device")[0] for m in rank0] == 2 * [
        "rank 0 of 2 under accelerate: MULTI_CPU over gloo"
    ]
    assert [r["loss"] for r in first["log"]] == [r["loss"] for r in second["log"]]
    assert first["metrics"] == second["metrics"]


def test_bad_gpus_are_refused_before_anything_is_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    with pytest.raises(ConfigError, match=r"micro_batch_size=1 x gpus=3"):
        execute(_spec("lora"), RunEnv(db=url, output_dir=str(tmp_path)), gpus=3)
    with pytest.raises(ConfigError, match=r"--gpus 0 must be at least 1"):
        execute(_spec("lora"), RunEnv(db=url, output_dir=str(tmp_path)), gpus=0)
    assert not (tmp_path / "bad.db").exists() or not store.list_runs(store.open_store(url))


SWEEP = """\
name: two-ranks
axes: {method: [lora, mixlora], model: tiny-llama}
set:
  train.max_steps: 2
  train.batch_size: 4
  train.micro_batch_size: MICRO
execution:
  gpus: 2
"""


def test_a_sweeps_gpus_go_with_each_queued_job_and_leave_its_hash_alone(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moebench.cli import app
    from moebench.store import jobs as q
    from moebench.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("MICRO", "2"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    r = CliRunner().invoke(app, ["sweep", str(path), "--db", url, "--queue-only"])
    assert r.exit_code == 0, r.output
    rows = q.list_jobs(store.open_store(url), sweep="two-ranks")
    assert [row["execution"]["gpus"] for row in rows] == [2, 2]
    single = tmp_path / "one.yaml"
    single.write_text(SWEEP.replace("MICRO", "2").replace("  gpus: 2\n", "  gpus: 1\n"))
    hashes = [store.get_run(store.open_store(url), row["id"])["config_hash"] for row in rows]
    assert hashes == [j.spec.hash for j in load_sweep(single).jobs]

    path.write_text(SWEEP.replace("MICRO", "4"))  # 4 rows a micro-batch on each of 2 ranks > 4
    bad = f"sqlite:///{tmp_path / 'bad.db'}"
    r = CliRunner().invoke(app, ["sweep", str(path), "--db", bad, "--queue-only"])
    assert r.exit_code != 0
    assert f"{path}: job lora tiny-llama" in str(r.exception)
    assert "micro_batch_size=4 x gpus=2" in str(r.exception)
    assert not (tmp_path / "bad.db").exists()


def test_jobs_on_two_gpus_get_two_gpus_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    from moebench.worker import plan_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,1")
    assert [s.gpu for s in plan_slots(None, 2)] == ["4,5", "6,7"]
    assert [s.gpu for s in plan_slots(None)] == ["4", "5", "6", "7", "1"]
    with pytest.raises(ConfigError, match="Jobs on 8 GPUs each need 8 visible GPUs; this"):
        plan_slots(None, 8)
    assert [s.gpu for s in plan_slots(2, 2)] == [None, None]  # CPU slots: ranks share the CPU
