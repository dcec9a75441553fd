"""The queue: exactly one claimant per job, dead owners seen and taken over, resume refused while
the owner lives, produced records kept apart from the spec (and moved there by migration 0005)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.errors import ConfigError
from moebench.runner import RunEnv, execute, resume, submit
from moebench.runspec import resolve
from moebench.store import jobs as q
from moebench.store.db import migrate
from tests.conftest import StopAt
from tests.test_store import POSTGRES_ENV, _wipe_postgres

SPEC = {"model": "tiny-llama", "max_steps": 4, "limit": 1}
SETS = [("train.batch_size", "8"), ("train.checkpoint_every", "2"), ("eval.tasks", "boolq")]


def _queue(store: db.Store, n: int, sweep: str | None = "s") -> list[int]:
    """n jobs of distinct specs (one per seed), queued without loading anything."""
    specs = [resolve(options={"model": "tiny-llama", "seed": seed}) for seed in range(n)]
    return [submit(store, spec, RunEnv(), sweep=sweep) for spec in specs]


def _claimer(url: str, start: Any, out: Any) -> None:
    store = db.open_store(url)
    owner = q.new_owner()
    start.wait()
    got = []
    while (row := q.claim(store, owner, sweep="s")) is not None:
        got.append(row["id"])
        q.release(store, row["id"], owner, "done", None)
    out.put(got)


@pytest.fixture(params=["sqlite", "postgres"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store's URL: a SQLite file always, PostgreSQL when a scratch server is given."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.db'}"
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        pytest.skip(f"set {POSTGRES_ENV} to a scratch PostgreSQL database to run this")
    _wipe_postgres(url)
    return url


def test_four_workers_claiming_one_queue_never_share_a_job(queue_url: str) -> None:
    url = queue_url
    ids = _queue(db.open_store(url), 60)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()  # all four ready before any claims
    procs = [ctx.Process(target=_claimer, args=(url, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    flat = [i for got in claimed for i in got]
    assert sorted(flat) == ids  # every job once, none twice
    assert sum(1 for got in claimed if got) >= 2  # they really competed
    rows = q.list_jobs(db.open_store(url), sweep="s")
    assert {r["status"] for r in rows} == {"done"} and {r["attempts"] for r in rows} == {1}


def test_a_dead_owners_job_is_claimed_again_and_the_death_recorded(queue_url: str) -> None:
    url = queue_url
    store = db.open_store(url)
    (run_id,) = _queue(store, 1)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moebench import store as db; from moebench.store import jobs"
            " as q; s = db.open_store(sys.argv[1]); q.claim(s, q.new_owner()); print('held',"
            " flush=True); time.sleep(600)",
            url,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert q.claim(store, q.new_owner()) is None  # its owner is alive: not claimable
    assert q.count_claimable(store) == (0, 1)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    row = q.claim(store, "me:1:x")
    assert row is not None and row["id"] == run_id and row["attempts"] == 2
    (death,) = db.get_run(store, run_id)["failures"]
    assert death["kind"] == "died" and str(holder.pid) in death["reason"]


def test_a_stale_heartbeat_from_another_host_counts_as_dead() -> None:
    now = q.utcnow()
    fresh, stale = now, now - timedelta(seconds=q.STALE_AFTER_S + 1)
    assert q.owner_alive("elsewhere:1:t", fresh, now)
    assert not q.owner_alive("elsewhere:1:t", stale, now)
    assert not q.owner_alive(None, fresh, now)
    # on this host the pid decides at once, heartbeat or not
    assert q.owner_alive(q.new_owner(), fresh, now)


def test_liveness_reads_the_stores_clock_not_the_workers(
    queue_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on another machine whose clock runs 10 minutes slow still looks alive to the
    others on PostgreSQL: its claim and heartbeats are stamped by the server's clock."""
    store = db.open_store(queue_url)
    (run_id,) = _queue(store, 1)
    slow = q.utcnow() - timedelta(minutes=10)
    with monkeypatch.context() as m:
        m.setattr(q, "utcnow", lambda: slow)  # the slow machine's view of the time
        far = "far-host/0/0:4242:t"  # another host: only the heartbeat can show it alive
        assert q.claim(store, far) is not None
        assert q.heartbeat(store, run_id, far)
    beat = db.get_run(store, run_id)["heartbeat_at"]
    if store.engine.dialect.name == "postgresql":
        assert abs(beat - q.utcnow()) < timedelta(seconds=30)
        assert q.claim(store, q.new_owner()) is None  # not taken from a live owner
        assert q.count_claimable(store) == (0, 1)
    else:  # a SQLite file has no clock of its own: each writer stamps with its host's
        assert beat == slow


