"""Kill trials: does a sweep survive SIGKILL, of itself or of one worker, without a trace?

Acceptance (from the issue): SIGKILL of the sweep process at random moments, at least 20 trials
over a 4-job tiny sweep, and at least 10 trials killing a worker subprocess; every job ends
`done` exactly once; the adapters of resumed jobs equal those of an uninterrupted sweep bitwise
on CPU; metric and prediction row counts equal the uninterrupted sweep's.

Why it is built this way:

* The reference is the same command run without interruption, in its own fresh store and output
  root. With `--reference-runs 2` it runs twice and the second must equal the first: if two
  clean sweeps differ, a difference after a kill would prove nothing.
* Sweep-kill trial: a fresh store and output root; `moebench sweep` is started as a subprocess in
  its own session, SIGKILLed after a random delay, started again (1 to 3 kills a trial), and
  finally left to finish. One second after each kill /proc is
  searched for a `moebench.worker` still naming the killed process as `--parent`: workers must
  die with their sweep. Delays are drawn over the shortest clean sweep seen so far; a trial
  whose sweep finishes before its first kill is checked like the others but not counted, and
  trials go on until `--trials-sweep` of them had a kill land.
* Worker-kill trial: the sweep runs once; one of its jobs is drawn, and a delay after its claim
  over its reference duration (so it may land in loading, training, checkpointing or scoring);
  then the process named in the job's `owner` is SIGKILLed, after checking that it is a worker
  of this sweep. The sweep is not touched; its pool must start a worker that resumes it.
* The sweeps run a snapshot of the moebench sources taken at start (`--live-tree`: not).
* The checks read the SQLite file with the standard library's sqlite3, not through moebench: a
  bug in the store code cannot then hide itself. Per job: status `done`, one row per spec hash,
  adapter tensors `torch.equal` to the reference job of the same `config_hash`, metric and
  prediction row counts equal, and (beyond the acceptance) their contents equal.
* Where each kill landed is recorded from the store right after it: each running job's last
  checkpoint step, scored sets and heartbeat stage (the stage is up to one heartbeat old).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
MOEBENCH = Path(sys.executable).with_name("moebench")
DEFAULT_SETS = ("train.max_steps=40", "train.checkpoint_every=4", "eval.max_new_tokens=64")
SWEEP_TIMEOUT_S = 600.0  # one invocation; far above a tiny sweep's minute: past it, a hang
POLL_S = 0.1
# Where each package's files sit when installed (pyproject's [tool.setuptools] package-dir).
PACKAGE_DIRS = {"moebench": "moebench", "moebench/methods": "methods", "moebench/tasks": "tasks"}


@dataclass(frozen=True)
class Setup:
    """The sweep every trial runs: same file, overrides and worker count as the reference."""

    sweep_file: Path
    sets: tuple[str, ...]
    workers: int
    threads: int
    sources: Path | None  # a snapshot of the moebench sources to run (None: the working tree)

    def env(self) -> dict[str, str]:
        """One torch thread per worker by default: on a small shared machine, workers with
        several threads each stall at OpenMP barriers whenever another process holds a core."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        if self.sources is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(self.sources), env.get("PYTHONPATH")])
            )
        return env

    def command(self, root: Path) -> list[str]:
        cmd = [str(MOEBENCH), "sweep", str(self.sweep_file), "--db", db_url(root)]
        cmd += ["--output-dir", str(root / "out"), "--workers", str(self.workers)]
        for s in self.sets:
            cmd += ["--set", s]
        return cmd


@dataclass
class Reference:
    """What an uninterrupted sweep produced, per spec hash, and how long clean sweeps took.

    Kill delays are drawn over `expected_s`, the shortest clean sweep seen so far (the
    references, then every trial's first invocation that finished before its kill): on a shared
    machine one slow reference would otherwise send many kills past the end of the sweep.
    """

    jobs: dict[str, dict[str, Any]]
    walls: list[float] = field(default_factory=list)

    @property
    def expected_s(self) -> float:
        return min(self.walls)


