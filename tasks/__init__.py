"""Built-in evaluation sets (`moebench.tasks`): one module per family, and the packaged mini data.

`commonsense.py` and `math.py` each declare their sets in one table and register them in
`moebench.task.TASKS`; that registry imports them on first lookup. `data/mini/` is a small,
deterministic draw from the LLM-Adapters files (see its README) that ships with the package, so a
first run needs no download.
"""

from __future__ import annotations

from pathlib import Path

MINI_DIR = Path(__file__).parent / "data" / "mini"
"""Root of the packaged `mini` suite, laid out like LLM-Adapters' `dataset/` folder."""

MINI_TRAIN_FILE = MINI_DIR / "train.json"
"""The mixed training file; each row also carries `"task": <task name>`."""

MINI_EVAL_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "social_i_qa",
    "winogrande",
    "arc_challenge",
    "arc_easy",
    "openbookqa",
    "gsm8k",
    "svamp",
    "addsub",
    "multiarith",
    "singleeq",
)
"""Tasks with a `<folder>/test.json` in `MINI_DIR` (hellaswag has no upstream file here)."""
