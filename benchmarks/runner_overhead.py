"""Scheduling overhead of `moebench sweep`: how long the queue keeps a job, and a slot, waiting.

Acceptance (from the issue): scheduling overhead per job (queue to start, finish to next start),
beyond model loading, under 1 s.

Why it is built this way:

* Work: a sweep of N short jobs on one worker slot (`--workers 1`): LoRA on tiny-llama, N seeds,
  `--steps` optimizer steps (30: about 5 s a job here), one eval set of one item. One slot, so
  each job's start follows the previous one's finish with nothing else to wait for. A job must
  outlast a worker's start (interpreter and imports, 3-4 s on this machine), or the pre-started
  next worker is still importing when its turn comes and the gap measures that instead;
  `--steps 2` shows it.
* Times come from the store: `created_at` (queued), `started_at` (claimed; every job here is
  claimed once), `finished_at` (marked done). Finish to next start is
  `started_at[k] - finished_at[k-1]`: it begins after the job's last write and ends at the next
  claim, so it holds no model loading (that comes after the claim).
* Where that gap goes: this script learns each job's worker pid from the first line of its log
  (`attempt 1 of run N as host:pid:token`), polls /proc every 20 ms for the pid to go, and reads
  the process's start time from /proc/<pid>/stat. The gap is then the predecessor's exit after
  its last write, plus the successor's noticing it and claiming. The start time shows whether
  the successor was started (and its imports done) while the predecessor still ran.
* The first job has no predecessor to overlap with. `moebench sweep` starts each slot's first
  worker as soon as the store is open, so that its interpreter start and imports overlap the
  queueing; its queue to start (`started_at - created_at`) is then what is left of them after
  the job was queued, plus the claim. It is a criterion of its own (also under 1 s), shown next
  to a bare `import torch, moebench.runner` timed on the same machine.
* Beyond the acceptance, the claim to the loop's `training:` log line (data, model load,
  injection) is shown, so the part that is model loading is visible rather than assumed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kill_trials import snapshot_sources, sources_digest

MOEBENCH = Path(sys.executable).with_name("moebench")
LIMIT_S = 1.0
POLL_S = 0.02
ATTEMPT = re.compile(r"^(\S+ \S+) INFO \S+: attempt 1 of run (\d+) as [^:]+:(\d+):")
TRAINING = re.compile(r"^(\S+ \S+) INFO moebench\.train: training:")


def sweep_file(path: Path, jobs: int, steps: int) -> Path:
    """N LoRA jobs on tiny-llama that differ only in seed: `steps` optimizer steps, one eval
    set of one item, nothing else."""
    seeds = ", ".join(str(s) for s in range(1, jobs + 1))
    path.write_text(
        "name: overhead\n"
        "axes:\n"
        "  method: lora\n  model: tiny-llama\n  suite: mini\n"
        f"  seed: [{seeds}]\n"
        "set:\n"
        f"  train.max_steps: {steps}\n  train.warmup_steps: 0\n"
        "  eval.tasks: [boolq]\n  eval.limit: 1\n  eval.max_new_tokens: 4\n"
        "execution:\n  retries: 0\n"
    )
    return path


@dataclass
class Watch:
    """Worker processes seen through their job logs: pid, start and exit (epoch seconds), and
    the CPU time the waiting successor spent from its predecessor's exit to its own claim: near
    zero if it was only polling, about the gap if it was still importing."""

    logs: Path
    pids: dict[int, int] = field(default_factory=dict)  # run id -> pid
    spawned: dict[int, float] = field(default_factory=dict)
    exited: dict[int, float] = field(default_factory=dict)
    waiting_cpu: dict[int, float] = field(default_factory=dict)  # successor pid -> CPU s at exit
    catch_up_cpu: dict[int, float] = field(default_factory=dict)  # run id -> CPU s exit to claim

    def poll(self) -> None:
        now = time.time()
        for run_id, pid in self.pids.items():
            if run_id not in self.exited and not _alive(pid):
                self.exited[run_id] = now
                for spare in _waiting_on(pid):
                    self.waiting_cpu[spare] = _cpu_s(spare) or 0.0
        if not self.logs.is_dir():
            return
        for log in self.logs.glob("run-*.log"):
            run_id = int(log.stem.split("-")[1])
            if run_id in self.pids:
                continue
            m = ATTEMPT.match(log.read_text(errors="replace").partition("\n")[0])
            if m:
                pid = int(m.group(3))
                self.pids[run_id] = pid
                started, cpu = _start_time(pid), _cpu_s(pid)
                if started is not None:
                    self.spawned[run_id] = started
                if pid in self.waiting_cpu and cpu is not None:
                    self.catch_up_cpu[run_id] = cpu - self.waiting_cpu[pid]


def _waiting_on(pid: int) -> list[int]:
    """Workers started with `--after-pid pid`: the slot's next worker."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            args = (d / "cmdline").read_bytes().split(b"\0") if d.name.isdigit() else []
        except OSError:
            continue
        if b"--after-pid" in args and args[args.index(b"--after-pid") + 1] == str(pid).encode():
            found.append(int(d.name))
    return found


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process (10 ms ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has finished; its parent reaps it within 0.2 s


def _start_time(pid: int) -> float | None:
    """When a process started (epoch s, 10 ms ticks), from /proc/<pid>/stat and /proc/uptime."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    boot = time.time() - uptime
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime


def _ts(text: str | None) -> float | None:
    """A stored timestamp (naive UTC text) as seconds since the epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() if text else None


def _log_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged


def training_started(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        m = TRAINING.match(line)
        if m:
            return _log_time(m.group(1))
    return None


def one_sweep(root: Path, jobs: int, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """Run the sweep once in a fresh store; per-job times and the gaps between jobs."""
    root.mkdir(parents=True)
    db = root / "store.db"
    cmd = [str(MOEBENCH), "sweep", str(sweep_file(root / "overhead.yaml", jobs, steps))]
    cmd += ["--db", f"sqlite:///{db}", "--output-dir", str(root / "out"), "--workers", "1"]
    watch = Watch(root / "out" / "logs")
    t0 = time.time()
    with (root / "sweep.log").open("wb") as log:
        p = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None:
            watch.poll()
            time.sleep(POLL_S)
    watch.poll()
    if p.returncode != 0:
        raise SystemExit(f"sweep failed ({p.returncode}); see {root / 'sweep.log'}")
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    runs = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY started_at")]
    con.close()
    if any(r["attempts"] != 1 or r["status"] != "done" for r in runs):
        raise SystemExit(f"a job was retried or did not finish; see {root}")
    rows = [_job_times(r, watch, root) for r in runs]
    for prev, cur in itertools.pairwise(rows):
        cur["gap_s"] = cur["started"] - prev["finished"]
        if prev["exited"] is not None:
            cur["exit_s"] = prev["exited"] - prev["finished"]
            cur["claim_s"] = cur["started"] - prev["exited"]
        if cur["spawned"] is not None:
            cur["spawn_lead_s"] = prev["finished"] - cur["spawned"]
    first = rows[0]
    return {
        "sweep_started": t0,
        "queued_s": max(r["created"] for r in rows) - t0,
        "jobs": rows,
        "first_queue_to_start_s": first["started"] - first["created"],
        "first_spawn_to_start_s": (
            first["started"] - first["spawned"] if first["spawned"] is not None else None
        ),
        "wall_s": time.time() - t0,
    }


def _job_times(run: dict[str, Any], watch: Watch, root: Path) -> dict[str, Any]:
    started, finished = _ts(run["started_at"]), _ts(run["finished_at"])
    assert started is not None and finished is not None
    train = training_started(root / "out" / "logs" / f"run-{run['id']}.log")
    return {
        "id": run["id"],
        "created": _ts(run["created_at"]),
        "started": started,
        "finished": finished,
        "spawned": watch.spawned.get(run["id"]),
        "exited": watch.exited.get(run["id"]),
        "catch_up_cpu_s": watch.catch_up_cpu.get(run["id"]),
        "claim_to_training_s": train - started if train is not None else None,
        "run_s": finished - started,
    }


def import_time(env: dict[str, str]) -> tuple[float, float]:
    """A worker's cold start and its exit, without the queue: a fresh interpreter importing
    what a worker imports, then exiting. (start to imported, imported to exited), seconds."""
    code = "import time, torch, moebench.runner; print(time.time())"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    t1 = time.time()
    imported = float(out.stdout.decode().split()[-1])
    return imported - t0, t1 - imported


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.3f} s, max {max(values):.3f} s (n={len(values)})"


def report(sweeps: list[dict[str, Any]], bare: list[tuple[float, float]]) -> dict[str, Any]:
    """Print the per-job table and the verdict; the figures for the JSON file."""
    cols = ("gap_s", "exit_s", "claim_s", "catch_up_cpu_s", "spawn_lead_s")
    cols += ("claim_to_training_s", "run_s")
    heads = ("gap s", "exit s", "claim s", "its CPU s", "spare lead s", "claim->train s", "run s")
    print(f"{'rep':>3} {'job':>3} " + " ".join(f"{h:>{len(h)}}" for h in heads))
    for n, s in enumerate(sweeps, 1):
        for j in s["jobs"]:
            cells = [f"{j[k]:.3f}" if j.get(k) is not None else "-" for k in cols]
            row = " ".join(f"{c:>{len(h)}}" for c, h in zip(cells, heads, strict=True))
            print(f"{n:>3} {j['id']:>3} {row}")
    pick = {k: [j[k] for s in sweeps for j in s["jobs"] if j.get(k) is not None] for k in cols}
    first = [s["first_queue_to_start_s"] for s in sweeps]
    imports, exits = [b[0] for b in bare], [b[1] for b in bare]
    gaps = pick["gap_s"]
    met_gap = bool(gaps) and max(gaps) < LIMIT_S
    met_first = bool(first) and max(first) < LIMIT_S
    print(f"\nfinish to next start: {_stats(gaps)}")
    print(f"  predecessor exit after its last write: {_stats(pick['exit_s'])}")
    print(f"  successor claim after that exit: {_stats(pick['claim_s'])}")
    print(f"    CPU the successor used meanwhile: {_stats(pick['catch_up_cpu_s'])}")
    print(f"  successor started before predecessor finished by: {_stats(pick['spawn_lead_s'])}")
    print(
        f"claim to training loop (data + model load + injection): "
        f"{_stats(pick['claim_to_training_s'])}"
    )
    print(f"first job, queue to start (cold worker): {_stats(first)}")
    print(f"bare `import torch, moebench.runner` in a fresh interpreter: {_stats(imports)}")
    print(f"  and its exit after that (interpreter teardown): {_stats(exits)}")
    for what, ok in (
        ("finish-to-next-start (every gap)", met_gap),
        ("first queue-to-start", met_first),
    ):
        print(f"criterion {what} < {LIMIT_S:.0f} s: {'met' if ok else 'missed'}")
    summary = {
        k: {"median": statistics.median(v), "max": max(v), "n": len(v)}
        for k, v in pick.items()
        if v
    }
    summary["first_queue_to_start_s"] = first
    summary["bare_import_s"], summary["bare_exit_s"] = imports, exits
    summary["criterion_gap_met"], summary["criterion_first_met"] = met_gap, met_first
    summary["criterion_met"] = met_gap and met_first
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8, help="jobs per sweep")
    ap.add_argument(
        "--steps",
        type=int,
        default=30,
        help="optimizer steps per job; jobs shorter than a worker's imports (a few seconds here) "
        "leave the next worker still importing when its turn comes",
    )
    ap.add_argument("--repeats", type=int, default=2, help="sweeps, each in a fresh store")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--quick", action="store_true", help="one sweep of 6 jobs")
    ap.add_argument("--work-dir", type=Path, default=None, help="[default: a temporary folder]")
    ap.add_argument(
        "--live-tree", action="store_true", help="run the working tree, not a snapshot of it"
    )
    ap.add_argument(
        "--sources",
        type=Path,
        default=None,
        help="a snapshot made by kill_trials.py (WORK/sources) to run, instead of taking one",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs, args.repeats = 6, 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="runner-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sources = args.sources or work / "sources"
    digest = "live working tree"
    if args.sources:
        digest = sources_digest(sources)
    elif not args.live_tree:  # the sources as they are now, whatever is edited meanwhile
        digest = snapshot_sources(sources)
    if not args.live_tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(sources), env.get("PYTHONPATH")]))
    load_start = os.getloadavg()
    bare, sweeps = [], []
    for n in range(args.repeats):  # an import timing next to each sweep: the load drifts
        bare.append(import_time(env))
        sweeps.append(one_sweep(work / f"sweep-{n}", args.jobs, args.steps, env))
        print(f"sweep {n + 1}/{args.repeats}: {sweeps[-1]['wall_s']:.1f} s", flush=True)
    summary = report(sweeps, bare)
    if args.out:
        info = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "loadavg": {"start": load_start, "end": os.getloadavg()},
            "python": platform.python_version(),
            "sources": digest,
            "args": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "sweeps": sweeps,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
