"""Downloads into the cache that leave either the whole, verified file or nothing.

A worker that lacks a suite's files (a fresh Ray node, say) fetches them here: the bytes stream
into a temporary file beside the destination while their sha256 is computed, and only a complete
download whose hash matches the one the suite records is renamed into place (an atomic rename on
one filesystem). A dropped connection, a short body or a wrong hash leaves no file behind, so the
next attempt starts clean instead of reading half a JSON array as data.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from moebench.errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 16
TIMEOUT_S = 20.0


def sha256_of(path: Path) -> str:
    """The file's sha256, read in chunks (training files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = TIMEOUT_S) -> Path:
    """Fetch `url` to `dest`, checking `sha256` when one is recorded; `dest` on success.

    Raises DataError (one sentence) when the transfer fails or the bytes are not the recorded
    ones; `dest` is then left as it was (absent) and no temporary file remains.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = _stream(url, fd, timeout)
        if sha256 is not None and digest != sha256.lower():
            raise DataError(
                f"The file downloaded from {url} has sha256 {digest}, not the {sha256} this "
                "suite records, so it was not kept; the upstream file has changed or the "
                "transfer was altered."
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("downloaded %s to %s (sha256 %s)", url, dest, digest)
    return dest


def _stream(url: str, fd: int, timeout: float) -> str:
    """Copy the response body into `fd` (closed after); the body's sha256.

    A body shorter than its Content-Length is a failed transfer, said in one sentence like every
    other (refused connection, HTTP error, timeout)."""
    digest, got = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            for block in iter(lambda: r.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
                got += len(block)
            # read(n) returns b"" at a dropped connection instead of raising: count the bytes
            if length is not None and length.isdigit() and got < int(length):
                raise http.client.IncompleteRead(b"", int(length) - got)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(e, http.client.IncompleteRead):
            reason = f"the connection closed after {got} bytes of the body, {e.expected} short"
        raise DataError(f"The download of {url} failed ({reason}); nothing was kept.") from None
    return digest.hexdigest()
