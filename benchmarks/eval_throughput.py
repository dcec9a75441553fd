"""Evaluation generation speed: moebench's decoding against lm-eval's HFLM on the same model.

Why it is built this way:

* Same work on every side. One model object, one tokenizer, the same prompts (LLM-Adapters test
  rows rendered with `moebench.prompts.build_prompt`, alpaca template), greedy decoding (or
  `--beams K` beam search on every side), the same new-token budget, the same stop strings (the
  task's own, `### Instruction`), the same batch size. Both sides sort prompts by length and
  left-pad each batch; both stop a sequence at EOS.
  - moebench: `moebench.generation.generate(..., num_beams=K)`, what `moebench run` scores with.
  - lm-eval: `HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=B)` and its
    `generate_until` on `Instance`s whose generation kwargs are `until=<stop strings>,
    max_gen_toks=<budget>, do_sample=False` (and `num_beams=K`, which HFLM passes on to
    `model.generate`), i.e. what `lm_eval.simple_evaluate` runs for a generate_until task,
    without the dataset and metric steps around it.
  - one prompt at a time: moebench's `generate` with batch size 1, the cost batching saves.
  - when `generate` has an `engine` argument, `engine="hf"` too (moebench's batching around
    `model.generate`), which splits the gap into lm-eval's wrapping and moebench's decode loop.
* One invocation, interleaved: every round runs each side once, in an order that rotates each
  round, so drift of a shared machine hits all sides alike; each side's best and median round
  are reported, and every round is listed. One untimed warm-up call per side comes first.
* Agreement: greedy outputs should be identical; batched decoding differs only through padding
  numerics, which can flip a near-tied argmax. The fraction of identical completions between
  moebench and each other side is reported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from moebench.generation import generate
from moebench.models import load_model
from moebench.prompts import build_prompt
from moebench.suites import mini_root
from moebench.task import get_task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"


@dataclass(frozen=True)
class Workload:
    task: str
    n: int
    max_new_tokens: int

    @property
    def label(self) -> str:
        return f"{self.task} x{self.n} @{self.max_new_tokens}"


@dataclass
class Round:
    workload: str
    side: str
    round: int
    seconds: float
    new_tokens: int  # tokens of the returned completions (after stop strings are cut)


def parse_workload(text: str, n: int, max_new: int) -> Workload:
    """`task[:n[:max_new_tokens]]`, the missing parts from --n / --max-new-tokens."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--task {text!r}: expected TASK[:N[:MAX_NEW_TOKENS]]")
    return Workload(
        parts[0],
        int(parts[1]) if len(parts) > 1 else n,
        int(parts[2]) if len(parts) > 2 else max_new,
    )


def load_prompts(w: Workload, data_dir: Path) -> tuple[list[str], tuple[str, ...]]:
    task = get_task(w.task)
    items = task.load_items(task.test_file(data_dir), w.n)
    if len(items) < w.n:
        raise SystemExit(f"{task.test_file(data_dir)} has {len(items)} rows, fewer than {w.n}")
    return [build_prompt("alpaca", it.instruction, it.input) for it in items], task.stop_strings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_sides(
    model: Any, tok: Any, batch: int, amp: torch.dtype | None, beams: int = 1
) -> dict[str, Callable[[list[str], int, Sequence[str]], list[str]]]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=model,
        tokenizer=tok,
        backend="causal",
        batch_size=batch,
        mixed_precision_dtype=amp,
    )

    def moebench(prompts: list[str], new: int, stops: Sequence[str], **kw: Any) -> list[str]:
        return generate(
            model,
            tok,
            prompts,
            max_new_tokens=new,
            num_beams=beams,
            batch_size=kw.pop("batch_size", batch),
            stop_strings=stops,
            amp=amp,
            **kw,
        )

    def lm_eval(prompts: list[str], new: int, stops: Sequence[str]) -> list[str]:
        kwargs = {"until": list(stops), "max_gen_toks": new, "do_sample": False}
        if beams > 1:  # HFLM hands the remaining kwargs to `model.generate`
            kwargs["num_beams"] = beams
        requests = [
            Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)
        ]
        return lm.generate_until(requests, disable_tqdm=True)

    sides: dict[str, Callable[..., list[str]]] = {
        "moebench": moebench,
        "lm-eval HFLM": lm_eval,
        "moebench batch 1": lambda p, n, s: moebench(p, n, s, batch_size=1),
    }
    if "engine" in inspect.signature(generate).parameters:
        sides["moebench engine=hf"] = lambda p, n, s: moebench(p, n, s, engine="hf")
    return sides


