"""Parallel sweep workers share one SQLite file: none may fail with "database is locked".

Eight real processes open a fresh file together (so they race to create and migrate it), each
record a run, then log their training steps in small batches as the runner does, all released at
once so their write transactions interleave. Nothing retries around the store: any error a worker
hits is reported back and fails the test.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import select

from moebench.store import create_run, get_training_log, log_steps, open_store
from moebench.store.queries import TRAINING_LOG

WORKERS = 8
ROWS = 500
BATCH = 10  # the runner flushes its log buffer every few steps, not once per run
DEADLINE_S = 120  # the whole test takes a few seconds; only a hung worker reaches this


def _write_one_run(url: str, index: int, barrier: Any, results: Any) -> None:
    """Worker body: open, create a run, log ROWS steps; report (index, run_id, error text)."""
    try:
        barrier.wait(DEADLINE_S)
        store = open_store(url)
        run_id = create_run(
            store,
            method="lora",
            model="tiny-llama",
            suite="concurrency",
            config={"worker": index},
            config_hash=f"worker-{index}",
            seed=index,
            versions={},
            git_sha=None,
            hardware={},
            output_dir=None,
        )
        barrier.wait(DEADLINE_S)
        for start in range(0, ROWS, BATCH):
            rows = [
                {"step": s, "loss": 1.0 / (s + 1), "lr": 1e-4, "tokens": 16 * s}
                for s in range(start, start + BATCH)
            ]
            log_steps(store, run_id, rows)
        store.close()
        results.put((index, run_id, None))
    except BaseException:
        results.put((index, None, traceback.format_exc()))
        barrier.abort()  # the others stop waiting for a worker that will never arrive
        raise


def _run_workers(url: str) -> tuple[list[int | None], dict[int, int], dict[int, str]]:
    """Start every worker at once; return exit codes, run id per worker, error per worker."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_write_one_run, args=(url, i, barrier, results)) for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    run_ids: dict[int, int] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(WORKERS):  # drain before joining, or a full pipe blocks the worker
            index, run_id, error = results.get(timeout=DEADLINE_S)
            if error is None:
                run_ids[index] = run_id
            else:
                errors[index] = error
    finally:
        for p in procs:
            p.join(timeout=DEADLINE_S)
            if p.is_alive():
                p.terminate()
                p.join()
    return [p.exitcode for p in procs], run_ids, errors


def test_eight_processes_write_their_logs_into_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    exit_codes, run_ids, errors = _run_workers(url)

    assert not errors, "\n".join(f"worker {i}:\n{text}" for i, text in sorted(errors.items()))
    assert exit_codes == [0] * WORKERS
    assert sorted(run_ids) == list(range(WORKERS))
    assert len(set(run_ids.values())) == WORKERS
    with open_store(url) as store:
        for run_id in run_ids.values():
            steps = [row["step"] for row in get_training_log(store, run_id)]
            assert steps == list(range(ROWS)), run_id
        with store.session() as session:
            writers = session.scalars(
                select(TRAINING_LOG.c.run_id).order_by(TRAINING_LOG.c.id)
            ).all()
    assert len(writers) == WORKERS * ROWS
    # Row ids follow commit order: workers writing one after another switch WORKERS - 1 times.
    switches = sum(a != b for a, b in itertools.pairwise(writers))
    assert switches > WORKERS - 1, f"the workers wrote one after another ({switches} switches)"
