"""What `moebench methods` lists, and a cache that lists it without importing torch.

The listing needs every method's config class, and a method is one file whose layers subclass
torch.nn.Module, so importing them all costs seconds for tables that change only when code does.
The tables are kept as JSON under the cache folder with the fingerprint of everything that could
change them (moebench.plugin_fingerprint); on any difference they are rebuilt by importing, so
what the cache gives is what importing gives. A listing that skipped a broken plugin is not kept:
the next one imports again and shows the warning again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import moebench
from moebench.config import accepted_values, field_help
from moebench.paths import cache_dir
from moebench.plugin_fingerprint import digest, fingerprint

log = logging.getLogger(__name__)

COLUMNS = ("field", "default", "accepted", "help")
FORMAT = 1  # bump when the shape of the cached file changes


@dataclass(frozen=True)
class FieldTable:
    """One config class as listed: a title and, per field, its name, default, accepted values
    and help (plain text; the CLI escapes it for rich)."""

    title: str
    rows: tuple[tuple[str, str, str, str], ...]


def field_rows(cls: type) -> tuple[tuple[str, str, str, str], ...]:
    """The listing's rows of a config dataclass; tuple defaults shown comma-joined."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        rows.append((f.name, str(default), accepted_values(cls, f.name), field_help(cls, f.name)))
    return tuple(rows)


def build_tables() -> tuple[list[FieldTable], bool]:
    """Every method's table, then the loop's and scoring's, by importing them all; and whether
    every plugin loaded (only then may the tables be cached)."""
    from moebench.evaluate import EvalConfig
    from moebench.method import METHODS
    from moebench.train import TrainConfig

    tables = [FieldTable(f"{name}: {m.help}", field_rows(m.config_cls)) for name, m in METHODS]
    tables.append(
        FieldTable(
            "train.* (the loop; --set train.KEY=VALUE; a suite may set its own defaults, "
            "see `moebench tasks`)",
            field_rows(TrainConfig),
        )
    )
    tables.append(FieldTable("eval.* (scoring; --set eval.KEY=VALUE)", field_rows(EvalConfig)))
    return tables, not METHODS.problems


def cache_file() -> Path:
    """One file per installation (interpreter and moebench folder), so that two environments
    sharing a cache folder do not overwrite each other's listing on every call."""
    where = f"{sys.prefix}|{Path(moebench.__file__).parent}"
    name = hashlib.sha256(where.encode()).hexdigest()[:16]
    return cache_dir() / "listings" / f"methods-{name}.json"


def method_tables() -> list[FieldTable]:
    """The tables `moebench methods` prints: from the cache when its fingerprint matches the code
    installed now, else built by importing (and cached when every plugin loaded)."""
    key = digest(fingerprint())
    path = cache_file()
    cached = read_cache(path, key)
    if cached is not None:
        return cached
    tables, clean = build_tables()
    if clean:
        write_cache(path, key, tables)
    return tables


def read_cache(path: Path, key: str) -> list[FieldTable] | None:
    """The cached tables if `path` holds them under fingerprint `key`, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("fingerprint") != key:
            return None
        return [FieldTable(str(t["title"]), _rows(t["rows"])) for t in data["tables"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or unreadable: rebuild


def _rows(rows: list[list[str]]) -> tuple[tuple[str, str, str, str], ...]:
    """Rows as read back; a row without exactly four cells raises ValueError (a bad file)."""
    return tuple((str(a), str(b), str(c), str(d)) for a, b, c, d in rows)


def write_cache(path: Path, key: str, tables: list[FieldTable]) -> None:
    """Write whole or not at all; a read-only cache folder only costs the next call its imports."""
    data = {
        "format": FORMAT,
        "fingerprint": key,
        "tables": [{"title": t.title, "rows": [list(r) for r in t.rows]} for t in tables],
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.debug("could not cache the method listing in %s: %s", path, e)
        tmp.unlink(missing_ok=True)
