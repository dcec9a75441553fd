"""Shared fixtures: tiny real models (random weights, real architectures) and a temp store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moebench.method import METHODS
from moebench.models import load_model

# Every test run is offline-deterministic: the hub is never consulted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

METHOD_NAMES = METHODS.names()
TINY_MODELS = ["tiny-llama", "tiny-qwen2"]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    if "MOEBENCH_CACHE" not in os.environ:
        os.environ["MOEBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


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
