"""Where moebench keeps what it downloads or derives, in a module light enough to import anywhere
(no torch), so that torch-free code such as IFEval scoring can find the cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MOEBENCH_CACHE`, else `~/.cache/moebench`: converted models, tokenizers, sensitivity
    tables, downloaded data, NLTK's Punkt files."""
    root = os.environ.get("MOEBENCH_CACHE") or Path.home() / ".cache" / "moebench"
    return Path(root)