def test_cancel_is_seen_by_the_owners_next_heartbeat(tmp_path: Path) -> None:
    store = db.open_store(f"sqlite:///{tmp_path / 'c.db'}")
    (run_id,) = _queue(store, 1)
    owner = q.new_owner()
    assert q.claim(store, owner) is not None
    assert q.heartbeat(store, run_id, owner, progress={"step": 1})
    assert q.cancel(store, run_id) == "running"
    assert not q.heartbeat(store, run_id, owner)
    assert db.get_run(store, run_id)["status"] == "cancelled"
    with pytest.raises(ConfigError, match="only an unfinished job"):
        q.cancel(store, run_id)


def test_resume_of_a_run_whose_owner_is_alive_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = db.open_store(url)
    (run_id,) = _queue(store, 1, sweep=None)
    assert q.claim(store, q.new_owner()) is not None  # held by this (living) process
    with pytest.raises(ConfigError, match=f"Run {run_id} is being run right now by process"):
        resume(run_id, RunEnv(db=url))
    assert db.get_run(store, run_id)["status"] == "running"


@pytest.mark.slow
def test_produced_records_live_apart_from_the_spec_and_survive_migration(tmp_path: Path) -> None:
    """A run interrupted at head; the database taken back to revision 0004 (where `_data` and
    `_prepared` lived in the config) and up again; the run resumes and its records are where
    they belong, its spec clean, wall time summed over both processes."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    spec = resolve(options={**SPEC, "method": "lora-smoe"}, sets=SETS)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, RunEnv(db=url, output_dir=str(tmp_path / "out")), StopAt(3))
    store = db.open_store(url)
    (run,) = db.list_runs(store)
    first_wall = run["wall_time_s"]
    assert run["status"] == "interrupted" and first_wall > 0
    assert not any(k.startswith("_") for k in run["config"])
    produced = db.get_produced(store, run["id"])
    assert produced.data and produced.prepared and produced.budget is None
    migrate(store.engine, "0004")
    with store.engine.connect() as conn:
        config = conn.execute(text("SELECT config FROM runs")).scalar_one()
    assert '"_data"' in config and '"_prepared"' in config
    store = db.open_store(url)  # upgrades to head again
    (run,) = db.list_runs(store)
    assert not any(k.startswith("_") for k in run["config"])
    assert run["config_hash"] == spec.hash
    assert db.get_produced(store, run["id"]) == produced
    assert resume(run["id"], RunEnv(db=url)) == run["id"]
    run = db.get_run(store, run["id"])
    assert run["status"] == "done" and run["resumed_from_step"] == 2
    assert run["wall_time_s"] > first_wall and run["attempts"] == 2


def test_jobs_on_a_missing_or_empty_database_say_so_in_one_sentence(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "nope.db"
    r = runner.invoke(app, ["jobs", "--db", str(missing)])
    assert r.exit_code != 0 and isinstance(r.exception, Exception)
    assert f"There is no results database at '{missing}'" in str(r.exception)
    assert not missing.exists()  # a read command creates nothing
    empty = tmp_path / "empty.db"
    db.open_store(str(empty))
    r = runner.invoke(app, ["jobs", "--db", str(empty)])
    assert r.exit_code == 0 and "holds no jobs" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_jobs_list_show_cancel_retry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.db'}"
    store = db.open_store(url)
    a, b = _queue(store, 2)
    runner = CliRunner()
    r = runner.invoke(app, ["jobs", "--db", url])
    assert r.exit_code == 0 and r.output.count("queued") == 2
    r = runner.invoke(app, ["jobs", "cancel", str(a), "--db", url])
    assert r.exit_code == 0 and f"job {a} cancelled (was queued)" in r.output
    r = runner.invoke(app, ["jobs", "retry", str(a), "--db", url])
    assert r.exit_code == 0 and db.get_run(store, a)["status"] == "queued"
    q.add_failure(store, b, kind="error", reason="boom in step 3")
    r = runner.invoke(app, ["jobs", "show", str(b), "--db", url])
    assert r.exit_code == 0 and "[error]" in r.output and "boom in step 3" in r.output


def test_a_cancelled_job_cannot_be_queued_again_while_its_owner_lives(tmp_path: Path) -> None:
    store = db.open_store(f"sqlite:///{tmp_path / 'cr.db'}")
    (run_id,) = _queue(store, 1)
    owner = q.new_owner()
    assert q.claim(store, owner) is not None
    q.cancel(store, run_id)
    with pytest.raises(ConfigError, match="still held by process"):
        q.requeue(store, run_id, "retry")
    assert q.claim(store, q.new_owner(), run_id=run_id, any_unfinished=True) is None
    # the owner's own ending does not overwrite the cancel
    assert not q.release(store, run_id, owner, "done", None)
    assert db.get_run(store, run_id)["status"] == "cancelled"


@pytest.mark.slow
def test_a_resume_that_cannot_open_leaves_the_run_as_it_was(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    spec = resolve(options=SPEC, sets=SETS)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, RunEnv(db=url, output_dir=str(tmp_path / "out")), StopAt(3))
    store = db.open_store(url)
    (run,) = db.list_runs(store)
    # a stored value this moebench no longer accepts: the spec cannot be opened
    broken = {**run["config"], "train": {**run["config"]["train"], "lr": -1.0}}
    db.update_run(store, run["id"], config=broken)
    with pytest.raises(ConfigError, match=r"lr=-1\.0 is out of range.*\(0, 1\]"):
        resume(run["id"], RunEnv(db=url))
    after = db.get_run(store, run["id"])
    assert (after["status"], after["status_reason"]) == ("interrupted", run["status_reason"])
    assert after["owner"] is None and [f["kind"] for f in after["failures"]] == ["interrupted"]


def test_one_sweep_never_holds_two_jobs_of_one_spec(queue_url: str) -> None:
    """Two machines submitting the same sweep file at once: the second submission of a spec is
    refused by the store itself, so no job is queued (and run) twice."""
    store = db.open_store(queue_url)
    spec = resolve(options={"model": "tiny-llama"})
    first = submit(store, spec, RunEnv(), sweep="s")
    with pytest.raises(q.AlreadyQueued):
        submit(store, spec, RunEnv(), sweep="s")
    submit(store, spec, RunEnv(), sweep="other")  # another sweep may hold the same spec
    submit(store, spec, RunEnv())  # and so may plain runs, any number of them
    submit(store, spec, RunEnv())
    plain = [r for r in q.list_jobs(store) if r["sweep"] is None]
    assert not q.adopt(store, plain[0]["id"], "s")  # "s" has this spec already
    assert [r["id"] for r in q.list_jobs(store, sweep="s")] == [first]


def _early_worker(url: str, cwd: Path, wait_s: float) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "moebench.worker", "--db", url, "--sweep", "s"]
    return subprocess.Popen(
        [*cmd, "--wait-s", str(wait_s)], cwd=cwd, stdout=subprocess.PIPE, text=True
    )


def test_a_worker_started_before_its_job_is_queued_claims_it_when_it_comes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = db.open_store(url)  # the store exists before the worker starts, as prestart asks
    worker = _early_worker(url, tmp_path, 120)
    spec = resolve(options={**SPEC, "max_steps": 2}, sets=SETS)
    run_id = submit(store, spec, RunEnv(output_dir=str(tmp_path / "out")), sweep="s")
    assert worker.wait(timeout=300) == 0
    row = db.get_run(store, run_id)
    assert row["status"] == "done" and row["attempts"] == 1
    from moebench.worker import log_path

    # The early worker, not another process, ran it.
    assert f"attempt 1 of run {run_id} as" in log_path(row).read_text()
    assert f":{worker.pid}:" in log_path(row).read_text()


def test_an_early_worker_with_nothing_to_claim_leaves_after_its_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    db.open_store(url)
    from moebench.worker import EXIT_NOTHING

    assert _early_worker(url, tmp_path, 0.5).wait(timeout=120) == EXIT_NOTHING


def test_an_early_worker_sent_away_before_the_store_exists_creates_nothing(tmp_path: Path) -> None:
    from moebench.worker import EXIT_NOTHING, start_early

    path = tmp_path / "never.db"
    early = start_early(f"sqlite:///{path}")
    early.retire()  # what a sweep does when its file turns out bad
    assert early.popen.wait(timeout=120) == EXIT_NOTHING
    early.output()
    assert not path.exists()
