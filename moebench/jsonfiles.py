"""Reading task data files in bounded memory, with errors that name the file and the row.

LLM-Adapters files are one JSON array of flat row objects; IFEval's is JSON lines. Whatever a
file holds, reading it never needs much more memory than the rows it yields: the array is
decoded one row at a time from a window of the file, so a damaged file (one 50 MB line, a
nesting thousands deep, binary bytes) is refused with one sentence before it is parsed whole.

Bounds (the largest row in the LLM-Adapters and IFEval files is about 2.4 KB):
- a file: at most `MAX_FILE_BYTES` (1 GiB, about ten times commonsense_170k.json);
- a row (an array element, or a JSON line): at most `MAX_ROW_CHARS` characters (1 Mi);
- nesting: a row holds arrays and objects at most `MAX_DEPTH` (16) deep, itself counted.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from moebench.errors import DataError

MAX_FILE_BYTES = 1 << 30
MAX_ROW_CHARS = 1 << 20
MAX_DEPTH = 16
CHUNK_BYTES = 1 << 20  # how much of the file is decoded at a time
_DECODER = json.JSONDecoder()
_NOT_SPACE = re.compile(r"[^ \t\n\r]")
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")  # between rows, or the array's end
# A decode error this close to the window's end may only mean the row goes on past it: the
# longest JSON token that fails before its end is a surrogate pair of \u escapes (12 chars).
_TAIL = 16


def read_json_array(path: Path) -> list[Any]:
    """Every row of a JSON-array data file (for small files; large ones: `iter_json_array`)."""
    return list(iter_json_array(path))


def iter_json_array(path: Path) -> Iterator[Any]:
    """The rows of a JSON-array data file, one at a time; an empty array or a non-array is a
    `DataError`. A row is decoded from a window of the file that never holds much more than
    `MAX_ROW_CHARS`, so a row beyond the bound is refused before it is read whole."""
    with open_data_file(path) as f:
        window = _Window(path, f)
        window.fill()
        if window.text.startswith("\ufeff"):  # a UTF-8 byte-order mark
            window.pos = 1
        first = window.next_char()
        if first != "[":
            raise DataError(_not_an_array(path, first))
        window.pos += 1
        if window.next_char() == "]":
            raise DataError(f"Data file {path} holds an empty array; a data file needs rows.")
        yield from window.rows()
        if window.next_char():
            window.invalid("extra data after the array", window.pos)


def iter_json_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a JSON-lines file, each line read only
    after its length is known to be within `MAX_ROW_CHARS` (as bytes, a little stricter)."""
    with open_data_file(path) as f:
        number, offset, row = 0, 0, 0
        while line := f.readline(MAX_ROW_CHARS + 1):
            number += 1
            where = f"Row {row} (line {number}) of {path}"
            if len(line) > MAX_ROW_CHARS:
                raise DataError(
                    f"{where} (from byte {offset}) is longer than {MAX_ROW_CHARS:,} bytes, the "
                    "bound on one row; is it a data file?"
                )
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(_not_utf8(where, offset + e.start)) from None
            offset += len(line)
            if text.strip():
                yield number, text
                row += 1


def loads_row(text: str, where: str) -> Any:
    """One JSON line parsed, its nesting bounded; `where` names it in the error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where} is not valid JSON ({e.msg} at column {e.colno}); is it truncated?"
        ) from None
    except RecursionError:  # deeper than Python's parser goes: far past the bound
        raise DataError(_too_deep(where)) from None
    if text.count("[") + text.count("{") > MAX_DEPTH and depth(value) > MAX_DEPTH:
        raise DataError(_too_deep(where))
    return value


def open_data_file(path: Path) -> IO[bytes]:
    """The file opened for reading, once it is known to exist and to be within the bound."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"Data file {path} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"Data file {path} is a directory, expected a JSON file.") from None
    if size > MAX_FILE_BYTES:
        f.close()
        raise DataError(
            f"Data file {path} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte bound on "
            "one data file; split it into several files of the suite."
        )
    return f


