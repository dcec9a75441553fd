"""One job on several GPUs (or, for tests, several CPU processes): data-parallel ranks of the
one training loop, run under accelerate (NCCL on GPUs, gloo on the CPU).

What accelerate does here. Every rank, rank 0 included, is given its place the way torchrun and
`accelerate launch` give it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), and `accelerate.PartialState` reads them, creates the process group (with this
module's timeout) and picks the rank's device; the loop trains on `state.device`. On the CPU it
is told `cpu=True` and the backend gloo outright: without the first it would set up the GPUs
for a CPU job, or on a machine without any nothing at all (one process, no group); without the
second it would take MPI wherever torch has it.
The step's collectives are accelerate's operations: `broadcast` (the adapter, once), `reduce`
with `reduction="sum"` (the step's flat buffer) and `gather_object` (the weight sums, the
auxiliary-loss names, the router-statistic sums; each rank hands in a one-item list, because
gather_object joins the ranks' lists end to end).

How the ranks share a step. The data order is the single-process one: every rank draws the same
plan of micro-batches per optimizer step (moebench.data.step_batches, seeded) and works the
micro-batches `rank, rank + N, ...` of it. Each micro-batch's loss is normalised by the counted
tokens of the whole global step and its auxiliary losses weighted by its share of the step's
rows, exactly as in one process, so the sum over ranks of their gradients is the single-process
gradient: `batch_size` stays the effective (global) batch, = micro-batch x ranks x accumulation.
After backward one all-reduce adds up, in one flat buffer, the gradients of the phase's
trainable set (a parameter no rank touched, an expert no token picked, stays without a gradient,
as in one process, so AdamW leaves it alone), the cross-entropy sum and the auxiliary losses.
Clipping and the optimizer step then run on every rank on equal numbers, so the ranks stay equal
without ever exchanging weights (they are broadcast from rank 0 once, at the start).

What it does not do: wrap the model. There is no `Accelerator.prepare` and no
`DistributedDataParallel` (which `prepare` would apply), because the wrapper fixes the set of
parameters that need gradients when it is built, while a method's phases switch that set mid-run
(LoRACoE, LoRA-SMoE); under top-k routing some experts get no gradient on a rank, which DDP only
tolerates by scanning the graph every step; the loop calls the decoder and the output layer
separately (moebench.train.token_loss_sum), which bypasses the wrapper's forward; and the last
step of an epoch may leave a rank without a micro-batch, where DDP would hang. One
explicit sum per step (accelerate's `reduce`) is what DDP's buckets do, without those four limits.

Auxiliary losses are per micro-batch, per rank: MixLoRA's balance loss and LoRAMoE's constraint
are formed on each forward's own tokens, as they are in one process with gradient accumulation
(where each micro-batch's forward forms its own), so a job's numbers do not depend on how many
ranks it runs on. Pooling the routing of all ranks before forming the loss would make them depend
on it (and on nothing else would 1 GPU with accumulation and 8 GPUs agree). Router statistics,
by contrast, are means over the step's tokens: each rank's running sums are added up before the
means are formed (`AdapterLayer.stat_sums`).

Only rank 0 touches the store and the disk: it is the process that claimed the job (moebench
run), it writes the training log and checkpoints and scores the result. The other ranks are
helper processes it starts on this machine (`python -m moebench.distributed`, its place in the
launcher variables), each given the resolved spec, the prepared method config and the tokenised
rows in a hand-off folder, so they build the same model without reading the store; they train
and exit. Rank 0 is a long-lived process (a sweep's worker): it holds the launcher variables and
accelerate's shared state only while the job runs, then closes the group and puts both back as
they were, so its next job starts clean. With dropout, every rank draws its own masks (as under
DDP), so such a run equals the one-process run in distribution, not number for number; with
dropout 0 it equals it to float summation order.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, broadcast, gather_object, reduce

from moebench.data import Example
from moebench.errors import ConfigError, MoebenchError

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer means a rank is gone
READY_WAIT_S = 1800.0  # how long rank 0 waits for a helper to have built its model
# What a launcher (torchrun, `accelerate launch`) gives each process, and what accelerate itself
# writes while it sets up CPU ranks: rank 0 sets them for one job and puts back what was there.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one job, and the step's collectives."""

    rank: int
    world: int
    device: torch.device  # accelerate's choice for this rank (cuda:LOCAL_RANK of those it sees)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a step's micro-batches: every `world`-th, from its own index."""
        return list(items[self.rank :: self.world])

    def broadcast(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors (the adapter at the start of training)."""
        with torch.no_grad():
            broadcast([p.data for p in params], from_process=0)  # in place, one call a tensor

    def check_same(self, model: torch.nn.Module) -> None:
        """Refuse to train if a rank's base model differs from rank 0's (another model file, a
        changed cache): a sum of every weight, compared across ranks."""
        with torch.no_grad():
            total = sum(float(p.detach().double().sum()) for p in model.parameters())
        sums = _gather(total)
        if any(s != sums[0] for s in sums):
            raise MoebenchError(
                f"The ranks' base models differ (weight sums {sums}); every rank must load the "
                "same model files."
            )

    def sum_step(
        self,
        params: Sequence[torch.nn.Parameter],
        ce_total: torch.Tensor,
        aux_total: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Add up the ranks' gradients (in place), cross-entropy sums and auxiliary losses."""
        keys = _gather(sorted(aux_total))
        names = sorted(set().union(*keys))
        device = ce_total.device
        zero = torch.zeros((), device=device)
        head = [ce_total.float(), *(aux_total.get(k, zero).float() for k in names)]
        had = [float(p.grad is not None) for p in params]
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).float().reshape(-1)
            for p in params
        ]
        flat = torch.cat(
            [torch.stack(head), torch.tensor(had, device=device), *grads]
            if params
            else [torch.stack(head)]
        )
        flat = reduce(flat, reduction="sum")  # a summed copy: the flat buffer once more, briefly
        n = len(head)
        ce, aux = flat[0], {k: flat[1 + i] for i, k in enumerate(names)}
        seen, offset = flat[n : n + len(params)].tolist(), n + len(params)
        for p, count in zip(params, seen, strict=True):
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).to(p.dtype) if count else None
            offset += size
        return ce, aux

    def sum_stats(self, layers: Iterable[Any]) -> None:
        """Replace each layer's running router-statistic sums with the sum over the ranks."""
        layers = list(layers)
        mine = [
            {k: (v.detach().cpu() if v is not None else None) for k, v in layer.stat_sums().items()}
            for layer in layers
        ]
        gathered = _gather(mine)
        for i, layer in enumerate(layers):
            total: dict[str, torch.Tensor | None] = {}
            for per_rank in gathered:
                for k, v in per_rank[i].items():
                    old = total.get(k)
                    total[k] = v if old is None else (old if v is None else old + v)
            device = _device_of(layer)
            layer.set_stat_sums(
                {k: v.to(device) if v is not None else None for k, v in total.items()}
            )


