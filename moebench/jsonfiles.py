"""Reading LLM-Adapters data files: one JSON array per file, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moebench.errors import DataError


def read_json_array(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"Data file {path} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"Data file {path} is a directory, expected a JSON file.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"Data file {path} is not UTF-8 text (byte {e.start}).") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"Data file {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "is it truncated?"
        ) from None
    except RecursionError:
        raise DataError(
            f"Data file {path} nests arrays or objects too deeply to read; a data file is one "
            "array of flat row objects."
        ) from None
    if not isinstance(rows, list):
        raise DataError(
            f"Data file {path} holds a JSON {json_type(rows)}, expected an array of rows."
        )
    if not rows:
        raise DataError(f"Data file {path} holds an empty array; a data file needs rows.")
    return rows


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
