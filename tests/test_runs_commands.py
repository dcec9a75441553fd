"""`moebench runs checkpoints|log|delete` and `export --format json`'s training log, each checked
against the store's own rows and the files on disk, on two real tiny runs in one store."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.errors import ConfigError
from moebench.paths import MARKER
from moebench.run_admin import checkpoint_table, training_table
from moebench.runner import RunEnv, execute
from moebench.runspec import resolve
from moebench.store import jobs as q

SETS = [
    ("train.batch_size", "4"),
    ("train.micro_batch_size", "4"),
    ("train.checkpoint_every", "1"),
    ("train.keep_checkpoints", "2"),
    ("train.stats_every", "1"),
    ("eval.tasks", "boolq"),
]
CHILD_TABLES = ("metrics", "predictions", "training_log", "checkpoints", "run_artifacts")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A MoE run with a router (3 steps, the first checkpoint pruned) and a LoRA run."""
    root = tmp_path_factory.mktemp("runs")
    url = f"sqlite:///{root / 'r.db'}"
    env = RunEnv(db=url, output_dir=str(root / "out"))
    options = {"model": "tiny-llama", "limit": 2}
    moe = execute(resolve(options={**options, "method": "mixlora", "max_steps": 3}, sets=SETS), env)
    lora = execute(resolve(options={**options, "method": "lora", "max_steps": 1}, sets=SETS), env)
    return {"url": url, "moe": moe, "lora": lora, "root": root}


def _cli(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=stdin)


