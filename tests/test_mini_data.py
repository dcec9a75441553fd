"""The packaged mini suite: small, valid, train/eval disjoint, traceable and reproducible."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moebench.prompts import build_prompt
from moebench.task import TASKS, get_task
from moebench.tasks import MINI_DIR, MINI_EVAL_TASKS, MINI_TRAIN_FILE

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_DATA = REPO.parent / "shared" / "data" / "llm-adapters"


def rows_of(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def keys(instruction: str) -> set[str]:
    """The whole instruction and its first paragraph (the question without its choices), both
    lowercased with everything but letters and digits squeezed out: written independently of
    the generator's `question_key` so that the two check each other."""
    squeeze = lambda text: re.sub(r"[^a-z0-9]", "", text.lower())  # noqa: E731
    return {squeeze(instruction), squeeze(instruction.strip().split("\n\n")[0])}


def eval_files() -> list[Path]:
    return sorted(MINI_DIR.glob("*/test.json"))


def test_total_size_is_well_under_2_mb() -> None:
    total = sum(p.stat().st_size for p in MINI_DIR.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


def test_eval_files_are_exactly_the_declared_tasks() -> None:
    folders = {p.parent.name for p in eval_files()}
    assert folders == {get_task(name).folder for name in MINI_EVAL_TASKS}


@pytest.mark.parametrize("name", MINI_EVAL_TASKS)
def test_eval_file_loads(name: str) -> None:
    task = get_task(name)
    items = task.load_items(task.test_file(MINI_DIR))
    assert len(items) == (16 if task.family == "commonsense" else 8)
    assert len({it.instruction for it in items}) == len(items)


def test_train_rows_are_valid_and_labelled() -> None:
    rows = rows_of(MINI_TRAIN_FILE)
    assert set(rows[0]) == {"instruction", "input", "output", "answer", "task"}
    counts: dict[str, int] = {}
    for row in rows:
        task = get_task(row["task"])
        assert all(isinstance(row[k], str) for k in ("instruction", "input", "output", "answer"))
        prompt = build_prompt("alpaca", row["instruction"], row["input"])
        assert task.score(prompt, row["output"], row["answer"]).correct, row
        counts[task.family] = counts.get(task.family, 0) + 1
    assert counts == {"commonsense": 160, "math": 80}
    # shuffled: the first 20 rows are not all from one task
    assert len({row["task"] for row in rows[:20]}) > 1


def test_train_and_eval_share_no_row_or_question() -> None:
    train_keys = set().union(*(keys(r["instruction"]) for r in rows_of(MINI_TRAIN_FILE)))
    for path in eval_files():
        for i, row in enumerate(rows_of(path)):
            assert not keys(row["instruction"]) & train_keys, (path, i)


def test_train_has_no_duplicate_question() -> None:
    firsts = [sorted(keys(r["instruction"]))[0] for r in rows_of(MINI_TRAIN_FILE)]
    assert len(set(firsts)) == len(firsts)


def test_licence_and_readme() -> None:
    upstream_licence = UPSTREAM_DATA / "DATA_LICENSE"
    licence = MINI_DIR / "DATA_LICENSE"
    assert "Open Data Commons Attribution License" in licence.read_text(encoding="utf-8")
    if upstream_licence.exists():
        assert licence.read_bytes() == upstream_licence.read_bytes()
    readme = (MINI_DIR / "README.md").read_text(encoding="utf-8")
    for fact in ("LLM-Adapters", "Hu et al.", "816657208af4", "ODC-By", "make_mini.py", "seed"):
        assert fact in readme


needs_upstream = pytest.mark.skipif(
    not UPSTREAM_DATA.exists(), reason=f"{UPSTREAM_DATA} not available"
)


@needs_upstream
def test_manifest_points_at_identical_upstream_rows() -> None:
    manifest = rows_of(MINI_DIR / "manifest.json")
    cache: dict[str, list[dict[str, Any]]] = {}
    for mini_name, refs in manifest["rows"].items():
        mini_rows = rows_of(MINI_DIR / mini_name)
        assert len(refs) == len(mini_rows)
        for ref, row in zip(refs, mini_rows, strict=True):
            source, index = ref.split("#")
            if source not in cache:
                cache[source] = rows_of(UPSTREAM_DATA / source)
            upstream = cache[source][int(index)]
            assert {k: row[k] for k in upstream} == upstream


@needs_upstream
def test_train_avoids_every_full_commonsense_test_question() -> None:
    train_keys = set().union(*(keys(r["instruction"]) for r in rows_of(MINI_TRAIN_FILE)))
    for name, task in TASKS:
        path = task.test_file(UPSTREAM_DATA)
        if task.family == "commonsense" and path.exists():
            for row in rows_of(path):
                assert not keys(row["instruction"]) & train_keys, (name, row["instruction"])


@needs_upstream
def test_make_mini_reproduces_the_packaged_files(tmp_path: Path) -> None:
    script = REPO / "scripts" / "make_mini.py"
    subprocess.run(
        [sys.executable, str(script), str(UPSTREAM_DATA), "--out", str(tmp_path)],
        check=True,
        env=os.environ.copy(),
    )
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    packaged = sorted(p.relative_to(MINI_DIR) for p in MINI_DIR.rglob("*") if p.is_file())
    assert made == packaged
    for rel in made:
        assert filecmp.cmp(tmp_path / rel, MINI_DIR / rel, shallow=False), rel
