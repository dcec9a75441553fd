"""`moebench runs delete|checkpoints|log`: one stored run looked after from the terminal.

Display only; the tables and the deletion live in moebench.run_admin. Registered on `runs_app`
by moebench.cli.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moebench.cli import DbOpt, console, runs_app

RunArg = Annotated[int, typer.Argument(help="Run id (`moebench runs list`).")]


@runs_app.command("checkpoints")
def runs_checkpoints(run_id: RunArg, db: DbOpt = None) -> None:
    """A run's stored checkpoints: step, path, size, and whether each would resume."""
    from moebench import store
    from moebench.run_admin import checkpoint_table

    s = store.open_existing_store(db)
    rows = checkpoint_table(s, run_id)
    if not rows:
        console.print(f"Run {run_id} has no stored checkpoints.")
        return
    table = Table(title=f"checkpoints of run {run_id}", title_justify="left")
    for col in ("step", "path", "size", "valid?"):
        table.add_column(col)
    for r in rows:
        size = _bytes(r["bytes"]) if r["bytes"] is not None else ""
        state = r["state"] if r["state"] == "valid" else f"[yellow]{escape(r['state'])}[/]"
        table.add_row(str(r["step"]), escape(r["path"]), size, state)
    console.print(table)


@runs_app.command("log")
def runs_log(
    run_id: RunArg,
    every: Annotated[int, typer.Option(help="Show every Nth logged step (and the last).")] = 1,
    db: DbOpt = None,
) -> None:
    """A run's training curve and router statistics, one row per logged step."""
    from moebench import store
    from moebench.run_admin import training_table

    s = store.open_existing_store(db)
    rows = training_table(s, run_id, every)
    if not rows:
        console.print(f"Run {run_id} has no training log (it has not trained a step).")
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=f"training log of run {run_id}", title_justify="left")
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(_cell(col, r.get(col)) for col in columns))
    console.print(table)
    if any("gate entropy" in r for r in rows):
        console.print(
            "[dim]gate entropy: mean over routed modules (nats); top expert share: mean over "
            "modules of the busiest expert's share of routing (1/experts is balanced)[/]"
        )


@runs_app.command("delete")
def runs_delete(
    run_id: RunArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    db: DbOpt = None,
) -> None:
    """Delete a run: its store rows (metrics, predictions, log, checkpoints, artifacts) and
    the files in its own output folder. Refused while a process runs it."""
    from moebench import store
    from moebench.run_admin import delete_run, plan_delete

    s = store.open_existing_store(db)
    plan = plan_delete(s, run_id)
    run = plan.run
    counts = ", ".join(f"{n:,} {name}" for name, n in plan.rows.items())
    files = (
        f"the folder {plan.folder} ({_bytes(plan.folder_bytes)})"
        if plan.folder
        else "no files (its folder is gone)"
    )
    if plan.log_file:
        files += f" and the log {plan.log_file}"
    console.print(
        f"run {run_id}: {run['method']} on {run['model']}, suite {run['suite']}, seed "
        f"{run['seed']}, {run['status']}\nwith {counts}; {escape(files)}"
    )
    if not yes and not typer.confirm(f"Delete run {run_id}?", default=False):
        console.print("Nothing deleted.")
        raise typer.Exit(1)
    delete_run(s, plan)
    console.print(f"deleted run {run_id} from {s.display_url}")


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in ("step", "tokens", "routed modules"):
        return f"{value:,}"
    if column == "lr":
        return f"{value:.3g}"
    return f"{value:.4f}"
