"""A seeded leaderboard store, written through the store's own API, and a check of it.

The runs are made up but complete the way the runner leaves them (finished runs with parameter
counts, a budget artifact, headline metrics equal to the mean of their stored per-item
verdicts, a training log and router artifacts), so every page can be tested against numbers
recomputed from the rows. Planned outcome, at one budget (about 10k trainable parameters):
loracoe clearly above lora, loramoe indistinguishable from lora; mixlora sits at 3x the budget.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from moebench import store as db
from moebench.run_records import store_router_summary

MODEL = "tiny-llama"
SUITE = "mini"
SETS = ("boolq", "piqa", "gsm8k", "svamp", "ifeval")
ITEMS = 40
BASE_PARAMS = 1_000_000

# method -> (rank, trainable params, seeds, accuracy shift)
PLAN: dict[str, tuple[int, int, tuple[int, ...], float]] = {
    "lora": (8, 10_000, (0, 1, 2), 0.0),
    "loramoe": (8, 9_900, (0, 1, 2), 0.0),
    "loracoe": (8, 10_200, (0, 1, 2), 0.2),
    "mixlora": (8, 30_000, (0, 1), 0.1),
    "lora_smoe": (8, 50_000, (0,), 0.05),
}
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")


def protocol_of(task: str) -> str:
    return "ifeval/greedy" if task == "ifeval" else "llm-adapters/beam4"


def headline_of(task: str) -> str:
    return "prompt_level_strict_acc" if task == "ifeval" else "accuracy"


def _verdicts(method: str, seed: int, task: str, shift: float) -> np.ndarray:
    """Per-item right/wrong: a shared item difficulty, moved by the method's shift."""
    base = np.random.default_rng(zlib.crc32(task.encode())).random(ITEMS)
    noise = np.random.default_rng([seed, zlib.crc32(f"{method}/{task}".encode())]).random(ITEMS)
    score = 0.55 * base + 0.25 * noise + shift
    return score > 0.5


def add_run(store: db.Store, method: str, seed: int, *, status: str = "done", **extra: Any) -> int:
    rank, trainable, _, shift = PLAN[method]
    config = {"method": {"name": method, "rank": rank}, "model": MODEL, "seed": seed}
    run_id = db.create_run(
        store,
        method=method,
        model=MODEL,
        suite=SUITE,
        config=config,
        config_hash=hashlib.sha256(f"{method}{seed}{extra}".encode()).hexdigest(),
        seed=seed,
        versions={"moebench": "test", "torch": "x"},
        git_sha="abc1234",
        hardware={"device": "cpu"},
        output_dir=None,
        status=status,
    )
    db.update_run(
        store,
        run_id,
        trainable_params=trainable,
        total_params=BASE_PARAMS + trainable,
        wall_time_s=10.0 + seed,
        last_step=20,
        peak_memory_bytes=2**20 * (1 + rank),
        **extra,
    )
    db.put_artifact(
        store, run_id, "budget", {"target_params": 10_000, "active_params": trainable // 2}
    )
    metrics, preds = [], []
    for task in SETS:
        v = _verdicts(method, seed, task, shift)
        metrics.append(
            {
                "task": task,
                "metric": headline_of(task),
                "value": float(v.mean()),
                "n": ITEMS,
                "stderr": float(np.sqrt(v.mean() * (1 - v.mean()) / ITEMS)),
                "protocol": protocol_of(task),
            }
        )
        for i, ok in enumerate(v):
            preds.append(
                {
                    "task": task,
                    "item_id": f"{task}/{i}",
                    "prompt_hash": f"h{task}{i}",
                    "output": "true" if ok else "false",
                    "extracted": None if (i % 7 == 0 and not ok) else "x",
                    "gold": "true",
                    "correct": bool(ok),
                    "parse_failed": bool(i % 7 == 0 and not ok),
                    "protocol": protocol_of(task),
                }
            )
    db.add_metrics(store, run_id, metrics)
    db.add_predictions(store, run_id, preds)
    _training_records(store, run_id, method)
    return run_id


def _router_stats(method: str, step: int) -> dict[str, float]:
    """What `Adapted.collect_stats` logs: per module, expert load (top-k) or rank share."""
    if method == "mixlora":
        kind, width = "load", 2
    elif method == "loracoe":
        kind, width = "share", PLAN[method][0]
    else:
        return {}
    out = {}
    for m, module in enumerate(MODULES):
        raw = [1.0 + ((j + m + step) % width) / width for j in range(width)]
        out.update({f"{module}.{kind}.{j}": v / sum(raw) for j, v in enumerate(raw)})
    return out


def _training_records(store: db.Store, run_id: int, method: str) -> None:
    """Training log, router summary (the runner's own function), phase switch, allocation."""
    db.log_steps(
        store,
        run_id,
        [
            {
                "step": s,
                "loss": 2.0 / s,
                "lr": 1e-3 * min(1.0, s / 5),
                "aux_losses": {"balance": 0.01 * s} if method != "lora" else None,
                "stats": _router_stats(method, s) or None,
            }
            for s in range(1, 21)
        ],
    )
    store_router_summary(store, run_id)
    if method == "loracoe":
        switch = [{"step": 10, "from": "warmup", "to": "joint"}]
        db.put_artifact(store, run_id, "phase_switches", switch)
    if method == "lora_smoe":
        allocation = [f"{m}={n}" for m, n in zip(MODULES, (2, 5), strict=True)]
        db.put_artifact(
            store, run_id, "prepared", {"method_config": {"allocation": allocation}, "notes": []}
        )


def seed_store(path: Path) -> str:
    """Write the planned runs (plus a failed and a queued job) to a new SQLite file."""
    url = f"sqlite:///{path}"
    with db.open_store(url) as store:
        for method, (_, _, seeds, _) in PLAN.items():
            for seed in seeds:
                add_run(store, method, seed)
        failed = add_run(store, "lora", 9, status="running")
        db.set_status(store, failed, "failed", "CUDA out of memory at step 3")
        add_run(store, "lora", 8, status="queued")
    return url


def test_seeded_metrics_match_their_predictions(tmp_path: Path) -> None:
    url = seed_store(tmp_path / "board.db")
    with db.open_store(url) as store:
        for run in db.list_runs(store, status="done", limit=None):
            preds = db.get_predictions(store, run["id"])
            for m in db.get_metrics(store, run["id"]):
                mine = [p["correct"] for p in preds if p["task"] == m["task"]]
                assert m["value"] == np.mean(mine)
