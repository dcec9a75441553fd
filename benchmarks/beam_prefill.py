"""Beam-search evaluation cost: moebench's decoding loop against `model.generate(num_beams=k)`.

Why it is built this way:

* Same work on both sides. Both go through `moebench.generation.generate`, the function
  evaluation calls, on the same prompts, batch, beams, budget and stop strings; only `engine`
  differs ("moebench": one prefill per prompt and finished prompts leave the batch; "hf":
  `model.generate`). The outputs are compared: the speed-up only counts if the texts are equal.
* Prompts: the first N items of an LLM-Adapters test set in the canonical alpaca template, as
  the commonsense protocol builds them, and the task's stop string (`### Instruction`).
* Work, not only time. A forward pre-hook counts the token positions each side runs through the
  model (prompt positions of the first call, then one per row and step). That count does not
  depend on a busy machine; the wall time does.
* Noise: the sides are interleaved for `--repeats` rounds after an untimed warm-up of each, and
  each side's best time is kept. `--threads 1` (the default) is steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers

from moebench.generation import generate
from moebench.models import load_model
from moebench.prompts import build_prompt

DATA = Path(os.environ.get("MOEBENCH_DATA", "/work/shared/data")) / "llm-adapters"


def _count_positions(model: torch.nn.Module) -> tuple[dict[str, int], Any]:
    counts = {"prefill": 0, "decode": 0, "calls": 0}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rows, cols = kwargs["input_ids"].shape
        counts["prefill" if cols > 1 else "decode"] += rows * cols  # decode steps feed 1 token
        counts["calls"] += 1

    return counts, model.register_forward_pre_hook(hook, with_kwargs=True)


def run_side(model, tok, prompts: list[str], engine: str, args: argparse.Namespace) -> dict:
    counts, handle = _count_positions(model)
    try:
        start = time.perf_counter()
        texts = generate(
            model,
            tok,
            prompts,
            max_new_tokens=args.new_tokens,
            num_beams=args.beams,
            batch_size=args.batch_size,
            stop_strings=("### Instruction",),
            engine=engine,  # type: ignore[arg-type]
        )
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return {"engine": engine, "seconds": seconds, "texts": texts, **counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="boolq", help="LLM-Adapters test set folder")
    p.add_argument("--n", type=int, default=16, help="prompts (one batch by default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = json.loads((DATA / args.task / "test.json").read_text())[: args.n]
    prompts = [build_prompt("alpaca", r["instruction"], r.get("input", "")) for r in rows]
    model, tok = load_model(args.model)
    model.eval()
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    print(
        f"{args.model}, {args.task} x{len(prompts)} (prompt tokens {min(lengths)}-"
        f"{max(lengths)}, mean {sum(lengths) / len(lengths):.0f}), beams {args.beams}, "
        f"{args.new_tokens} new tokens, batch {args.batch_size}, threads {args.threads}"
    )
    for engine in ("moebench", "hf"):  # untimed warm-up: allocator, kernels, lazy imports
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 2})
        run_side(model, tok, prompts[:2], engine, warm)

    runs = []
    for r in range(args.repeats):
        for engine in ("moebench", "hf"):
            res = run_side(model, tok, prompts, engine, args)
            res["round"] = r + 1
            runs.append(res)
            print(
                f"round {r + 1} {engine:8s} {res['seconds']:7.2f} s  positions: prefill "
                f"{res['prefill']:6d}, decode {res['decode']:6d}, forward calls {res['calls']}"
            )
    best = {
        e: min((x for x in runs if x["engine"] == e), key=lambda x: x["seconds"])
        for e in ("moebench", "hf")
    }
    same = all(x["texts"] == runs[0]["texts"] for x in runs)
    ratio = best["hf"]["seconds"] / best["moebench"]["seconds"]
    work = (best["hf"]["prefill"] + best["hf"]["decode"]) / (
        best["moebench"]["prefill"] + best["moebench"]["decode"]
    )
    print(f"outputs identical across engines and rounds: {same}")
    print(f"speed-up (hf seconds / moebench seconds, best of {args.repeats}): {ratio:.2f}x")
    print(f"token positions hf / moebench: {work:.2f}x")
    if args.json_out:
        record = {
            "date": datetime.date.today().isoformat(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "prompt_tokens": lengths,
            "runs": [{k: v for k, v in x.items() if k != "texts"} for x in runs],
            "outputs_identical": same,
            "speedup": ratio,
            "texts": runs[0]["texts"],
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
