"""The leaderboard's server process: Streamlit, started warm.

A Streamlit server does no work of the page's until a browser opens a session, so the first
reader of a freshly started board waits for the pages' imports (pandas, plotly and the board:
about 0.8 s on a 2-core VM) and for the first table build (about 0.5 s on a 1,000-run store)
on top of the frontend's own start. Here the imports are done before the server listens, and
the table's rows are built on a side thread while it starts, into the process-wide row cache
that the page's own build reuses (moebench/board/row_cache.py, keyed on the runs' stamps, so
a row is reused only while its runs are unchanged). The warm-up fills caches and nothing else:
what the page shows is what it would have computed itself.

`moebench leaderboard` runs `python -m moebench.board.serve run APP [streamlit flags]`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def page_modules(entry: Path) -> list[str]:
    """The modules the app's scripts (`entry`'s folder and its `pages/`) import at their top
    level, read from their source so that a page's new import is warmed too; the app's own
    helper scripts (found beside `entry` only once Streamlit runs it) are left out."""
    scripts = sorted(entry.parent.glob("*.py")) + sorted(entry.parent.glob("pages/*.py"))
    local = {p.stem for p in entry.parent.glob("*.py")} | {"__future__"}
    names: list[str] = []
    for script in scripts:
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
                names += [f"{node.module}.{a.name}" for a in node.names]  # if submodules
    return [n for n in dict.fromkeys(names) if n.split(".")[0] not in local and _module(n)]


def _module(name: str) -> bool:
    """Whether `name` is a module (not a function or class imported from one)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # `name`'s parent is a module, not a package
        return False


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
    for name in page_modules(Path(argv[1])):  # argv: run APP [flags]
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