def _count(s: db.Store, table: str, run_id: int) -> int:
    with s.engine.connect() as conn:
        sql = text(f"SELECT COUNT(*) FROM {table} WHERE run_id = :r")
        return int(conn.execute(sql, {"r": run_id}).scalar_one())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_checkpoints_table_matches_the_stored_rows_and_the_disk(runs: dict[str, Any]) -> None:
    s = db.open_store(runs["url"])
    stored = db.get_checkpoints(s, runs["moe"])
    table = checkpoint_table(s, runs["moe"])
    assert [r["step"] for r in table] == [c["step"] for c in stored] == [1, 2, 3]
    assert [r["path"] for r in table] == [c["path"] for c in stored]
    by_step = {r["step"]: r for r in table}
    assert by_step[1]["state"].startswith("missing") and by_step[1]["bytes"] is None  # pruned
    for step in (2, 3):
        folder = Path(by_step[step]["path"])
        assert by_step[step]["state"] == "valid"
        assert by_step[step]["bytes"] == sum(
            os.path.getsize(folder / f) for f in os.listdir(folder)
        )
    newest = Path(by_step[3]["path"]) / "optimizer.safetensors"
    kept = newest.read_bytes()
    try:
        newest.write_bytes(kept[: len(kept) // 2])
        (cut,) = (r for r in checkpoint_table(s, runs["moe"]) if r["step"] == 3)
        assert cut["state"].startswith("unusable: optimizer.safetensors is truncated")
        assert cut["bytes"] == by_step[3]["bytes"] - (len(kept) - len(kept) // 2)
        r = _cli("runs", "checkpoints", str(runs["moe"]), "--db", runs["url"])
        assert r.exit_code == 0, r.output
        out = " ".join(r.output.split())
        assert "unusable: optimizer.safetensors is truncated" in out and "missing" in out
    finally:
        newest.write_bytes(kept)
    assert by_step[3]["path"].endswith("step-0000003")  # checkpoints live in the run's folder
    assert Path(by_step[3]["path"]).parent.parent == Path(db.get_run(s, runs["moe"])["output_dir"])


def _independent_router_summary(stats: dict[str, float]) -> tuple[int, float, float]:
    """Modules, mean entropy, mean busiest-expert share, computed apart from run_admin."""
    modules = {k[: -len(".entropy")] for k in stats if k.endswith(".entropy")}
    entropy = sum(stats[f"{m}.entropy"] for m in modules) / len(modules)
    top = [max(v for k, v in stats.items() if k.startswith(f"{m}.share.")) for m in modules]
    return len(modules), entropy, sum(top) / len(top)


def test_log_table_is_the_stored_training_log(runs: dict[str, Any]) -> None:
    s = db.open_store(runs["url"])
    stored = db.get_training_log(s, runs["moe"])
    table = training_table(s, runs["moe"])
    assert [r["step"] for r in table] == [r["step"] for r in stored] == [1, 2, 3]
    for row, log in zip(table, stored, strict=True):
        assert (row["loss"], row["lr"], row["tokens"]) == (log["loss"], log["lr"], log["tokens"])
        for k, v in (log["aux_losses"] or {}).items():
            assert row[f"aux {k}"] == v
        modules, entropy, top = _independent_router_summary(log["stats"])
        assert row["routed modules"] == modules > 0
        assert row["gate entropy"] == pytest.approx(entropy, rel=1e-12)
        assert row["top expert share"] == pytest.approx(top, rel=1e-12)
        assert 0 < row["top expert share"] <= 1
    assert [r["step"] for r in training_table(s, runs["moe"], every=2)] == [1, 3]  # and the last
    r = _cli("runs", "log", str(runs["moe"]), "--db", runs["url"])
    assert r.exit_code == 0, r.output
    assert "gate entropy" in r.output and f"{stored[-1]['loss']:.4f}" in r.output
    assert "gate entropy" not in " ".join(training_table(s, runs["lora"])[0])  # LoRA: no router
    r = _cli("runs", "log", str(runs["moe"]), "--every", "0", "--db", runs["url"])
    assert isinstance(r.exception, ConfigError) and "--every 0 must be 1 or more" in str(
        r.exception
    )


def test_export_json_carries_the_training_log(runs: dict[str, Any]) -> None:
    r = _cli("export", "--format", "json", "--run", str(runs["moe"]), "--db", runs["url"])
    assert r.exit_code == 0, r.output
    (doc,) = json.loads(r.output)
    s = db.open_store(runs["url"])
    stored = db.get_training_log(s, runs["moe"])
    assert [row["step"] for row in doc["training_log"]] == [row["step"] for row in stored]
    assert [row["loss"] for row in doc["training_log"]] == [row["loss"] for row in stored]
    assert [row["stats"] for row in doc["training_log"]] == [row["stats"] for row in stored]


def test_delete_asks_refuses_a_live_run_and_removes_only_its_own(runs: dict[str, Any]) -> None:
    s = db.open_store(runs["url"])
    gone, kept = runs["lora"], runs["moe"]
    row = db.get_run(s, gone)
    folder = Path(row["output_dir"])
    assert folder.is_dir() and all(_count(s, t, gone) > 0 for t in ("metrics", "training_log"))
    kept_row = db.get_run(s, kept)
    kept_files = _tree(Path(kept_row["output_dir"]))
    kept_counts = {t: _count(s, t, kept) for t in CHILD_TABLES}

    # declined at the prompt: nothing changes
    r = _cli("runs", "delete", str(gone), "--db", runs["url"], stdin="n\n")
    assert r.exit_code == 1 and "Nothing deleted" in r.output
    assert f"the folder {folder}" in " ".join(r.output.split())
    assert db.get_run(s, gone)["id"] == gone and folder.is_dir()

    # held by a live process (this one, heartbeat now): refused
    db.update_run(s, gone, owner=q.new_owner(), heartbeat_at=datetime.now(UTC))
    r = _cli("runs", "delete", str(gone), "--yes", "--db", runs["url"])
    assert isinstance(r.exception, ConfigError) and "is being run right now" in str(r.exception)
    db.update_run(s, gone, owner=None, heartbeat_at=None)

    # its stored folder taken over by another run: refused, nothing removed
    marker = (folder / MARKER).read_text()
    (folder / MARKER).write_text(json.dumps({"run_id": 99, "created": "x", "store": "y"}))
    r = _cli("runs", "delete", str(gone), "--yes", "--db", runs["url"])
    assert isinstance(r.exception, ConfigError) and "belongs to run 99" in str(r.exception)
    (folder / MARKER).write_text(marker)
    assert db.get_run(s, gone)["id"] == gone

    r = _cli("runs", "delete", str(gone), "--db", runs["url"], stdin="y\n")
    assert r.exit_code == 0, r.output
    assert f"deleted run {gone}" in r.output
    assert not folder.exists()
    assert [x["id"] for x in db.list_runs(s)] == [kept]
    assert all(_count(s, t, gone) == 0 for t in CHILD_TABLES)
    assert {t: _count(s, t, kept) for t in CHILD_TABLES} == kept_counts
    assert _tree(Path(kept_row["output_dir"])) == kept_files
    r = _cli("runs", "delete", str(gone), "--yes", "--db", runs["url"])
    assert r.exit_code != 0 and f"{gone}" in str(r.exception)
