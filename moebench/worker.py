"""Workers: each job in its own process, claimed from the store's queue, retried by policy.

`python -m moebench.worker --db URL [--sweep NAME]` is one job's process: it claims a job,
writes its log to `<output root>/logs/run-<id>.log`, runs it, and on failure applies the retry
policy (a failure is retried up to the job's `retries`; an out-of-memory failure is retried with
half the micro-batch and twice the accumulation, the same effective batch, from step 0 since a
checkpoint's data position counts micro-batches; an out-of-memory failure in scoring halves the
eval batch instead). It exits 0 after a job ended as done or failed, 130 when interrupted, 3
when there was nothing to claim.

`work_queue` keeps one such process per slot (a GPU, or `--workers N` on a CPU) until the queue
is empty. To keep the gap between jobs small, a slot's next processes are started while the
current one runs (`SPARES` of them, in a chain): each imports torch and the rest, then waits for
its predecessor to exit before it claims. Two, not one, because a job shorter than an interpreter
start (4-5 s on a loaded 2-core machine) would otherwise leave its successor still importing.
Every process dies with the one that started it (Linux), so a killed sweep leaves no stray
worker; its jobs are seen dead at once and resume from their checkpoints when it restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no stray workers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


if __name__ == "__main__" and "--parent" in sys.argv[:-1]:
    # Armed before the store's imports below, which take seconds on a loaded machine: a sweep
    # SIGKILLed while its workers still import must take them along at once, not when they
    # reach main(). Measured: 4 workers still alive 1 s after such a kill at load 33.
    with contextlib.suppress(ValueError):
        _die_with_parent(int(sys.argv[sys.argv.index("--parent") + 1]))

from moebench.errors import ConfigError, MoebenchError  # noqa: E402
from moebench.store import jobs as q  # noqa: E402

log = logging.getLogger(__name__)

EXIT_NOTHING = 3
POLL_S = 0.05
SPARES = 2  # processes a slot keeps started ahead of its current one, each waiting on the last
MAX_WORKER_ERRORS = 3
PRESTART_WAIT_S = 120.0  # how long a worker started before the queueing waits for a job


class WorkerError(MoebenchError):
    """Worker processes keep failing on their own (not their jobs): the pool stops."""


# --- one job's process -------------------------------------------------------------------------


def _wait_for(pid: int | None) -> None:
    while pid and q._pid_exists(pid):
        time.sleep(POLL_S)


def _log_to_file(path: Path) -> None:
    """Send this process's stdout, stderr and logging to the job's own log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        os.dup2(fd, stream.fileno())
    os.close(fd)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def log_path(row: dict[str, Any]) -> Path:
    """Where a job's processes write their log (one file per job, attempts appended), named
    like its output folder, so runs of two stores sharing an output root keep apart."""
    from moebench.paths import run_folder_name

    root = Path((row.get("execution") or {}).get("output_root") or "results/runs")
    return root / "logs" / f"{run_folder_name(row)}.log"


def work_one(
    db_url: str | None,
    *,
    sweep: str | None = None,
    after_pid: int | None = None,
    wait_s: float = 0.0,
    await_go: bool = False,
    run_id: int | None = None,
) -> int:
    """Claim one job and work it in this process; the exit code `main` returns.

    `run_id` claims that job only (a Ray task works the one job it was scheduled for).

    `wait_s` is for a worker started before its jobs are queued (`prestart`): it waits up to
    that long for something to claim instead of leaving at once. With `await_go` (an early
    worker, see `start_early`) it first reads its sweep and GPU from one line on stdin, sent
    once the store exists; end of input means there is nothing for it.
    """
    import torch  # imported before waiting, so the gap between jobs holds no import time

    from moebench import runner
    from moebench import store as db
    from moebench.liveness import JobLost

    if await_go:
        line = sys.stdin.readline()
        if not line.strip():
            return EXIT_NOTHING
        go = json.loads(line)
        sweep = go.get("sweep")
        if go.get("gpu") is not None:  # before any CUDA call, so it still takes effect
            os.environ["CUDA_VISIBLE_DEVICES"] = go["gpu"]
    store = db.open_store(db_url)  # opened (and its schema checked) before the wait, too
    _wait_for(after_pid)
    owner = q.new_owner()
    row = q.claim(store, owner, sweep=sweep, run_id=run_id)
    deadline = time.monotonic() + wait_s
    while row is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
        if q.count_claimable(store, sweep=sweep)[0]:
            row = q.claim(store, owner, sweep=sweep, run_id=run_id)
    if row is None:
        return EXIT_NOTHING
    _log_to_file(log_path(row))
    log.info("attempt %d of run %d as %s", row["attempts"], row["id"], owner)
    try:
        runner.run_claimed(store, row, owner, runner.RunEnv(db=db_url))
    except JobLost as e:
        log.warning("%s", e)
    except KeyboardInterrupt:
        log.warning("run %d interrupted", row["id"])
        return 130
    except torch.OutOfMemoryError:
        log.exception("run %d ran out of memory", row["id"])
        retry_after_oom(store, row["id"])
    except Exception:
        log.exception("run %d failed", row["id"])
        retry_after_failure(store, row["id"])
    return 0


