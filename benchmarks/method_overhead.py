"""Training-step cost of each LoRA-MoE method against LoRA of the same rank and targets.

Why it is built this way:

* One invocation measures every method, so the ratios are not polluted by a different load,
  thermal state or library build between runs. Each measurement runs in a fresh subprocess (a
  clean allocator, a fresh peak-memory counter, no state left by the previous method), and the
  methods are interleaved: round 1 runs them in order, round 2 in reverse, and so on, so a slow
  drift of the machine hits every method alike. A method's step time is the median of all its
  timed steps over all rounds; every round is listed too.
* The step is the loop's own (`moebench.train.train`), called piece by piece so that only the
  step is timed: the method's last phase made trainable with `set_phase_trainable` (LoRACoE:
  its joint phase, gates on), the `BatchContext` filled as the loop fills it (mask, task labels,
  phase, `record_stats=False`), forward through `token_loss_sum` plus
  `adapted.collect_aux_losses()`, backward, `clip_grad_norm_` at 1.0, the loop's AdamW
  (`build_optimizer`), `zero_grad(set_to_none=True)`, and the host reads of the loss and the
  norm that the loop makes. Adapters are fp32; on CUDA the frozen base is bf16 and the step runs
  under bf16 autocast, as the runner does (`precision="auto"`). Data handling (collation, the
  copy to the device) is left out: it is the same for every method. The batch is one
  micro-batch of random token ids, labels = inputs (every position counts), no padding, task
  labels alternating 1/0 so LoRAMoE's balancing loss is computed as on a typed mixture.
* Same adapter work as LoRA: rank 16, alpha 32 and all seven linears wherever a method has
  targets, dropout 0 everywhere (so LoRACoE takes its fused path: one matmul of x with
  [A; W_route]). LoRAMoE at its defaults (N=6, r=4, FFN only) is reported but is not a
  same-targets comparison. LoRA-SMoE runs its preparation stage (sensitivity pass and
  allocation) on synthetic two-task examples, cached for the invocation, outside the timing.
* Peak memory. CUDA: `torch.cuda.max_memory_allocated` over all steps of the first timing run
  (counter reset just before step 1, so AdamW's lazily allocated state is included). CPU: a
  separate run per method (3 steps) with glibc's mmap threshold fixed at 64 KiB
  (`MALLOC_MMAP_THRESHOLD_`), so freed tensors go back to the OS and RSS follows live memory;
  the kernel's RSS high-water mark is reset (`/proc/self/clear_refs`) just before step 1 and
  read after the last. Timing runs keep the default allocator, since a fixed mmap threshold adds
  page faults to every step. Two ratios are reported. "Added" is the peak minus the memory held
  before injection (base model, batch, any preparation stage): adapters, gradients, AdamW state
  and activations, the strictest view of a method's extra memory. "+weights" adds the frozen
  model's bytes back, which is what an accelerator's peak holds and what the papers report; the
  memory goals are checked on it. (An absolute RSS would also count a few hundred MiB of
  libraries, so on CPU the ratio is built from the growth.)
* The FLOP ratio: one more step per run, after the measurements, under
  `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention, forward and backward; the
  CPU attention kernel, which torch has no formula for, is counted by `ATTENTION_FLOPS`). It is
  the arithmetic a method adds to LoRA's step. It is not a floor on the time ratio: the loss
  over the vocabulary, norms and the optimizer take time the counter does not see, and dilute
  it. For LoRACoE the router's E r extra columns are a fixed cost against each linear's width,
  so they weigh more on narrow models than on the 4096-wide ones the paper measured.
* `--paired`: a shared machine drifts by several percent between subprocesses minutes apart,
  as much as the effects being measured. With `--paired` each method is also timed against
  LoRA in one process (two models side by side, steps alternating A B B A; `--steps` even), and
  the ratio is the method's total time over LoRA's: within each A B B A block a drift linear
  in time lands on both sides alike. The time goal is judged on this ratio when it is measured;
  the per-process rounds still give the absolute step times and the memory.
* Noise: a busy CPU makes step times swing by several times; `--threads 1` is far steadier on a
  shared machine, at the cost of ratios for a single-threaded run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from moebench.data import IGNORE_INDEX, Example, collate
from moebench.inject import Adapted, inject
from moebench.method import ModelShapes, PrepareContext, get_method
from moebench.models import KNOWN_CONFIGS, model_config
from moebench.train import (
    TrainConfig,
    autocast_dtype,
    build_optimizer,
    set_phase_trainable,
    token_loss_sum,
)

MODEL_SEED, ADAPTER_SEED = 1234, 0
MEMORY_STEPS = 3  # step 1 allocates AdamW's state; later steps hold it alongside activations
CHILD_MARK = "METHOD_OVERHEAD_RESULT "
MIB = 2**20
SAME = dict(rank=16, alpha=32.0, dropout=0.0)


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    config: dict[str, Any]
    summary: str  # the config in words, for the table
    goal_time: float | None = None
    goal_mem: float | None = None
    reference: str = ""  # the or the paper's number, printed beside the goal


VARIANTS = [
    Variant("lora", "lora", SAME, "r=16, 7 linears (baseline)"),
    Variant(
        "loracoe",
        "loracoe",
        {**SAME, "num_experts": 2, "fused": True},
        "r=16, E=2, fused, joint phase",
        1.05,
        1.05,
        "paper (fused): 1.048x time, 1.035x mem",
    ),
    Variant(
        "loracoe-unfused",
        "loracoe",
        {**SAME, "num_experts": 2, "fused": False},
        "r=16, E=2, fused=false, joint phase",
        reference="paper (unfused): 3.1x time",
    ),
    Variant(
        "loramoe-partition",
        "loramoe-partition",
        {**SAME, "num_experts": 4},
        "r=16 split into N=4, 7 linears",
        1.10,
    ),
    Variant(
        "mixlora",
        "mixlora",
        {**SAME, "num_experts": 8, "top_k": 2},
        "r=16, E=8, k=2; attn LoRA + FFN experts",
        1.6,
    ),
    Variant(
        "loramoe",
        "loramoe",
        {"dropout": 0.0},
        "defaults: N=6, r=4, FFN only (not same targets)",
    ),
    Variant("lora-smoe", "lora-smoe", SAME, "r=16, p=0.6, 2 synthetic tasks"),
]
BY_LABEL = {v.label: v for v in VARIANTS}


# --- child: one method in its own process -----------------------------------------------------


def model_shape(shape: str, seq: int) -> PretrainedConfig:
    if shape == "cpu":  # a Llama whose linears dominate: decoder 12.6 M, embeddings 8.4 M
        return LlamaConfig(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
            max_position_embeddings=max(2048, seq),
            tie_word_embeddings=False,
            pad_token_id=0,
        )
    if shape == "cpu-qwen2-width":  # Qwen2-0.5B's layers (GQA 14/2, d_ff 4864), 4 of them
        widths = {k: v for k, v in KNOWN_CONFIGS["qwen2-0.5b"].items() if k not in ("arch", "tie")}
        return Qwen2Config(
            **{**widths, "num_hidden_layers": 4, "vocab_size": 8192},
            max_position_embeddings=max(2048, seq),
            tie_word_embeddings=True,
            pad_token_id=0,
        )
    return model_config(shape)


def synthetic(vocab: int, rows: int, length: int, seed: int) -> list[Example]:
    """Random token rows, labels = inputs, task labels alternating 1 (knowledge) and 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g).tolist()
    return [Example(tuple(r), tuple(r), 1 - i % 2) for i, r in enumerate(ids)]


