"""`moebench analyze ...`: analyses of stored runs. Display only; the numbers come from
moebench.importance_run / moebench.importance_stats. Registered on the main app by moebench.cli.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moebench.cli import DbOpt, _setup_logging, app, console, err

analyze_app = typer.Typer(help="Analyses of stored runs (parameter importance, ...).")
app.add_typer(analyze_app, name="analyze")

TasksOpt = Annotated[
    str | None,
    typer.Option("--tasks", help="Comma-separated eval sets [default: the run's eval sets]."),
]


def _open(db: str | None) -> Any:
    from moebench.cli_jobs import open_existing

    return open_existing(db)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        from moebench.errors import ConfigError

        raise ConfigError(f"--tasks {text!r} has an empty name; give e.g. --tasks boolq,gsm8k.")
    return names


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _print_figure2(record: dict[str, Any]) -> None:
    table = Table(title=f"run: {record['method']} on {record['model']} (all tasks)")
    for col in ("module type", "tensor", "rank var", "d_in/d_out var", "rank / d"):
        table.add_column(col, justify="left" if col in ("module type", "tensor") else "right")
    for r in record["figures"]["figure2"]:
        if r["task"] == "all":
            table.add_row(
                r["module_type"],
                r["tensor"],
                _fmt(r["rank_avg"]),
                _fmt(r["d_or_k_avg"]),
                _fmt(r["ratio"]),
            )
    console.print(table)


@analyze_app.command("importance")
def importance(
    run_id: Annotated[int, typer.Argument(help="The stored run to analyse.", metavar="RUN")],
    tasks: TasksOpt = None,
    batches: Annotated[int, typer.Option(help="Batches of eval items per task.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Items per batch.")] = 8,
    data_dir: Annotated[
        str | None, typer.Option(help="LLM-Adapters folder [default: the run's own].")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Also write the figures (HTML) into this folder.")
    ] = None,
    png: Annotated[bool, typer.Option(help="With --plots, PNG files too (needs kaleido).")] = False,
    db: DbOpt = None,
) -> None:
    """First-order importance |dL/dtheta * theta| of a run's adapter per task (stored with it)."""
    from moebench.importance_run import analyze_run

    _setup_logging(False)
    store = _open(db)

    def progress(task: str, n: int) -> None:
        err.print(f"[dim]{task}: {n} items[/]")

    record = analyze_run(
        store,
        run_id,
        tasks=_split(tasks),
        batches=batches,
        batch_size=batch_size,
        data_dir=data_dir,
        progress=progress,
    )
    _print_figure2(record)
    console.print(f"stored as artifact 'importance' of run {run_id}")
    if plots is not None:
        _write_plots(store, [run_id], plots, png)


@analyze_app.command("importance-plots")
def importance_plots(
    run_ids: Annotated[list[int], typer.Argument(help="Analysed runs; several compare.")],
    out: Annotated[Path, typer.Option(help="Folder for the figures.")] = Path("importance-plots"),
    png: Annotated[bool, typer.Option(help="PNG files too (needs kaleido).")] = False,
    db: DbOpt = None,
) -> None:
    """Figures 2 to 4 of runs' stored importance; several runs are drawn side by side."""
    store = _open(db)
    _write_plots(store, run_ids, out, png)


def _write_plots(store: Any, run_ids: list[int], out: Path, png: bool) -> None:
    from moebench.importance_plots import write_figures
    from moebench.importance_run import stored_record

    records = {}
    for run_id in run_ids:
        record = stored_record(store, run_id)
        records[f"run {run_id} {record['method']}"] = record
    for path in write_figures(records, out, png=png):
        console.print(f"wrote {path}")
