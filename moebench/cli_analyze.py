"""`moebench analyze ...`: analyses of stored runs and of methods' preparation stages. Display
only; the numbers come from the library: moebench.importance_run / moebench.importance_stats
(`importance`) and moebench.allocation (`allocation`, LoRA-SMoE: how many modules change their
expert count between two stored runs, or between the sensitivity protocols and two seeds).
Registered on the main app by moebench.cli.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moebench.cli import DbOpt, _setup_logging, app, console, err
from moebench.errors import ConfigError

analyze_app = typer.Typer(
    help="Analyses of stored runs: importance, LoRA-SMoE allocation.",
    rich_markup_mode=None,  # as every group: plain help keeps "[default: ...]"
)
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


@analyze_app.command("allocation")
def allocation(
    run: Annotated[int | None, typer.Argument(help="A lora-smoe run id.")] = None,
    run2: Annotated[int | None, typer.Argument(help="A second run to compare with.")] = None,
    db: DbOpt = None,
    model: Annotated[
        str | None, typer.Option(help="Measure this model instead of reading runs.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Suite data root (an LLM-Adapters folder).")
    ] = None,
    suite: Annotated[str, typer.Option(help="Suite whose training files to read.")] = "la-offline",
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks of the suite.")] = (
        "boolq,arc_easy"
    ),
    seeds: Annotated[str, typer.Option(help="Two (or more) comma-separated seeds.")] = "0,1",
    samples: Annotated[
        int, typer.Option(help="sensitivity_samples (per layer: authors; per task: clean).")
    ] = 8,
    clean_samples: Annotated[
        int | None, typer.Option(help="Examples per task for clean [default: --samples].")
    ] = None,
    pool: Annotated[int, typer.Option(help="Rows read per task before sampling.")] = 512,
    fraction: Annotated[float, typer.Option(help="p of the allocation rule.")] = 0.6,
    groups: Annotated[str, typer.Option(help="module or attention.")] = "module",
) -> None:
    """Modules whose expert count differs: between RUN and RUN2, or (with --model) between
    the authors and clean protocols at each seed and between seeds of each protocol."""
    from moebench import allocation as alloc
    from moebench.errors import ConfigError

    if model is not None:
        counts = {"authors": samples, "clean": clean_samples or samples}
        maps = _measured_maps(model, data_dir, suite, tasks, seeds, counts, pool, fraction, groups)
        title = f"{model}: {tasks}, p={fraction}, samples authors {samples}/layer, clean " + str(
            counts["clean"]
        )
        _show(alloc.stability(maps), title)
        return
    if run is None:
        raise ConfigError("Give a run id (and a second to compare with), or --model to measure.")
    from moebench.cli_jobs import open_existing

    store = open_existing(db)
    first = alloc.run_allocation(store, run)
    if run2 is None:
        counts = list(first["modules"].values())
        console.print(
            f"run {run}: protocol={first.get('protocol', '?')}, seed={first.get('seed', '?')}, "
            f"{sum(counts)} experts on {sum(n > 0 for n in counts)} of {len(counts)} modules"
        )
        return
    second = alloc.run_allocation(store, run2)
    row = alloc.compare(first["modules"], second["modules"])
    names = ("protocol", "seed")
    between = ",".join(n for n in names if first.get(n) != second.get(n)) or "-"
    _show([{"between": between, "a": f"run {run}", "b": f"run {run2}"} | row], "stored runs")


def _measured_maps(
    model: str,
    data_dir: Path | None,
    suite: str,
    tasks: str,
    seeds: str,
    samples: Mapping[str, int],
    pool: int,
    fraction: float,
    groups: str,
) -> Any:
    from moebench import allocation as alloc
    from moebench.data import load_training_rows, tokenize_row
    from moebench.errors import ConfigError
    from moebench.models import load_model
    from moebench.paths import cache_dir
    from moebench.suites import get_suite

    if data_dir is None:
        raise ConfigError("--model needs --data-dir, the suite's data root.")
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r} must be comma-separated integers.") from None
    files = {tf.task: tf for tf in get_suite(suite).train if tf.task}
    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    missing = [t for t in wanted if t not in files]
    if missing:
        raise ConfigError(
            f"--tasks {', '.join(missing)} not among {suite}'s training files ({', '.join(files)})."
        )
    net, tok = load_model(model)
    examples = {
        t: [
            tokenize_row(
                r, tok, template="alpaca", cutoff_len=256, train_on_prompt=False, task_label=-1
            )
            for r in load_training_rows(data_dir / files[t].path)[:pool]
        ]
        for t in wanted
    }
    settings = [(p, s) for p in ("authors", "clean") for s in seed_list]
    return alloc.measure_maps(
        net,
        examples,
        settings=settings,
        samples=samples,
        fraction=fraction,
        groups=groups,
        model_name=model,
        cache_dir=cache_dir(),
        pad_token_id=int(tok.pad_token_id or 0),
        eos_token_id=tok.eos_token_id,
    )


def _show(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=f"allocation stability ({title})", title_justify="left")
    for col in ("between", "a", "b", "modules differing", "experts a / b"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["between"],
            r["a"],
            r["b"],
            f"{r['differ']} of {r['modules']}",
            f"{r['experts'][0]} / {r['experts'][1]}",
        )
    console.print(table)
