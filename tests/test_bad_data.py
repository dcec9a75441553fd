"""A bad data file stops a run with one sentence naming the file and the row, before any work.

Each case corrupts one file of a small LLM-Adapters folder and runs `moebench run --suite
la-offline` on it; an earlier run in the same store must come out untouched and no half-made run
may be left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench import store
from tests.test_cli import _one_clean_error, moebench
from tests.test_suites import small_la_folder


def _rows(path: Path) -> list[dict[str, object]]:
    return json.loads(path.read_text())


def _wrong_fields(data: Path) -> tuple[str, str]:
    p = data / "piqa" / "test.json"
    rows = _rows(p)
    rows[3] = {"question": "no instruction here", "answer": "solution1"}
    p.write_text(json.dumps(rows))
    return "piqa/test.json", "Row 3"


def _empty(data: Path) -> tuple[str, str]:
    (data / "ARC-Easy" / "train.json").write_text("[]")
    return "ARC-Easy/train.json", "empty"


def _truncated(data: Path) -> tuple[str, str]:
    p = data / "social_i_qa" / "test.json"
    p.write_text(p.read_text()[:-700])
    return "social_i_qa/test.json", "truncated"


def _non_numeric_gold(data: Path) -> tuple[str, str]:
    p = data / "gsm8k" / "test.json"
    rows = _rows(p)
    rows[2]["answer"] = "seventy"
    p.write_text(json.dumps(rows))
    return "gsm8k/test.json", "Row 2"


def _training_row(data: Path) -> tuple[str, str]:
    p = data / "openbookqa" / "train.json"
    rows = _rows(p)
    rows[5]["output"] = ["not", "a", "string"]
    p.write_text(json.dumps(rows))
    return "openbookqa/train.json", "row 5"


@pytest.mark.parametrize(
    "corrupt", [_wrong_fields, _empty, _truncated, _non_numeric_gold, _training_row]
)
def test_bad_file_is_one_sentence_and_loses_nothing(tmp_path: Path, corrupt) -> None:  # type: ignore[no-untyped-def]
    data = small_la_folder(tmp_path / "la", rows=12)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    s = store.open_store(db)
    earlier = store.create_run(
        s,
        method="lora",
        model="m",
        suite="mini",
        config={"a": 1},
        config_hash="h" * 64,
        seed=1,
        versions={},
        git_sha=None,
        hardware={},
        output_dir=None,
        status="done",
    )
    store.add_metrics(
        s,
        earlier,
        [
            {
                "task": "boolq",
                "metric": "accuracy",
                "value": 0.5,
                "n": 2,
                "stderr": None,
                "protocol": "p",
                "protocol_detail": None,
            }
        ],
    )
    file, row = corrupt(data)
    r = moebench(
        "run",
        "--suite",
        "la-offline",
        "--data-dir",
        str(data),
        "--model",
        "tiny-llama",
        "--max-steps",
        "1",
        "--db",
        db,
        cwd=tmp_path,
    )
    _one_clean_error(r, file, row)
    message = " ".join(r.stderr.split())
    assert message.count(". ") <= 1, message  # one sentence (a path may hold dots, not ". ")
    runs = store.list_runs(s)
    assert [x["id"] for x in runs] == [earlier]
    assert store.get_metrics(s, earlier)[0]["value"] == 0.5


def test_deeply_nested_json_is_one_sentence_naming_the_file(tmp_path: Path) -> None:
    from moebench.errors import DataError
    from moebench.jsonfiles import read_json_array

    path = tmp_path / "nested.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"nested\.json nests arrays or objects too deeply"):
        read_json_array(path)
