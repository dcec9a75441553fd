"""A fingerprint of the code that decides what the method plugins declare, read without importing
a plugin: what a cache of their declarations is keyed by (moebench.method_listing).

It covers moebench's version and Python's, every source file of moebench and of its built-in
method and task packages (path, size, modification time in nanoseconds), and each entry point
of the `moebench.methods` group: its name, what it points at, its distribution's name and
version, and the source files of the top-level package it lives in. Editing, adding or removing
any of those files, installing, upgrading or removing a plugin: each changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import moebench
from moebench.registry import METHOD_GROUP, METHOD_PACKAGE

# Packages whose files are moebench's own; a method's declarations depend on nothing else of ours.
OWN_PACKAGES = ("moebench", METHOD_PACKAGE, "moebench.tasks")


def source_stats(folders: Iterable[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] of every .py file under `folders` (each once: an installed
    moebench holds its method package), in a stable order."""
    out = []
    for path in sorted({p for folder in folders for p in Path(folder).rglob("*.py")}):
        st = path.stat()
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def module_files(module: str) -> list[list[Any]]:
    """The source stats of a top-level module or package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []  # loading it fails too, and a listing with a failed plugin is never cached
    if spec.submodule_search_locations:
        return source_stats(Path(p) for p in spec.submodule_search_locations)
    if spec.origin is None or not Path(spec.origin).is_file():
        return []
    st = Path(spec.origin).stat()
    return [[spec.origin, st.st_size, st.st_mtime_ns]]


def _package_folders(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def plugin_entries(group: str = METHOD_GROUP) -> list[dict[str, Any]]:
    """Each entry point of `group` with its distribution and its code's files."""
    out = []
    for ep in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
        dist = ep.dist
        out.append(
            {
                "name": ep.name,
                "value": ep.value,
                "dist": None if dist is None else [dist.name, dist.version],
                "files": module_files(ep.module),
            }
        )
    return out


def fingerprint() -> dict[str, Any]:
    """Everything the method declarations could depend on, as JSON-able data."""
    folders = [f for name in OWN_PACKAGES for f in _package_folders(name)]
    return {
        "moebench": moebench.__version__,
        "python": sys.version,
        "sources": source_stats(folders),
        "plugins": plugin_entries(),
    }


def digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
