"""Every registered method trains and scores through the one loop and `moebench run`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from moebench import store
from moebench.config import config_hash
from moebench.data import collate
from moebench.method import ModelShapes, get_method
from moebench.models import load_model, model_config
from moebench.runner import RunEnv, execute, resume
from moebench.runspec import resolve
from moebench.train import StepLog, TrainConfig, TrainHooks, train
from tests.conftest import METHOD_NAMES, adapt, invoke, synthetic_examples
from tests.test_cli import TINY
from tests.test_train import _examples, _rows


def _loop_lr(config: object) -> object:
    """Phase learning rates (config fields named *_lr) defer to the loop's lr, so every method
    is trained at the same rate here."""
    lrs = {f.name: None for f in dataclasses.fields(config) if f.name.endswith("_lr")}
    return dataclasses.replace(config, **lrs)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_loss_falls_on_a_learnable_task(method: str, tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    m = get_method(method)
    adapted = adapt(model, method, _loop_lr(m.config_cls()))
    logs: list[StepLog] = []
    cfg = TrainConfig(
        max_steps=40,
        batch_size=8,
        micro_batch_size=8,
        warmup_steps=2,
        checkpoint_every=None,
        lr=3e-3,
    )
    train(
        adapted,
        _examples(tok, _rows(40)),
        cfg,
        seed=0,
        checkpoint_root=tmp_path,
        hooks=TrainHooks(on_step=logs.append),
    )
    # Within every phase the loss falls (LoRACoE's literal gates shrink the adapter at the
    # switch, so its joint phase starts high again), and the run ends below where it began.
    for phase in dict.fromkeys(s.phase for s in logs):
        losses = [s.loss for s in logs if s.phase == phase]
        assert sum(losses[-3:]) < 0.85 * sum(losses[:3]), (phase, losses)
    assert sum(s.loss for s in logs[-3:]) < 0.8 * sum(s.loss for s in logs[:3])


def _reports_router_stats(method: str) -> bool:
    """Whether the method's layers report statistics on a recorded training forward."""
    model, tok = load_model("tiny-llama")
    adapted = adapt(model, method)
    examples, _ = synthetic_examples(len(tok), n=4)
    batch = collate(examples, tok.pad_token_id)
    adapted.context.attention_mask = batch["attention_mask"]
    adapted.context.record_stats = True
    model.train()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return bool(adapted.collect_stats())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_moebench_run_trains_scores_and_stores_router_statistics(
    method: str, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    out_dir = str(tmp_path / "runs")
    args = ["run", "--method", method, *TINY, "--set", "train.stats_every=2", "--db", db]
    code, out = invoke([*args, "--output-dir", out_dir])  # in-process: test_cli runs the real one
    assert code == 0, out
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "done" and run["method"] == method
    assert run["trainable_params"] > 0
    assert any(m["task"] == "boolq" for m in store.get_metrics(s, run["id"]))
    log = store.get_training_log(s, run["id"])
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    artifacts = store.get_artifacts(s, run["id"])
    if _reports_router_stats(method):
        logged = [row for row in log if row["stats"]]
        # every 2 steps, and the first and last step of each phase
        assert {1, 2, 4} <= {row["step"] for row in logged}
        summary = artifacts["router_stats"]
        assert summary["logged_steps"] == len(logged)
        assert summary["last"] == logged[-1]["stats"]
        for key, mean in summary["mean"].items():  # over the steps that logged each key
            values = [row["stats"][key] for row in logged if key in row["stats"]]
            assert mean == pytest.approx(sum(values) / len(values)), key
        shares = [v for k, v in logged[-1]["stats"].items() if ".share." in k]
        assert shares and all(0.0 <= v <= 1.0 for v in shares)
    # the preparation stage's outcome is stored, so a resume rebuilds the same modules
    prepared = store.get_produced(s, run["id"]).prepared
    assert set(prepared["method_config"]) == set(run["config"]["method_config"])


SHIPPED_MOE = ["loramoe", "loramoe-partition", "mixlora", "lora-smoe", "loracoe"]


@pytest.mark.parametrize("method", SHIPPED_MOE)
def test_shipped_moe_methods_report_router_statistics(method: str) -> None:
    assert _reports_router_stats(method)


def test_run_budget_stores_target_and_achieved_counts(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    args = ["run", "--method", "loracoe", "--budget", "lora:r=16", *TINY, "--db", db]
    code, out = invoke([*args, "--output-dir", str(tmp_path / "runs")])
    assert code == 0, out
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    budget = store.get_artifacts(s, run["id"])["budget"]
    assert budget["target"] == "lora:r=16"
    assert budget["achieved_params"] == run["trainable_params"]
    assert abs(budget["achieved_params"] / budget["target_params"] - 1) <= 0.05
    assert run["config"]["method_config"]["rank"] == budget["knobs"]["rank"]
    assert budget["active_params"] == budget["achieved_params"]  # LoRACoE routes densely
    lora = get_method("lora")
    shapes = ModelShapes.from_config(model_config("tiny-llama"))
    assert budget["target_params"] == lora.trainable_parameters(lora.config_cls(rank=16), shapes)


class _StopAt:
    """An observer that interrupts training at a step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.at = step

    def started(self, run_id: int, info: dict) -> None: ...  # type: ignore[type-arg]
    def eval_started(self, task: str, n: int) -> None: ...
    def eval_progress(self, n: int) -> None: ...
    def task_done(self, result: object) -> None: ...

    def step(self, s: StepLog) -> None:
        if s.step == self.at:
            raise KeyboardInterrupt


def test_a_resumed_run_reuses_its_preparation_instead_of_measuring_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    env = RunEnv(db=db, output_dir=str(tmp_path / "out"))
    spec = resolve(
        options={"method": "lora-smoe", "model": "tiny-llama", "max_steps": 4, "limit": 2},
        # a random model never stops by itself: 16 new tokens, not the math sets' 256
        sets=[
            ("train.batch_size", "8"),
            ("train.checkpoint_every", "2"),
            ("eval.max_new_tokens", "16"),
        ],
    )
    with pytest.raises(KeyboardInterrupt):
        execute(spec, env, _StopAt(3))
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["status"] == "interrupted" and run["last_step"] == 2
    allocation = store.get_artifacts(s, run["id"])["allocation"]
    stored = store.get_produced(s, run["id"]).prepared["method_config"]["allocation"]
    assert stored and len(stored) == len(allocation["modules"])

    def no_measuring(*args: object, **kwargs: object) -> None:
        raise AssertionError("the resumed run measured sensitivity again")

    monkeypatch.setattr("moebench.methods.lora_smoe.measure_cached", no_measuring)
    assert resume(run["id"], RunEnv(db=db)) == run["id"]
    run = store.get_run(s, run["id"])
    assert run["status"] == "done" and run["resumed_from_step"] == 2
    assert store.get_produced(s, run["id"]).prepared["method_config"]["allocation"] == stored


def test_a_run_stored_before_a_config_field_existed_still_resumes(tmp_path: Path) -> None:
    """Runs interrupted under an older moebench lack fields added since (e.g. stats_every);
    they resolve to those fields' defaults and resume, instead of failing on the hash."""
    db = f"sqlite:///{tmp_path / 'o.db'}"
    spec = resolve(
        options={"model": "tiny-llama", "max_steps": 4, "limit": 1},
        sets=[("train.batch_size", "8"), ("train.checkpoint_every", "2"), ("eval.tasks", "boolq")],
    )
    with pytest.raises(KeyboardInterrupt):
        execute(spec, RunEnv(db=db, output_dir=str(tmp_path / "out")), _StopAt(3))
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    old = {k: v for k, v in run["config"].items()}
    del old["train"]["stats_every"]
    store.update_run(s, run["id"], config=old, config_hash=config_hash(old))
    assert resume(run["id"], RunEnv(db=db)) == run["id"]
    assert store.get_run(s, run["id"])["status"] == "done"


def test_a_run_interrupted_at_loracoe_phase_switch_still_records_the_switch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoint on the last warm-up step, interrupt on the first joint step: the resumed
    process must see the stored warm-up side and note the switch as an unbroken run does.
    The switch is the method working as designed: an INFO line (shown with -v), no warning."""
    caplog.set_level(logging.INFO, logger="moebench")
    options = {"method": "loracoe", "model": "tiny-llama", "max_steps": 4, "limit": 1}
    sets = [("train.batch_size", "8"), ("train.checkpoint_every", "2"), ("eval.tasks", "boolq")]
    switches = []
    for interrupt in (False, True):
        db = f"sqlite:///{tmp_path / f'{interrupt}.db'}"
        env = RunEnv(db=db, output_dir=str(tmp_path / f"out-{interrupt}"))
        spec = resolve(options=options, sets=sets)
        if interrupt:
            with pytest.raises(KeyboardInterrupt):
                execute(spec, env, _StopAt(3))
            (run,) = store.list_runs(store.open_store(db))
            assert run["last_step"] == 2
            resume(run["id"], RunEnv(db=db))
        else:
            execute(spec, env)
        (run,) = store.list_runs(store.open_store(db))
        switches.append(store.get_artifacts(store.open_store(db), run["id"])["phase_switches"])
    unbroken, resumed = switches
    noted = [r for r in caplog.records if r.getMessage().startswith("phase lora-warmup -> joint")]
    assert noted and {r.levelno for r in noted} == {logging.INFO}
    assert [(s["from"], s["to"], s["from_step"], s["step"]) for s in resumed] == [
        ("lora-warmup", "joint", 2, 3)
    ]
    assert resumed[0]["ratio"] == pytest.approx(unbroken[0]["ratio"], rel=1e-5)
