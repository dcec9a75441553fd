"""The allocation-stability report: counting modules whose expert count changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench import allocation
from moebench.cli import app
from moebench.errors import NotFoundError
from moebench.store import open_store
from moebench.store.queries import create_run, put_artifact

Q = "model.layers.{}.self_attn.q_proj"


def test_compare_counts_changed_modules_over_the_union() -> None:
    a = {Q.format(0): 2, Q.format(1): 0, Q.format(2): 1}
    b = {Q.format(0): 2, Q.format(1): 1, Q.format(3): 1}  # layer 2 missing = 0, layer 3 new
    got = allocation.compare(a, b)
    assert got["differ_names"] == [Q.format(1), Q.format(2), Q.format(3)]
    assert (got["modules"], got["differ"], got["experts"]) == (4, 3, [3, 4])


def test_stability_pairs_change_one_setting_at_a_time() -> None:
    maps = {
        ("authors", 0): {Q.format(0): 1, Q.format(1): 0},
        ("authors", 1): {Q.format(0): 1, Q.format(1): 1},
        ("clean", 0): {Q.format(0): 0, Q.format(1): 1},
        ("clean", 1): {Q.format(0): 0, Q.format(1): 1},
    }
    rows = allocation.stability(maps)
    got = {(r["between"], r["a"], r["b"]): r["differ"] for r in rows}
    assert got == {
        ("seed", "authors seed 0", "authors seed 1"): 1,
        ("protocol", "authors seed 0", "clean seed 0"): 2,
        ("protocol", "authors seed 1", "clean seed 1"): 1,
        ("seed", "clean seed 0", "clean seed 1"): 0,
    }


def _run(store, alloc: dict[str, int] | None, protocol: str, seed: int) -> int:  # type: ignore[no-untyped-def]
    run_id = create_run(
        store,
        method="lora-smoe",
        model="tiny-llama",
        suite="mini",
        config={},
        config_hash=f"{seed}{protocol}".ljust(64, "0"),
        seed=seed,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
        status="done",
    )
    if alloc is not None:
        art = {"modules": alloc, "protocol": protocol, "seed": seed}
        put_artifact(store, run_id, "allocation", art)
    return run_id


def test_cli_compares_two_stored_runs(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    store = open_store(db)
    a = _run(store, {Q.format(0): 2, Q.format(1): 0, Q.format(2): 1}, "authors", 0)
    b = _run(store, {Q.format(0): 1, Q.format(1): 0, Q.format(2): 0}, "clean", 0)
    plain = _run(store, None, "clean", 0)
    runner = CliRunner()
    out = runner.invoke(app, ["analyze", "allocation", str(a), str(b), "--db", db])
    assert out.exit_code == 0, out.output
    assert "2 of 3" in out.output and "3 / 1" in out.output and "protocol" in out.output
    one = runner.invoke(app, ["analyze", "allocation", str(a), "--db", db])
    assert "3 experts on 2 of 3 modules" in one.output
    with pytest.raises(NotFoundError, match=f"Run {plain} has no allocation map"):
        allocation.run_allocation(store, plain)
