"""What every page shares: the read-only store (cached) and the page shown when it is unusable."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from moebench.board.load import store_version
from moebench.board.table import Board, BoardFilters, build_board
from moebench.store import Store, resolve_db_url
from moebench.store.readonly import StoreUnavailable, open_store_readonly

CACHED_VIEWS = 64  # (filters, store version) tables kept, least recently used out first

_WHAT_TO_RUN = {
    "missing": "`moebench run ...` or `moebench sweep FILE` records runs; "
    "`moebench leaderboard --db FILE` reads another store.",
    "empty": "`moebench run ...` or `moebench sweep FILE` records runs in it.",
    "corrupt": "restore the file from a copy, or open another store with "
    "`moebench leaderboard --db FILE`.",
    "newer": "`pip install -U moebench`, then reopen the leaderboard.",
    "older": "any writing command (e.g. `moebench runs list`) migrates it; then reopen.",
    "unreachable": "check the server and the URL given to `--db`.",
}


@st.cache_resource
def _open(url: str) -> Store:
    return open_store_readonly(url)


def store_or_stop() -> Store:
    """The store this app reads, or an explanation page and a stop."""
    url = resolve_db_url()
    try:
        return _open(url)
    except StoreUnavailable as e:
        st.title("moebench leaderboard")
        st.error(str(e))
        st.markdown(f"**What to run:** {_WHAT_TO_RUN.get(e.kind, '')}")
        st.stop()
        raise  # unreachable: st.stop() ends the script


def board(url: str, filters: BoardFilters) -> Board:
    """The main table for `filters`, recomputed only when the store has changed since.

    Keyed on `store_version` (one narrow scan of the runs), not a time-to-live: a run that finishes
    under a sweep shows at the next visit, and an unchanged store is never recomputed.
    """
    return _board(url, filters, store_version(_open(url)))


@st.cache_data(max_entries=CACHED_VIEWS, show_spinner=False)
def _board(url: str, filters: BoardFilters, version: tuple[int, str]) -> Board:
    """`version` is unused here: it is in the arguments so that it is in the cache key."""
    return build_board(_open(url), filters)


_KEPT = "kept:"  # prefix of the plain session keys holding a reader's own widget choices


def kept(
    widget: Callable[..., Any],
    key: str,
    default: Any,
    options: Sequence[Any] | None = None,
    **kwargs: Any,
) -> Any:
    """`widget(key=key, ...)` showing the reader's own last choice, else `default`.

    Streamlit forgets a widget's value on any run that does not draw it: the Charts tab's runs
    skip the table's column picker, and the Run and Jobs pages skip the leaderboard's filters.
    A plain session key is never forgotten, so the reader's choice is kept there, written by
    the widget's change callback only. What the widget shows is that choice restricted to
    today's `options`; entries a filter hid are kept, and come back when the filter is
    cleared. Until the reader changes it, the widget follows `default`, which may move with
    the view. The widget's own key is written only when what it should show differs from what
    it holds, so an unchanged widget's value is never pushed back to the browser.
    """
    state = st.session_state
    wanted = state.get(_KEPT + key, default)
    shown = _restricted(wanted, options, default)
    if key not in state or state[key] != shown:
        state[key] = shown
    if options is not None:
        kwargs["options"] = options

    def remember() -> None:
        choice = state[key]
        if isinstance(choice, list) and isinstance(wanted, list) and options is not None:
            choice = choice + [v for v in wanted if v not in options]  # hidden, not dropped
        state[_KEPT + key] = choice

    return widget(key=key, on_change=remember, **kwargs)


def _restricted(wanted: Any, options: Sequence[Any] | None, default: Any) -> Any:
    """`wanted` as far as `options` allow: a list keeps the entries on offer, a single value
    falls back to `default` when it is not on offer."""
    if options is None:
        return wanted
    if isinstance(wanted, list):
        return [v for v in wanted if v in options]
    return wanted if wanted in options else default
