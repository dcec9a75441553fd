"""A bad data file stops a run with one sentence naming the file and the row, before any work.

Each case corrupts one file of a small LLM-Adapters folder and runs `moebench run --suite
la-offline` on it (in-process; the 50 MB line as the real command, its memory watched); an
earlier run in the same store must come out untouched and no half-made run may be left behind,
and the refusal must not cost more memory than a run's start does. Files of pathological shape
(nesting, binary bytes, a file over the bound, JSON lines, a million rows) are read directly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from moebench import jsonfiles, store
from moebench.errors import DataError
from moebench.jsonfiles import MAX_DEPTH, MAX_FILE_BYTES, MAX_ROW_CHARS, read_json_array
from moebench.task import get_task
from tests.conftest import invoke, run_watched
from tests.test_cli import _one_clean_error
from tests.test_scoring import assert_one_sentence
from tests.test_suites import small_la_folder

# A refused run peaks at about 430 MiB (torch and transformers imported, no weights loaded);
# the reader before issue 11 passed 4 GiB on the 50 MB line below (23 GB on the machine,
# until the kernel killed it).
RUN_PEAK_MB = 1536


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


def _huge_line(data: Path) -> tuple[str, str]:
    """One 50 MB question in a one-line file, written a megabyte at a time."""
    p = data / "piqa" / "test.json"
    rows = _rows(p)
    rows[3]["instruction"] = "HUGE"
    before, after = json.dumps(rows).split('"HUGE"')
    with p.open("w") as f:
        f.write(before + '"')
        for _ in range(50):
            f.write("word " * 200_000)
        f.write('"' + after)
    row_3 = len(json.dumps(rows[:3])[:-1] + ", ")  # where json.dumps starts row 3
    return "piqa/test.json", f"row 3 (from line 1, column {row_3 + 1}, byte {row_3})"


@pytest.mark.parametrize(
    "corrupt", [_wrong_fields, _empty, _truncated, _non_numeric_gold, _training_row, _huge_line]
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
    run = ["run", "--suite", "la-offline", "--data-dir", str(data), "--model", "tiny-llama"]
    run += ["--max-steps", "1", "--db", db, "--output-dir", str(tmp_path / "runs")]
    if corrupt is _huge_line:  # the memory case runs as the real command, its peak watched
        r, peak_mb = run_watched(
            [sys.executable, "-m", "moebench", *run], cwd=tmp_path, limit_mb=RUN_PEAK_MB
        )
        assert peak_mb < RUN_PEAK_MB
        _one_clean_error(r, file, row)
        message = " ".join(r.stderr.split())
    else:  # in-process: a fresh interpreter per case costs seconds and tests nothing more
        code, text = invoke(run)
        message = " ".join(text.split())
        assert code != 0 and file in message and row in message, message
    assert message.count(". ") <= 1, message  # one sentence (a path may hold dots, not ". ")
    runs = store.list_runs(s)
    assert [x["id"] for x in runs] == [earlier]
    assert store.get_metrics(s, earlier)[0]["value"] == 0.5


def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def _first_bad_byte(blob: bytes) -> int:
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    raise AssertionError("the blob is valid UTF-8")


GARBAGE = random.Random(0).randbytes(4096)
HEAD = b'[{"instruction": "caf\xc3\xa9", "output": "o"},\n '


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (_nested(100_000).encode(), ["row 0 nests arrays or objects too deeply"]),
        (f"[1, {_nested(MAX_DEPTH + 1)}]".encode(), ["row 1 nests", f"more than {MAX_DEPTH}"]),
        (GARBAGE, ["not UTF-8 text", f"offset {_first_bad_byte(GARBAGE)} of the file"]),
        (HEAD + GARBAGE, [f"offset {len(HEAD) + _first_bad_byte(GARBAGE)} of the file"]),
        (b"\0" * 4096, ["is not a JSON array of rows (it begins with '\\x00')"]),
        (f'[1, "{"x" * MAX_ROW_CHARS}"]'.encode(), ["row 1 (from line 1, column 5, byte 4)"]),
    ],
    ids=["nesting", "one-too-deep", "binary", "binary-later", "nul-bytes", "long-row"],
)
def test_pathological_file_is_one_sentence_naming_file_and_place(
    tmp_path: Path, content: bytes, needles: list[str]
) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_json_array(path)
    assert_one_sentence(err, f"Data file {path}", *needles)


def test_nesting_up_to_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(f"[{_nested(MAX_DEPTH)}]")
    assert read_json_array(path) == json.loads(path.read_text())


def test_a_file_over_the_bound_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with path.open("wb") as f:  # sparse: no disk is used
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(DataError) as err:
        read_json_array(path)
    assert_one_sentence(err, str(path), f"{MAX_FILE_BYTES + 1:,} bytes, over the")


ROWS = [
    {"instruction": f"Frage {i}: naïve café – “quoted” 😀 [{i}]", "input": "", "answer": i * 1.5e3}
    for i in range(30)
]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, jsonfiles.CHUNK_BYTES])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_rows_and_error_places_agree_with_json_whatever_the_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, ascii_only: bool
) -> None:
    """Rows split anywhere across chunks (mid escape, mid character) read as `json` reads
    them, and a file cut anywhere names the place `json` names, with its byte offset."""
    monkeypatch.setattr(jsonfiles, "CHUNK_BYTES", chunk)
    text = json.dumps(ROWS, indent=4, ensure_ascii=ascii_only)
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    assert read_json_array(path) == ROWS
    for cut in range(40, len(text), 97 if chunk > 3 else 301):
        path.write_text(text[:cut], encoding="utf-8")
        with pytest.raises(json.JSONDecodeError) as expected:
            json.loads(text[:cut])
        e = expected.value
        where = f"line {e.lineno}, column {e.colno}, byte {len(text[: e.pos].encode())}"
        with pytest.raises(DataError) as err:
            read_json_array(path)
        assert_one_sentence(err, str(path), "is not valid JSON", where)


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        (b'{"prompt": "' + b"x" * MAX_ROW_CHARS + b'"}', ["(from byte 1) is longer than"]),
        (GARBAGE[:64], ["not UTF-8 text", f"offset {1 + _first_bad_byte(GARBAGE)} of the file"]),
        (_nested(5000).encode(), ["nests arrays or objects too deeply"]),
        (f'{{"kwargs": [{_nested(MAX_DEPTH)}]}}'.encode(), ["nests arrays or objects too deeply"]),
    ],
    ids=["long-line", "binary", "nesting", "one-too-deep"],
)
def test_pathological_json_line_is_one_sentence_naming_file_and_line(
    tmp_path: Path, line: bytes, needles: list[str]
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n" + line.replace(b"\n", b" ") + b"\n")  # row 0 is on line 2
    with pytest.raises(DataError) as err:
        get_task("ifeval").load_items(path)
    assert_one_sentence(err, f"Row 0 (line 2) of {path}", *needles)


MILLION = 1_000_000
_ROW = '{{"instruction": "Question {0}: is it true?", "input": "", "output": "the answer is {0}"}}'
# The child reads the file and reports what its rows hold (sys.getsizeof over the rows, their
# attribute dicts and their strings; "" and None are shared singletons) and checks every row.
_READ_A_MILLION = """
import json, sys
from pathlib import Path
from moebench.data import load_training_rows
status = Path("/proc/self/status").read_text().split("VmRSS:")[1]
imported = int(status.split()[0]) / 1024  # resident now, not the import's high-water mark
rows = load_training_rows(Path(sys.argv[1]))
one = sys.getsizeof(rows[0]) + sys.getsizeof(rows[0].__dict__)  # the same for every row
strings = sum(sys.getsizeof(r.instruction) + sys.getsizeof(r.output) for r in rows)
held = sys.getsizeof(rows) + len(rows) * one + strings
ok = all(
    (r.instruction, r.input, r.output, r.task)
    == (f"Question {i}: is it true?", "", f"the answer is {i}", None)
    for i, r in enumerate(rows)
)
print(json.dumps({"rows": len(rows), "ok": ok, "held_mb": held / 2**20, "imported_mb": imported}))
"""


def test_a_million_rows_are_read_holding_little_more_than_the_rows(tmp_path: Path) -> None:
    """The reader keeps only the rows it returns, never the file's text or its parsed dicts.

    Bound: the child's peak less its resident size after import is at most twice what the rows
    hold, a guard against copies piling up rather than a tight fit. Measured over the import for
    rows holding 300 MiB: 271 MiB (idle machine) and 411 MiB (CI under two xdist workers, where the
    allocator returned less); the whole-file reader before issue 11 took 461 MiB, which this bound
    would also pass: the 50 MB line in test_bad_file_is_one_sentence_and_loses_nothing is the
    case it failed.
    """
    path = tmp_path / "million.json"
    with path.open("w") as f:
        f.write("[")
        for start in range(0, MILLION, 100_000):
            f.write("," if start else "")
            f.write(",".join(_ROW.format(i) for i in range(start, start + 100_000)))
        f.write("]")
    r, peak_mb = run_watched(
        [sys.executable, "-c", _READ_A_MILLION, str(path)], cwd=tmp_path, limit_mb=RUN_PEAK_MB
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rows"] == MILLION and report["ok"]
    assert peak_mb - report["imported_mb"] < 2 * report["held_mb"], (peak_mb, report)