class _Window:
    """The part of a file still to be decoded, and where it starts in the file (for errors)."""

    def __init__(self, path: Path, f: IO[bytes]) -> None:
        self.path, self.f = path, f
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.eof = "", 0, False
        self.read_bytes = 0  # bytes of the file read so far
        self.byte, self.line, self.column = 0, 1, 1  # where text[0] is in the file

    def fill(self) -> None:
        """Drop what is decoded and append the next chunk of the file."""
        self._advance(self.pos)
        chunk = self.f.read(CHUNK_BYTES)
        pending = len(self.utf8.getstate()[0])
        self.eof = not chunk
        try:
            self.text += self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            byte = self.read_bytes - pending + e.start
            raise DataError(_not_utf8(f"Data file {self.path}", byte)) from None
        self.read_bytes += len(chunk)

    def next_char(self) -> str:
        """The next character that is not whitespace (pos is left on it); '' at the end."""
        while True:
            found = _NOT_SPACE.search(self.text, self.pos)
            self.pos = found.start() if found else len(self.text)
            if found or self.eof:
                return self.text[self.pos : self.pos + 1]
            self.fill()

    def rows(self) -> Iterator[Any]:
        """Decode rows from pos (on the first row) to the array's closing bracket.

        The loop is the reader's hot path (a million-row file runs it a million times): one C
        decode and one separator match a row; reading on happens only at a window's end.
        """
        index, decode, separator = 0, _DECODER.raw_decode, _SEPARATOR.match
        while True:
            text, start = self.text, self.pos
            try:
                value, end = decode(text, start)
            except json.JSONDecodeError as e:
                if self.eof or not _may_go_on(e, len(text)):
                    self.invalid(e.msg.removesuffix(" at"), e.pos, index)
                self._read_on(index)
                continue
            except RecursionError:
                raise DataError(_too_deep(f"Data file {self.path} row {index}")) from None
            if end - start > MAX_ROW_CHARS:
                self._bound(index, end - start)
            after = separator(text, end)
            if after is None:  # the window may end inside the row, or right after it
                if self.eof or _NOT_SPACE.search(text, end):
                    self.invalid(f"expected ',' or ']' after row {index}", end)
                self._read_on(index)
                continue
            # Nesting is at most the number of opening brackets, counted at C speed.
            brackets = text.count("[", start, end) + text.count("{", start, end)
            if brackets > MAX_DEPTH and depth(value) > MAX_DEPTH:
                raise DataError(_too_deep(f"Data file {self.path} row {index}"))
            yield value
            index += 1
            self.pos = after.end()
            if after.group(1) == "]":
                return

    def _read_on(self, index: int) -> None:
        """More of the file for the row at pos, which must stay within the bound."""
        self._bound(index, len(self.text) - self.pos)
        self.fill()
        self.next_char()

    def _bound(self, index: int, chars: int) -> None:
        if chars > MAX_ROW_CHARS:
            raise DataError(
                f"Data file {self.path} row {index} (from {self._where(self.pos)}) is longer "
                f"than {MAX_ROW_CHARS:,} characters, the bound on one row; is it a data file?"
            )

    def invalid(self, what: str, at: int, index: int | None = None) -> None:
        row = "" if index is None else f" in row {index}"
        raise DataError(
            f"Data file {self.path} is not valid JSON{row} ({what} at {self._where(at)}); "
            "is it truncated?"
        )

    def _where(self, at: int) -> str:
        before = self.text[:at]
        newlines = before.count("\n")
        line = self.line + newlines
        column = at - before.rfind("\n") if newlines else self.column + at
        byte = self.byte + len(before.encode("utf-8"))
        return f"line {line}, column {column}, byte {byte}"

    def _advance(self, n: int) -> None:
        """Forget the first n characters, keeping count of where the rest starts."""
        gone = self.text[:n]
        newlines = gone.count("\n")
        self.line += newlines
        self.column = n - gone.rfind("\n") if newlines else self.column + n
        self.byte += len(gone.encode("utf-8"))
        self.text, self.pos = self.text[n:], self.pos - n


def _may_go_on(e: json.JSONDecodeError, window: int) -> bool:
    """Whether a decode error may be only the window ending inside the row."""
    return e.msg.startswith("Unterminated string") or e.pos >= window - _TAIL


def depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed value (a flat object is 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            stack += [(x, d + 1) for x in v]
    return deepest


def _too_deep(where: str) -> str:
    return (
        f"{where} nests arrays or objects too deeply (more than {MAX_DEPTH} levels); a data "
        "file is one array of flat row objects."
    )


def _not_an_array(path: Path, first: str) -> str:
    if first == "{":
        return f"Data file {path} holds a JSON object, expected an array of rows."
    if not first:
        return f"Data file {path} is empty, expected a JSON array of rows."
    return f"Data file {path} is not a JSON array of rows (it begins with {first!r})."


def _not_utf8(where: str, byte: int) -> str:
    return (
        f"{where} is not UTF-8 text (a byte that UTF-8 does not allow at offset {byte} of the "
        "file), so not JSON; is it a binary file?"
    )


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")