def snapshot_sources(dest: Path) -> str:
    """Copy the moebench sources into `dest`, laid out as installed; a digest of the copy.

    A run of this benchmark lasts half an hour in a working tree others may be editing; an edit
    that changes a spec hash (or breaks an import) halfway would make later trials differ from
    the reference for reasons that have nothing to do with kills. On PYTHONPATH the copy is
    found before the editable install, whose finder comes last on sys.meta_path.
    """
    for target, source in PACKAGE_DIRS.items():
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / source, dest / target, ignore=ignore, dirs_exist_ok=True)
    return sources_digest(dest)


def sources_digest(root: Path) -> str:
    """A short digest of a snapshot's package files: which sources a result was measured on.
    Bytecode is left out: running the snapshot writes it."""
    digest = hashlib.sha256()
    files = (root / "moebench").rglob("*")
    for f in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def db_url(root: Path) -> str:
    return f"sqlite:///{root / 'store.db'}"


# --- processes --------------------------------------------------------------------------------

_LIVE: list[subprocess.Popen[bytes]] = []  # sweeps this script started, killed on the way out


def start_sweep(setup: Setup, root: Path, n: int) -> subprocess.Popen[bytes]:
    """Start one invocation; its own session, so stopping this script stops it and its workers."""
    log = (root / f"sweep-{n}.log").open("wb")
    p = subprocess.Popen(
        setup.command(root),
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=setup.env(),
    )
    log.close()
    _LIVE.append(p)
    return p


def finish(p: subprocess.Popen[bytes], timeout: float = SWEEP_TIMEOUT_S) -> int | None:
    """Wait for an invocation; None (and the process group killed) if it hung."""
    try:
        rc: int | None = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = None
    _LIVE.remove(p)  # not on the way out of an interruption: main's cleanup must still see it
    return rc


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return []
    return [] if state == "Z" else raw.decode(errors="replace").split("\0")


def workers_of(parent: int) -> list[int]:
    """Live (not zombie) `moebench.worker` processes started by the sweep with pid `parent`."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        args = _cmdline(int(d.name))
        is_worker = "moebench.worker" in args and "--parent" in args
        if is_worker and args[args.index("--parent") + 1] == str(parent):
            found.append(int(d.name))
    return found


def owner_pid(owner: str | None) -> int | None:
    """The pid in an owner id `host:pid:token`."""
    parts = (owner or "").split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# --- reading the store ------------------------------------------------------------------------


def _query(root: Path, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    path = root / "store.db"
    if not path.is_file():
        return []
    con = sqlite3.connect(path, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    except sqlite3.OperationalError as e:  # not migrated yet (a kill before the tables exist)
        if "no such table" in str(e):
            return []
        raise
    finally:
        con.close()


def read_runs(root: Path) -> list[dict[str, Any]]:
    rows = _query(root, "SELECT * FROM runs ORDER BY id")
    for r in rows:
        for key in ("failures", "progress"):
            r[key] = json.loads(r[key]) if r[key] else None
    return rows


def _ts(text: str | None) -> float | None:
    """A stored timestamp (naive UTC text) as seconds since the epoch."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() if text else None


def _contents(root: Path, table: str, run_id: int) -> list[tuple[str, ...]]:
    """A run's rows of `table` without ids and times, sorted: what must match the reference."""
    rows = _query(root, f"SELECT * FROM {table} WHERE run_id = ?", (run_id,))
    skip = {"id", "run_id", "created_at"}
    return sorted(tuple(f"{k}={v}" for k, v in r.items() if k not in skip) for r in rows)


def job_record(root: Path, run: dict[str, Any]) -> dict[str, Any]:
    metrics = _contents(root, "metrics", run["id"])
    preds = _contents(root, "predictions", run["id"])
    return {
        "id": run["id"],
        "status": run["status"],
        "adapter": str(Path(run["output_dir"] or "-") / "adapter" / "adapter.safetensors"),
        "metrics": metrics,
        "predictions": preds,
        "duration_s": (_ts(run["finished_at"]) or 0.0) - (_ts(run["started_at"]) or 0.0),
    }


