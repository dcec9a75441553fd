"""Every way a results store can be unusable ends in one sentence naming it and the fix, with no
traceback; read commands never create a database, `run` and `sweep` say when they do.

In-process through typer's CliRunner (the `MoebenchError` it catches is what `main` prints as
one line), and through real `python -m moebench` processes where the process is the point: a
read-only location (run as an unprivileged user when the tests run as root, since root writes
anywhere) and a driver missing from the interpreter."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench import store as db
from moebench.cli import app
from moebench.errors import MoebenchError, NotFoundError, StoreError

NOBODY = 65534


def _cli(*args: str) -> tuple[int, str, BaseException | None]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output, r.exception


def _refused(args: list[str], error: type[MoebenchError], *needles: str) -> str:
    code, _, exc = _cli(*args)
    assert code != 0 and isinstance(exc, error), exc
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _moebench(
    *args: str, cwd: Path, unprivileged: bool = False, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """`moebench ARGS` in a fresh interpreter; `prelude` runs first (an import blocker)."""
    code = f"{prelude}\nimport sys\nfrom moebench.cli import main\n"
    code += f"sys.argv = ['moebench', *{args!r}]\nmain()"
    return subprocess.run(
        [*(_unprivileged() if unprivileged else []), sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _unprivileged() -> list[str]:
    """The prefix that runs a command as nobody when the tests run as root (root writes
    anywhere, so a read-only file would not be read-only to it); nothing otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def _python(code: str, cwd: Path) -> str:
    """Run `code` as an unprivileged user (when the tests run as root); its stdout."""
    r = subprocess.run(
        [*_unprivileged(), sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _one_sentence(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    message = " ".join(r.stderr.split())
    assert message.startswith("error:"), message
    for needle in needles:
        assert needle in message, message
    return message


# --- a file that is not a store, a folder, a misspelt path -------------------------------------


def test_a_corrupt_database_file_is_named_and_left_alone(tmp_path: Path) -> None:
    bad = tmp_path / "results.db"
    garbage = bytes(range(256)) * 40
    bad.write_bytes(garbage)
    for args in (["runs", "list"], ["export"], ["jobs"]):
        _refused([*args, "--db", str(bad)], StoreError, f"'{bad}' is not a SQLite database")
    with pytest.raises(StoreError, match="is not a SQLite database"):
        db.open_store(str(bad))  # what `run` and `sweep` open
    assert bad.read_bytes() == garbage


def test_a_folder_given_as_the_database(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    _refused(
        ["runs", "list", "--db", str(folder)],
        StoreError,
        f"'{folder}' is a folder, not a file",
        str(folder / "moebench.db"),
    )
    with pytest.raises(StoreError, match="is a folder"):
        db.open_store(f"sqlite:///{folder}")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "list"],
        ["runs", "show", "1"],
        ["runs", "summary"],
        ["export", "--format", "json"],
        ["compare", "1", "2"],
        ["jobs"],
        ["eval", "1", "--lm-eval-tasks", "boolq"],
        ["run", "--resume", "1"],
        ["run", "--rerun", "1"],
    ],
)
def test_read_commands_never_create_a_database(tmp_path: Path, args: list[str]) -> None:
    typo = tmp_path / "resluts.db"
    _refused(
        [*args, "--db", str(typo)],
        NotFoundError,
        f"There is no results database at '{typo}'",
        "`moebench run` or `moebench sweep` creates one",
    )
    assert list(tmp_path.iterdir()) == []


def test_an_empty_file_is_not_taken_for_a_store_by_a_read(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    _refused(["runs", "list", "--db", str(empty)], NotFoundError, "holds no moebench results")
    assert empty.stat().st_size == 0


# --- created only by run and sweep, and they say so ---------------------------------------------


def test_open_store_says_whether_it_created_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deep' / 'new.db'}"
    assert db.open_store(url).created is True
    assert db.open_store(url).created is False
    assert db.open_existing_store(url).created is False


@pytest.mark.slow
def test_run_says_it_created_a_store(tmp_path: Path) -> None:
    new = tmp_path / "new.db"
    code, out, exc = _cli(
        "run",
        *("--model", "tiny-llama", "--max-steps", "1", "--limit", "1"),
        *("--set", "train.batch_size=4", "--set", "eval.tasks=boolq"),
        *("--db", str(new), "--output-dir", str(tmp_path / "out")),
    )
    assert code == 0, exc
    assert f"created a new results store at sqlite:///{new}" in " ".join(out.split())
    (row,) = db.list_runs(db.open_existing_store(str(new)))
    assert row["status"] == "done"


def test_sweep_says_it_created_a_store(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\naxes:\n  method: [lora]\n  model: tiny-llama\n")
    new = tmp_path / "sweep.db"
    code, out, exc = _cli("sweep", str(sweep), "--db", str(new), "--queue-only")
    assert code == 0, exc
    assert f"created a new results store at sqlite:///{new}" in " ".join(out.split())
    code, out, exc = _cli("sweep", str(sweep), "--db", str(new), "--queue-only")
    assert code == 0 and "created a new results store" not in out, exc


# --- read-only --------------------------------------------------------------------------------


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder an unprivileged user can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="moebench-ro-"))
    folder.chmod(0o755)
    yield folder
    for p in folder.rglob("*"):
        p.chmod(0o777) if p.is_dir() else None
    shutil.rmtree(folder)


def _read_only_store(folder: Path, *, folder_writable: bool) -> Path:
    folder.mkdir(mode=0o755)
    path = folder / "ro.db"
    db.open_store(str(path)).close()
    for extra in ("-wal", "-shm"):
        Path(f"{path}{extra}").unlink(missing_ok=True)
    path.chmod(0o444)
    folder.chmod(0o777 if folder_writable else 0o555)
    return path


def test_read_only_files_and_folders_are_named(public_dir: Path) -> None:
    """A read-only file in a read-only folder (even a read fails: WAL needs its -shm file), a
    read-only file in a writable folder (reads work; `run` and `sweep` are refused before they
    write), and a store to be created in a folder that cannot be written."""
    locked = _read_only_store(public_dir / "locked", folder_writable=False)
    file_only = _read_only_store(public_dir / "file-only", folder_writable=True)
    before = file_only.read_bytes()
    cannot = public_dir / "locked" / "new" / "moebench.db"
    r = _moebench("runs", "list", "--db", str(locked), cwd=public_dir, unprivileged=True)
    _one_sentence(r, f"The results database '{locked}' is read-only", "make the file and its")
    out = _python(
        "from moebench.store import open_existing_store, open_store\n"
        "from moebench.errors import StoreError\n"
        f"for opener, path in [(open_store, {str(locked)!r}), (open_store, {str(file_only)!r}),"
        f" (open_store, {str(cannot)!r}), (open_existing_store, {str(file_only)!r})]:\n"
        "    try:\n        print('opened', opener(path).url)\n"
        "    except StoreError as e:\n        print(type(e).__name__, e)\n",
        public_dir,
    )
    lines = out.splitlines()
    assert lines[0].startswith(f"StoreError The results database '{locked}' is read-only")
    assert lines[1].startswith(f"StoreError The results database '{file_only}' is read-only")
    assert (
        lines[2].startswith("StoreError The results database") and "Permission denied" in lines[2]
    )
    assert lines[3] == f"opened sqlite:///{file_only}"  # reading it is fine
    assert file_only.read_bytes() == before and not cannot.parent.exists()
    assert stat.S_IMODE(file_only.stat().st_mode) == 0o444


# --- PostgreSQL: a server that does not answer, a driver that is not there ---------------------


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_postgres_server_that_does_not_answer(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://moebench@127.0.0.1:{_dead_port()}/results?connect_timeout=2"
    start = time.monotonic()
    message = _refused(
        ["runs", "list", "--db", url],
        StoreError,
        f"The database server for {url} does not answer",
        "Connection refused",
        "start it, or check the host, port",
    )
    assert time.monotonic() - start < 10
    with pytest.raises(StoreError, match="does not answer"):
        db.open_store(url)
    assert "password" not in message.lower()


def test_a_password_in_the_url_is_masked(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://moebench:s3cret@127.0.0.1:{_dead_port()}/r?connect_timeout=2"
    message = _refused(["runs", "list", "--db", url], StoreError, "does not answer")
    assert "s3cret" not in message and "***" in message


def test_a_missing_postgres_driver_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails
    _refused(
        ["runs", "list", "--db", "postgresql+psycopg://u@127.0.0.1:1/x"],
        StoreError,
        "needs the Python driver 'psycopg', which is not installed",
        "pip install 'moebench[postgres]'",
    )


BLOCK_PSYCOPG = """
import importlib.abc, sys
class _NoPsycopg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoPsycopg())
"""


def test_a_missing_postgres_driver_in_a_real_process(tmp_path: Path) -> None:
    url = "postgresql+psycopg://u@127.0.0.1:1/x"
    r = _moebench("runs", "list", "--db", url, cwd=tmp_path, prelude=BLOCK_PSYCOPG)
    _one_sentence(r, f"The results database {url} needs the Python driver 'psycopg'")


def test_an_unknown_url_scheme(tmp_path: Path) -> None:
    _refused(["runs", "list", "--db", "postgress://u@h/x"], StoreError, "scheme 'postgress'")
