"""Can a hub model be had here? Offline mode, a quick reachability probe, and the local cache.

Met with a hub it cannot reach, transformers retries five times with backoff (about a minute
here) before it reports that the model is not cached, and it waits just as long before loading a
model that is cached. These checks answer in a second instead: a cached model then loads with
`local_files_only`, an uncached one is refused in one sentence (moebench.models words it).
No torch, no transformers: `moebench run` asks before either loads.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_reason() -> str | None:
    """Why the hub is out of reach, in words, or None when it answers (or when a proxy is set:
    the hub client goes through it, so a direct probe would prove nothing)."""
    from huggingface_hub import constants

    # The environment as it is now, and as huggingface_hub read it on import: either one set
    # makes transformers skip the network.
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    return _unreachable(host, port)


@functools.cache
def _unreachable(host: str, port: int) -> str | None:
    """One connection attempt per endpoint and process: `moebench run` asks before torch loads
    and the loader asks again, and a black-holed network costs the full timeout each time."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{host} cannot be reached: {e.strerror or e}"
    return None


def is_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds a snapshot of `repo_id` (its config.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError): it cannot be cached either
        return False
    return isinstance(found, str)


def cache_location() -> str:
    """The folder the hub cache lives in, for messages."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