def retry_after_failure(store: Any, run_id: int) -> bool:
    """Re-queue a failed job while its failures are within its `retries`; True if re-queued."""
    from moebench import store as db

    row = db.get_run(store, run_id)
    if row["status"] != "failed":
        return False
    retries = int((row.get("execution") or {}).get("retries", 0))
    failed = [f for f in row["failures"] or [] if f["kind"] in ("error", "oom")]
    if len(failed) > retries:
        log.warning(
            "run %d failed %d times; not retried (retries=%d)", run_id, len(failed), retries
        )
        return False
    q.requeue(store, run_id, f"retry {len(failed)} of {retries} after: {failed[-1]['reason']}")
    return True


def retry_after_oom(store: Any, run_id: int) -> bool:
    """Re-queue a job that ran out of memory with a smaller batch, the same job all the same.

    In scoring (its adapter is saved): half the eval batch, an execution setting, resuming where
    it stopped. In training: the largest micro-batch that divides the batch and is at most half
    the current one (so the same effective batch, more accumulation), from step 0, since a
    checkpoint's data position counts micro-batches of the old size. With nothing left to
    halve, the ordinary retry policy decides.
    """
    from moebench import store as db
    from moebench.runner import spec_of

    row = db.get_run(store, run_id)
    if row["status"] != "failed":
        return False
    spec = spec_of(row)
    execution = dict(row.get("execution") or {})
    trained = row["output_dir"] and (Path(row["output_dir"]) / "adapter").is_dir()
    if trained:
        size, knob = spec.eval.batch_size, "eval_batch_size"
        smaller = size // 2
    else:
        size, knob = spec.train.micro_batch_size, "micro_batch_size"
        smaller = max(
            (d for d in range(1, size // 2 + 1) if spec.train.batch_size % d == 0), default=0
        )
    if smaller < 1:
        return retry_after_failure(store, run_id)
    execution[knob] = smaller
    execution.setdefault("oom_retries", []).append({"knob": knob, "from": size, "to": smaller})
    q.set_execution(store, run_id, execution)
    if not trained:
        _set_checkpoints_aside(store, row, size)
    where = "scoring" if trained else "training"
    again = "where it stopped" if trained else "step 0 (same effective batch)"
    q.requeue(
        store,
        run_id,
        f"out of memory in {where} at {knob.replace('_', ' ')} {size}; retrying from {again} "
        f"with {smaller}",
    )
    return True


def _set_checkpoints_aside(store: Any, row: dict[str, Any], micro: int) -> None:
    """Checkpoints of another micro-batch size cannot be resumed from: kept aside, forgotten."""
    from moebench import store as db

    ckpts = Path(row["output_dir"] or "") / "checkpoints"
    if row["output_dir"] and ckpts.is_dir():
        aside = ckpts.with_name(f"checkpoints-micro{micro}")
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(str(ckpts), str(aside))
    db.forget_checkpoints(store, row["id"])


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m moebench.worker", description=__doc__)
    parser.add_argument("--db", default=None)
    parser.add_argument("--sweep", default=None)
    parser.add_argument("--after-pid", type=int, default=None)
    parser.add_argument("--parent", type=int, default=None)
    parser.add_argument("--wait-s", type=float, default=0.0)
    parser.add_argument("--await-go", action="store_true")
    parser.add_argument("--run-id", type=int, default=None)
    args = parser.parse_args(argv)
    if args.parent:
        _die_with_parent(args.parent)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = work_one(
            args.db,
            sweep=args.sweep,
            after_pid=args.after_pid,
            wait_s=args.wait_s,
            await_go=args.await_go,
            run_id=args.run_id,
        )
    except KeyboardInterrupt:  # stopped while waiting its turn: nothing was claimed
        code = 130
    # The job is stored (every write committed): leave without the interpreter's teardown of
    # torch and friends, a second or two that the slot's next worker would wait out.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- a pool of slots -------------------------------------------------------------------------


@dataclass
class Proc:
    """A worker process and the scratch file holding its output until it knows its job."""

    popen: subprocess.Popen[bytes]
    scratch: Any

    def retire(self) -> None:
        """An early worker never told its sweep: closing its stdin sends it away untouched."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.popen.stdin.close()

    def output(self) -> str:
        self.scratch.seek(0)
        text = self.scratch.read().decode(errors="replace")
        self.scratch.close()
        return text


@dataclass
class Slot:
    """One worker place: a GPU (its CUDA_VISIBLE_DEVICES value) or a CPU share."""

    name: str
    gpu: str | None
    current: Proc | None = None
    spares: list[Proc] = field(default_factory=list)  # in start order; each waits on the one before
    errors: int = 0  # worker processes in a row that ended in an error of their own


@dataclass
class QueueReport:
    started: int = 0
    ended: int = 0
    exit_codes: list[int] = field(default_factory=list)


def plan_slots(workers: int | None, per_job: int = 1) -> list[Slot]:
    """One slot per visible GPU (CUDA_VISIBLE_DEVICES honoured), or per `per_job` of them for jobs
    on that many ranks; else `workers` CPU slots (each job's ranks then share the CPU)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1 (or left out: one per GPU).")
    if workers is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g.strip() for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        if gpus and per_job > 1:
            if len(gpus) < per_job:
                raise ConfigError(
                    f"Jobs on {per_job} GPUs each need {per_job} visible GPUs; this machine "
                    f"shows {len(gpus)}."
                )
            groups = [gpus[i : i + per_job] for i in range(0, len(gpus) - per_job + 1, per_job)]
            return [Slot("gpu" + "+".join(g), ",".join(g)) for g in groups]
        if gpus:
            return [Slot(f"gpu{g}", g) for g in gpus]
        workers = 1
    return [Slot(f"cpu{i}", None) for i in range(workers)]


def _spawn(
    db_url: str | None,
    sweep: str | None,
    slot: Slot | None,
    after: int | None,
    wait_s: float = 0.0,
    early: bool = False,
) -> Proc:
    cmd = [sys.executable, "-m", "moebench.worker", "--parent", str(os.getpid())]
    if db_url:
        cmd += ["--db", db_url]
    if sweep:
        cmd += ["--sweep", sweep]
    if after:
        cmd += ["--after-pid", str(after)]
    if wait_s:
        cmd += ["--wait-s", str(wait_s)]
    if early:
        cmd += ["--await-go"]
    env = dict(os.environ)
    if slot is not None and slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    # Until it knows its job, a worker's output (an import error, say) goes to a scratch file
    # the pool reads when it exits; a pipe could fill up while the worker waits its turn.
    scratch = tempfile.TemporaryFile()  # noqa: SIM115 (closed by Proc.output)
    stdin = subprocess.PIPE if early else subprocess.DEVNULL
    popen = subprocess.Popen(cmd, env=env, stdin=stdin, stdout=scratch, stderr=scratch)
    return Proc(popen, scratch)


def start_early(db_url: str | None) -> Proc:
    """A worker started before anything is known but the store's URL: the first thing a sweep does.

    Its interpreter start and imports (seconds) then overlap the sweep's own (the sweep file's
    specs import torch too) and its queueing. It touches nothing until `prestart` tells it its
    sweep and GPU, after the store exists; if the sweep stops first (a bad file), its stdin
    closes and it leaves without opening the store, so no database is created.
    """
    return _spawn(db_url, None, None, None, wait_s=PRESTART_WAIT_S, early=True)


def prestart(
    db_url: str | None, sweep: str | None, slots: list[Slot], early: Proc | None = None
) -> None:
    """Start each slot's first worker while the jobs are still being queued.

    A worker's interpreter start and imports take seconds; begun before the queueing, they
    overlap it, so the first job is claimed moments after it is queued instead of one cold
    start later. Call it once the store exists (two processes must not create its schema at
    once). The first slot takes over `early` (from `start_early`), if given. `work_queue`
    adopts these processes.
    """
    for slot in slots:
        if slot.current is not None:
            continue
        if early is not None and early.popen.stdin is not None:
            go = {"sweep": sweep, "gpu": slot.gpu}
            with contextlib.suppress(BrokenPipeError):
                early.popen.stdin.write((json.dumps(go) + "\n").encode())
            early.retire()
            slot.current, early = early, None
            continue
        slot.current = _spawn(db_url, sweep, slot, None, wait_s=PRESTART_WAIT_S)


def _drop_idle_prestarted(slots: list[Slot]) -> None:
    """Nothing was queued: stop the workers `prestart` began, which would only wait and leave."""
    for slot in slots:
        if slot.current is not None:
            slot.current.popen.send_signal(signal.SIGTERM)
            slot.current.popen.wait()
            slot.current.output()
            slot.current = None


def work_queue(
    db_url: str | None,
    *,
    sweep: str | None,
    slots: list[Slot],
    on_tick: Callable[[], None] = lambda: None,
    tick_s: float = 1.0,
) -> QueueReport:
    """Keep every slot busy until nothing of the queue (or sweep) is left to claim or running."""
    from moebench import store as db

    store = db.open_store(db_url)
    report = QueueReport(started=sum(1 for s in slots if s.current))
    if report.started and not _pending(store, sweep):
        _drop_idle_prestarted(slots)
        report.started = 0
    last_tick = 0.0
    try:
        while True:
            for slot in slots:
                _advance(slot, slots, db_url, sweep, store, report)
            busy = any(s.current for s in slots)
            if not busy and not _pending(store, sweep):
                break
            if time.monotonic() - last_tick >= tick_s:
                on_tick()
                last_tick = time.monotonic()
            time.sleep(POLL_S * 4)
    finally:
        procs = [p for slot in slots for p in [*reversed(slot.spares), slot.current] if p]
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=60)
    on_tick()
    return report


def _advance(
    slot: Slot, slots: list[Slot], db_url: str | None, sweep: str | None, store: Any, r: QueueReport
) -> None:
    """Reap a finished process, promote the first spare, and top the chain of spares up."""
    if slot.current is not None and slot.current.popen.poll() is not None:
        _reap(slot, r)
    if slot.current is None and slot.spares:
        slot.current = slot.spares.pop(0)
    if slot.current is None and _claimable_now(store, sweep):
        slot.current = _spawn(db_url, sweep, slot, None)
        r.started += 1
    # Every spare (of any slot) will try one claim: more spares than claimable jobs would only
    # start and exit.
    while slot.current is not None and len(slot.spares) < SPARES:
        if _claimable_now(store, sweep) <= sum(len(s.spares) for s in slots):
            break
        last = slot.spares[-1] if slot.spares else slot.current
        slot.spares.append(_spawn(db_url, sweep, slot, last.popen.pid))
        r.started += 1


def _reap(slot: Slot, r: QueueReport) -> None:
    """Account for the slot's current process, which has exited."""
    assert slot.current is not None
    code = slot.current.popen.returncode
    out = slot.current.output()
    if code not in (0, EXIT_NOTHING):
        log.warning("worker on %s exited %s: %s", slot.name, code, out.strip()[-2000:])
    # A negative code is a signal (a kill the job survives); a positive one other than 130
    # is the worker itself failing (e.g. at import): spawning more would fail the same way.
    slot.errors = slot.errors + 1 if code > 0 and code not in (EXIT_NOTHING, 130) else 0
    if slot.errors >= MAX_WORKER_ERRORS:
        raise WorkerError(
            f"{MAX_WORKER_ERRORS} worker processes on {slot.name} in a row failed before "
            f"finishing a job; the last said: {out.strip()[-500:] or 'nothing'}"
        )
    if code != EXIT_NOTHING:
        r.ended += 1
        r.exit_codes.append(code)
    slot.current = None


def _claimable_now(store: Any, sweep: str | None) -> int:
    """How many jobs are waiting to be claimed (0: none, which reads as false)."""
    return q.count_claimable(store, sweep=sweep)[0]


def _pending(store: Any, sweep: str | None) -> bool:
    """Anything left that some process works or will: claimable, or running elsewhere."""
    claimable, running = q.count_claimable(store, sweep=sweep)
    return claimable + running > 0


if __name__ == "__main__":
    main()
