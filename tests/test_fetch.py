"""Data on a worker that has none: suite files fetched over HTTP from a real server on the
loopback address (no other network), kept only whole and with the sha256 the suite records; and
the OrcaMath reader on a local copy in the hub's own layout."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moebench import fetch, upstream
from moebench.errors import DataError
from moebench.sources import export_hub_dataset, read_rows
from moebench.suites import get_suite, resolve
from tests.conftest import shared_data_or_skip

LA4 = ("boolq", "ARC-Challenge", "ARC-Easy", "openbookqa")


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror folder; /short/<name> sends half the body of a declared length."""

    def do_GET(self) -> None:
        if self.path.startswith("/short/"):
            body = b"[" + b'{"instruction": "x"},' * 500
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder in the upstream repository's layout, served on 127.0.0.1, named as the mirror;
    an empty cache and no data folder, as on a fresh worker."""
    root = tmp_path / "mirror"
    (root / "dataset").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(upstream.MIRROR_ENV, f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOEBENCH_DATA", raising=False)
    yield root
    server.shutdown()
    server.server_close()


def _copy_upstream(root: Path, folders: tuple[str, ...]) -> None:
    shared = shared_data_or_skip()
    for folder in folders:
        shutil.copytree(shared / folder, root / "dataset" / folder)


def _cached(tmp_path: Path) -> list[Path]:
    cache = tmp_path / "cache"
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_a_worker_without_data_fetches_a_suite_verified(mirror: Path, tmp_path: Path) -> None:
    _copy_upstream(mirror, LA4)
    resolved = resolve(get_suite("la-commonsense4"), None)
    fetched = [p for p, _ in resolved.train_files] + list(resolved.eval_files.values())
    assert len(fetched) == 8 and all(p.is_relative_to(tmp_path / "cache") for p in fetched)
    for path in fetched:
        rel = path.relative_to(tmp_path / "cache" / "data" / "llm-adapters")
        served = mirror / "dataset" / rel
        assert path.read_bytes() == served.read_bytes()
        want = upstream.SHA256[f"dataset/{rel.as_posix()}"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == want
    assert _cached(tmp_path) == sorted(fetched)  # no temporary file left beside them
    assert len(resolved.suite.train) == 4
    rows, _, _ = resolved.training_pool()
    assert len(rows) == 9427 + 1119 + 2251 + 4957  # the files' own row counts (shared README)


def test_a_changed_upstream_file_is_refused_in_one_sentence(mirror: Path, tmp_path: Path) -> None:
    _copy_upstream(mirror, LA4)
    test = mirror / "dataset" / "boolq" / "test.json"
    test.write_bytes(test.read_bytes().replace(b'"true"', b'"false"', 1))
    with pytest.raises(DataError) as e:
        resolve(get_suite("la-commonsense4"), None, ("boolq",))
    msg = str(e.value)
    digest = hashlib.sha256(test.read_bytes()).hexdigest()
    assert "\n" not in msg and msg.count(". ") == 0 and msg.endswith(".")
    assert f"dataset/boolq/test.json has sha256 {digest}" in msg
    assert upstream.SHA256["dataset/boolq/test.json"] in msg
    assert not (tmp_path / "cache" / "data" / "llm-adapters" / "boolq" / "test.json").exists()
    assert not [p for p in _cached(tmp_path) if "test" in p.name]


def test_an_interrupted_download_leaves_no_file(mirror: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "data" / "x.json"
    url = upstream.base_url() + "short/x.json"
    with pytest.raises(DataError, match=r"connection closed after 5250 bytes.*nothing was kept"):
        fetch.download(url, dest)
    assert list(dest.parent.iterdir()) == []


def test_an_unreachable_mirror_is_one_sentence_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(upstream.MIRROR_ENV, "http://127.0.0.1:9/")  # discard port: refused
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOEBENCH_DATA", raising=False)
    with pytest.raises(DataError) as e:
        resolve(get_suite("la-commonsense4"), None, ("boolq",))
    assert "needs 'boolq/train.json'" in str(e.value) and "http://127.0.0.1:9/" in str(e.value)
    assert _cached(tmp_path) == []


def test_the_orca_math_reader_on_a_local_copy_in_the_hubs_layout(tmp_path: Path) -> None:
    """`datasets` reads the hub repository's layout (data/train-*.parquet, question and answer
    columns) from a local folder exactly as it reads it from the hub."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    repo = tmp_path / "orca-math-word-problems-200k"
    (repo / "data").mkdir(parents=True)
    questions = [f"Tom has {i} apples and buys {i + 2} more. How many now?" for i in range(5)]
    answers = [f"Tom has {i} + {i + 2} = {2 * i + 2} apples." for i in range(5)]
    table = pa.table({"question": questions, "answer": answers})
    pq.write_table(table, repo / "data" / "train-00000-of-00001.parquet")
    dest = tmp_path / "cache" / "orca_math_200k.json"
    export_hub_dataset(str(repo), "train", ("question", "answer"), dest)
    rows = read_rows("orca-math", dest, "math")
    assert [(r.instruction, r.input, r.output, r.task) for r in rows] == [
        (q, "", a, "math") for q, a in zip(questions, answers, strict=True)
    ]
    assert [p.name for p in dest.parent.iterdir()] == ["orca_math_200k.json"]
