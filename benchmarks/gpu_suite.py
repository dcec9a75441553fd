"""Every GPU figure moebench reports, from one command that fits one device loan.

    .venv/bin/python benchmarks/gpu_suite.py                  # a CUDA device: the full suite
    .venv/bin/python benchmarks/gpu_suite.py --smoke          # CPU, tiny model, every part

The full suite runs on Qwen2-0.5B's shapes (`moebench.models.KNOWN_CONFIGS`, random weights),
frozen base in bf16 with fp32 adapters under bf16 autocast, training batch 16 x 256. Its parts,
each with its budget on one H100 (a hard timeout: the part is killed and recorded as failed):

    part         budget  what                                                   measured by
    model          30 s  the random-weight model folder the later parts load    gpu_parts.py
    methods       200 s  each method's step time paired with LoRA in one        method_overhead.py
                         process (A B B A) and its peak memory, rank 16, all
                         linears; goals: LoRACoE <= 1.03x time and memory,
                         partition LoRAMoE <= 1.05x, MixLoRA E=8 k=2 <= 1.5x
    mfu             -    moebench's LoRA step FLOPs / time / the bf16 peak      (from methods)
    train          60 s  LoRA tokens/s against peft + HF Trainer                train_throughput.py
    eval-greedy    45 s  greedy generation at batch 64 against lm-eval HFLM     eval_throughput.py
    eval-beam      60 s  4-beam search, same prompts and batch                  eval_throughput.py
    run            70 s  `moebench run --max-steps 20` end to end on CUDA       the CLI
    total         465 s  (< 8 minutes, leaving a device loan time to rerun it)

The budgets are estimates (no GPU was lent while this was written: about 10 s to start each
process, plus the steps); every part records its wall time beside its budget, so the first
device run tightens them. The train part keeps `train_throughput.py`'s own workload (the mini
suite's rows, cutoff 256, 16 rows a step as 4 micro-batches of 4, both sides alike). On a
device machine, `benchmarks/gpu_device.sh` installs what its image lacks and runs this.

Why it is built this way:

* A GPU is lent by chance, for about 15 minutes of device time, so everything must run from one
  prepared command, and it must not rot between loans: `--smoke` runs every part on CPU with a
  tiny model in under 2 minutes and CI runs it (tests/test_gpu_suite.py).
* One part's failure must not lose the others. In the full suite each part runs in its own
  process (a fresh CUDA allocator, nothing left by the previous part) under its budget; the
  methods part further runs every method in its own process, as `method_overhead.py` does. A
  failure (exception, exit, timeout) is recorded with its reason and the next part runs. The
  smoke suite runs the parts inline, so the libraries are imported once (CI cost).
* Safe to run twice. Results go to a new folder (default `results/gpu-suite/<UTC time>-<mode>`);
  an existing `--out` is only replaced with `--overwrite`. While running, `suite.json` and
  `suite.md` are rewritten (write, then rename) after every part in `<out>.partial-<pid>`, which
  is renamed to `<out>` at the end, so a run cut off at the device's time limit keeps what it
  measured and a reader never sees two runs mixed.
* Every part records the command, the device, torch and CUDA versions and the date; every ratio
  is stored beside the raw numbers it comes from (`gpu_parts.py`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpu_report import markdown

ORDER = ["model", "methods", "mfu", "train", "eval-greedy", "eval-beam", "run"]
NEEDS = {"mfu": "methods"} | {p: "model" for p in ("train", "eval-greedy", "eval-beam", "run")}
BUDGET_S = {"model": 30, "methods": 200, "mfu": 5, "train": 60}  # seconds on one H100
BUDGET_S |= {"eval-greedy": 45, "eval-beam": 60, "run": 70}
SMOKE_BUDGET_S = 600
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"  # as CI


@dataclass(frozen=True)
class Profile:
    """The sizes of one suite; `FULL` is the issue's, `SMOKE` the smallest that runs every path."""

    device: str
    shape: str
    batch: int
    seq: int
    method_steps: int  # timed steps per method run (paired: per side, even)
    method_warmup: int
    train_steps: int
    eval_n: int
    eval_new_tokens: int
    eval_batch: int
    beams: int
    run_steps: int
    run_limit: int  # items scored per eval set by the real run
    run_new_tokens: int  # its generation budget per item (math sets would take 256)
    run_timeout_s: int
    isolate: bool  # each part in its own process, killed at its budget
    threads: int | None  # torch CPU threads (smoke: 1, steadier and cheaper on a busy CI box)
    # The model folder's vocabulary when not the shape's own. The smoke model's is twice its
    # tokenizer's, as the full model's 151,936 ids are to the 2,048-id tokenizer it is saved with,
    # so generating ids the tokenizer does not know is exercised on CPU too.
    vocab: int | None = None


FULL = Profile(
    device="cuda",
    shape="qwen2-0.5b",
    batch=16,
    seq=256,
    method_steps=10,
    method_warmup=3,
    train_steps=12,
    eval_n=64,
    eval_new_tokens=32,
    eval_batch=64,
    beams=4,
    run_steps=20,
    run_limit=8,
    run_new_tokens=32,
    run_timeout_s=65,
    isolate=True,
    threads=None,
)
SMOKE = replace(
    FULL,
    device="cpu",
    shape="tiny-qwen2",
    batch=2,
    seq=32,
    method_steps=2,
    method_warmup=1,
    train_steps=2,
    eval_n=8,
    eval_new_tokens=4,
    eval_batch=8,
    run_steps=2,
    run_limit=1,
    run_new_tokens=4,
    run_timeout_s=600,
    isolate=False,
    threads=1,
    vocab=4096,
)


