"""What a run records as it goes: the buffered training log, the phase-switch watch, the router
statistics summary and the saved adapter. The runner calls these; none of them trains.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from moebench import store as db
from moebench.config import to_dict
from moebench.inject import Adapted
from moebench.runspec import RunSpec
from moebench.train import StepLog

log = logging.getLogger(__name__)

LOG_FLUSH_EVERY = 10  # training-log rows buffered before a store write


@dataclass
class LogBuffer:
    store: db.Store
    run_id: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0

    def add(self, s: StepLog) -> None:
        self.rows.append(
            {
                "step": s.step,
                "loss": s.loss,
                "lr": s.lr,
                "tokens": s.tokens,
                "aux_losses": s.aux or None,
                "stats": s.stats or None,
            }
        )
        self.last_step = s.step
        if len(self.rows) >= LOG_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            db.log_steps(self.store, self.run_id, self.rows)
            self.rows = []


class PhaseWatch:
    """Notes the mean adapter-output norm on both sides of each phase switch (LoRACoE's
    warm-up -> joint), which the loop records on the last and first step of every phase.

    A run interrupted right at a switch resumes with the other side still to come, so the last
    logged side is stored with every checkpoint (`phase_watch_last`) and `restore` picks it up.
    """

    def __init__(
        self,
        switches: list[dict[str, Any]] | None = None,
        prev: tuple[str, int, float | None] | None = None,
    ) -> None:
        self.prev = prev
        self.switches: list[dict[str, Any]] = switches or []

    @classmethod
    def restore(cls, artifacts: dict[str, Any], step: int) -> PhaseWatch:
        """The watch as it stood at checkpoint `step`, from the run's stored artifacts."""
        switches = [s for s in artifacts.get("phase_switches", []) if s["step"] <= step]
        last = artifacts.get("phase_watch_last")
        prev = None
        if last and last["step"] <= step:
            prev = (last["phase"], last["step"], last["adapter_out_norm"])
        return cls(switches, prev)

    def add(self, s: StepLog) -> None:
        if not s.stats:
            return
        norms = [v for k, v in s.stats.items() if k.endswith(".out_norm")]
        norm = sum(norms) / len(norms) if norms else None
        if self.prev is not None and self.prev[0] != s.phase:
            before = self.prev[2]
            ratio = norm / before if norm is not None and before else None
            self.switches.append(
                {
                    "step": s.step,
                    "from": self.prev[0],
                    "to": s.phase,
                    "from_step": self.prev[1],
                    "adapter_out_norm_before": before,
                    "adapter_out_norm_after": norm,
                    "ratio": ratio,
                }
            )
            if ratio is not None:
                log.info(
                    "phase %s -> %s at step %d: mean adapter output norm %.4g -> %.4g (x%.3g)",
                    self.prev[0],
                    s.phase,
                    s.step,
                    before,
                    norm,
                    ratio,
                )
        self.prev = (s.phase, s.step, norm)

    def store(self, store: db.Store, run_id: int) -> None:
        if self.switches:
            db.put_artifact(store, run_id, "phase_switches", self.switches)
        if self.prev is not None:
            phase, step, norm = self.prev
            last = {"phase": phase, "step": step, "adapter_out_norm": norm}
            db.put_artifact(store, run_id, "phase_watch_last", last)


def store_router_summary(store: db.Store, run_id: int) -> None:
    """Per-key means of the router statistics over every logged step (all processes of a
    resumed run), plus the last logged values: the per-run view the leaderboard reads."""
    rows = [r for r in db.get_training_log(store, run_id) if r["stats"]]
    if not rows:
        return
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r["stats"].items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    summary = {
        "logged_steps": len(rows),
        # per key over the steps that logged it: gates exist only in some phases (LoRACoE)
        "mean": {k: v / counts[k] for k, v in sums.items()},
        "steps_logged_per_key": counts,
        "last_step": rows[-1]["step"],
        "last": rows[-1]["stats"],
    }
    db.put_artifact(store, run_id, "router_stats", summary)


def save_adapter(adapted: Adapted, spec: RunSpec, folder: Path) -> None:
    """The adapter weights and the config that builds their modules: the prepared method config
    (e.g. with LoRA-SMoE's allocation), so loading never needs the preparation stage again."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapted.adapter_state_dict(), str(folder / "adapter.safetensors"))
    config = {**spec.to_dict(), "method_config": to_dict(adapted.config)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
