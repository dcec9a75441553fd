"""Log-likelihood scoring cost: each item's context prefilled once against one forward per label.

Why it is built this way:

* Same requests on both sides, built as `moebench.evaluate` builds them in log-likelihood mode:
  context = the alpaca prompt of an LLM-Adapters test row + `LOGLIK_PREFIX`, continuation =
  " " + label for each label the item offers (`Task.candidate_labels`). Both sides call
  `moebench.generation.continuation_logprobs` with the same batch size; only `shared_prefix`
  differs (True: each distinct context prefilled once, its labels scored on copies of its cached
  keys and values; False: one full forward of context + label per request, the reference).
* Agreement: the largest score difference and whether every item picks the same label are
  reported; the speed-up only counts if the picks are equal.
* Work, not only time. A forward pre-hook counts the token positions each side feeds the model
  (padding included, as it is computed); that count does not depend on a busy machine.
* Noise: one untimed warm-up per side, then the sides interleaved for `--repeats` rounds, each
  side's best round kept. `--threads 1` (the default) is steadier on a shared machine.
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

from moebench.generation import continuation_logprobs
from moebench.models import load_model
from moebench.prompts import build_prompt
from moebench.task import LOGLIK_PREFIX, get_task

DATA = Path(os.environ.get("MOEBENCH_DATA", "/work/shared/data")) / "llm-adapters"
SIDES = {"shared prefix": True, "full forward": False}


def build_requests(task_name: str, n: int) -> tuple[list[tuple[str, str]], list[tuple[str, ...]]]:
    """(requests in item order, each item's labels), as evaluate_task builds them."""
    task = get_task(task_name)
    items = task.load_items(task.test_file(DATA), limit=n)
    labels = [task.candidate_labels(it) for it in items]
    requests = [
        (build_prompt("alpaca", it.instruction, it.input) + LOGLIK_PREFIX, " " + lab)
        for it, ls in zip(items, labels, strict=True)
        for lab in ls
    ]
    return requests, labels


def run_side(model, tok, requests, shared: bool, batch_size: int) -> dict[str, Any]:
    counts = {"positions": 0, "calls": 0}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        counts["positions"] += kwargs["input_ids"].numel()
        counts["calls"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        start = time.perf_counter()
        scores = continuation_logprobs(
            model, tok, requests, batch_size=batch_size, shared_prefix=shared
        )
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return {"shared_prefix": shared, "seconds": seconds, "scores": scores, **counts}


def picks(scores: list[float], labels: list[tuple[str, ...]]) -> list[str]:
    out, k = [], 0
    for ls in labels:
        own = scores[k : k + len(ls)]
        k += len(ls)
        out.append(ls[own.index(max(own))])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc_challenge", help="registered commonsense task")
    p.add_argument("--n", type=int, default=64, help="items")
    p.add_argument("--batch-size", type=int, default=16, help="EvalConfig's default")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    requests, labels = build_requests(args.task, args.n)
    model, tok = load_model(args.model)
    model.eval()
    lengths = [len(ids) for ids in tok([c for c, _ in requests])["input_ids"]]
    print(
        f"{args.model}, {args.task} x{len(labels)} items, {len(requests)} requests (context "
        f"tokens {min(lengths)}-{max(lengths)}, mean {sum(lengths) / len(lengths):.0f}), batch "
        f"{args.batch_size}, threads {args.threads}"
    )
    for shared in SIDES.values():  # untimed warm-up: allocator, kernels, lazy imports
        run_side(model, tok, requests[:8], shared, args.batch_size)

    runs = []
    for r in range(args.repeats):
        for name, shared in SIDES.items():
            res = run_side(model, tok, requests, shared, args.batch_size)
            res["round"] = r + 1
            runs.append(res)
            print(
                f"round {r + 1} {name:13s} {res['seconds']:7.2f} s  token positions "
                f"{res['positions']:7d}, forward calls {res['calls']}"
            )
    best = {s: min((x for x in runs if x["shared_prefix"] is s), key=lambda x: x["seconds"])
            for s in (True, False)}  # fmt: skip
    diff = max(abs(a - b) for a, b in zip(best[True]["scores"], best[False]["scores"], strict=True))
    same = picks(best[True]["scores"], labels) == picks(best[False]["scores"], labels)
    ratio = best[False]["seconds"] / best[True]["seconds"]
    work = best[False]["positions"] / best[True]["positions"]
    print(f"max |score difference|: {diff:.2e}; every item picks the same label: {same}")
    print(f"speed-up (full-forward seconds / shared-prefix seconds, best of {args.repeats}): "
          f"{ratio:.2f}x; token positions full / shared: {work:.2f}x")  # fmt: skip
    if args.json_out:
        record = {
            "date": datetime.date.today().isoformat(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "context_tokens": lengths,
            "runs": [{k: v for k, v in x.items() if k != "scores"} for x in runs],
            "max_abs_score_difference": diff,
            "same_picks": same,
            "speedup": ratio,
            "positions_ratio": work,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
