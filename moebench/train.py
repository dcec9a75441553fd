"""The one training loop. It knows no method by name.

What varies between methods reaches the loop only through the `Method` interface: phases (each
with its own trainable set and optional learning rate), auxiliary losses and statistics that
layers report after each forward, and which parameters skip weight decay. Reading order:
setup (optimizer, schedule, resume), then one loop whose body is one optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from moebench.checkpoint import TrainState, load_checkpoint, save_checkpoint
from moebench.config import check, doc
from moebench.data import IGNORE_INDEX, Example, StepBatches, collate, step_batches
from moebench.errors import TrainingDiverged
from moebench.inject import Adapted
from moebench.method import Phase
from moebench.prompts import TEMPLATES

if TYPE_CHECKING:
    from moebench.distributed import Ranks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = doc("passes over the training mixture (seed paper: 4)", 4.0, gt=0, le=1000)
    max_steps: int | None = doc(
        "train exactly this many optimizer steps (None: epochs decide)", None, ge=1, le=10**9
    )
    lr: float = doc("peak learning rate (seed paper, LoRA and LoRAMoE: 3e-4)", 3e-4, gt=0, le=1)
    weight_decay: float = doc(
        "AdamW decoupled weight decay, on trainable matrices only (HF Trainer default: 0)",
        0.0,
        ge=0,
        le=1,
    )
    batch_size: int = doc(
        "effective batch size per optimizer step (seed paper: 16 Llama)", 16, ge=1, le=2**20
    )
    micro_batch_size: int = doc(
        "rows per forward; batch_size/micro_batch_size = accumulation", 4, ge=1, le=2**16
    )
    cutoff_len: int = doc(
        "truncate each tokenised row to this many tokens (LLM-Adapters)", 256, ge=8, le=2**20
    )
    warmup_steps: int = doc(
        "linear LR warm-up steps per phase (LLM-Adapters: 100)", 100, ge=0, le=10**9
    )
    lr_schedule: Literal["linear", "cosine", "constant"] = doc(
        "decay after warm-up, to 0 at the end of each phase", "linear"
    )
    max_grad_norm: float | None = doc(
        "clip the gradient norm to this (None: no clipping)", 1.0, gt=0, le=1e6
    )
    train_on_prompt: bool = doc("also train on prompt tokens, as LLM-Adapters' script does", False)
    template: str = doc("prompt template id (moebench.prompts)", "alpaca")
    group_by_length: bool = doc("group batches by length to cut padding", True)
    checkpoint_every: int | None = doc(
        "checkpoint every N steps (None: only at the end)", 50, ge=1, le=10**9
    )
    keep_checkpoints: int = doc("how many recent checkpoints to keep on disk", 2, ge=1, le=1000)
    stats_every: int = doc(
        "record router statistics every N steps, and at the first and last step of each phase",
        10,
        ge=1,
        le=10**9,
    )
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "auto: bf16 autocast on GPU, fp32 on CPU", "auto"
    )
    device: Literal["auto", "cpu", "cuda"] = doc("auto: cuda when available", "auto")

    def __post_init__(self) -> None:
        problems = []
        if self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
            problems.append(
                f"batch_size={self.batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.template not in TEMPLATES:
            problems.append(f"template='{self.template}' is not one of {', '.join(TEMPLATES)}")
        check(problems, "train", self)

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class StepLog:
    step: int
    total_steps: int
    epoch: int
    phase: str
    loss: float  # cross-entropy on the counted tokens, before auxiliary losses
    aux: dict[str, float]
    lr: float
    tokens: int  # non-padding tokens processed so far
    tokens_per_s: float
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainHooks:
    """Callbacks the runner uses to log, store and show progress; the loop stays I/O-free."""

    on_step: Callable[[StepLog], None] = lambda s: None
    on_checkpoint: Callable[[int, Path], None] = lambda step, path: None
    on_phase: Callable[[Phase, int], None] = lambda phase, step: None


@dataclass(frozen=True)
class TrainResult:
    steps: int
    steps_run: int  # optimizer steps taken by this call (0 when resuming a finished training)
    tokens: int
    seconds: float  # wall time of this process's share of training
    tokens_per_s: float


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def plan_steps(num_micro_batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    per_epoch = math.ceil(num_micro_batches / cfg.accumulation)
    # As in HF: max_steps, when given, decides the length and may run past `epochs`.
    return per_epoch, cfg.max_steps or math.ceil(cfg.epochs * per_epoch)


def phase_at(phases: Sequence[Phase], step: int, total: int) -> tuple[int, int, int]:
    """(phase index, first step of the phase, its length) for a 0-based step."""
    start = 0
    for i, phase in enumerate(phases):
        length = round(phase.fraction * total) if i < len(phases) - 1 else total - start
        if step < start + length or i == len(phases) - 1:
            return i, start, max(length, 1)
        start += length
    raise AssertionError("unreachable")


def lr_at(cfg: TrainConfig, peak: float, step_in_phase: int, phase_len: int) -> float:
    if step_in_phase < cfg.warmup_steps:
        return peak * (step_in_phase + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return peak
    progress = (step_in_phase - cfg.warmup_steps) / max(1, phase_len - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def build_optimizer(adapted: Adapted, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over adapter parameters; decay only matrices the method does not exempt."""
    decay, no_decay = [], []
    for name, p in adapted.adapter_parameters():
        exempt = p.ndim < 2 or adapted.method.no_weight_decay(adapted.config, name)
        (no_decay if exempt else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def set_phase_trainable(adapted: Adapted, phase: Phase) -> list[torch.nn.Parameter]:
    """Switch gradients on for the phase's trainable set; return it (what gets clipped)."""
    trainable = []
    for name, p in adapted.adapter_parameters():
        p.requires_grad_(phase.trainable is None or phase.trainable(name))
        if p.requires_grad:
            trainable.append(p)
    return trainable


def token_loss_sum(adapted: Adapted, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the counted (non-masked) positions.

    The output layer runs only on positions that count: on small models the vocab projection is
    most of the compute, and prompt and padding positions would be thrown away anyway.
    """
    model = adapted.model
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is not None and head is not None and not _has_logit_transform(model):
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


def _has_logit_transform(model: torch.nn.Module) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None))


def train(
    adapted: Adapted,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    seed: int,
    checkpoint_root: Path,
    resume_from: Path | None = None,
    hooks: TrainHooks | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train `adapted` to the end of its schedule, from `resume_from` if given.

    With `ranks` this process is one of several data-parallel ranks of the job
    (moebench.distributed): it works its share of each step's micro-batches, the step's sums are
    added up across ranks, and only rank 0 writes checkpoints; the device is the one accelerate
    gave the rank."""
    hooks = hooks or TrainHooks()
    device = resolve_device(cfg) if ranks is None else ranks.device
    amp = autocast_dtype(cfg, device)
    model = adapted.model
    model.to(device)
    for _, p in adapted.adapter_parameters():
        p.data = p.data.float()  # adapter and optimizer state stay fp32 under bf16 autocast
    model.train()

    lengths = [len(e.input_ids) for e in examples]
    n_micro = math.ceil(len(examples) / cfg.micro_batch_size)
    per_epoch, total = plan_steps(n_micro, cfg)
    phases = adapted.method.phases(adapted.config)
    if abs(sum(p.fraction for p in phases) - 1.0) > 1e-6:
        raise ValueError(f"{adapted.method.name}: phase fractions must sum to 1, got {phases}")
    optimizer = build_optimizer(adapted, cfg)

    state = TrainState(step=0, epoch=0, batch_in_epoch=0, tokens_seen=0)
    if resume_from is not None:
        state, adapter = load_checkpoint(resume_from, optimizer)
        adapted.load_adapter_state_dict(adapter)
        log.info(
            "resumed at step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch
        )
    if ranks is not None:
        ranks.check_same(model)
        ranks.broadcast(p for _, p in adapted.adapter_parameters())
    log.info(
        "training: %d rows, %d micro-batches/epoch, %d steps/epoch, %d total steps, "
        "accumulation %d, device %s, autocast %s",
        len(examples),
        n_micro,
        per_epoch,
        total,
        cfg.accumulation,
        device,
        amp,
    )

    step, tokens = state.step, state.tokens_seen
    plans = step_batches(
        lengths,
        cfg.micro_batch_size,
        cfg.accumulation,
        seed,
        cfg.group_by_length,
        (state.epoch, state.batch_in_epoch),
    )
    current_phase, trainable = -1, []
    t0, tokens_at_t0 = time.perf_counter(), tokens
    while step < total:
        plan = next(plans)
        p_idx, p_start, p_len = phase_at(phases, step, total)
        phase = phases[p_idx]
        if p_idx != current_phase:
            current_phase = p_idx
            trainable = set_phase_trainable(adapted, phase)
            hooks.on_phase(phase, step)
        lr = lr_at(cfg, phase.lr or cfg.lr, step - p_start, p_len)
        # Router statistics cost a little per forward, so layers record them only on logged
        # steps: every `stats_every`, and both sides of a phase switch (LoRACoE's norm jump).
        record = (
            (step + 1) % cfg.stats_every == 0
            or step == p_start
            or step == p_start + p_len - 1
            or step == total - 1
        )
        adapted.context.phase = phase.name
        adapted.context.record_stats = record
        for group in optimizer.param_groups:
            group["lr"] = lr

        # One optimizer step: accumulate over up to `accumulation` micro-batches, normalising by
        # the counted tokens of the whole step so micro-batch sizes do not reweight tokens.
        batches = [
            collate([examples[i] for i in ids], _pad_id(adapted)) for ids in plan.micro_batches
        ]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        ce_total = torch.zeros((), device=device)
        aux_total: dict[str, torch.Tensor] = {}
        rows = sum(len(x["input_ids"]) for x in batches)
        # counted on the CPU copies (no device sync), over the whole step whichever rank runs it
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        for b in batches if ranks is None else ranks.mine(batches):
            share = len(b["input_ids"]) / rows
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            adapted.context.attention_mask = b["attention_mask"]
            adapted.context.task_labels = b["task_labels"]
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                ce_sum = token_loss_sum(adapted, b)
                aux = adapted.collect_aux_losses()
            loss = ce_sum / max(n_tokens, 1) + sum((v * share for v in aux.values()), 0.0)
            loss.backward()
            ce_total += ce_sum.detach()
            for k, v in aux.items():
                aux_total[k] = aux_total.get(k, 0) + v.detach() * share
        if ranks is not None:
            ce_total, aux_total = ranks.sum_step(trainable, ce_total, aux_total)
        ce = float(ce_total) / max(n_tokens, 1)
        aux_values = {k: float(v) for k, v in aux_total.items()}
        if not all(math.isfinite(v) for v in [ce, *aux_values.values()]):
            raise _diverged("Loss", ce, step + 1, plan)
        # With an infinite bound the call only measures: a finite loss can still have inf/nan
        # gradients (bf16 overflow in backward), and that update must never be applied.
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf))
        if not math.isfinite(norm):
            raise _diverged("Gradient norm", norm, step + 1, plan)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        elapsed = time.perf_counter() - t0
        if record and ranks is not None:
            ranks.sum_stats(adapted.layers.values())
        hooks.on_step(
            StepLog(
                step=step,
                total_steps=total,
                epoch=plan.epoch,
                phase=phase.name,
                loss=ce,
                aux=aux_values,
                lr=lr,
                tokens=tokens,
                tokens_per_s=(tokens - tokens_at_t0) / max(elapsed, 1e-9),
                stats=adapted.collect_stats() if record else {},
            )
        )
        saves = ranks is None or ranks.main
        if saves and (step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            path = save_checkpoint(
                checkpoint_root,
                TrainState(step, *plan.next_position, tokens),
                adapted.adapter_state_dict(),
                optimizer,
                cfg.keep_checkpoints,
            )
            hooks.on_checkpoint(step, path)
    elapsed = time.perf_counter() - t0
    # Evaluation batches differ in shape: no layer may read the last training batch's mask.
    # The phase stays: the model is evaluated in the form training ended in.
    adapted.context.attention_mask = adapted.context.task_labels = None
    adapted.context.record_stats = False
    model.eval()
    return TrainResult(
        step, step - state.step, tokens, elapsed, (tokens - tokens_at_t0) / max(elapsed, 1e-9)
    )


def _diverged(what: str, value: float, step: int, plan: StepBatches) -> TrainingDiverged:
    rows = [i for ids in plan.micro_batches for i in ids]
    last = plan.first + len(plan.micro_batches) - 1
    return TrainingDiverged(
        f"{what} became non-finite ({value}) at step {step} (epoch {plan.epoch}, micro-batches "
        f"{plan.first}-{last}, rows {rows[:16]}); lower lr or check the data."
    )


def _pad_id(adapted: Adapted) -> int:
    pad = getattr(adapted.model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
