"""The parts of `gpu_suite.py`: each measures one group of figures and returns plain data.

A part takes the suite's context (a JSON-able dict: device, sizes, the model folder, the output
folder) and returns `{"figures": [...], ...}`. Every ratio a figure shows is stored beside the raw
numbers it is computed from, so a reader (and tests/test_gpu_suite.py) can recompute it. Raising
is the failure path: the suite records the part as failed with the exception's message and goes
on with the next part. The measuring itself is the existing benchmarks' (`method_overhead.py`,
`train_throughput.py`, `eval_throughput.py`) and the real CLI; this module only drives them at the
suite's sizes and reads their results back.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# The goals, judged on the paired time ratio and the memory ratio with the frozen
# weights included (what a GPU's peak holds): (time, memory, reference from the paper).
GOALS: dict[str, tuple[float | None, float | None, str]] = {
    "loracoe": (1.03, 1.03, "paper (fused): 1.048x time, 1.035x mem"),
    "loracoe-unfused": (None, None, "paper (unfused): 3.1x time"),
    "loramoe-partition": (1.05, None, ""),
    "mixlora": (1.5, None, ""),
}

# Dense bf16 tensor-core peaks (no sparsity) in TFLOP/s, from NVIDIA's data sheets (which print
# the sparse figure, twice these). Matched in order against `torch.cuda.get_device_name()`, so a
# more specific name comes before a name it contains ("H100 PCIe" before "H100").
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM5, named e.g. "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.5),
    ("H200", 989.4),  # SXM, also GH200
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
]


def bf16_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name, or None when the device is not in it."""
    return next((tf for key, tf in BF16_PEAK_TFLOPS if key in device_name), None)


def _json_out(ctx: dict[str, Any], name: str) -> Path:
    path = Path(ctx["work"]) / "raw" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


# --- model --------------------------------------------------------------------------------------


