"""Shared fixtures: tiny real models (random weights, real architectures) and a temp store."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moebench.data import Example
from moebench.errors import MoebenchError
from moebench.inject import Adapted, prepare_and_inject
from moebench.method import METHODS, PrepareContext, get_method
from moebench.models import load_model

# Every test run is offline-deterministic: the hub is never consulted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

POSTGRES_ENV = "MOEBENCH_TEST_POSTGRES_URL"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n 2`), each worker gets a scratch PostgreSQL database of its own.

    The store tests wipe their database before use; two workers wiping and filling one database
    at once would see each other's rows. The worker's database is the given one's name plus the
    worker id (`moebench_test_gw0`), created on first use; subprocesses inherit the variable.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    url = os.environ.get(POSTGRES_ENV)
    if worker and url:
        os.environ[POSTGRES_ENV] = _worker_database(url, worker)


def _worker_database(url: str, worker: str) -> str:
    from sqlalchemy import create_engine, make_url, text

    base = make_url(url)
    name = f"{base.database}_{worker}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if found.first() is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


METHOD_NAMES = METHODS.names()
TINY_MODELS = ["tiny-llama", "tiny-qwen2"]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    if "MOEBENCH_CACHE" not in os.environ:
        os.environ["MOEBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


_QUIET_NAMES = ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
_QUIET_AT_START = {name: os.environ.get(name) for name in _QUIET_NAMES}


def _restore_quiet_settings() -> None:
    for name, value in _QUIET_AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _quiet_settings_stay_in_their_test() -> Iterator[None]:
    """A quiet CLI command sets these for the processes it starts (`cli._quiet_libraries`); one
    run in-process must not carry them into another test's subprocesses. Restored to what the
    session started with before each test too: a module-scoped fixture that runs the CLI
    in-process sets them before any test's own fixture sees them."""
    _restore_quiet_settings()
    yield
    _restore_quiet_settings()


def invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """`moebench ARGS` in-process, ended as `moebench.cli.main` ends it: (exit code, what the user
    reads). A `MoebenchError` is the one line main prints; any other exception is a bug and
    re-raises, so a case that would print a traceback fails its test. In-process because a fresh
    interpreter costs about 5 s of torch and transformers imports per command; the real-command
    cases (`tests/test_cli.py`, `test_the_real_command_prints_one_line`) keep the subprocess."""
    from typer.testing import CliRunner

    from moebench.cli import app

    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", **(env or {})})
    error = result.exception
    if isinstance(error, MoebenchError):
        return error.exit_code, str(error)
    if error is not None and not isinstance(error, SystemExit):
        raise error
    return result.exit_code, result.output


@pytest.fixture
def tiny(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return load_model(getattr(request, "param", "tiny-llama"))


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"


def shared_data_or_skip() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the LLM-Adapters files at {SHARED_DATA} (CI has them beside the repo)")
    return SHARED_DATA


def synthetic_examples(vocab: int, n: int = 8, length: int = 10) -> tuple[list[Example], list[str]]:
    """Random token rows from two task types (boolq: knowledge 1, gsm8k: 0), for preparation
    stages and task-aware layers on models that have no tokenizer."""
    g = torch.Generator().manual_seed(0)
    examples, tasks = [], []
    for i in range(n):
        ids = tuple(torch.randint(3, vocab, (length - i % 3,), generator=g).tolist())
        task = ("boolq", "gsm8k")[i % 2]
        examples.append(Example(ids, ids, 1 - i % 2))
        tasks.append(task)
    return examples, tasks


def adapt(model: torch.nn.Module, method: str, config: object | None = None) -> Adapted:
    """Adapt a model the way the runner does: the method's preparation stage, then inject."""
    m = get_method(method)
    examples, tasks = synthetic_examples(model.config.vocab_size)
    ctx = PrepareContext(
        model=model,
        examples=examples,
        tasks=tasks,
        model_name=f"test-{type(model).__name__}-{model.config.hidden_size}",
        seed=0,
        cache_dir=Path(os.environ["MOEBENCH_CACHE"]),
        device=torch.device("cpu"),
        autocast=None,
    )
    adapted, _ = prepare_and_inject(model, m, config or m.config_cls(), ctx)
    return adapted


class StopAt:
    """An observer that interrupts a run at one training step, as a Ctrl-C there would."""

    def __init__(self, step: int) -> None:
        self.at = step

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def step(self, s: Any) -> None:
        if s.step == self.at:
            raise KeyboardInterrupt


def poisoned_model(folder: Path) -> Path:
    """tiny-llama saved with one weight set to inf: its first step diverges, every time."""
    model, tok = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("inf"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def as_from_a_terminal() -> None:
    """`preexec_fn` for a child that must see Ctrl-C as a terminal's foreground job does.

    A suite started in the background (`cmd &`, `nohup`) inherits an ignored SIGINT, and Python
    then installs no KeyboardInterrupt handler in the child at all: a test that sends SIGINT
    would watch the child (and its workers) shrug it off and finish with exit 0.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_watched(
    cmd: list[str], *, cwd: Path, limit_mb: float, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `cmd` as a child, killed if its memory passes `limit_mb`; (its result, peak MiB).

    The peak is the child's own `ru_maxrss` as `wait4` reports it, so a spike between two polls
    still counts; the polling (VmHWM, Linux) only keeps a runaway child from taking the machine
    down, as one 50 MB data line once did (23 GB).
    """
    out, err = cwd / "child.stdout", cwd / "child.stderr"
    env = {**os.environ, "COLUMNS": "200"}
    with out.open("w") as o, err.open("w") as e:
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=o, stderr=e)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if _high_water_mb(child.pid) > limit_mb or time.monotonic() > deadline:
            child.kill()
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(cmd, child.returncode, out.read_text(), err.read_text())
    return result, usage.ru_maxrss / 1024  # kB on Linux


def _high_water_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")), 0)
    return int(kb) / 1024