def environment(device: str) -> dict[str, Any]:
    """What every figure is stamped with."""
    import torch
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_inline(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    import gpu_parts  # torch and the benchmarks: imported once the arguments are known good

    try:
        return gpu_parts.PARTS[name](ctx)
    except Exception as e:  # recorded, and the next part runs
        return {"error": f"{type(e).__name__}: {e}"}


def run_isolated(name: str, ctx: dict[str, Any], budget: int) -> dict[str, Any]:
    """The part in its own process group, killed (children included) at its budget."""
    work = Path(ctx["work"])
    ctx_file, result = work / "raw" / "ctx.json", work / "raw" / f"{name}.result.json"
    ctx_file.parent.mkdir(parents=True, exist_ok=True)
    ctx_file.write_text(json.dumps(ctx))
    result.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--ctx", str(ctx_file)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--result", str(result)], stdout=out, stderr=out, start_new_session=True
        )
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after its budget of {budget} s (log: logs/{name}.log)"}
    if result.is_file():
        return json.loads(result.read_text())
    lines = log.read_text().strip().splitlines() or ["no output"]
    return {"error": f"exit {code}: {lines[-1]}"}


def budget(name: str, ctx: dict[str, Any]) -> int:
    """The part's budget on one H100; a smoke run's is only a guard against a hang, since a busy
    CPU makes its times swing several-fold."""
    return BUDGET_S[name] if ctx["device"] == "cuda" else SMOKE_BUDGET_S


def run_part(name: str, ctx: dict[str, Any], suite: dict[str, Any], peak: float | None) -> None:
    """Run one part and store its record (figures or failure, and its stamp) in `suite`."""
    t0 = time.perf_counter()
    need = NEEDS.get(name)
    if need and suite["parts"].get(need, {}).get("status") != "ok":
        out: dict[str, Any] = {"error": f"needs the {need} part, which did not succeed"}
    elif name == "mfu":
        import gpu_parts

        try:
            out = gpu_parts.mfu_figures(suite["parts"]["methods"], suite["device"], peak)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
    elif ctx["isolate"]:
        out = run_isolated(name, ctx, budget(name, ctx))
    else:
        out = run_inline(name, ctx)
    error = out.pop("error", None)
    inner = out.pop("argv", None)
    suite["parts"][name] = {
        "status": "failed" if error else "ok",
        "reason": error,
        "command": suite["command"],
        "benchmark_args": inner,
        "device": suite["device"],
        "torch": suite["torch"],
        "cuda": suite["cuda"],
        "date": now(),
        "wall_s": time.perf_counter() - t0,
        "budget_s": budget(name, ctx) if ctx["isolate"] else None,
        **out,
    }
    print(f"[gpu-suite] {name}: {error or 'ok'} ({time.perf_counter() - t0:.1f} s)", flush=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save(work: Path, suite: dict[str, Any]) -> None:
    write_atomic(work / "suite.json", json.dumps(suite, indent=1))
    write_atomic(work / "suite.md", markdown(suite))


def publish(work: Path, out: Path) -> None:
    """Move the finished run to `out`, replacing an old one in a single rename."""
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny-qwen2, every part inline")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a new one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--parts", default=",".join(ORDER), help=f"comma-separated from {ORDER}")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak, if not in table")
    p.add_argument("--data-dir", type=Path, default=None, help="LLM-Adapters data folder")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each part in its own process under its budget (default: on, off with --smoke)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ctx", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in ORDER]
    if unknown:
        p.error(f"unknown --parts {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    parts += [NEEDS[x] for x in parts if x in NEEDS]  # the model folder is rebuilt each run
    a.parts = [x for x in ORDER if x in parts]
    if a.out is not None and a.out.exists() and not a.overwrite:
        p.error(f"--out {a.out} exists; pass --overwrite to replace it, or another --out")
    if not a.smoke and a.child is None:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device is visible; the full suite needs one (use --smoke on CPU)")
    return a


def context(a: argparse.Namespace, profile: Profile, work: Path, scratch: str) -> dict[str, Any]:
    data = a.data_dir or Path(os.environ.get("MOEBENCH_DATA", SHARED_DATA))
    return asdict(profile) | {
        "work": str(work),
        "scratch": scratch,
        "model_dir": str(Path(scratch) / "model"),
        "data_dir": str(data) if (data / "boolq" / "test.json").is_file() else None,
    }


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.child is not None:  # one isolated part
        out = run_inline(a.child, json.loads(a.ctx.read_text()))
        a.result.write_text(json.dumps(out))
        return
    profile = SMOKE if a.smoke else FULL
    if a.isolate is not None:
        profile = replace(profile, isolate=a.isolate)
    if profile.threads:
        import torch

        torch.set_num_threads(profile.threads)
        os.environ["OMP_NUM_THREADS"] = str(profile.threads)  # the children's too
    mode = "smoke" if a.smoke else "full"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = a.out or Path("results") / "gpu-suite" / f"{stamp}-{mode}"
    work = out.with_name(out.name + f".partial-{os.getpid()}")
    work.mkdir(parents=True)
    command = shlex.join(["python", "benchmarks/gpu_suite.py", *(argv or sys.argv[1:])])
    suite: dict[str, Any] = {"command": command, "mode": mode, "started": now()}
    suite |= environment(profile.device) | {"profile": asdict(profile), "parts": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:  # model folder, checkpoints
        ctx = context(a, profile, work, scratch)
        for name in a.parts:
            run_part(name, ctx, suite, a.peak_tflops)
            save(work, suite)
    suite |= {"finished": now(), "wall_s": time.perf_counter() - t0}
    save(work, suite)
    publish(work, out)
    print(f"[gpu-suite] {out}/suite.md ({suite['wall_s']:.0f} s)\n\n{markdown(suite)}")


if __name__ == "__main__":
    main()