def part_model(ctx: dict[str, Any]) -> dict[str, Any]:
    """A local model folder of `ctx["shape"]` with random weights, which every later part loads.

    The weights are random because the device has no hub; the shapes are the real ones
    (`moebench.models.KNOWN_CONFIGS`), vocabulary included, so the output layer costs what it
    costs on the real model. The tokenizer is moebench's tiny BPE (2048 ids): prompts only use
    its ids, while the model may generate any of its own, which decode to nothing; both sides of
    every comparison see the same ids, so the work compared is the same.
    """
    from transformers import AutoModelForCausalLM

    from moebench.models import _tiny_tokenizer, count_parameters, model_config

    cfg = model_config(ctx["shape"])
    tok = _tiny_tokenizer()
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    dtype = torch.bfloat16 if ctx["device"] == "cuda" else torch.float32
    torch.manual_seed(1234)
    with torch.device(ctx["device"]):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    folder = Path(ctx["model_dir"])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = count_parameters(model)[1]
    figure = {"name": "model", "shape": ctx["shape"], "parameters": params, "dtype": str(dtype)}
    return {"figures": [figure | {"layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size}]}


# --- every method against LoRA ------------------------------------------------------------------


def _method_job(ctx: dict[str, Any], cache: str) -> dict[str, Any]:
    return {
        "device": ctx["device"],
        "shape": ctx["shape"],
        "batch": ctx["batch"],
        "seq": ctx["seq"],
        "steps": ctx["method_steps"],
        "warmup": ctx["method_warmup"],
        "threads": ctx["threads"],
        "repeat": 1,
        "cache_dir": cache,
    }


def _child(mo: Any, job: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """One method_overhead child: its own process on a GPU (fresh peak counter), else inline."""
    if isolate:
        return mo.spawn(job, dict(os.environ))
    try:
        return mo.run_child(job)
    except Exception as e:  # one method's failure must not lose the others
        return {"error": f"{type(e).__name__}: {e}"}


def part_methods(ctx: dict[str, Any]) -> dict[str, Any]:
    """Each method's step time (paired with LoRA in one process, steps A B B A) and peak memory
    (its own process, `method_overhead.py`'s timing child), at rank 16 on all seven linears."""
    import method_overhead as mo

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as cache:  # LoRA-SMoE's sensitivities, once per suite
        job = _method_job(ctx, cache)
        for v in mo.VARIANTS:
            run = {"time": _child(mo, job | {"label": v.label, "kind": "time"}, ctx["isolate"])}
            if v.label != "lora" and "error" not in run["time"]:
                paired = job | {"label": v.label, "kind": "paired"}
                run["paired"] = _child(mo, paired, ctx["isolate"])
            runs[v.label] = run
    base = runs["lora"]["time"]
    if "error" in base:
        raise RuntimeError(f"the LoRA baseline failed: {base['error']}")
    figures = [_method_figure(v, runs[v.label], base) for v in mo.VARIANTS]
    return {"figures": figures}


def _method_figure(v: Any, run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    goal_time, goal_mem, reference = GOALS.get(v.label, (None, None, ""))
    row: dict[str, Any] = {"method": v.label, "plugin": v.method, "config": v.summary}
    row["reference"] = reference
    row |= {"goal_time": goal_time, "goal_mem": goal_mem}
    failed = next((r["error"] for r in run.values() if "error" in r), None)
    if failed is not None:
        return row | {"error": failed}
    t = run["time"]
    lora_bytes = base["added_bytes"] + base["weight_bytes"]
    row |= {
        "trainable": t["trainable"],
        "closed_form": t["closed_form"],
        "step_s": t["step_s"],
        "step_ms": 1000 * statistics.median(t["step_s"]),
        "added_bytes": t["added_bytes"],
        "weight_bytes": t["weight_bytes"],
        "peak_bytes": t["peak_bytes"],
        "mem_ratio": (t["added_bytes"] + t["weight_bytes"]) / lora_bytes,
        "step_flops": t["step_flops"],
        "flop_ratio": t["step_flops"] / base["step_flops"],
        "note": t["note"],
    }
    if "paired" in run:
        lora_s, method_s = run["paired"]["lora_s"], run["paired"]["method_s"]
        row |= {"paired_lora_s": lora_s, "paired_method_s": method_s}
        row["time_ratio"] = sum(method_s) / sum(lora_s)
    else:  # LoRA itself
        row["time_ratio"] = 1.0
    checks = [row["time_ratio"] <= goal_time] if goal_time else []
    checks += [row["mem_ratio"] <= goal_mem] if goal_mem else []
    row["met"] = all(checks) if checks else None
    return row


def mfu_figures(methods: dict[str, Any], device_name: str, peak: float | None) -> dict[str, Any]:
    """Model FLOPs utilisation of moebench's LoRA step: the step's counted matmul and attention
    FLOPs (forward and backward, `torch.utils.flop_counter`, no recomputation) over its median
    time, against the device's dense bf16 peak."""
    lora = next(f for f in methods["figures"] if f["method"] == "lora")
    if "error" in lora:
        raise RuntimeError(f"the LoRA step failed: {lora['error']}")
    flops = lora["step_flops"]
    step_s = statistics.median(lora["step_s"])
    achieved = flops / step_s / 1e12
    peak = peak if peak is not None else bf16_peak_tflops(device_name)
    figure = {
        "name": "lora step MFU",
        "step_flops": flops,
        "step_s": step_s,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": None if peak is None else achieved / peak,
    }
    if peak is None:
        figure["note"] = f"no bf16 peak known for {device_name!r}; pass --peak-tflops"
    return {"figures": [figure]}


# --- training throughput ------------------------------------------------------------------------


def part_train(ctx: dict[str, Any]) -> dict[str, Any]:
    """moebench's LoRA loop against peft + HF Trainer (`train_throughput.py`), one run each."""
    import train_throughput

    out = _json_out(ctx, "train")
    argv = ["--model", ctx["model_dir"], "--steps", str(ctx["train_steps"]), "--repeats", "1"]
    argv += ["--no-hf-grouped", "--device", ctx["device"], "--json-out", str(out)]
    train_throughput.main(argv)
    blob = json.loads(out.read_text())
    sides = {}
    for side in ("moebench", "hf-trainer"):
        best = max((r for r in blob["runs"] if r["side"] == side), key=lambda r: r["tokens_per_s"])
        sides[side] = {k: best[k] for k in ("tokens", "seconds", "steps", "tokens_per_s")}
    ratio = sides["moebench"]["tokens_per_s"] / sides["hf-trainer"]["tokens_per_s"]
    figure = {"name": "lora tokens/s, moebench / peft + HF Trainer", "sides": sides}
    return {"figures": [figure | {"ratio": ratio}], "argv": argv}


# --- evaluation throughput ----------------------------------------------------------------------


def eval_data(ctx: dict[str, Any]) -> tuple[Path, str]:
    """A data folder with at least `eval_n` boolq test rows: the LLM-Adapters set when it is
    there, else the packaged mini suite's rows repeated (same prompts on every side, so the
    comparison holds; only the prompt mix is narrower)."""
    from moebench.suites import mini_root

    n = ctx["eval_n"]
    given = ctx.get("data_dir")
    if given and len(json.loads((Path(given) / "boolq" / "test.json").read_text())) >= n:
        return Path(given), f"{given} (boolq, first {n})"
    rows = json.loads((mini_root() / "boolq" / "test.json").read_text())
    folder = Path(ctx["scratch"]) / "eval-data"
    (folder / "boolq").mkdir(parents=True, exist_ok=True)
    repeated = [rows[i % len(rows)] for i in range(n)]
    (folder / "boolq" / "test.json").write_text(json.dumps(repeated))
    return folder, f"mini suite boolq ({len(rows)} rows) repeated to {n}"


def _eval(ctx: dict[str, Any], name: str, beams: int) -> dict[str, Any]:
    import eval_throughput

    data, source = eval_data(ctx)
    out = _json_out(ctx, name)
    task = f"boolq:{ctx['eval_n']}:{ctx['eval_new_tokens']}"
    argv = ["--model", ctx["model_dir"], "--task", task, "--batch-size", str(ctx["eval_batch"])]
    argv += ["--beams", str(beams), "--repeats", "1", "--no-single", "--no-hf-engine"]
    argv += ["--device", ctx["device"], "--dtype", "bf16" if ctx["device"] == "cuda" else "fp32"]
    argv += ["--data-dir", str(data), "--json-out", str(out)]
    eval_throughput.main(argv)
    w = next(iter(json.loads(out.read_text())["workloads"].values()))
    seconds = w["best_seconds"]
    figure = {
        "name": f"eval {'greedy' if beams == 1 else f'{beams}-beam'}, lm-eval HFLM / moebench time",
        "beams": beams,
        "batch": ctx["eval_batch"],
        "prompts": ctx["eval_n"],
        "max_new_tokens": ctx["eval_new_tokens"],
        "prompt_source": source,
        "moebench_s": seconds["moebench"],
        "lm_eval_s": seconds["lm-eval HFLM"],
        "speedup": seconds["lm-eval HFLM"] / seconds["moebench"],
        "identical_outputs": w["identical_to_moebench"]["lm-eval HFLM"],
    }
    return {"figures": [figure], "argv": argv}


def part_eval_greedy(ctx: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation, `eval_throughput.py` at the suite's batch."""
    return _eval(ctx, "eval-greedy", 1)


def part_eval_beam(ctx: dict[str, Any]) -> dict[str, Any]:
    """Beam search on both sides: moebench prefills each prompt once, HFLM's generate does not."""
    return _eval(ctx, "eval-beam", ctx["beams"])


# --- a real `moebench run` ----------------------------------------------------------------------


def part_run(ctx: dict[str, Any]) -> dict[str, Any]:
    """`moebench run` end to end through the CLI (its own process), then its stored figures."""
    from moebench import store

    db = f"sqlite:///{Path(ctx['work']) / 'run.sqlite'}"
    argv = [sys.executable, "-m", "moebench", "run", "--model", ctx["model_dir"]]
    argv += ["--method", "lora", "--max-steps", str(ctx["run_steps"]), "--limit"]
    argv += [str(ctx["run_limit"]), "--set", f"eval.max_new_tokens={ctx['run_new_tokens']}"]
    argv += ["--set", f"device={ctx['device']}", "--db", db]
    argv += ["--output-dir", str(Path(ctx["scratch"]) / "runs")]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=ctx["run_timeout_s"], check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["no output"]
        raise RuntimeError(f"moebench run exited {proc.returncode}: {tail[-1]}")
    s = store.open_store(db)
    (row,) = store.list_runs(s)
    run = store.get_run(s, row["id"])
    metrics = store.get_metrics(s, row["id"])
    figure = {
        "name": "moebench run",
        "status": run["status"],
        "steps": run["last_step"],
        "tokens_per_s": run["tokens_per_s"],
        "wall_time_s": run["wall_time_s"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "gpu": run["hardware"].get("gpu"),
        "metrics": [
            {k: m[k] for k in ("task", "metric", "value", "n")}
            for m in metrics
            if m["metric"] != "parse_failure_rate"
        ],
    }
    return {"figures": [figure], "argv": argv[1:]}


PARTS = {
    "model": part_model,
    "methods": part_methods,
    "train": part_train,
    "eval-greedy": part_eval_greedy,
    "eval-beam": part_eval_beam,
    "run": part_run,
}