def current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    return _proc_status_kib("VmRSS") * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def adapt(
    model: torch.nn.Module, variant: Variant, device: torch.device, amp: Any, job: dict[str, Any]
) -> tuple[Adapted, str, int]:
    """Prepare (LoRA-SMoE's sensitivity pass) and inject; (adapted, note, memory before inject)."""
    method = get_method(variant.method)
    config = method.config_cls(**variant.config)
    ctx = PrepareContext(
        model=model,
        examples=synthetic(model.config.vocab_size, 8, 10, seed=1),
        tasks=["boolq", "gsm8k"] * 4,
        model_name=f"method-overhead-{job['shape']}",
        seed=0,
        cache_dir=Path(job["cache_dir"]),
        device=device,
        autocast=amp,
    )
    prepared = method.prepare(config, ctx)
    note = ""
    if "allocation" in prepared.artifacts:
        n = list(prepared.artifacts["allocation"]["modules"].values())
        note = (
            f"{sum(n)} experts on {sum(k > 0 for k in n)}/{len(n)} linears "
            f"(n=1: {n.count(1)}, n>=2: {sum(k >= 2 for k in n)})"
        )
    before = current_memory(device)
    torch.manual_seed(ADAPTER_SEED)
    adapted = inject(model, method, prepared.config)
    return adapted, note, before


