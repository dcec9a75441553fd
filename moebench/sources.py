"""Training-row readers, one per upstream file format, each mapping rows to LLM-Adapters `Row`s.

Most training data moebench knows is already in LLM-Adapters' `{instruction, input, output,
answer}` form. Two sources are not: `mawps/trainset.json` (`original_text`, `ans`, ...), which
LLM-Adapters ships beside its tests, and the seed paper's OrcaMath and instruction-following mixes,
which live on the HuggingFace hub. Each reader validates every row and names the file and row of
the first bad one, so a broken file stops a run before any weight loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moebench.data import Row, load_training_rows
from moebench.errors import DataError
from moebench.jsonfiles import iter_json_array, json_type


def _mawps_rows(path: Path, task: str | None) -> list[Row]:
    """MAWPS' equation-annotated problems as math rows (the answer as the whole response)."""
    out = []
    for i, r in enumerate(iter_json_array(path)):
        where = f"Row {i} of {path}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is a JSON {json_type(r)}, expected an object.")
        text, ans = r.get("original_text"), r.get("ans")
        if not isinstance(text, str):
            raise DataError(f"{where} has no string 'original_text' (the MAWPS question).")
        try:  # the file mixes JSON numbers and numeric strings
            number = float(ans) if not isinstance(ans, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{where}: 'ans' must be a number, found {ans!r}.")
        value = int(number) if number.is_integer() else number
        out.append(Row(text.strip(), "", f"The answer is {value}.", task or r.get("task")))
    return out


def _llm_adapters_rows(path: Path, task: str | None) -> list[Row]:
    return load_training_rows(path, task)


def _hub_rows(dataset: str, question: str, answer: str) -> Callable[[Path, str | None], list[Row]]:
    """A reader for a hub dataset with one question and one answer column (read via `datasets`).

    The path argument is the cache file the dataset was exported to (see `suites._locate`)."""

    def read(path: Path, task: str | None) -> list[Row]:
        out = []
        for i, r in enumerate(iter_json_array(path)):
            if not isinstance(r, dict) or not isinstance(r.get(question), str):
                raise DataError(f"Row {i} of {path} ({dataset}) has no string '{question}'.")
            if not isinstance(r.get(answer), str):
                raise DataError(f"Row {i} of {path} ({dataset}) has no string '{answer}'.")
            out.append(Row(r[question], "", r[answer], task))
        return out

    return read


READERS: dict[str, Callable[[Path, str | None], list[Row]]] = {
    "llm-adapters": _llm_adapters_rows,
    "mawps": _mawps_rows,
    "orca-math": _hub_rows("microsoft/orca-math-word-problems-200k", "question", "answer"),
}
"""File format -> reader(path, task label for rows without their own) -> rows."""


def read_rows(fmt: str, path: Path, task: str | None) -> list[Row]:
    return READERS[fmt](path, task)


def export_hub_dataset(dataset: str, split: str, columns: tuple[str, ...], dest: Path) -> None:
    """Download a hub dataset once and keep the columns moebench reads as a JSON array.

    Needs the `datasets` package and the hub; the caller turns a failure into one sentence."""
    import json

    from datasets import load_dataset  # optional dependency, present with the `eval` extra

    ds = load_dataset(dataset, split=split)
    rows: list[dict[str, Any]] = [{c: r[c] for c in columns} for r in ds]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_text(json.dumps(rows))
    tmp.replace(dest)