def _gather(item: Any) -> list[Any]:
    """Every rank's `item`, in rank order. accelerate's gather_object concatenates the ranks'
    lists, so each rank hands in a one-item list and gets one item per rank back."""
    return list(gather_object([item]))


def _device_of(layer: torch.nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")


def check_gpus(gpus: int, batch_size: int, micro_batch_size: int) -> None:
    """Everything about `--gpus N` that can be wrong, said before the job is stored."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be at least 1.")
    if gpus == 1:
        return
    if batch_size % (micro_batch_size * gpus):
        raise ConfigError(
            f"train.batch_size={batch_size} must be a multiple of micro_batch_size="
            f"{micro_batch_size} x gpus={gpus}, the rows of one micro-batch on every rank."
        )
    if not dist.is_available():
        raise ConfigError("--gpus needs a torch built with torch.distributed; this one is not.")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES values."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """A helper is signalled when rank 0 dies, even by SIGKILL (Linux), so none is left behind
    waiting on a collective."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def helper_ranks(
    world: int,
    *,
    spec: dict[str, Any],
    method_config: dict[str, Any],
    examples: Sequence[Example],
    workdir: Path,
    checkpoint_root: Path,
    resume_from: Path | None,
    device: torch.device,
    alive: Callable[[], None] = lambda: None,
) -> Iterator[Ranks]:
    """Start ranks 1..world-1 on this machine, join them as rank 0, and yield this rank's place;
    on leaving, wait for the helpers to finish (or stop them, on an error) and close the group.

    `alive` is called while waiting (the job's heartbeat check, which raises if the job was
    taken away)."""
    threads = max(1, torch.get_num_threads() // world) if device.type == "cpu" else None
    if dist.is_initialized():
        raise ConfigError(
            f"--gpus {world} starts its own ranks, but this process is already one of a "
            "process group (started by torchrun or accelerate launch?); run it without a launcher."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("ready.*"):
        old.unlink()
    port = _free_port()
    handoff = {
        "spec": spec,
        "method_config": method_config,
        "examples": str(workdir / "examples.json"),
        "checkpoint_root": str(checkpoint_root),
        "resume_from": str(resume_from) if resume_from else None,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "threads": threads,
    }
    rows = [[list(e.input_ids), list(e.labels), e.task_label] for e in examples]
    (workdir / "examples.json").write_text(json.dumps(rows))
    (workdir / "handoff.json").write_text(json.dumps(handoff))
    gpus = visible_gpus() if device.type == "cuda" else []
    if device.type == "cuda" and len(gpus) < world:
        raise ConfigError(
            f"--gpus {world} needs {world} visible GPUs; this machine shows {len(gpus)}."
        )
    procs = [
        _start(workdir, launch_env(rank, world, port, threads), gpus[rank] if gpus else None)
        for rank in range(1, world)
    ]
    saved_threads = torch.get_num_threads()
    try:
        _wait_ready(procs, workdir, alive)
        with _as_rank0(launch_env(0, world, port, threads), handoff["backend"]) as ranks:
            if threads:
                torch.set_num_threads(threads)
            yield ranks
            for rank, proc in enumerate(procs, start=1):
                if proc.wait() != 0:
                    raise MoebenchError(
                        f"Rank {rank} ended with exit code {proc.returncode}: "
                        + _tail(workdir, rank)
                    )
    finally:
        torch.set_num_threads(saved_threads)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # The hand-off (the tokenised rows: large on a real mixture) is rebuilt by a resume;
        # the helpers' logs stay beside the checkpoints.
        for name in ["examples.json", "handoff.json", *(p.name for p in workdir.glob("ready.*"))]:
            (workdir / name).unlink(missing_ok=True)


def launch_env(rank: int, world: int, port: int, threads: int | None) -> dict[str, str]:
    """A rank's place as torchrun and `accelerate launch` hand it over (one machine, so the local
    rank is the rank). On CPU ranks OMP_NUM_THREADS is the rank's share of the cores: with it
    set, accelerate leaves the thread count alone instead of picking its own (with a warning)."""
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def join(backend: str) -> Ranks:
    """Join the job's ranks from the launcher variables. accelerate creates the process group
    and picks the device; `cpu=True` is what makes it choose CPU ranks (else it finds no
    accelerator and sets up nothing), and the explicit backend keeps it from taking MPI, which
    it prefers on the CPU whenever torch has it."""
    state = PartialState(cpu=backend == "gloo", backend=backend, timeout=TIMEOUT)
    wanted = DistributedType.MULTI_CPU if backend == "gloo" else DistributedType.MULTI_GPU
    if state.distributed_type != wanted or state.backend != backend:
        raise MoebenchError(
            f"accelerate set up {state.distributed_type} over {state.backend} where this job "
            f"needs {wanted} over {backend}; is an ACCELERATE_* variable set (deepspeed, fsdp)?"
        )
    log.info(
        "rank %d of %d under accelerate: %s over %s, device %s",
        state.process_index,
        state.num_processes,
        state.distributed_type.value,
        state.backend,
        state.device,
    )
    return Ranks(state.process_index, state.num_processes, state.device)


def leave() -> None:
    """Close the job's process group and drop accelerate's record of it. accelerate has no
    public reset; `_reset_state` is the one its own test scripts use between runs."""
    if dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()


@contextlib.contextmanager
def _as_rank0(env: dict[str, str], backend: str) -> Iterator[Ranks]:
    """This long-lived process (a sweep's worker, a CLI call in a test) as rank 0 of one job.
    The launcher variables and accelerate's shared state belong to the job only while it runs:
    afterwards both are what they were before, so the process's next job, on any number of
    ranks, starts clean (and a state someone made earlier, undistributed, is not lost)."""
    saved_env = {k: os.environ.get(k) for k in LAUNCH_VARS}
    saved_state = dict(PartialState._shared_state)
    PartialState._reset_state()
    os.environ.update(env)
    try:
        yield join(backend)
    finally:
        leave()
        PartialState._shared_state.update(saved_state)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start(workdir: Path, place: dict[str, str], gpu: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **place}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(workdir / f"rank{place['RANK']}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "moebench.distributed", str(workdir / "handoff.json")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def _wait_ready(
    procs: list[subprocess.Popen[bytes]], workdir: Path, alive: Callable[[], None]
) -> None:
    """Until every helper has built its model (its `ready.R` file), so that a helper that fails
    while loading is one clear error here rather than a collective that never completes."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        waiting = [r for r in range(1, len(procs) + 1) if not (workdir / f"ready.{r}").exists()]
        if not waiting:
            return
        for rank in waiting:
            code = procs[rank - 1].poll()
            if code is not None:
                raise MoebenchError(
                    f"Rank {rank} ended (exit code {code}) before training began: "
                    + _tail(workdir, rank)
                )
        if time.monotonic() > deadline:
            raise MoebenchError(f"Ranks {waiting} did not get ready within {READY_WAIT_S:.0f} s.")
        alive()
        time.sleep(0.05)


def _tail(workdir: Path, rank: int) -> str:
    try:
        lines = (workdir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-3:]) or "(empty log)"


def helper_main(handoff_path: Path) -> None:
    """A helper rank (its place in the launcher variables): build the job's model from the
    hand-off, train, exit."""
    from moebench.adapted import build_adapted
    from moebench.config import build
    from moebench.method import get_method
    from moebench.runspec import resolve
    from moebench.train import train

    h = json.loads(handoff_path.read_text())
    if h["threads"]:
        torch.set_num_threads(h["threads"])
    spec = resolve(base=h["spec"])
    method = get_method(spec.method)
    config = build(method.config_cls, h["method_config"], section=method.name)
    built = build_adapted(spec, config)
    rows = json.loads(Path(h["examples"]).read_text())
    examples = [Example(tuple(i), tuple(lab), int(t)) for i, lab, t in rows]
    (handoff_path.parent / f"ready.{os.environ['RANK']}").touch()
    ranks = join(h["backend"])
    try:
        train(
            built.adapted,
            examples,
            spec.train,
            seed=spec.seed,
            checkpoint_root=Path(h["checkpoint_root"]),
            resume_from=Path(h["resume_from"]) if h["resume_from"] else None,
            ranks=ranks,
        )
    finally:
        leave()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)  # the rank's place under accelerate, into its ranks/rank<R>.log
    helper_main(Path(sys.argv[1]))
