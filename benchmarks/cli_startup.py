"""Start-up time of the `moebench` commands a researcher types first, before and after.

Acceptance (issue 11, item 5): `moebench methods`, `models` and `tasks` each under 2 s; a
misspelt method refused and `--help` shown as fast as before; an uncached hub id refused offline
within seconds.

How it is measured:
* Each command is a real subprocess (`python -m moebench ...`, this interpreter), timed from
  start to exit with its output captured; a row's figure is the median of `--repeats` runs.
* "Before" is the tree of `--before` (default 915860d, the main branch before this work),
  exported with `git archive` into a temporary folder; "after" is this checkout. Both run with
  PYTHONPATH at their tree and the same interpreter and packages, from an empty working folder.
  (`moebench.methods` and `moebench.tasks` come from the editable install in both cases: a
  PYTHONPATH tree has no `moebench/methods`.)
* Before and after alternate within each repeat, in turn order swapped every repeat, so a
  drift of the shared machine's load falls on both.
* `methods` is timed twice after: with its listing cache filled (the usual case; one untimed
  call fills it) and cold (an empty cache folder for every repeat: imports, fingerprint and the
  write). Both trees get their own cache folder under the temporary root; before has no cache.
* Outputs are compared: a listing must print the same bytes before and after.
* The offline hub row runs with the network as it is (HF_HUB_OFFLINE unset); on a machine with
  no network it is the minute of retries against the one-sentence refusal. It is run
  `--hub-repeats` times (default 1): before, one run takes about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "some-org/not-a-model"


def export_tree(ref: str, dest: Path) -> str:
    """`ref`'s files in `dest` (git archive: no worktree entry, nothing written to the repo)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return sha


def commands(tmp: Path) -> dict[str, list[str]]:
    db = f"sqlite:///{tmp / 'hub.db'}"
    return {
        "--help": ["--help"],
        "run --method lorx": ["run", "--method", "lorx"],
        "methods": ["methods"],
        "models": ["models"],
        "tasks": ["tasks"],
        f"run --model {HUB_ID}": [
            *("run", "--model", HUB_ID, "--db", db, "--output-dir", str(tmp / "runs")),
        ],
    }


def timed(tree: Path, args: list[str], cwd: Path, cache: Path) -> tuple[float, str, str]:
    """(seconds, stdout, stderr) of one `python -m moebench ARGS` against `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "MOEBENCH_CACHE": str(cache), "COLUMNS": "200"}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "moebench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return time.perf_counter() - start, r.stdout, r.stderr


def measure(trees: dict[str, Path], tmp: Path, repeats: int, hub_repeats: int) -> dict:
    """Every row's times for both trees, before and after alternating."""
    work = tmp / "cwd"
    work.mkdir()
    cmds = commands(tmp)
    rows: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, dict[str, str]] = {}
    warm = {side: tmp / f"cache-{side}" for side in trees}
    timed(trees["after"], ["methods"], work, warm["after"])  # fills the listing cache
    plan = [(name, args, "warm") for name, args in cmds.items()]
    plan.insert(3, ("methods (cache cold)", cmds["methods"], "cold"))
    for i in range(max(repeats, hub_repeats)):
        order = list(trees) if i % 2 == 0 else list(reversed(trees))
        for name, args, cache_kind in plan:
            if i >= (hub_repeats if name.startswith("run --model") else repeats):
                continue
            for side in order:
                cache = warm[side]
                if cache_kind == "cold":
                    cache = tmp / f"cold-{side}-{i}"
                secs, out, err = timed(trees[side], args, work, cache)
                rows.setdefault(name, {}).setdefault(side, []).append(secs)
                outputs.setdefault(name, {})[side] = out + err
    same = {name: len(set(o.values())) == 1 for name, o in outputs.items()}
    return {"times": rows, "same_output": same, "last_output": outputs}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(result: dict) -> str:
    lines = [
        "| command | before (median) | after (median) | ratio | same output |",
        "|---|---|---|---|---|",
    ]
    for name, sides in result["times"].items():
        b, a = statistics.median(sides["before"]), statistics.median(sides["after"])
        same = "yes" if result["same_output"][name] else "no"
        if name.startswith("run --model"):
            same = "no: one sentence instead of retries (the change)"
        lines.append(f"| `moebench {name}` | {b:.2f} s | {a:.2f} s | {b / a:.1f}x | {same} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hub-repeats", type=int, default=1)
    p.add_argument("--before", default="915860d", help="git ref of the 'before' tree")
    p.add_argument("--out", type=Path, default=Path("cli_startup.json"))
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cli_startup-"))
    try:
        sha = export_tree(a.before, tmp / "before")
        started = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "load": load()}
        result = measure({"before": tmp / "before", "after": ROOT}, tmp, a.repeats, a.hub_repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    after_sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {
        **started,
        "load_at_end": load(),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "arch": platform.machine()},
        "python": sys.version.split()[0],
        "before": {"ref": a.before, "sha": sha},
        "after": {"sha": after_sha, "dirty": bool(_dirty())},
        "repeats": a.repeats,
        "hub_repeats": a.hub_repeats,
        "times_s": result["times"],
        "same_output": result["same_output"],
        "output_after": {k: v["after"] for k, v in result["last_output"].items()},
    }
    a.out.write_text(json.dumps(record, indent=2))
    print(f"{started['date']}, load {started['load']} -> {record['load_at_end']}")
    print(table(result))
    print(f"written to {a.out}")


def _dirty() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()


if __name__ == "__main__":
    main()