def train_step(
    adapted: Adapted,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    amp: torch.dtype | None,
    n_tokens: int,
) -> float:
    """One optimizer step of `moebench.train.train` with one micro-batch (accumulation 1)."""
    device = batch["input_ids"].device
    adapted.context.attention_mask = batch["attention_mask"]
    adapted.context.task_labels = batch["task_labels"]
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        ce_sum = token_loss_sum(adapted, batch)
        aux = adapted.collect_aux_losses()
    loss = ce_sum / n_tokens + sum(aux.values(), 0.0)
    loss.backward()
    ce = float(ce_sum.detach()) / n_tokens
    if not all(math.isfinite(v) for v in [ce, *(float(v.detach()) for v in aux.values())]):
        raise RuntimeError(f"non-finite loss {ce}")
    norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
    if not math.isfinite(norm):
        raise RuntimeError(f"non-finite gradient norm {norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ce


@dataclass
class Trainee:
    """One adapted model, ready to step as the loop steps it."""

    adapted: Adapted
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    phase: str
    note: str
    before: int  # memory held before injection
    weight_bytes: int

    def step(self, batch: dict[str, torch.Tensor], amp: torch.dtype | None, n: int) -> float:
        return train_step(self.adapted, batch, self.optimizer, self.trainable, amp, n)


def trainee(
    job: dict[str, Any], label: str, cfg: PretrainedConfig, device: torch.device, amp: Any
) -> Trainee:
    torch.manual_seed(MODEL_SEED)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=amp or torch.float32)
    model.config.use_cache = False
    tensors = [*model.parameters(), *model.buffers()]  # parameters(): tied weights once
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    adapted, note, before = adapt(model, BY_LABEL[label], device, amp, job)
    model.to(device)
    for _, p in adapted.adapter_parameters():
        p.data = p.data.float()  # as train(): adapters and their optimizer state stay fp32
    model.train()
    phase = adapted.method.phases(adapted.config)[-1]
    trainable = set_phase_trainable(adapted, phase)
    optimizer = build_optimizer(adapted, TrainConfig())
    adapted.context.phase = phase.name
    adapted.context.record_stats = False
    return Trainee(adapted, optimizer, trainable, phase.name, note, before, weight_bytes)


