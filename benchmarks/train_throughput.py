"""LoRA training throughput: moebench's loop against peft + Hugging Face `Trainer`, one process.

Why it is built this way:

* One run of this script measures both sides, on the same machine state, so the ratio is not
  polluted by a different load, thermal state or library build between two separate runs.
* Same work on both sides: the same model (each side loads a fresh copy), the same tokenised
  examples (`moebench.data.tokenize_row`: identical `input_ids`, labels -100 on the prompt), LoRA
  r=16, alpha=32, dropout=0.05 on all seven linears, AdamW at 3e-4 with 2 linear warm-up steps,
  gradient clipping at 1.0, no weight decay, 16 rows per optimizer step as 4 micro-batches of 4,
  and the same number of optimizer steps. The HF side is what people run: `Trainer` defaults
  (random sampler, i.e. no length grouping; fused AdamW), a right-padding collator, and
  `train_sampling_strategy="group_by_length"` as an optional second HF row (transformers 5
  replaced `group_by_length=True` with that option).
* Same token definition: non-padding tokens (prompt + response) of the micro-batches actually
  run, i.e. `attention_mask.sum()`. moebench counts them itself (`StepLog.tokens`); the HF side
  counts them in a one-line `training_step` override. Padded positions are counted too, to show
  how much of each side's compute went to padding.
* Same clock: a timestamp at the end of every optimizer step (moebench `TrainHooks.on_step`, HF
  `TrainerCallback.on_step_end`). The timed window runs from the end of step 1 to the end of the
  last step, so the first step (allocator and kernel warm-up) is excluded on both sides, and so
  is everything after the last step (moebench's final checkpoint write, which it does even with
  `checkpoint_every=None`; HF's end-of-training bookkeeping). Each window holds the full cost of
  steps 2..N: batch building, forward, backward, clipping, optimizer, per-step logging.
* Neither side writes to the terminal inside the window: moebench's loop is I/O-free and HF's
  `PrinterCallback` (added when tqdm is disabled) is removed; logs still go to `log_history`.
* Noise: sides are interleaved (moebench, HF, HF grouped, then again) `--repeats` times and each
  side's best tokens/s is kept, so a transient slowdown hurts neither side systematically. Every
  run is also listed.

The ratio reported is best moebench tokens/s over best HF (random sampler) tokens/s; above 1.0
moebench trains faster on the same data.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from moebench.components import ALL_LINEARS
from moebench.data import IGNORE_INDEX, Example, load_training_rows, step_batches, tokenize_row
from moebench.inject import inject
from moebench.method import get_method
from moebench.models import load_model
from moebench.suites import mini_root
from moebench.train import StepLog, TrainConfig, TrainHooks, train

RANK, ALPHA, DROPOUT = 16, 32, 0.05
BATCH, MICRO = 16, 4
LR, WARMUP, MAX_GRAD_NORM = 3e-4, 2, 1.0
CUTOFF = 256


@dataclass
class Run:
    side: str
    repeat: int
    steps: int  # optimizer steps in the timed window (total steps - 1)
    tokens: int  # non-padding tokens processed in the window
    padded: int  # positions processed in the window, padding included
    seconds: float
    final_loss: float
    step_seconds: list[float]  # each timed step's duration, to see noise in the JSON

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded if self.padded else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _window(
    marks: Sequence[tuple[float, int, int]],
) -> tuple[int, int, int, float, list[float]]:
    """(steps, tokens, padded, seconds, per-step seconds) from the end of step 1 to the end of
    the last step."""
    (t1, tok1, pad1), (tn, tokn, padn) = marks[0], marks[-1]
    per_step = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    return len(marks) - 1, tokn - tok1, padn - pad1, tn - t1, per_step


# --- moebench ---------------------------------------------------------------------------------


def moebench_step_sizes(
    examples: Sequence[Example], steps: int, seed: int
) -> list[tuple[int, int]]:
    """(non-padding tokens, positions incl. padding) of each step, replaying moebench's order.

    `train` takes its steps from `step_batches` (group_by_length=True, the default); the same
    generator is replayed here rather than patched into the loop, so the timed code is untouched.
    The non-padding count from the replay is checked against the loop's own count.
    """
    lengths = [len(e.input_ids) for e in examples]
    plans = step_batches(lengths, MICRO, BATCH // MICRO, seed)
    out: list[tuple[int, int]] = []
    for _, plan in zip(range(steps), plans, strict=False):
        group = plan.micro_batches
        real = sum(lengths[i] for ids in group for i in ids)
        out.append((real, sum(len(ids) * max(lengths[i] for i in ids) for ids in group)))
    return out


def run_moebench(
    model_name: str,
    examples: Sequence[Example],
    steps: int,
    seed: int,
    device: torch.device,
    repeat: int,
) -> Run:
    model, _ = load_model(model_name)
    torch.manual_seed(seed)  # adapter init; data order comes from `seed` in `train`
    method = get_method("lora")
    adapted = inject(model, method, method.config_cls(rank=RANK, alpha=ALPHA, dropout=DROPOUT))
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    def on_step(s: StepLog) -> None:
        _sync(device)
        marks.append((time.perf_counter(), s.tokens))
        losses.append(s.loss)

    cfg = TrainConfig(
        max_steps=steps,
        batch_size=BATCH,
        micro_batch_size=MICRO,
        lr=LR,
        warmup_steps=WARMUP,
        lr_schedule="linear",
        max_grad_norm=MAX_GRAD_NORM,
        weight_decay=0.0,
        cutoff_len=CUTOFF,
        group_by_length=True,
        checkpoint_every=None,
        device=device.type,  # type: ignore[arg-type]
    )
    with tempfile.TemporaryDirectory() as tmp:
        train(
            adapted,
            examples,
            cfg,
            seed=seed,
            checkpoint_root=Path(tmp),
            hooks=TrainHooks(on_step=on_step),
        )
    sizes = moebench_step_sizes(examples, steps, seed)
    cum_real = list(itertools.accumulate(r for r, _ in sizes))
    cum_pad = list(itertools.accumulate(p for _, p in sizes))
    if cum_real != [t for _, t in marks]:
        raise RuntimeError("replayed moebench batch order disagrees with the loop's token count")
    window = _window([(t, tok, p) for (t, tok), p in zip(marks, cum_pad, strict=True)])
    return Run("moebench", repeat, *window[:4], losses[-1], window[4])


# --- peft + HF Trainer ------------------------------------------------------------------------


class PadCollator:
    """Right-pad input_ids (pad id), labels (-100) and build the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class CountingTrainer(Trainer):
    """`Trainer` that counts the tokens of every micro-batch it trains on (and nothing else)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.real_tokens = 0
        self.padded_tokens = 0

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        mask = inputs["attention_mask"]
        self.real_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()
        return super().training_step(model, inputs, num_items_in_batch)


class StepClock(TrainerCallback):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.trainer: CountingTrainer | None = None
        self.marks: list[tuple[float, int, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _sync(self.device)
        assert self.trainer is not None
        self.marks.append(
            (time.perf_counter(), self.trainer.real_tokens, self.trainer.padded_tokens)
        )


def run_hf(
    model_name: str,
    examples: Sequence[Example],
    steps: int,
    seed: int,
    device: torch.device,
    repeat: int,
    grouped: bool,
) -> Run:
    model, tok = load_model(model_name)
    torch.manual_seed(seed)
    peft_cfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=list(ALL_LINEARS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=BATCH // MICRO,
            max_steps=steps,
            learning_rate=LR,
            warmup_steps=WARMUP,
            lr_scheduler_type="linear",
            max_grad_norm=MAX_GRAD_NORM,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",  # moebench's precision="auto": bf16 autocast on GPU
            dataloader_num_workers=0,
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
            train_sampling_strategy="group_by_length" if grouped else "random",
        )
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        trainer = CountingTrainer(
            model=model,
            args=args,
            train_dataset=data,  # type: ignore[arg-type]
            data_collator=PadCollator(pad_id),
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        clock.trainer = trainer
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    window = _window(clock.marks)
    side = "hf-trainer grouped" if grouped else "hf-trainer"
    return Run(side, repeat, *window[:4], losses[-1] if losses else float("nan"), window[4])


# --- driver -----------------------------------------------------------------------------------


def best(runs: Sequence[Run], side: str) -> Run:
    return max((r for r in runs if r.side == side), key=lambda r: r.tokens_per_s)


def table(runs: Sequence[Run]) -> str:
    head = f"{'side':<20} {'run':>3} {'steps':>5} {'tokens':>7} {'pad %':>6} {'seconds':>8} "
    head += f"{'tokens/s':>9} {'last loss':>9}"
    lines = [head, "-" * len(head)]
    for r in runs:
        lines.append(
            f"{r.side:<20} {r.repeat:>3} {r.steps:>5} {r.tokens:>7} {100 * r.pad_fraction:>6.1f} "
            f"{r.seconds:>8.2f} {r.tokens_per_s:>9.1f} {r.final_loss:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="moebench model alias or path")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (first untimed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; best kept")
    p.add_argument(
        "--hf-grouped",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run HF with train_sampling_strategy=group_by_length",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2: the first step is excluded from the timing")

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )

    _, tok = load_model(a.model)
    rows = load_training_rows(mini_root() / "train.json")
    examples = [
        tokenize_row(
            r, tok, template="alpaca", cutoff_len=CUTOFF, train_on_prompt=False, task_label=-1
        )
        for r in rows
    ]
    print(
        f"model {a.model}, {len(examples)} rows, {a.steps} steps x {BATCH} rows "
        f"({BATCH // MICRO} x {MICRO}), device {device}, torch threads {torch.get_num_threads()}"
    )

    runs: list[Run] = []
    for rep in range(1, a.repeats + 1):
        jobs = [("moebench", False), ("hf", False)] + ([("hf", True)] if a.hf_grouped else [])
        for side, grouped in jobs:
            if side == "moebench":
                r = run_moebench(a.model, examples, a.steps, a.seed, device, rep)
            else:
                r = run_hf(a.model, examples, a.steps, a.seed, device, rep, grouped)
            runs.append(r)
            print(f"  {r.side} run {rep}: {r.tokens_per_s:.1f} tokens/s", flush=True)
            gc.collect()

    print()
    print(table(runs))
    ours, hf = best(runs, "moebench"), best(runs, "hf-trainer")
    print(
        f"\nratio moebench / hf-trainer (best of {a.repeats}): "
        f"{ours.tokens_per_s / hf.tokens_per_s:.2f}"
    )
    summary: dict[str, Any] = {
        "model": a.model,
        "steps": a.steps,
        "seed": a.seed,
        "repeats": a.repeats,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "ratio": ours.tokens_per_s / hf.tokens_per_s,
        "best_tokens_per_s": {
            side: best(runs, side).tokens_per_s for side in dict.fromkeys(r.side for r in runs)
        },
    }
    if a.hf_grouped:
        hg = best(runs, "hf-trainer grouped")
        summary["ratio_vs_grouped"] = ours.tokens_per_s / hg.tokens_per_s
        print(f"ratio moebench / hf-trainer grouped: {summary['ratio_vs_grouped']:.2f}")
    summary["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "moebench": importlib.metadata.version("moebench"),
    }
    summary["runs"] = [
        asdict(r) | {"tokens_per_s": r.tokens_per_s, "pad_fraction": r.pad_fraction} for r in runs
    ]
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
