"""Leaderboard load time on a large store: the main page and a run page, server side.

Acceptance (from the issue): with 1,000 runs and 200,000 predictions, the main page is
interactive in under 2 s and a run page in under 1 s.

How it is measured:
* Store: 1,000 finished runs (2 models x 5 methods x 20 budgets x 5 seeds, one suite of 5 sets
  of 40 items: 200 predictions a run, 200,000 in all), written through the store's own API into
  a SQLite file (made once, reused with --db).
* A page's time is one `AppTest` script run of it (streamlit.testing.v1): every query, the
  aggregation, the paired tests and the figures; the browser's drawing is not included. Caches
  are cleared before each run, so every time is a cold one. The store opens read-only.
* Baseline in the same run: the same pages on the 20-run store of the tests, so the ratio says
  how much the size costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebench import store as db  # noqa: E402

SETS = ("boolq", "piqa", "gsm8k", "svamp", "ifeval")
ITEMS = 40


def seed_large(path: Path) -> None:
    """1,000 runs and 200,000 predictions, deterministic."""
    import numpy as np

    rng = np.random.default_rng(0)
    with db.open_store(f"sqlite:///{path}") as store:
        for model in ("tiny-llama", "tiny-qwen2"):
            for m, method in enumerate(("lora", "loramoe", "loracoe", "mixlora", "lora_smoe")):
                for budget in range(20):
                    for seed in range(5):
                        _one(store, rng, model, method, m, budget, seed)


def _one(store, rng, model, method, m, budget, seed) -> None:  # type: ignore[no-untyped-def]
    rank = 2 + 2 * budget
    config = {"method": {"name": method, "rank": rank}, "model": model, "seed": seed}
    run = db.create_run(
        store, method=method, model=model, suite="bench", config=config,
        config_hash=f"{model}{method}{rank}{seed}", seed=seed, versions={}, git_sha=None,
        hardware={}, output_dir=None, status="done",
    )  # fmt: skip
    trainable = 1000 * rank * (1 + m / 10)
    db.update_run(store, run, trainable_params=int(trainable), total_params=10**6, last_step=10)
    preds, metrics = [], []
    for task in SETS:
        ok = rng.random(ITEMS) < 0.3 + 0.05 * m + 0.01 * budget
        proto = "ifeval/greedy" if task == "ifeval" else "llm-adapters/beam4"
        metric = "prompt_level_strict_acc" if task == "ifeval" else "accuracy"
        metrics.append(
            {"task": task, "metric": metric, "value": float(ok.mean()), "n": ITEMS,
             "stderr": 0.05, "protocol": proto}
        )  # fmt: skip
        preds += [
            {"task": task, "item_id": f"{task}/{i}", "prompt_hash": f"{task}{i}", "output": "o",
             "extracted": "x", "gold": "g", "correct": bool(v), "parse_failed": False,
             "protocol": proto}
            for i, v in enumerate(ok)
        ]  # fmt: skip
    db.add_metrics(store, run, metrics)
    db.add_predictions(store, run, preds)
    db.log_steps(store, run, [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 11)])


def time_page(url: str, page: str | None, repeats: int) -> list[float]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["MOEBENCH_DB"] = url
    times = []
    for _ in range(repeats):
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
        if page is not None:
            at.run()  # land on the entry page, then time the switch alone
            st.cache_data.clear()
            st.cache_resource.clear()
            at.switch_page(page)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        if at.exception:
            raise SystemExit(f"{page or 'main'} page failed: {at.exception[0].value}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "lb_load.db")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.db.exists():
        t0 = time.perf_counter()
        seed_large(args.db)
        print(f"seeded {args.db} in {time.perf_counter() - t0:.0f} s")
    from tests.test_leaderboard_data import seed_store

    small = seed_store(Path(tempfile.mkdtemp()) / "small.db")
    with db.open_store(f"sqlite:///{args.db}") as store:
        n_runs = len(db.list_runs(store, limit=None))
    machine = f"{platform.node()} {platform.processor() or platform.machine()}"
    print(f"machine: {machine}, {os.cpu_count()} cpus; load {os.getloadavg()[0]:.1f}")
    print(f"store: {n_runs} runs")
    for name, page, limit in (("main", None, 2.0), ("run", "pages/run.py", 1.0)):
        big = time_page(f"sqlite:///{args.db}", page, args.repeats)
        base = time_page(small, page, args.repeats)
        med, base_med = statistics.median(big), statistics.median(base)
        verdict = "meets" if med < limit else "MISSES"
        print(
            f"{name} page: median {med:.2f} s (runs {', '.join(f'{t:.2f}' for t in big)}), "
            f"small store {base_med:.2f} s, ratio {med / base_med:.1f}x; "
            f"{verdict} the {limit:.0f} s target"
        )


if __name__ == "__main__":
    main()
