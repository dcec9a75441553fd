"""Leaderboard load time on a large store: the main page and a run page, server side.

Acceptance (from the issue): with 1,000 runs and 200,000 predictions, the main page is
interactive in under 2 s and a run page in under 1 s.

How it is measured:
* Store: 1,000 finished runs (2 models x 5 methods x 20 budgets x 5 seeds, one suite of 5 sets
  of 40 items: 200 predictions a run, 200,000 in all), written through the store's own API into
  a SQLite file (made once, reused with --db).
* Server side, `AppTest` (streamlit.testing.v1): one script run of the page, which is every
  query, the aggregation, the paired tests and the figures, without the browser's drawing.
  Caches are cleared before each run, so the data is always cold. Two harnesses:
  - `warm server` (the figure held against the target): one AppTest per page, run once untimed,
    then each timed run reruns it. A Streamlit server scans every installed package for
    components once, when it starts (`Runtime.__init__` calls
    `discover_and_register_components`); a fresh AppTest repeats that scan on its first run
    (0.6-1.5 s in a venv holding torch, ray and transformers). That cost belongs to no page view.
  - `fresh AppTest`: a new AppTest for every run, as this script measured until 2026-12-07; the
    scan is inside every figure.
* In a browser (`--browser`, Debian's chromium through playwright): `moebench leaderboard` is
  started on the store; each visit opens a new tab (a new session) and is timed from navigation
  to the main table and both charts being on screen. The first visit is to a server that has
  just started (its imports and the store's opening included); the next ones come after the
  board cache's 30 s lifetime has run out, so their data is cold too. The floor, timed the same
  way in the same run: a bare Streamlit page with a three-row table and two plotly charts, no
  store; what is left above it is the leaderboard's own cost.
* Baseline in the same run: the same pages on the 20-run store of the tests, so the ratio says
  how much the size costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
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


def _clear_caches() -> None:
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()


def time_page(url: str, page: str | None, repeats: int, *, fresh: bool) -> list[float]:
    """Seconds per cold-data script run of `page` (None: the main page)."""
    from streamlit.testing.v1 import AppTest

    os.environ["MOEBENCH_DB"] = url

    def new_app() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)
        if page is not None:
            at.run()  # land on the entry page; the switch is what is timed
            at.switch_page(page)
        return at

    warm = None if fresh else new_app()
    if warm is not None:
        warm.run()  # the server's start: imports and the one-time component scan
    times = []
    for _ in range(repeats):
        at = warm if warm is not None else new_app()
        _clear_caches()
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        if at.exception:
            raise SystemExit(f"{page or 'main'} page failed: {at.exception[0].value}")
    return times


FLOOR_APP = """
import pandas as pd
import plotly.express as px
import streamlit as st

frame = pd.DataFrame({"method": ["lora", "loracoe", "loramoe"], "accuracy": [0.61, 0.64, 0.63]})
st.title("floor")
st.dataframe(frame)
st.plotly_chart(px.scatter(frame, x="method", y="accuracy"))
st.plotly_chart(px.bar(frame, x="method", y="accuracy"))
"""


def _serve(url: str | None, port: int, scratch: Path) -> subprocess.Popen:
    """`moebench leaderboard` on `url`, or (None) the floor app: a bare Streamlit page with one
    three-row table and two plotly charts, which is what the frontend alone costs."""
    from moebench.cli_leaderboard import streamlit_command

    if url is not None:
        cmd = [sys.executable, "-m", "moebench", "leaderboard", "--db", url, "--port", str(port)]
    else:
        app = scratch / "floor_app.py"
        app.write_text(FLOOR_APP)
        cmd = streamlit_command(app, port, "127.0.0.1")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def time_browser(url: str | None, repeats: int, *, cache_ttl_s: float = 31.0) -> list[float]:
    """Seconds from navigation to the table and both charts shown, one new tab per visit: the
    first visit after the server's start, then `repeats` visits with cold data. `url` None
    times the floor app instead."""
    from playwright.sync_api import sync_playwright

    from tests.test_leaderboard_browser import CHROMIUM, _free_port, _wait_healthy

    port = _free_port()
    scratch = tempfile.TemporaryDirectory()
    proc = _serve(url, port, Path(scratch.name))
    base = f"http://127.0.0.1:{port}"
    times: list[float] = []
    tables: list[float] = []
    try:
        _wait_healthy(base, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            for i in range(repeats + 1):
                if i:
                    time.sleep(cache_ttl_s)  # the board's cached result expires: cold data
                tab = browser.new_page(viewport={"width": 1600, "height": 1000})
                start = time.perf_counter()
                tab.goto(base)
                tab.wait_for_selector("[data-testid='stDataFrame']", timeout=120_000)
                table = time.perf_counter() - start
                tab.locator(".js-plotly-plot").nth(1).wait_for(timeout=120_000)
                times.append(time.perf_counter() - start)
                tables.append(table)
                tab.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        scratch.cleanup()
    print(f"  {url or 'floor app'}: table shown after {', '.join(f'{t:.2f}' for t in tables)} s")
    return times


def _line(name: str, big: list[float], base: list[float], limit: float) -> str:
    med, base_med = statistics.median(big), statistics.median(base)
    verdict = "meets" if med < limit else "MISSES"
    return (
        f"{name}: median {med:.2f} s (runs {', '.join(f'{t:.2f}' for t in big)}), "
        f"small store {base_med:.2f} s, ratio {med / base_med:.1f}x; {verdict} the "
        f"{limit:.0f} s target"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "lb_load.db")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--browser", action="store_true", help="also time it in chromium")
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
    big_url = f"sqlite:///{args.db}"
    for name, page, limit in (("main", None, 2.0), ("run", "pages/run.py", 1.0)):
        for harness, fresh in (("warm server", False), ("fresh AppTest", True)):
            big = time_page(big_url, page, args.repeats, fresh=fresh)
            base = time_page(small, page, args.repeats, fresh=fresh)
            print(_line(f"{name} page, {harness}", big, base, limit))
    if args.browser:
        big = time_browser(big_url, args.repeats)
        base = time_browser(small, args.repeats)
        print(
            f"main page in chromium, first visit after the server's start: {big[0]:.2f} s, "
            f"small store {base[0]:.2f} s"
        )
        print(_line("main page in chromium, cold data", big[1:], base[1:], 2.0))
        floor = time_browser(None, args.repeats, cache_ttl_s=0.0)
        floor_med, big_med = statistics.median(floor[1:]), statistics.median(big[1:])
        print(
            f"floor app in chromium (no store, 3-row table, 2 charts): first visit "
            f"{floor[0]:.2f} s, then median {floor_med:.2f} s; above the floor, the main "
            f"page's own share of a cold visit is {big_med - floor_med:.2f} s"
        )


if __name__ == "__main__":
    main()