def agreement(a: Sequence[str], b: Sequence[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="moebench model alias or folder")
    p.add_argument(
        "--task",
        action="append",
        default=None,
        help="TASK[:N[:MAX_NEW_TOKENS]], repeatable (default: boolq)",
    )
    p.add_argument("--n", type=int, default=64, help="prompts per task (default for --task)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default for --task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beams", type=int, default=1, help="beam width on every side (1: greedy)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds per side")
    p.add_argument(
        "--no-single",
        action="store_true",
        help="skip the one-prompt-at-a-time side (the slowest)",
    )
    p.add_argument(
        "--no-hf-engine",
        action="store_true",
        help="skip moebench's generate with engine='hf' (model.generate)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="base weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", type=Path, default=None, help="LLM-Adapters folder")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )
    data_dir = a.data_dir or (SHARED_DATA if SHARED_DATA.is_dir() else mini_root())
    workloads = [parse_workload(t, a.n, a.max_new_tokens) for t in a.task or ["boolq"]]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model, tok = load_model(a.model, dtype=dtype)
    model.to(device).eval()
    sides = make_sides(model, tok, a.batch_size, None, a.beams)
    if a.no_single:
        del sides["moebench batch 1"]
    if a.no_hf_engine:
        sides.pop("moebench engine=hf", None)
    print(
        f"model {a.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {a.dtype}), "
        f"device {device}, torch threads {torch.get_num_threads()}, batch {a.batch_size}, "
        f"data {data_dir}",
        flush=True,
    )

    rounds: list[Round] = []
    summary: dict[str, Any] = {"workloads": {}}
    for w in workloads:
        prompts, stops = load_prompts(w, data_dir)
        names = list(sides)
        for name in names:  # warm-up: allocator, kernels, first-call setup
            sides[name](prompts[:2], 2, stops)
        outputs: dict[str, list[str]] = {}
        for r in range(a.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                out = sides[name](prompts, w.max_new_tokens, stops)
                _sync(device)
                seconds = time.perf_counter() - t0
                outputs.setdefault(name, out)
                new = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in out)
                rounds.append(Round(w.label, name, r + 1, seconds, new))
                print(f"  {w.label:<22} {name:<20} round {r + 1}: {seconds:7.2f} s", flush=True)
        best = {
            n: min(x.seconds for x in rounds if x.workload == w.label and x.side == n)
            for n in names
        }
        median = {
            n: statistics.median(x.seconds for x in rounds if x.workload == w.label and x.side == n)
            for n in names
        }
        summary["workloads"][w.label] = {
            "workload": asdict(w),
            "stop_strings": list(stops),
            "best_seconds": best,
            "median_seconds": median,
            "prompts_per_s_best": {n: w.n / s for n, s in best.items()},
            "speedup_vs_moebench_best": {n: best[n] / best["moebench"] for n in names},
            "speedup_vs_moebench_median": {n: median[n] / median["moebench"] for n in names},
            "identical_to_moebench": {
                n: agreement(outputs["moebench"], outputs[n]) for n in names if n != "moebench"
            },
            "completion_tokens_moebench": next(
                x.new_tokens for x in rounds if x.workload == w.label and x.side == "moebench"
            ),
        }

    print()
    head = f"{'workload':<22} {'side':<20} {'best s':>8} {'median s':>9} {'prompts/s':>10} "
    head += f"{'x moebench time':>16} {'same output':>12}"
    print(head)
    print("-" * len(head))
    for label, s in summary["workloads"].items():
        for n, b in s["best_seconds"].items():
            same = s["identical_to_moebench"].get(n)
            print(
                f"{label:<22} {n:<20} {b:>8.2f} {s['median_seconds'][n]:>9.2f} "
                f"{s['prompts_per_s_best'][n]:>10.2f} {s['speedup_vs_moebench_best'][n]:>16.2f} "
                f"{'' if same is None else f'{100 * same:.0f}%':>12}"
            )
    summary.update(
        model=a.model,
        dtype=a.dtype,
        device=str(device),
        batch_size=a.batch_size,
        beams=a.beams,
        repeats=a.repeats,
        torch_threads=torch.get_num_threads(),
        data_dir=str(data_dir),
        date=datetime.date.today().isoformat(),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lm_eval": importlib.metadata.version("lm_eval"),
            "moebench": importlib.metadata.version("moebench"),
        },
        rounds=[asdict(r) for r in rounds],
    )
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
