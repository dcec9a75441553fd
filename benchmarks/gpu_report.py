"""The Markdown view of a `gpu_suite.py` result: one section per part, each stamped with the
command, device, versions and date it was measured with, the tables in BENCHMARKS.md's layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MIB = 2**20


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _met(row: dict[str, Any]) -> str:
    return {None: "-", True: "met", False: "**missed**"}[row.get("met")]


def _goal(row: dict[str, Any]) -> str:
    parts = [f"time <= {row['goal_time']}"] if row.get("goal_time") else []
    parts += [f"mem <= {row['goal_mem']}"] if row.get("goal_mem") else []
    return "; ".join(parts + ([row["reference"]] if row.get("reference") else [])) or "-"


def methods_table(figures: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | config | trainable params | step ms (median) | paired time ratio "
        "| FLOP ratio | peak MiB | mem ratio (+weights) | goal | met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in figures:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['config']} | failed: {r['error']} |" + " |" * 7)
            continue
        lines.append(
            f"| {r['method']} | {r['config']} | {r['trainable']:,} | {r['step_ms']:.1f} "
            f"| {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | {r['peak_bytes'] / MIB:.0f} "
            f"| {r['mem_ratio']:.3f} | {_goal(r)} | {_met(r)} |"
        )
    return lines


def mfu_table(figures: list[dict[str, Any]]) -> list[str]:
    f = figures[0]
    mfu = "-" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"
    return [
        "| step GFLOPs (counted) | step ms (median) | achieved TFLOP/s | bf16 peak TFLOP/s | MFU |",
        "|--:|--:|--:|--:|--:|",
        f"| {f['step_flops'] / 1e9:.1f} | {1000 * f['step_s']:.1f} | {f['achieved_tflops']:.2f} "
        f"| {_num(f['peak_tflops'], '.1f')} | {mfu} |",
        *([f"\n{f['note']}"] if f.get("note") else []),
    ]


def train_table(figures: list[dict[str, Any]]) -> list[str]:
    f = figures[0]
    lines = ["| side | steps timed | tokens | seconds | tokens/s |", "|---|--:|--:|--:|--:|"]
    for side, s in f["sides"].items():
        lines.append(
            f"| {side} | {s['steps']} | {s['tokens']} | {s['seconds']:.2f} "
            f"| {s['tokens_per_s']:.1f} |"
        )
    return [*lines, "", f"Ratio moebench / peft + HF Trainer: **{f['ratio']:.2f}x**."]


def eval_table(figures: list[dict[str, Any]]) -> list[str]:
    f = figures[0]
    decoding = "greedy" if f["beams"] == 1 else f"{f['beams']} beams"
    return [
        "| decoding | prompts | batch | new tokens | moebench s | lm-eval HFLM s "
        "| speed-up (HFLM s / moebench s) | identical outputs |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        f"| {decoding} | {f['prompts']} "
        f"| {f['batch']} | {f['max_new_tokens']} | {f['moebench_s']:.2f} | {f['lm_eval_s']:.2f} "
        f"| {f['speedup']:.2f}x | {100 * f['identical_outputs']:.0f}% |",
        "",
        f"Prompts: {f['prompt_source']}.",
    ]


def run_table(figures: list[dict[str, Any]]) -> list[str]:
    f = figures[0]
    peak = f["peak_memory_bytes"]
    scores = ", ".join(
        f"{m['task']} {m['metric']} {m['value']:.3f} (n={m['n']})" for m in f["metrics"]
    )
    return [
        "| status | steps | tokens/s | wall s | peak MiB | GPU |",
        "|---|--:|--:|--:|--:|---|",
        f"| {f['status']} | {f['steps']} | {_num(f['tokens_per_s'], '.1f')} "
        f"| {_num(f['wall_time_s'], '.1f')} | {'-' if peak is None else f'{peak / MIB:.0f}'} "
        f"| {f['gpu'] or '-'} |",
        "",
        f"Stored metrics: {scores or 'none'}.",
    ]


def model_table(figures: list[dict[str, Any]]) -> list[str]:
    f = figures[0]
    return [
        "| shape | parameters | dtype | layers | vocabulary |",
        "|---|--:|---|--:|--:|",
        f"| {f['shape']} | {f['parameters']:,} | {f['dtype']} | {f['layers']} | {f['vocab']:,} |",
    ]


TABLES: dict[str, Callable[[list[dict[str, Any]]], list[str]]] = {
    "model": model_table,
    "methods": methods_table,
    "mfu": mfu_table,
    "train": train_table,
    "eval-greedy": eval_table,
    "eval-beam": eval_table,
    "run": run_table,
}


def markdown(suite: dict[str, Any]) -> str:
    lines = [
        f"# moebench GPU suite ({suite['mode']})",
        "",
        f"Command: `{suite['command']}`; device: {suite['device']}; torch {suite['torch']}, "
        f"CUDA {suite['cuda'] or '-'}, transformers {suite['transformers']}, Python "
        f"{suite['python']}; started {suite['started']}"
        + (f", {suite['wall_s']:.0f} s in all." if "wall_s" in suite else " (unfinished)."),
    ]
    for name, part in suite["parts"].items():
        budget = f" of its {part['budget_s']} s budget" if part["budget_s"] else ""
        lines += ["", f"## {name}: {part['status']} ({part['wall_s']:.1f} s{budget})", ""]
        lines.append(
            f"Device {part['device']}; torch {part['torch']}, CUDA {part['cuda'] or '-'}; "
            f"{part['date']}; command `{part['command']}`."
        )
        lines.append("")
        if part["status"] != "ok":
            lines.append(f"**Failed**: {part['reason']}")
            continue
        lines += TABLES[name](part["figures"])
    return "\n".join(lines) + "\n"