def landing(root: Path) -> list[str]:
    """Where a kill found the sweep: each running job's checkpoint step, scored sets, stage."""
    runs = read_runs(root)
    if not runs:
        return ["no store yet (before queueing)"]
    out = []
    for r in runs:
        if r["status"] != "running":
            continue
        sets = _query(
            root, "SELECT COUNT(DISTINCT task) AS n FROM metrics WHERE run_id = ?", (r["id"],)
        )[0]["n"]
        stage = (r["progress"] or {}).get("stage", "no heartbeat progress yet")
        out.append(
            f"job {r['id']}: ckpt {r['last_step'] or 0}, {sets} sets scored, heartbeat: {stage}"
        )
    done = sum(r["status"] == "done" for r in runs)
    return out or [f"no job running ({done} of {len(runs)} done)"]


def verify(root: Path, ref: Reference) -> tuple[list[str], list[dict[str, Any]]]:
    """Every problem with a finished trial's store against the reference, and per-job facts."""
    runs = read_runs(root)
    problems = []
    counts = Counter(r["config_hash"] for r in runs)
    for h, n in counts.items():
        if n != 1:
            problems.append(f"spec {h[:12]} has {n} rows")
    for h in set(ref.jobs) - set(counts):
        problems.append(f"spec {h[:12]} is missing")
    jobs = []
    for r in runs:
        want = ref.jobs.get(r["config_hash"])
        got = job_record(root, r)
        kinds = [f["kind"] for f in r["failures"] or []]
        jobs.append(
            {
                "id": r["id"],
                "attempts": r["attempts"],
                "failures": kinds,
                "resumed_from_step": r["resumed_from_step"],
                "first_finished_at": _ts(r["finished_at"]) if r["attempts"] == 1 else None,
            }
        )
        if want is None:
            problems.append(f"job {r['id']}: spec {r['config_hash'][:12]} not in the reference")
            continue
        if r["status"] != "done":
            problems.append(f"job {r['id']} ended {r['status']}: {r['status_reason']}")
            continue
        problems += [f"job {r['id']}: {p}" for p in _compare(got, want)]
    return problems, jobs


def _compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    problems = []
    for table in ("metrics", "predictions"):
        if len(got[table]) != len(want[table]):
            problems.append(f"{len(got[table])} {table} rows, reference {len(want[table])}")
        elif got[table] != want[table]:
            problems.append(f"{table} rows differ in content from the reference")
    try:
        a, b = load_file(got["adapter"]), load_file(want["adapter"])
    except (OSError, RuntimeError) as e:  # safetensors raises its own error on a torn file
        return [*problems, f"adapter unreadable: {e}"]
    if a.keys() != b.keys():
        problems.append("adapter tensor names differ from the reference")
    elif not all(torch.equal(a[k], b[k]) for k in a):
        differ = sum(not torch.equal(a[k], b[k]) for k in a)
        problems.append(f"adapter differs from the reference in {differ} of {len(a)} tensors")
    return problems


# --- trials -----------------------------------------------------------------------------------


def reference(setup: Setup, root: Path) -> Reference:
    root.mkdir(parents=True)
    t0 = time.monotonic()
    rc = finish(start_sweep(setup, root, 0))
    wall = time.monotonic() - t0
    runs = read_runs(root)
    if rc != 0 or not runs or any(r["status"] != "done" for r in runs):
        raise SystemExit(f"reference sweep failed (rc {rc}); see {root}/sweep-0.log")
    return Reference({r["config_hash"]: job_record(root, r) for r in runs}, [wall])


