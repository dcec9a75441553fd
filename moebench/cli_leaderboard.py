"""`moebench leaderboard`: start the Streamlit app on a store, or write its main view to a file.

Registered on the main app by moebench.cli. The numbers come from `moebench.board`, the same
functions the app calls, so an exported table and the page agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from moebench.cli import DbOpt, app, console
from moebench.errors import ConfigError
from moebench.paths import output_file

APP_ENTRY = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def parse_count(text: str | None) -> int | None:
    """`10000`, `10k`, `2.3M` -> a parameter count (None stays None)."""
    if text is None:
        return None
    raw = text.strip().lower().replace(",", "").replace("_", "")
    scale = _SUFFIX.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in _SUFFIX else raw
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if value < 1:
        raise ConfigError(
            f"--target {text!r} is not a parameter count; give e.g. 10000, 10k or 2.3M."
        )
    return round(value)


@app.command()
def leaderboard(
    db: DbOpt = None,
    port: Annotated[int, typer.Option(help="Port to serve the app on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine).")] = (
        "127.0.0.1"
    ),
    export: Annotated[
        Path | None,
        typer.Option(help="Write the main view to FILE (.csv, .md, .tex, .html) and exit."),
    ] = None,
    model: Annotated[list[str] | None, typer.Option(help="Only this model (repeatable).")] = None,
    suite: Annotated[list[str] | None, typer.Option(help="Only this suite (repeatable).")] = None,
    method: Annotated[list[str] | None, typer.Option(help="Only this method (repeatable).")] = None,
    protocol: Annotated[
        list[str] | None, typer.Option(help="Only scores under this protocol (repeatable).")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Target trainable parameters, e.g. 10k or 2.3M.")
    ] = None,
    band: Annotated[float, typer.Option(help="Budget band around --target, in percent.")] = 5.0,
) -> None:
    """Start the leaderboard (read-only on the store), or export its main view with --export."""
    from moebench.board.table import BoardFilters
    from moebench.store import resolve_db_url

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; use 1 to 65535.")
    if not 0 < band < 100:
        raise ConfigError(
            f"--band {band:g} is not a budget band; give a percentage above 0 and below 100."
        )
    filters = BoardFilters(
        models=tuple(model or ()),
        suites=tuple(suite or ()),
        methods=tuple(method or ()),
        protocols=tuple(protocol or ()),
        target_params=parse_count(target),
        band=band / 100.0,
    )
    url = resolve_db_url(db)
    if export is not None:
        _export(url, filters, export)
        return
    command = streamlit_command(APP_ENTRY, port, address)
    console.print(f"leaderboard on http://{address}:{port} reading {url} (read-only)")
    env = {**os.environ, "MOEBENCH_DB": url}
    # The server takes this process's place, so a signal to `moebench leaderboard` (Ctrl-C, a
    # test's terminate) reaches the server itself instead of orphaning a child streamlit.
    sys.stdout.flush()
    os.execve(sys.executable, command, env)


def streamlit_command(
    entry: Path, port: int, address: str, *, module: str = "moebench.board.serve"
) -> list[str]:
    """The Streamlit server for `entry`: headless, no usage stats, and the toolbar a reader
    needs (no Deploy or cache buttons: whoever opens the board reads it, never develops it).
    `module` is the board's warm start (moebench/board/serve.py), or "streamlit" for a page
    served cold: the leaderboard's benchmark serves its floor page so, with the same flags."""
    return [
        sys.executable, "-m", module, "run", str(entry),
        "--server.port", str(port), "--server.address", address,
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
    ]  # fmt: skip


def _export(url: str, filters: object, path: Path) -> None:
    from moebench.board.export import FORMATS, records, write_export
    from moebench.board.table import build_board
    from moebench.store.readonly import open_store_readonly

    if path.suffix.lower() not in FORMATS:
        raise ConfigError(
            f"--export {path}: unknown format '{path.suffix or '(none)'}'; use one of "
            f"{', '.join(FORMATS)}."
        )
    output_file(path, "--export")
    with open_store_readonly(url) as store:
        board = build_board(store, filters)  # type: ignore[arg-type]
    rows = board.rows if path.suffix.lower() == ".csv" else [r for r in board.rows if r.in_band]
    charts = _html_charts(board) if path.suffix.lower() == ".html" else []
    write_export(path, records(board, rows=rows), board.score_columns(), charts)
    console.print(f"wrote {len(rows)} rows to {path}")
    note = board.band_note()
    if note:
        console.print(note)


def _html_charts(board: object) -> list[str]:
    """The Pareto and per-set charts as HTML divs, plotly.js inlined once (self-contained)."""
    from moebench.board import charts

    rows = board.rows  # type: ignore[attr-defined]
    figures = [
        charts.accuracy_vs_params(rows),
        charts.per_set_bars([r for r in rows if r.in_band], board.score_columns()),  # type: ignore[attr-defined]
    ]
    return [
        f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
        for i, f in enumerate(figures)
    ]


def export_bundle_command(db: str | None, path: Path, run_ids: list[int] | None) -> None:
    """`moebench export --bundle FILE`: every record of the runs, for `moebench import`."""
    from moebench.store import open_existing_store
    from moebench.store.bundle import export_bundle

    output_file(path, "--bundle")
    # An existing store only: a mistyped --db is refused, not created and exported as 0 runs.
    with open_existing_store(db) as store:
        n = export_bundle(store, path, run_ids or None)
    console.print(f"wrote {n} runs to {path}")


@app.command("import")
def import_command(
    bundle: Annotated[Path, typer.Argument(help="A file made by `moebench export --bundle`.")],
    db: DbOpt = None,
) -> None:
    """Add a bundle's runs to the store; runs it already holds (same identity) are skipped."""
    from moebench.store import open_store
    from moebench.store.bundle import check_bundle, import_bundle

    check_bundle(bundle)  # before the store is opened: a bad bundle creates no database
    with open_store(db) as store:
        added, skipped = import_bundle(store, bundle, checked=True)
    console.print(f"imported {added} runs into {store.display_url}; {skipped} were already there")
