"""Where moebench keeps what it downloads, derives and writes, in a module light enough to import
anywhere (no torch), so that torch-free code such as IFEval scoring can find the cache.

Run outputs: `--output-dir` is a root; each run writes only into its own folder under it,
`run-<id>-<hash8>`, whose marker file names the run that made it. Nothing is written into a
folder whose marker names another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from moebench.errors import ConfigError


def cache_dir() -> Path:
    """`$MOEBENCH_CACHE`, else `~/.cache/moebench`: converted models, tokenizers, sensitivity
    tables, downloaded data, NLTK's Punkt files."""
    root = os.environ.get("MOEBENCH_CACHE") or Path.home() / ".cache" / "moebench"
    return Path(root)


def output_file(path: Path, option: str) -> Path:
    """`path`, ready to be written before anything is computed: refused in one sentence if it
    is a folder; its folder made if missing, as `moebench export --out` has always done
    (`option` names the flag in the message)."""
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name inside it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot make its folder ({e.strerror}).") from e
    return path


# --- each run's own output folder ------------------------------------------------------------

MARKER = ".moebench-run.json"


def run_owner(row: dict[str, Any], store: str) -> dict[str, Any]:
    """What an output folder's marker records about the run that owns it. A run row is known
    by its id and its creation time (to the microsecond): a database deleted and made again
    at the same path numbers its runs from 1 again, but never at the same instants. `store`
    is kept for people reading the marker; moving a database file does not disown its runs."""
    created = row["created_at"]
    if isinstance(created, datetime):
        created = created.astimezone(UTC).isoformat(timespec="microseconds")
    return {"run_id": int(row["id"]), "created": str(created), "store": store}


def run_folder_name(row: dict[str, Any]) -> str:
    """`run-<id>-<hash8>`: the id people quote, and a digest of the row's creation time, so
    runs of different stores sharing one output root get different names."""
    owner = run_owner(row, store="")
    digest = hashlib.sha256(f"{owner['run_id']}|{owner['created']}".encode()).hexdigest()
    return f"run-{owner['run_id']}-{digest[:8]}"


def claim_run_folder(root: Path, owner: dict[str, Any], name: str) -> Path:
    """Make the run's folder `root/name`, marker inside, or take it back if its marker names
    this run already (a resume, a retry). The folder is made under a temporary name and renamed
    into place, which is atomic and fails onto a folder with anything in it: of two processes
    racing for a name, one gets it and the other reads the winner's marker and is refused."""
    folder = Path(root) / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.mkdir()
    _write_marker(tmp, owner)
    try:
        os.rename(tmp, folder)  # onto nothing or an empty folder only
    except OSError:
        (tmp / MARKER).unlink()
        tmp.rmdir()
        check_owned(folder, owner)
    return folder


def check_owned(folder: Path, owner: dict[str, Any]) -> None:
    """Refuse, in one sentence, to write into a folder that another run owns."""
    mark = Path(folder) / MARKER
    try:
        found = json.loads(mark.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"Output folder {folder} was not made for run {owner['run_id']} (it has no {MARKER}"
            "); moebench writes only into folders it made, so move it away or pass another "
            "--output-dir."
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"Output folder {folder} has an unreadable {MARKER} ({e}); move the folder away "
            "or pass another --output-dir."
        ) from None
    if not _same_owner(found, owner):
        raise ConfigError(
            f"Output folder {folder} belongs to run {found.get('run_id')} of "
            f"{found.get('store') or 'another store'} (created {found.get('created', '?')}), "
            f"not to run {owner['run_id']} of {owner['store']}; moebench never writes into "
            "another run's folder, so move it away or pass another --output-dir."
        )


def _same_owner(found: dict[str, Any], owner: dict[str, Any]) -> bool:
    if not isinstance(found, dict) or found.get("run_id") != owner["run_id"]:
        return False
    if "created" in found:
        return bool(found["created"] == owner["created"])
    # Markers written before creation times were recorded name the run by its store only.
    return bool(found.get("store") == owner["store"])


def _write_marker(folder: Path, owner: dict[str, Any]) -> None:
    """Written whole or not at all (a temporary file renamed over it)."""
    tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(owner, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MARKER)
