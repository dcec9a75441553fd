"""The leaderboard's server process: Streamlit, started warm.

A Streamlit server does no work of the page's until a browser opens a session, so the first
reader of a freshly started board waits for the page's imports (pandas, plotly and the board:
about 0.8 s on a 2-core VM) and for the first table build (about 0.5 s on a 1,000-run store)
on top of the frontend's own start. Here the imports are done before the server listens, and
the table's rows are built on a side thread while it starts, into the process-wide row cache
that the page's own build reuses (moebench/board/row_cache.py, keyed on the runs' stamps, so
a row is reused only while its runs are unchanged). The warm-up fills caches and nothing else:
what the page shows is what it would have computed itself.

`moebench leaderboard` runs `python -m moebench.board.serve run APP [streamlit flags]`.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading

# What the pages import (app/pages/*.py, app/board_support.py), by weight.
PAGE_IMPORTS = (
    "pandas",
    "plotly.express",
    "plotly.graph_objects",
    "moebench.board.charts",
    "moebench.board.export",
    "moebench.board.reference",
    "moebench.board.runs",
    "moebench.board.table",
    "moebench.store.readonly",
)

log = logging.getLogger(__name__)


def build_rows(url: str) -> None:
    """Build the unfiltered main table once, read-only, for its rows to be cached. A store the
    page cannot open is left to the page, which explains it to the reader."""
    from moebench.board.table import build_board
    from moebench.store.readonly import open_store_readonly

    try:
        with open_store_readonly(url) as store:
            build_board(store)
    except Exception as e:  # a warm-up only: the page itself reports the store's state
        log.info("leaderboard warm-up skipped: %s", e)


def main(argv: list[str]) -> None:
    """Import what the pages need, start the row build, then hand over to Streamlit's CLI."""
    for name in PAGE_IMPORTS:
        importlib.import_module(name)
    from moebench.store import resolve_db_url

    threading.Thread(
        target=build_rows, args=(resolve_db_url(),), name="board-warm-up", daemon=True
    ).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", *argv]
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main(sys.argv[1:])
