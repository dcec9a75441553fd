"""What every page shares: the read-only store (cached) and the page shown when it is unusable."""

from __future__ import annotations

import streamlit as st

from moebench.board.table import Board, BoardFilters, build_board
from moebench.store import Store, resolve_db_url
from moebench.store.readonly import StoreUnavailable, open_store_readonly

CACHE_TTL_S = 30

_WHAT_TO_RUN = {
    "missing": "`moebench run ...` or `moebench sweep FILE` records runs; "
    "`moebench leaderboard --db FILE` reads another store.",
    "empty": "`moebench run ...` or `moebench sweep FILE` records runs in it.",
    "corrupt": "restore the file from a copy, or `moebench leaderboard --db FILE` another store.",
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


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def board(url: str, filters: BoardFilters) -> Board:
    """The main table for `filters` (cached briefly: the store may be growing under a sweep)."""
    return build_board(_open(url), filters)
