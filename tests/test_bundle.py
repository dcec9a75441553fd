"""Bundles: export from one store, import into another twice, one identical copy of each run."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.errors import ConfigError
from moebench.store.bundle import import_bundle, run_identity
from tests.test_leaderboard_data import seed_store


def _content(url: str) -> dict[str, dict]:
    """identity -> everything of the run but store-local ids."""
    out = {}
    with db.open_store(url) as store:
        for run in db.list_runs(store, limit=None):
            rid = run["id"]

            def strip(rows: list[dict]) -> list[tuple]:
                keep = [{k: v for k, v in r.items() if k not in ("id", "run_id")} for r in rows]
                return sorted(repr(sorted(r.items())) for r in keep)

            out[run_identity(run)] = {
                "run": {k: v for k, v in run.items() if k not in ("id", "updated_at")},
                "metrics": strip(db.get_metrics(store, rid)),
                "predictions": strip(db.get_predictions(store, rid)),
                "log": strip(db.get_training_log(store, rid)),
                "artifacts": db.get_artifacts(store, rid),
            }
    return out


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_export_import_twice_leaves_one_identical_copy(tmp_path: Path) -> None:
    source = seed_store(tmp_path / "cluster.db")
    target = f"sqlite:///{tmp_path / 'laptop.db'}"
    bundle = tmp_path / "runs.bundle.gz"
    _cli("export", "--db", source, "--bundle", str(bundle))
    first = _cli("import", str(bundle), "--db", target)
    second = _cli("import", str(bundle), "--db", target)
    original = _content(source)
    assert f"imported {len(original)} runs" in first
    assert "imported 0 runs" in second and f"{len(original)} were already there" in second
    moved = _content(target)
    assert moved.keys() == original.keys()
    for identity, record in original.items():
        assert moved[identity]["metrics"] == record["metrics"]
        assert moved[identity]["predictions"] == record["predictions"]
        assert moved[identity] == record
    # Back into the store it came from: nothing is added.
    assert "imported 0 runs" in _cli("import", str(bundle), "--db", source)


def test_bad_bundle_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"format": "other"}\n')
    result = CliRunner().invoke(app, ["import", str(bad), "--db", str(tmp_path / "t.db")])
    assert result.exit_code != 0
    assert "is not a moebench bundle" in str(result.exception) + result.output
    missing = CliRunner().invoke(app, ["import", str(tmp_path / "none.gz")])
    assert "does not exist" in str(missing.exception) + missing.output


@pytest.mark.parametrize("run_ids", [["--run", "999"]])
def test_unknown_run_is_refused(tmp_path: Path, run_ids: list[str]) -> None:
    source = seed_store(tmp_path / "a.db")
    result = CliRunner().invoke(
        app, ["export", "--db", source, "--bundle", str(tmp_path / "b.gz"), *run_ids]
    )
    assert result.exit_code != 0
    assert "no such run" in str(result.exception) + result.output


def _runs_in(url: str) -> int:
    with db.open_store(url) as store:
        return len(db.list_runs(store, limit=None))


@pytest.mark.parametrize("cut", ["mid-stream", "whole-line"])
def test_a_truncated_bundle_adds_nothing(tmp_path: Path, cut: str) -> None:
    """Truncation is caught before any run is written: by gzip mid-stream, by the header's run
    count where whole lines are missing."""
    source = seed_store(tmp_path / "cluster.db")
    bundle = tmp_path / "runs.bundle.gz"
    _cli("export", "--db", source, "--bundle", str(bundle))
    bad = tmp_path / "cut.gz"
    if cut == "mid-stream":
        bad.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
        expected = "not a readable moebench bundle"
    else:
        with gzip.open(bundle, "rt") as f:
            lines = f.readlines()
        with gzip.open(bad, "wt") as f:
            f.writelines(lines[:-1])
        expected = f"holds {len(lines) - 2} of the {len(lines) - 1} runs"
    target = f"sqlite:///{tmp_path / 'laptop.db'}"
    db.open_store(target).close()  # an existing, empty store
    result = CliRunner().invoke(app, ["import", str(bad), "--db", target])
    assert result.exit_code != 0
    assert expected in str(result.exception) + result.output
    assert _runs_in(target) == 0


def test_export_refuses_a_missing_store_and_a_folder_path(tmp_path: Path) -> None:
    """A mistyped --db is not created (and exported as 0 runs); a folder given as the bundle
    is one sentence; a missing folder is made, as `moebench export --out` makes it."""
    nothere = tmp_path / "nothere.db"
    result = CliRunner().invoke(
        app, ["export", "--db", str(nothere), "--bundle", str(tmp_path / "b.gz")]
    )
    assert result.exit_code != 0 and not nothere.exists() and not (tmp_path / "b.gz").exists()
    assert str(nothere) in str(result.exception) + result.output
    source = seed_store(tmp_path / "a.db")
    result = CliRunner().invoke(app, ["export", "--db", source, "--bundle", str(tmp_path)])
    assert result.exit_code != 0
    assert f"--bundle {tmp_path} is a folder" in str(result.exception) + result.output
    result = CliRunner().invoke(app, ["export", "--db", source, "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a folder" in str(result.exception) + result.output
    _cli("export", "--db", source, "--bundle", str(tmp_path / "no" / "b.gz"))
    assert "imported" in _cli(
        "import", str(tmp_path / "no" / "b.gz"), "--db", str(tmp_path / "c.db")
    )


def test_an_edited_bundle_adds_nothing_and_creates_no_store(tmp_path: Path) -> None:
    """A line whose columns no longer match its identity (edited by hand), or that is not a
    run line at all, is found before the store is opened: no run is added, no file made."""
    import json

    source = seed_store(tmp_path / "cluster.db")
    bundle = tmp_path / "runs.bundle.gz"
    _cli("export", "--db", source, "--bundle", str(bundle))
    with gzip.open(bundle, "rt") as f:
        lines = f.readlines()
    for name, fault, message in (
        ("edited", lambda line: {**line, "run": {**line["run"], "seed": 99}}, "edited?"),
        ("malformed", lambda line: {"identity": line["identity"]}, "malformed"),
    ):
        bad = tmp_path / f"{name}.gz"
        last = json.loads(lines[-1])
        with gzip.open(bad, "wt") as f:
            f.writelines([*lines[:-1], json.dumps(fault(last)) + "\n"])
        target = tmp_path / f"{name}.db"
        result = CliRunner().invoke(app, ["import", str(bad), "--db", str(target)])
        assert result.exit_code != 0
        assert message in str(result.exception) + result.output
        assert not target.exists()
        db.open_store(f"sqlite:///{target}").close()
        with db.open_store(f"sqlite:///{target}") as store, pytest.raises(ConfigError):
            import_bundle(store, bad)  # the library, called on its own, refuses it too
        assert _runs_in(f"sqlite:///{target}") == 0