def child_batch(
    job: dict[str, Any], cfg: PretrainedConfig, device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    examples = synthetic(cfg.vocab_size, job["batch"], job["seq"], seed=0)
    batch = {k: v.to(device) for k, v in collate(examples, 0).items()}
    return batch, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def elapsed(t0: float, device: torch.device) -> float:
    """Seconds since `t0`, once the device has finished the work queued since."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _attention_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    """QK^T and PV at full length (as torch's own SDPA formulas count), over the query heads;
    the shapes come in as [batch, heads, seq, head_dim], keys possibly with fewer (GQA) heads."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[-2] * d + 2 * b * h * s_q * key[-2] * value[-1]


def _attention_backward_flops(
    grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any
) -> int:
    return 2 * _attention_flops(query, key, value)  # dQ, dK, dV and dP: twice the forward


# torch's FlopCounterMode has formulas for the CUDA attention kernels but not for the CPU one,
# which it would count as 0 FLOPs.
_aten = torch.ops.aten
ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    amp = autocast_dtype(TrainConfig(device=job["device"]), device)
    cfg = model_shape(job["shape"], job["seq"])
    batch, n_tokens = child_batch(job, cfg, device)
    if job["kind"] == "paired":
        return run_paired(job, cfg, device, amp, batch, n_tokens)
    t = trainee(job, job["label"], cfg, device, amp)
    adapted = t.adapted
    closed_form = adapted.method.trainable_parameters(adapted.config, ModelShapes.from_config(cfg))

    reset_peak(device)
    times, losses = [], []
    for _ in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        losses.append(t.step(batch, amp, n_tokens))
        times.append(elapsed(t0, device))
    peak = peak_memory(device)
    # one more step, after the timed ones: counting is slow
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as flops:
        t.step(batch, amp, n_tokens)
    return {
        "label": job["label"],
        "repeat": job["repeat"],
        "kind": job["kind"],
        "step_s": times[job["warmup"] :],
        "peak_bytes": peak,
        "added_bytes": peak - t.before,
        "weight_bytes": t.weight_bytes,
        "trainable": sum(p.numel() for p in t.trainable),
        "step_flops": flops.get_total_flops(),
        "closed_form": closed_form,
        "phase": t.phase,
        "note": t.note,
        "last_loss": losses[-1],
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }


def run_paired(
    job: dict[str, Any],
    cfg: PretrainedConfig,
    device: torch.device,
    amp: Any,
    batch: dict[str, torch.Tensor],
    n_tokens: int,
) -> dict[str, Any]:
    """LoRA and the method in one process, stepped alternately in A B B A order, so that a
    machine's drift (other tenants, clocks) lands on both sides of every pair alike."""
    pair = [trainee(job, "lora", cfg, device, amp), trainee(job, job["label"], cfg, device, amp)]
    for _ in range(job["warmup"]):
        for t in pair:
            t.step(batch, amp, n_tokens)
    times: list[list[float]] = [[], []]
    for i in range(job["steps"]):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            pair[side].step(batch, amp, n_tokens)
            times[side].append(elapsed(t0, device))
    return {"label": job["label"], "kind": "paired", "lora_s": times[0], "method_s": times[1]}


# --- parent: interleave the children, then report -----------------------------------------------


@dataclass
class Result:
    variant: Variant
    runs: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    paired: dict[str, Any] | None = None  # --paired: steps alternated with LoRA's in one process
    error: str | None = None

    @property
    def paired_ratios(self) -> list[float]:
        """Per A B B A block, this method's two steps over LoRA's two: within a block, a drift
        that is linear in time lands on both sides alike."""
        p = self.paired or {}
        lora, method = p.get("lora_s", []), p.get("method_s", [])
        return [
            (method[i] + method[i + 1]) / (lora[i] + lora[i + 1])
            for i in range(0, len(lora) - 1, 2)
        ]

    @property
    def paired_ratio(self) -> float | None:
        """All of this method's paired steps over all of LoRA's."""
        p = self.paired or {}
        return sum(p["method_s"]) / sum(p["lora_s"]) if p.get("lora_s") else None

    @property
    def step_ms(self) -> float:
        return 1000 * statistics.median(t for r in self.runs for t in r["step_s"])


def spawn(job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + (" + uncommitted changes" if git("status", "--porcelain") else "")


def goal_text(v: Variant) -> str:
    parts = [f"time <= {v.goal_time}"] if v.goal_time else []
    parts += [f"mem <= {v.goal_mem}"] if v.goal_mem else []
    return "; ".join(parts + ([v.reference] if v.reference else [])) or "-"


def met(v: Variant, time_ratio: float, mem_ratio: float) -> str:
    checks = [time_ratio <= v.goal_time] if v.goal_time else []
    checks += [mem_ratio <= v.goal_mem] if v.goal_mem else []
    return ("yes" if all(checks) else "**no**") if checks else "-"


def with_weights(memory: dict[str, Any]) -> int:
    """Training memory including the frozen model: what an accelerator's peak holds."""
    return memory["added_bytes"] + memory["weight_bytes"]


def table(results: list[Result]) -> str:
    base = results[0].memory
    assert base is not None
    lines = [
        "| method | config | trainable params | step ms (median) | time ratio | paired ratio "
        "| FLOP ratio | peak MiB | added MiB | mem ratio (added) | mem ratio (+weights) | goal "
        "| met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in results:
        v, mem = r.variant, r.memory
        if r.error is not None or mem is None or not r.runs:
            lines.append(f"| {v.label} | {v.summary} | failed: {r.error} |" + " |" * 10)
            continue
        t = r.step_ms / results[0].step_ms
        paired = r.paired_ratio
        f = r.runs[0]["step_flops"] / results[0].runs[0]["step_flops"]
        added = mem["added_bytes"] / base["added_bytes"]
        m = with_weights(mem) / with_weights(base)
        config = v.summary + (f"; {r.runs[0]['note']}" if r.runs[0]["note"] else "")
        lines.append(
            f"| {v.label} | {config} | {r.runs[0]['trainable']:,} | {r.step_ms:.1f} | {t:.3f} "
            f"| {'-' if paired is None else f'{paired:.3f}'} "
            f"| {f:.3f} | {mem['peak_bytes'] / MIB:.0f} | {mem['added_bytes'] / MIB:.0f} "
            f"| {added:.3f} | {m:.3f} | {goal_text(v)} "
            f"| {met(v, t if paired is None else paired, m)} |"
        )
    return "\n".join(lines)


def paired_table(results: list[Result]) -> str:
    lines = [
        "| method | steps per side | ratio of totals | A B B A blocks | block median | min | max |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        blocks = sorted(r.paired_ratios)
        if not blocks or r.paired is None:
            continue
        lines.append(
            f"| {r.variant.label} | {len(r.paired['lora_s'])} | {r.paired_ratio:.3f} "
            f"| {len(blocks)} | {statistics.median(blocks):.3f} | {blocks[0]:.3f} "
            f"| {blocks[-1]:.3f} |"
        )
    return "\n".join(lines)


def runs_table(results: list[Result]) -> str:
    lines = ["| method | round | median step ms | min | max |", "|---|--:|--:|--:|--:|"]
    for r in results:
        for run in r.runs:
            ms = [1000 * t for t in run["step_s"]]
            lines.append(
                f"| {r.variant.label} | {run['repeat']} | {statistics.median(ms):.1f} "
                f"| {min(ms):.1f} | {max(ms):.1f} |"
            )
    return "\n".join(lines)


def measure(labels: list[str], a: argparse.Namespace, job: dict[str, Any]) -> list[Result]:
    """Timing rounds (alternating order), then, on CPU, one memory run per method."""
    results = {m: Result(BY_LABEL[m]) for m in labels}
    env = dict(os.environ)
    for rep in range(1, a.repeats + 1):
        for m in labels if rep % 2 else labels[::-1]:
            if results[m].error:
                continue
            out = spawn(job | {"label": m, "repeat": rep, "kind": "time"}, env)
            if "error" in out:
                results[m].error = out["error"]
                print(f"  {m} round {rep}: FAILED {out['error']}", flush=True)
                continue
            results[m].runs.append(out)
            print(f"  {m} round {rep}: {1000 * statistics.median(out['step_s']):.1f} ms/step")
    for r in results.values():
        if r.error or job["device"] == "cuda":  # CUDA: the timing runs' allocator peak
            r.memory = r.runs[0] if r.runs else None
            continue
        mem_job = job | {"label": r.variant.label, "repeat": 0, "kind": "memory"}
        mem_job |= {"steps": MEMORY_STEPS, "warmup": 0}
        out = spawn(mem_job, env | {"MALLOC_MMAP_THRESHOLD_": "65536"})
        r.error, r.memory = out.get("error"), None if "error" in out else out
        if r.memory:
            print(f"  {r.variant.label} memory: +{r.memory['added_bytes'] / MIB:.0f} MiB")
    for r in list(results.values())[1:] if a.paired else []:
        if r.error:
            continue
        out = spawn(job | {"label": r.variant.label, "repeat": 0, "kind": "paired"}, env)
        if "error" in out:
            print(f"  {r.variant.label} paired: FAILED {out['error']}", flush=True)
            continue
        r.paired = out
        print(f"  {r.variant.label} paired with lora: x{r.paired_ratio:.3f}", flush=True)
    return list(results.values())


def report(results: list[Result], a: argparse.Namespace, job: dict[str, Any], command: str) -> str:
    first = next((r.runs[0] for r in results if r.runs), {})
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {first.get('threads')}"
    machine += f", GPU {first['gpu']}" if first.get("gpu") else ""
    cuda = job["device"] == "cuda"
    peak = "torch.cuda.max_memory_allocated" if cuda else "RSS high-water mark (3-step runs)"
    lines = [
        f"Command: `{command}`",
        f"Date: {datetime.date.today()}; machine: {machine}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"moebench at {git_revision()}.",
        f"Model: {job['shape']} (random init, {'bf16 base, bf16 autocast' if cuda else 'fp32'}), "
        f"batch {job['batch']} x {job['seq']} tokens as one micro-batch; {a.warmup} warm-up + "
        f"{a.steps} timed steps per run, {a.repeats} interleaved rounds.",
        f"Time ratio: median step time / LoRA's. Paired ratio (--paired): the method's total "
        "time over LoRA's, both models in one process, steps in A B B A order; the time goal "
        "is judged on it when measured. FLOP ratio: the step's matmul and attention FLOPs "
        "(forward and backward, `torch.utils.flop_counter`) / LoRA's, the arithmetic the "
        "method adds; the rest of a step (loss, norms, optimizer) dilutes it in time. "
        f"Peak: {peak}. Added: peak minus memory before "
        "injection. Mem ratio (added): added / LoRA's; (+weights): (added + frozen model "
        "bytes) / LoRA's, the quantity a GPU's peak holds; memory goals use it.",
    ]
    for r in results:
        run = r.runs[0] if r.runs else None
        if run and run["trainable"] != run["closed_form"]:
            lines.append(
                f"WARNING {r.variant.label}: {run['trainable']:,} trainable parameters, its "
                f"closed form says {run['closed_form']:,}."
            )
    out = [*lines, "", table(results), "", "Every run:", "", runs_table(results)]
    if any(r.paired for r in results):
        out += ["", "Paired with LoRA (one process, A B B A steps):", "", paired_table(results)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the methods")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--shape",
        default=None,
        help="'cpu' (Llama: hidden 512, 4 layers, vocab 8192), 'cpu-qwen2-width' (Qwen2-0.5B's "
        "layer shapes, 4 layers, vocab 8192) or a model alias such as qwen2-0.5b (random "
        "init); default: qwen2-0.5b on cuda, cpu otherwise",
    )
    p.add_argument("--batch", type=int, default=None, help="rows (default: 16 cuda, 4 cpu)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--methods",
        default=",".join(BY_LABEL),
        help=f"comma-separated, from: {', '.join(BY_LABEL)} (lora, the baseline, always runs)",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="also time each method against LoRA in one process, steps alternating A B B A "
        "(steadier on a shared machine; the time goal is judged on it)",
    )
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(CHILD_MARK + json.dumps(run_child(json.loads(a.child))), flush=True)
        return

    labels = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in BY_LABEL]
    if unknown:
        p.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(BY_LABEL)}")
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if a.paired and a.steps % 2:
        p.error(f"--paired runs A B B A blocks, so --steps must be even, not {a.steps}")
    labels = ["lora", *[m for m in dict.fromkeys(labels) if m != "lora"]]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    job: dict[str, Any] = {
        "device": device,
        "shape": a.shape or ("qwen2-0.5b" if device == "cuda" else "cpu"),
        "batch": a.batch or (16 if device == "cuda" else 4),
        "seq": a.seq,
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": a.threads,
    }
    command = shlex.join(["python", "benchmarks/method_overhead.py", *(argv or sys.argv[1:])])
    print(f"{command}\n{job}", flush=True)
    with tempfile.TemporaryDirectory() as cache:  # LoRA-SMoE's sensitivities, once per invocation
        results = measure(labels, a, job | {"cache_dir": cache})
    if results[0].error or results[0].memory is None:
        sys.exit(f"the LoRA baseline failed ({results[0].error}); no ratios to report")
    print("\n" + report(results, a, job, command))
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "command": command,
            "job": job,
            "torch": torch.__version__,
            "date": str(datetime.date.today()),
            "results": {
                r.variant.label: {
                    "runs": r.runs,
                    "memory": r.memory,
                    "paired": r.paired,
                    "error": r.error,
                }
                for r in results
            },
        }
        a.json_out.write_text(json.dumps(blob, indent=1))


if __name__ == "__main__":
    main()
