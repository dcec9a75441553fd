"""The leaderboard in a real headless Chromium: started by the CLI, read through the browser.

Debian's chromium is driven by playwright through its executable path (`.ci/run` installs it);
the test checks that the main table and the Pareto chart show the seeded values and saves a
screenshot of each tab (docs/leaderboard.png and docs/leaderboard_charts.png are these).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from moebench.board.table import BoardFilters, build_board
from moebench.digits import fixed
from tests.test_leaderboard_data import seed_store

# Generous: a first render on a loaded 2-core CI machine imports streamlit, plotly and numpy.
WAIT_MS = 180_000
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("streamlit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not answer at {url} within {timeout_s:.0f} s")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


@pytest.fixture
def served(tmp_path: Path):
    path = tmp_path / "board.db"
    url = seed_store(path)
    os.chmod(path, 0o444)
    port = _free_port()
    cmd = [sys.executable, "-m", "moebench", "leaderboard", "--db", url, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc)
        yield base, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait(page: Any, selector: str, tmp_path: Path) -> None:
    """Wait for `selector`; on a timeout, fail with a screenshot of what the page showed."""
    try:
        page.wait_for_selector(selector, timeout=WAIT_MS)
    except playwright_api.TimeoutError:
        page.screenshot(path=str(tmp_path / "timeout.png"))
        raise AssertionError(f"no {selector}; see {tmp_path / 'timeout.png'}") from None


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run)")
def test_table_and_chart_render_in_chromium(served, tmp_path: Path) -> None:
    base, url = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(base, wait_until="networkidle")
        _wait(page, "[data-testid='stDataFrame']", tmp_path)
        page.wait_for_timeout(1500)
        # The table's cells live in the grid's accessible table.
        cells = page.locator("[data-testid='stDataFrame'] table td").all_inner_texts()
        # The budget-matched view: out-of-band rows greyed, in-band rows ranked.
        target = page.get_by_label("Target trainable parameters (0: none)")
        target.fill("10000")
        target.press("Enter")
        page.get_by_text("Compared: rows within").wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(1500)
        shot = tmp_path / "leaderboard.png"
        page.screenshot(path=str(shot), full_page=False)
        # The charts are drawn when their tab opens; a chart's data lives in its div.
        page.get_by_role("tab", name="Charts").click()
        _wait(page, ".js-plotly-plot", tmp_path)
        page.wait_for_timeout(1500)
        traces = page.evaluate(
            "() => document.querySelector('.js-plotly-plot').data"
            ".map(t => ({name: t.name, x: t.x, y: t.y}))"
        )
        charts_shot = tmp_path / "leaderboard_charts.png"
        page.screenshot(path=str(charts_shot), full_page=False)
        browser.close()
    from moebench.store.readonly import open_store_readonly

    with open_store_readonly(url) as store:
        board = build_board(store, BoardFilters())
    by = {r.method: r for r in board.rows}
    assert "loracoe" in cells and "tiny-llama" in cells
    overall = round(100 * by["loracoe"].scores["overall"].mean, 4)
    row = cells[cells.index("loracoe") - 1 : cells.index("tiny-llama", cells.index("loracoe")) + 20]
    assert any(_number(c) == pytest.approx(overall, abs=1e-3) for c in row), (overall, row)
    points = {t["name"]: (t["x"], t["y"]) for t in traces}
    xs, ys = points["loracoe"]
    assert xs == [by["loracoe"].trainable_params]
    assert ys[0] == pytest.approx(100 * by["loracoe"].scores["overall"].mean)
    keep = os.environ.get("MOEBENCH_SCREENSHOT_DIR")
    for picture in (shot, charts_shot):
        assert picture.stat().st_size > 10_000
        if keep:
            shutil.copy(picture, Path(keep) / picture.name)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run)")
def test_fixed_writes_what_the_browser_writes() -> None:
    """`moebench.digits.fixed` against the grid's own rule in chromium: Streamlit's dataframe
    formats `%.2f` with sprintf-js, whose `f` is JavaScript's `toFixed`."""
    values = [k / 8 for k in range(-400, 401)] + [1.005, 8.345, 0.285, -2.675, 99.995, 1e-7]
    values += [-0.0, -0.001, -0.004, 0.004]  # the sign of zero and of what rounds to zero
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        written = page.evaluate("vs => vs.map(v => [v.toFixed(2), v.toFixed(3)])", values)
        browser.close()
    assert [[fixed(v, 2), fixed(v, 3)] for v in values] == written