def sweep_trial(setup: Setup, ref: Reference, rng: random.Random, root: Path) -> dict[str, Any]:
    """Kill the sweep 1-3 times at random delays, then let it finish; check the store."""
    root.mkdir(parents=True)
    planned = rng.randint(1, 3)
    kills: list[dict[str, Any]] = []
    t0 = time.monotonic()
    rc: int | None = None
    for n in range(planned):
        delay = round(rng.uniform(0.5, ref.expected_s), 2)
        p = start_sweep(setup, root, n)
        try:
            rc = p.wait(timeout=delay)  # finished before the kill: the trial ends here
            _LIVE.remove(p)
            if n == 0:
                ref.walls.append(time.monotonic() - t0)
            kills.append({"delay_s": delay, "landed": False})
            break
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            _LIVE.remove(p)
        time.sleep(1.0)
        stray = workers_of(p.pid)
        for pid in stray:  # report, then clear them away so the next invocation starts clean
            os.kill(pid, signal.SIGKILL)
        kills.append({"delay_s": delay, "landed": True, "at": landing(root), "stray": stray})
        kills[-1]["expected_s"] = round(ref.expected_s, 1)
    else:
        rc = finish(start_sweep(setup, root, planned))
    wall = time.monotonic() - t0
    problems, jobs = verify(root, ref)
    if rc != 0:
        problems.append(f"last invocation exited {'by timeout (hang)' if rc is None else rc}")
    problems += [f"stray workers {k['stray']} after a kill" for k in kills if k.get("stray")]
    return {
        "kind": "sweep",
        "kills": kills,
        "rc": rc,
        "wall_s": round(wall, 1),
        "jobs": jobs,
        "problems": problems,
    }


