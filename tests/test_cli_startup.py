"""The commands a researcher types first start without torch (issue 11: each under 2 s; torch and
transformers alone take seconds to import). Asserted on what is imported, not on the clock, so
a loaded machine cannot make it flaky; benchmarks/cli_startup.py has the times."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_method_listing import imported

HEAVY = {"torch", "transformers", "datasets"}


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        (["--help"], True),
        (["models"], True),
        (["tasks"], True),
        (["run", "--method", "lorx"], False),
    ],
    ids=["help", "models", "tasks", "misspelt-method"],
)
def test_a_first_command_imports_no_torch(args: list[str], ok: bool, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "moebench", *args],
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode == 0) == ok, r.stderr[-2000:]
    assert not HEAVY & imported(r)
