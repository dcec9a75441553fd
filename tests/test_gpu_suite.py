"""benchmarks/gpu_suite.py --smoke: every part runs on CPU and its outputs hold to the spec.

The suite exists to be run once on a lent GPU, so it must not rot between loans: this runs it
for real (tiny model, CPU) and checks what a reader of the GPU figures relies on: every part
present and stamped (command, device, torch/CUDA, date), every ratio equal to the one recomputed
from the raw numbers stored beside it, the Markdown showing the same numbers, the store holding
the real run, and a second run into the same folder refused or replaced whole.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moebench import store
from moebench.method import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["model", "methods", "mfu", "train", "eval-greedy", "eval-beam", "run"]
PEAK = 0.5  # a stand-in bf16 peak (TFLOP/s), so the CPU run computes an MFU


def suite_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=900
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("gpu-suite") / "smoke"
    proc = suite_cmd("--smoke", "--out", str(out), "--peak-tflops", str(PEAK))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "suite.json").read_text())


def part(suite: dict[str, Any], name: str) -> dict[str, Any]:
    return suite["parts"][name]


def test_every_part_ran_and_is_stamped(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, suite = smoke
    assert list(suite["parts"]) == PARTS
    assert suite["mode"] == "smoke" and suite["device"].startswith("CPU")
    for name, p in suite["parts"].items():
        assert p["status"] == "ok", (name, p["reason"])
        assert p["command"].startswith("python benchmarks/gpu_suite.py --smoke")
        assert p["device"] == suite["device"] and p["torch"] == suite["torch"]
        assert "cuda" in p  # None on a CPU-only torch, the CUDA version otherwise
        assert datetime.datetime.fromisoformat(p["date"]).tzinfo is not None
        assert p["figures"], name
    assert not list(out.parent.glob("smoke.*")), "no partial or old folder left beside it"


def test_method_ratios_follow_from_the_raw_times(smoke: tuple[Path, dict[str, Any]]) -> None:
    rows = {r["method"]: r for r in part(smoke[1], "methods")["figures"]}
    assert set(METHODS.names()) <= {r["plugin"] for r in rows.values()}  # every method measured
    assert "loracoe-unfused" in rows
    lora = rows["lora"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["trainable"] == r["closed_form"], r["method"]
        assert r["step_ms"] == pytest.approx(1000 * statistics.median(r["step_s"]))
        base = lora["added_bytes"] + lora["weight_bytes"]
        assert r["mem_ratio"] == pytest.approx((r["added_bytes"] + r["weight_bytes"]) / base)
        if r["method"] != "lora":
            paired = sum(r["paired_method_s"]) / sum(r["paired_lora_s"])
            assert r["time_ratio"] == pytest.approx(paired)
            assert len(r["paired_lora_s"]) == len(r["paired_method_s"]) > 0
        checks = [r["time_ratio"] <= r["goal_time"]] if r["goal_time"] else []
        checks += [r["mem_ratio"] <= r["goal_mem"]] if r["goal_mem"] else []
        assert r["met"] == (all(checks) if checks else None)
    goals = {m: (rows[m]["goal_time"], rows[m]["goal_mem"]) for m in rows}
    assert goals["loracoe"] == (1.03, 1.03)
    assert goals["loramoe-partition"][0] == 1.05 and goals["mixlora"][0] == 1.5


def test_mfu_train_and_eval_ratios(smoke: tuple[Path, dict[str, Any]]) -> None:
    suite = smoke[1]
    lora = next(r for r in part(suite, "methods")["figures"] if r["method"] == "lora")
    (mfu,) = part(suite, "mfu")["figures"]
    assert mfu["step_flops"] == lora["step_flops"] > 0
    assert mfu["step_s"] == pytest.approx(statistics.median(lora["step_s"]))
    assert mfu["achieved_tflops"] == pytest.approx(mfu["step_flops"] / mfu["step_s"] / 1e12)
    assert mfu["peak_tflops"] == PEAK
    assert mfu["mfu"] == pytest.approx(mfu["achieved_tflops"] / PEAK)

    (train,) = part(suite, "train")["figures"]
    rates = {k: s["tokens"] / s["seconds"] for k, s in train["sides"].items()}
    assert rates["moebench"] == pytest.approx(train["sides"]["moebench"]["tokens_per_s"])
    assert train["ratio"] == pytest.approx(rates["moebench"] / rates["hf-trainer"])

    for name, beams in (("eval-greedy", 1), ("eval-beam", 4)):
        (f,) = part(suite, name)["figures"]
        assert f["beams"] == beams and f["prompts"] == suite["profile"]["eval_n"]
        assert f["speedup"] == pytest.approx(f["lm_eval_s"] / f["moebench_s"])
        assert 0.0 <= f["identical_outputs"] <= 1.0


def test_the_real_run_is_in_its_store(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, suite = smoke
    (f,) = part(suite, "run")["figures"]
    s = store.open_store(f"sqlite:///{out / 'run.sqlite'}")
    (row,) = store.list_runs(s)
    assert row["status"] == f["status"] == "done"
    assert f["steps"] == row["last_step"] == suite["profile"]["run_steps"]
    assert f["tokens_per_s"] == row["tokens_per_s"] > 0
    stored = {(m["task"], m["metric"]) for m in store.get_metrics(s, row["id"])}
    assert {(m["task"], m["metric"]) for m in f["metrics"]} <= stored
    assert len(f["metrics"]) > 1


def test_markdown_shows_the_stored_numbers(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, suite = smoke
    md = (out / "suite.md").read_text()
    for name in PARTS:
        assert f"## {name}: ok" in md
    for r in part(suite, "methods")["figures"]:
        assert f"| {r['method']} | " in md and f"| {r['time_ratio']:.3f} |" in md
    assert f"**{part(suite, 'train')['figures'][0]['ratio']:.2f}x**" in md
    assert f"| {part(suite, 'eval-beam')['figures'][0]['speedup']:.2f}x |" in md
    assert f"{100 * part(suite, 'mfu')['figures'][0]['mfu']:.1f}%" in md


def test_a_second_run_is_refused_or_replaces_the_folder_whole(
    smoke: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "twice"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    refused = suite_cmd("--smoke", "--out", str(out))
    assert refused.returncode == 2 and f"--out {out} exists" in refused.stderr
    # --isolate: the model part in its own process, as on a GPU
    again = suite_cmd("--smoke", "--out", str(out), "--overwrite", "--parts", "model", "--isolate")
    assert again.returncode == 0, again.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert list(suite["parts"]) == ["model"] and suite["parts"]["model"]["status"] == "ok"
    assert not (out / "stale.txt").exists() and (out / "logs" / "model.log").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice"]


def test_a_part_over_its_budget_is_killed_and_recorded(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SCRIPT.parent))
    ctx = {"work": str(tmp_path), "threads": 1}
    out = gpu_suite.run_isolated("methods", ctx, budget=1)
    assert out == {"error": "timed out after its budget of 1 s (log: logs/methods.log)"}


def test_unknown_part_is_one_clear_error() -> None:
    proc = suite_cmd("--smoke", "--parts", "model,nope")
    assert proc.returncode == 2
    assert "unknown --parts nope; choose from model, methods" in proc.stderr
