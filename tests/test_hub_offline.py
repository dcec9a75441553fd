"""A hub model id with no hub: refused in one sentence within seconds when it is not cached, loaded
from the cache without waiting on retries when it is (docs: ../shared/docs/offline.md).

"No network" is made the same on every machine: HF_ENDPOINT points at a local port nobody listens
on, so the probe and the hub client both meet a refused connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from moebench import hub
from moebench.errors import ModelError
from moebench.models import load_model, model_config
from tests.test_cli import moebench

SENTENCE = "is not in the local model cache"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def no_hub(tmp_path: Path) -> dict[str, dict[str, str]]:
    """Environments without the hub: offline mode, and a hub that refuses connections."""
    empty = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HTTPS_PROXY": "", "https_proxy": ""}
    return {
        "offline-mode": {**empty, "HF_HUB_OFFLINE": "1"},
        "no-network": {
            **empty,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        },
    }


@pytest.mark.parametrize("kind", ["offline-mode", "no-network"])
def test_an_uncached_hub_id_is_refused_in_one_sentence_within_seconds(
    kind: str, tmp_path: Path
) -> None:
    start = time.monotonic()
    r = moebench(
        "run",
        "--model",
        "some-org/not-a-model",
        "--db",
        f"sqlite:///{tmp_path / 'r.db'}",
        "--output-dir",
        str(tmp_path / "runs"),
        cwd=tmp_path,
        env=no_hub(tmp_path)[kind],
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: Model 'some-org/not-a-model' " + SENTENCE), r.stderr
    assert "offline" in lines[0] and "tiny-llama" in lines[0]
    # Before this check the hub client retried for about a minute; the loose bound leaves room
    # for a loaded machine.
    assert elapsed < 20, f"{elapsed:.1f} s"


def test_loading_and_shapes_refuse_an_uncached_id_the_same_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model named in a config file reaches these without the CLI's early check."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (load_model, model_config):
        with pytest.raises(ModelError, match=f"'some-org/not-a-model' {SENTENCE}.*HF_HUB_OFFLINE"):
            call("some-org/not-a-model")


def test_the_probe_tells_a_refused_hub_from_one_that_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    reason = hub.offline_reason()
    assert reason is not None and reason.startswith("127.0.0.1 cannot be reached")
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.offline_reason() is None


def _hub_cache(root: Path, repo: str, model: object, tok: object) -> None:
    """The hub cache's layout (models--org--name, refs/main -> a snapshot), as a download
    leaves it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    model.save_pretrained(folder / "snapshots" / commit)  # type: ignore[attr-defined]
    tok.save_pretrained(folder / "snapshots" / commit)  # type: ignore[attr-defined]
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_a_cached_hub_model_loads_without_waiting_on_the_hub(tmp_path: Path) -> None:
    model, tok = load_model("tiny-llama")
    env = no_hub(tmp_path)["no-network"]
    _hub_cache(Path(env["HF_HUB_CACHE"]), "test-org/tiny-llama", model, tok)
    code = (
        "import time\n"
        "from moebench.models import load_model\n"
        "start = time.monotonic()\n"
        "m, _ = load_model('test-org/tiny-llama')\n"
        "print(time.monotonic() - start)\n"
        "print(repr(sum(float(p.detach().double().sum()) for p in m.parameters())))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    seconds, checksum = r.stdout.split()
    assert float(checksum) == sum(float(p.detach().double().sum()) for p in model.parameters())
    # Each file the hub client looks up would wait ~23 s of retries (about 200 s in all here).
    assert float(seconds) < 20, seconds