def _pick_target(ref: Reference, rng: random.Random, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One job not done yet (any of them, so lora and loracoe, first and second in their slot,
    are all hit) and a delay after its claim, drawn over its reference duration."""
    done = {r["config_hash"] for r in runs if r["status"] == "done"}
    spec = rng.choice(sorted(set(ref.jobs) - done))
    delay = rng.uniform(0.0, 0.9 * ref.jobs[spec]["duration_s"])
    return {"spec": spec, "delay_s": round(delay, 2)}


def _arm(target: dict[str, Any], runs: list[dict[str, Any]], parent: int) -> None:
    """Once the target job runs under a live worker of this sweep, fix whom to kill and when."""
    row = next((r for r in runs if r["config_hash"] == target["spec"]), None)
    if row and row["status"] == "running" and owner_pid(row["owner"]) in workers_of(parent):
        target["id"], target["owner"] = row["id"], row["owner"]
        target["at"] = (_ts(row["started_at"]) or time.time()) + target["delay_s"]


def worker_trial(setup: Setup, ref: Reference, rng: random.Random, root: Path) -> dict[str, Any]:
    """SIGKILL the worker holding a running job at a random point of it; the sweep carries on."""
    root.mkdir(parents=True)
    t0 = time.monotonic()
    p = start_sweep(setup, root, 0)
    target: dict[str, Any] | None = None
    kill: dict[str, Any] | None = None
    missed = 0
    while p.poll() is None and time.monotonic() - t0 < SWEEP_TIMEOUT_S:
        time.sleep(POLL_S)
        runs = read_runs(root)
        if kill is not None:
            row = next(r for r in runs if r["id"] == kill["job"])
            if "reclaimed_after_s" not in kill and row["owner"] not in (None, kill["owner"]):
                kill["reclaimed_after_s"] = round(time.time() - kill["epoch"], 2)
            continue
        if target is None:
            if runs and any(r["status"] != "done" for r in runs):
                target = _pick_target(ref, rng, runs)
            continue
        if "owner" not in target:
            _arm(target, runs, p.pid)
            continue
        if time.time() < target["at"]:
            continue
        row = next(r for r in runs if r["id"] == target["id"])
        pid = owner_pid(row["owner"])
        alive = pid in workers_of(p.pid)  # never signal a process this sweep did not start
        if row["status"] != "running" or row["owner"] != target["owner"] or not alive:
            missed, target = missed + 1, None  # it ended first: draw again
            continue
        where = landing(root)
        os.kill(pid, signal.SIGKILL)
        kill = {
            "job": target["id"],
            "owner": target["owner"],
            "delay_s": target["delay_s"],
            "epoch": time.time(),
            "at": [w for w in where if w.startswith(f"job {target['id']}:")],
        }
    rc = finish(p, max(1.0, SWEEP_TIMEOUT_S - (time.monotonic() - t0)))
    wall = time.monotonic() - t0
    problems, jobs = verify(root, ref)
    if rc != 0:
        problems.append(f"sweep exited {'by timeout (hang)' if rc is None else rc}")
    if kill is not None:  # (None: every target ended first; the trial does not count)
        killed = next(j for j in jobs if j["id"] == kill["job"])
        # Between reading the row and the signal the job may have been marked done: the kill
        # then hit a worker already exiting, and the job was rightly done once, in one attempt.
        ended = killed["first_finished_at"]
        kill["after_end"] = ended is not None and ended <= kill["epoch"]
        resumed = killed["attempts"] >= 2 and "died" in killed["failures"]
        if not kill["after_end"] and not resumed:
            problems.append(
                f"killed job {kill['job']}: attempts {killed['attempts']}, "
                f"failures {killed['failures']} (expected >= 2 and a 'died')"
            )
        kill.pop("epoch")
    return {
        "kind": "worker",
        "kill": kill,
        "missed": missed,
        "rc": rc,
        "wall_s": round(wall, 1),
        "jobs": jobs,
        "problems": problems,
    }


# --- report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": f"{sha}{' + uncommitted changes' if dirty else ''}",
    }


def _describe(t: dict[str, Any]) -> str:
    if t["kind"] == "sweep":
        kills = [
            f"{k['delay_s']:.1f}s" + ("" if k["landed"] else " (finished first)")
            for k in t["kills"]
        ]
        return ", ".join(kills)
    k = t["kill"]
    if k is None:
        return "none (every drawn job ended first)"
    return f"job {k['job']} +{k['delay_s']:.1f}s" + (" (after it ended)" if k["after_end"] else "")


def _landed(t: dict[str, Any]) -> bool:
    if t["kind"] == "worker":
        return t["kill"] is not None and not t["kill"]["after_end"]
    return any(k["landed"] for k in t["kills"])


def print_summary(trials: list[dict[str, Any]], ref: Reference) -> None:
    print(
        f"\nclean sweeps: {', '.join(f'{w:.1f}' for w in ref.walls)} s; reference jobs "
        + ", ".join(f"{j['id']}: {j['duration_s']:.1f} s" for j in ref.jobs.values())
    )
    print(
        f"{'#':>3} {'kind':6} {'kills (delay after start / claim)':44} {'wall s':>7} "
        f"{'attempts':>9}  outcome"
    )
    for i, t in enumerate(trials, 1):
        attempts = "/".join(str(j["attempts"]) for j in t["jobs"])
        outcome = "pass" if not t["problems"] else "FAIL: " + "; ".join(t["problems"])
        print(
            f"{i:>3} {t['kind']:6} {_describe(t):44} {t['wall_s']:>7.1f} {attempts:>9}  {outcome}"
        )
        where = [w for k in t.get("kills", []) for w in k.get("at", [])]
        where += (t.get("kill") or {}).get("at", [])
        for w in where:
            print(f"{'':11}{w}")
    for kind, need in (("sweep", "sweep-kill"), ("worker", "worker-kill")):
        ts = [t for t in trials if t["kind"] == kind]
        landed = [t for t in ts if _landed(t)]
        ok = [t for t in ts if not t["problems"]]
        kills = sum(k["landed"] for t in ts for k in t.get("kills", [])) + sum(
            kind == "worker" and _landed(t) for t in ts
        )
        print(
            f"{need}: {len(ok)} of {len(ts)} trials pass; {len(landed)} had a kill land "
            f"({kills} kills in all)"
        )
    resumed = Counter(
        j["resumed_from_step"] or 0 for t in trials for j in t["jobs"] if j["attempts"] > 1
    )
    print(
        "jobs claimed more than once, by the checkpoint step they resumed from: "
        + ", ".join(f"step {k}: {n}" for k, n in sorted(resumed.items()))
    )
    reclaim = [
        t["kill"]["reclaimed_after_s"]
        for t in trials
        if "reclaimed_after_s" in (t.get("kill") or {})
    ]
    if reclaim:
        print(
            f"killed job claimed again after: median {statistics.median(reclaim):.2f} s, "
            f"max {max(reclaim):.2f} s"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sweep-file", type=Path, default=REPO / "examples/sweeps/smoke.yaml")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=None,
        help=f"sweep override (repeatable) [default: {' '.join(DEFAULT_SETS)}]",
    )
    ap.add_argument("--workers", type=int, default=2, help="worker slots of the sweep")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument(
        "--trials-sweep", type=int, default=20, help="sweep-kill trials in which a kill landed"
    )
    ap.add_argument(
        "--trials-worker", type=int, default=10, help="worker-kill trials in which a kill landed"
    )
    ap.add_argument(
        "--reference-runs",
        type=int,
        default=2,
        help="uninterrupted sweeps; from the second on each must equal the first",
    )
    ap.add_argument("--quick", action="store_true", help="3 sweep-kill and 2 worker-kill trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None, help="[default: a temporary folder]")
    ap.add_argument("--keep", action="store_true", help="keep passing trials' folders too")
    ap.add_argument(
        "--live-tree",
        action="store_true",
        help="run the working tree's moebench as it is at each moment, not a snapshot of it",
    )
    ap.add_argument(
        "--sources",
        type=Path,
        default=None,
        help="a snapshot from an earlier run (WORK/sources) to run again, instead of taking one",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials_sweep, args.trials_worker, args.reference_runs = 3, 2, 1
    return args


def result(info: dict[str, Any], ref: Reference, checks: list[list[str]], trials: list[Any]) -> str:
    """The JSON file: machine, command, reference, every trial (written after each trial)."""
    jobs = {
        h: {
            "id": j["id"],
            "duration_s": round(j["duration_s"], 2),
            "metrics": len(j["metrics"]),
            "predictions": len(j["predictions"]),
        }
        for h, j in ref.jobs.items()
    }
    info = {
        **info,
        "reference": {"clean_walls_s": ref.walls, "self_checks": checks, "jobs": jobs},
    }
    info["machine"] = {**info["machine"], "loadavg_now": os.getloadavg()}
    return json.dumps({**info, "trials": trials}, indent=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kill-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    sweep_file, sources, digest = args.sweep_file.resolve(), None, "live working tree"
    if args.sources:  # an earlier snapshot, to measure the same code again
        sources, digest = args.sources.resolve(), sources_digest(args.sources)
    elif not args.live_tree:
        sources = work / "sources"
        digest = snapshot_sources(sources)
    if sources is not None:
        sweep_file = Path(shutil.copy(sweep_file, sources / sweep_file.name))
    sets = tuple(args.sets or DEFAULT_SETS)
    setup = Setup(sweep_file, sets, args.workers, args.threads, sources)
    rng = random.Random(args.seed)
    info = {
        "machine": machine(),
        "sources": digest,
        "command": " ".join(setup.command(Path("ROOT"))),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"work dir {work}; moebench sources {digest}\n{info['command']}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    t0 = time.monotonic()
    trials: list[dict[str, Any]] = []
    try:
        ref = reference(setup, work / "reference-0")
        checks = []
        for n in range(1, args.reference_runs):
            ref.walls += reference(setup, work / f"reference-{n}").walls
            checks.append(verify(work / f"reference-{n}", ref)[0])
            print(f"reference {n} vs 0: {checks[-1] or 'equal'}", flush=True)
        for kind, need in (("sweep", args.trials_sweep), ("worker", args.trials_worker)):
            landed = 0
            # A trial whose sweep ended before its kill still checks a clean sweep, but does not
            # count; so trials run until `need` had a kill land (at most 2 x need of them).
            while landed < need and sum(t["kind"] == kind for t in trials) < 2 * need:
                i = len(trials) + 1
                root = work / f"trial-{i:02d}-{kind}"
                trial = (sweep_trial if kind == "sweep" else worker_trial)(setup, ref, rng, root)
                trials.append(trial)
                landed += _landed(trial)
                print(
                    f"trial {i} {kind} ({landed} of {need} landed): {_describe(trial)}, "
                    f"{trial['wall_s']} s, {trial['problems'] or 'pass'}",
                    flush=True,
                )
                if not trial["problems"] and not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(result(info, ref, checks, trials))
    finally:
        for p in list(_LIVE):  # interrupted: stop what this script started, and its workers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    print_summary(trials, ref)
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0 if all(not t["problems"] for t in trials) and not any(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
