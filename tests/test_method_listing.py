"""`moebench methods` from its cache prints what importing every plugin prints, and any edit to a
method's code (a built-in file, an installed plugin) rebuilds the cache.

The expected tables are rendered here the way the CLI rendered them before the cache existed
(moebench 915860d): straight from each imported config class.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moebench.config import accepted_values, field_help
from moebench.evaluate import EvalConfig
from moebench.method import METHODS
from moebench.plugin_fingerprint import digest, fingerprint, source_stats
from moebench.train import TrainConfig
from tests.conftest import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]
LOOP_TABLES = {
    "train": (
        "train.* (the loop; --set train.KEY=VALUE; a suite may set its own defaults, "
        "see `moebench tasks`)",
        TrainConfig,
    ),
    "eval": ("eval.* (scoring; --set eval.KEY=VALUE)", EvalConfig),
}


def imported_table(title: str, cls: type) -> str:
    """One table as the CLI printed it from the imported class (width 200: not a terminal)."""
    out = io.StringIO()
    table = Table(title=title, title_justify="left")
    for col in ("field", "default", "accepted", "help"):
        table.add_column(col)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        accepted = escape(accepted_values(cls, f.name))
        table.add_row(f.name, escape(str(default)), accepted, field_help(cls, f.name))
    Console(file=out, width=200).print(table)
    return out.getvalue()


def list_methods(
    env: dict[str, str], cwd: Path, *, importtime: bool = False
) -> subprocess.CompletedProcess:
    """`moebench methods` in a subprocess; `cwd` matters: `-m` imports from it first."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "moebench", "methods"],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def imported(r: subprocess.CompletedProcess) -> set[str]:
    """Top-level packages a `-X importtime` run imported."""
    names = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    return {n.split(".")[0] for n in names}


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`moebench methods` printed twice with an empty cache folder: once by importing (which
    fills the cache), once from the cache, which must not import torch."""
    root = tmp_path_factory.mktemp("listing")
    env = {"MOEBENCH_CACHE": str(root / "cache")}
    cold = list_methods(env, root)
    assert cold.returncode == 0, cold.stderr
    assert list((Path(env["MOEBENCH_CACHE"]) / "listings").glob("methods-*.json"))
    warm = list_methods(env, root, importtime=True)
    assert warm.returncode == 0, warm.stderr
    assert "torch" not in imported(warm) and "transformers" not in imported(warm)
    assert warm.stdout == cold.stdout
    return warm.stdout


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_cached_listing_shows_each_method_as_importing_it_does(cached: str, name: str) -> None:
    m = METHODS.get(name)
    assert imported_table(f"{name}: {m.help}", m.config_cls) in cached


@pytest.mark.parametrize("part", sorted(LOOP_TABLES))
def test_the_cached_listing_shows_the_loop_settings_as_importing_does(
    cached: str, part: str
) -> None:
    assert imported_table(*LOOP_TABLES[part]) in cached


def test_the_cached_listing_is_exactly_the_imported_one(cached: str) -> None:
    tables = [(f"{n}: {m.help}", m.config_cls) for n, m in METHODS]
    tables += [LOOP_TABLES["train"], LOOP_TABLES["eval"]]
    assert cached == "".join(imported_table(title, cls) for title, cls in tables)


def _plugin_site(root: Path, help_text: str, version: str = "0.1") -> Path:
    """A third-party method installed the way pip leaves one: a module and its dist-info."""
    site = root / "site"
    info = site / "my_plugin-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: my-plugin\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[moebench.methods]\nqv-lora = my_plugin:METHOD\n")
    (site / "my_plugin.py").write_text(
        "from moebench.methods.lora import LoRA\n"
        "class QVLoRA(LoRA):\n"
        "    name = 'qv-lora'\n"
        f"    help = {help_text!r}\n"
        "METHOD = QVLoRA()\n"
    )
    return site


def test_editing_an_installed_plugin_rebuilds_the_cached_listing(tmp_path: Path) -> None:
    site = _plugin_site(tmp_path, "first help.")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "MOEBENCH_CACHE": str(tmp_path / "cache")}
    assert "qv-lora: first help." in list_methods(env, tmp_path).stdout
    warm = list_methods(env, tmp_path, importtime=True)
    assert "qv-lora: first help." in warm.stdout and "torch" not in imported(warm)
    _plugin_site(tmp_path, "the help after an edit.")
    r = list_methods(env, tmp_path)
    assert "qv-lora: the help after an edit." in r.stdout and "first help." not in r.stdout


def test_editing_a_built_in_method_file_rebuilds_the_cached_listing(tmp_path: Path) -> None:
    """moebench laid out as a wheel installs it (methods/ as moebench/methods), in a tmp copy."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "moebench", tmp_path / "moebench", ignore=skip)
    shutil.copytree(REPO / "methods", tmp_path / "moebench" / "methods", ignore=skip)
    shutil.copytree(REPO / "tasks", tmp_path / "moebench" / "tasks", ignore=skip)
    lora = tmp_path / "moebench" / "methods" / "lora.py"
    env = {"PYTHONPATH": str(tmp_path), "MOEBENCH_CACHE": str(tmp_path / "cache")}
    before = list_methods(env, tmp_path)
    assert before.returncode == 0, before.stderr
    old_help = METHODS.get("lora").help
    assert f"lora: {old_help}" in before.stdout
    lora.write_text(lora.read_text().replace(old_help, "LoRA, help edited in a copy."))
    after = list_methods(env, tmp_path)
    assert "lora: LoRA, help edited in a copy." in after.stdout and old_help not in after.stdout


def test_the_fingerprint_follows_files_and_plugin_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = shutil.copytree(REPO / "methods", tmp_path / "methods")
    stats = source_stats([copy])
    lora = copy / "lora.py"
    os.utime(lora, ns=(lora.stat().st_atime_ns, lora.stat().st_mtime_ns + 1))  # touched only
    assert source_stats([copy]) != stats
    (copy / "new_method.py").write_text("")
    assert len(source_stats([copy])) == len(stats) + 1
    site = _plugin_site(tmp_path, "a plugin.")
    monkeypatch.syspath_prepend(str(site))
    first = digest(fingerprint())
    _plugin_site(tmp_path, "a plugin.", version="0.2")
    assert digest(fingerprint()) != first
