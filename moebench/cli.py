"""The `moebench` command line: parsing and display only; the work lives in the library."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moebench.cli_progress import ProgressObserver, progress_bars
from moebench.config import load_file, parse_sets
from moebench.digits import pct_text
from moebench.errors import ConfigError, MoebenchError
from moebench.paths import output_file

app = typer.Typer(
    help="moebench: one harness for LoRA mixture-of-experts methods.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help text is plain: with markup on, rich takes "[default: lora]" for a style tag and drops it.
    rich_markup_mode=None,
)
runs_app = typer.Typer(
    help="List and inspect stored runs.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(runs_app, name="runs")
# A pipe or log file gets a wide console: names people copy (suites, protocols) must not be cut.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="SQLAlchemy URL or SQLite path [env MOEBENCH_DB; default sqlite:///results/moebench.db].",
    ),
]


@app.command()
def run(
    method: Annotated[
        str | None, typer.Option(help="Method name (`moebench methods`). [default: lora]")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Alias (`moebench models`), hub id or local folder. [default: smollm2-135m]"
        ),
    ] = None,
    suite: Annotated[
        str | None, typer.Option(help="Suite name (`moebench tasks`). [default: mini]")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for adapter init and data order. [default: 42]")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most N items per eval set.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="JSON/TOML config file (same shape as a stored run's config)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="key=value for any method/train/eval field, e.g. --set rank=8 --set lr=1e-4.",
        ),
    ] = None,
    db: DbOpt = None,
    data_dir: Annotated[
        str | None, typer.Option(help="LLM-Adapters-style data folder [env MOEBENCH_DATA].")
    ] = None,
    output_dir: Annotated[
        str | None,
        typer.Option(
            help="Root folder of run outputs; each run writes checkpoints and its adapter into "
            "its own folder <root>/run-<id>-<hash8> [default: results/runs]."
        ),
    ] = None,
    resume: Annotated[
        int | None, typer.Option(help="Continue stored run ID from its last checkpoint.")
    ] = None,
    rerun: Annotated[
        int | None, typer.Option(help="Start a new run with stored run ID's exact config.")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Re-size the method to a parameter budget: lora:r=16, 0.5% or 2.3M "
            "(`moebench budget` shows the solutions)."
        ),
    ] = None,
    decontaminate: Annotated[
        bool,
        typer.Option(
            "--decontaminate",
            help="Drop training rows that overlap an eval set (the overlap is always reported).",
        ),
    ] = False,
    gpus: Annotated[
        int,
        typer.Option(
            help="Train on N data-parallel ranks of this machine (N GPUs; on a CPU, N processes); "
            "batch_size stays the global batch. With --resume: the ranks it continues on "
            "[default: 1, or the run's own].",
        ),
    ] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library details.")] = False,
) -> None:
    """Train a method on a suite and score it; `moebench run` alone runs the embedded default."""
    if method is not None and resume is None:
        _check_method_name(method)
    if model is not None and resume is None:
        from moebench.models import check_model_available

        check_model_available(model)
    from moebench import runner
    from moebench.runspec import resolve

    _setup_logging(verbose)
    env = runner.RunEnv(db=db, data_dir=data_dir, output_dir=output_dir)
    with progress_bars(console) as progress:
        observer = ProgressObserver(progress)
        try:
            given = [
                name
                for name, v in [
                    ("--method", method),
                    ("--model", model),
                    ("--suite", suite),
                    ("--seed", seed),
                    ("--max-steps", max_steps),
                    ("--limit", limit),
                    ("--config", config),
                    ("--set", set_),
                    ("--rerun", rerun),
                    ("--output-dir", output_dir),
                    ("--budget", budget),
                    ("--decontaminate", decontaminate),
                ]
                if v
            ]
            if resume is not None and given:
                raise ConfigError(
                    f"--resume continues run {resume} under its stored config, so "
                    f"{', '.join(given)} cannot be changed; use --rerun {resume} with "
                    "overrides for a new run."
                )
            if rerun is not None and config is not None:
                raise ConfigError("--rerun and --config both give the base config; pass one.")
            if resume is not None:
                run_id = runner.resume(resume, env, observer, gpus=gpus or None)
            else:
                base = load_file(config) if config else {}
                if rerun is not None:
                    base = _stored_config(db, rerun)
                options = dict(
                    method=method,
                    model=model,
                    suite=suite,
                    seed=seed,
                    max_steps=max_steps,
                    limit=limit,
                    decontaminate=decontaminate,
                )
                spec = resolve(base=base, sets=parse_sets(set_ or []), options=options)
                _refuse_ignored_data_dir(spec.suite, data_dir)
                record = None
                if budget is not None:
                    from moebench.budget import apply

                    spec, record = apply(spec, budget)
                    achieved = record["achieved_params"]
                    progress.console.print(
                        f"[dim]budget {budget}: {record['target_params']:,} parameters -> "
                        f"{spec.method} "
                        + ", ".join(f"{k}={v}" for k, v in record["knobs"].items())
                        + (f" ({achieved:,}, {record['relative_error']:+.1%})" if achieved else "")
                        + "[/]"
                    )
                progress.console.print(
                    f"[dim]config {spec.hash[:12]}: {spec.method} on {spec.model}, suite "
                    f"{spec.suite}, seed {spec.seed} (all settings: moebench runs show ID "
                    "--config)[/]"
                )
                run_id = runner.execute(
                    spec,
                    env,
                    observer,
                    budget=record,
                    on_new_store=lambda url: progress.console.print(
                        f"created a new results store at {url}"
                    ),
                    gpus=gpus or 1,
                )
        except KeyboardInterrupt:
            progress.stop()
            err.print(
                "Interrupted: the run is marked interrupted in the store with its last "
                "checkpoint; `moebench runs list` shows it."
            )
            raise typer.Exit(130) from None
    _print_metrics(db, run_id)


def _check_method_name(name: str) -> None:
    """A misspelt --method is refused before torch loads (the plugins import it)."""
    from moebench.errors import unknown
    from moebench.registry import declared_method_names

    names = declared_method_names()
    if name not in names:
        raise unknown("method", name, names)


def _refuse_ignored_data_dir(suite_name: str, data_dir: str | None) -> None:
    """A packaged suite reads its own files: a --data-dir beside it would be silently ignored."""
    from moebench.suites import get_suite

    if data_dir is not None and get_suite(suite_name).packaged:
        raise ConfigError(
            f"--data-dir {data_dir} would be ignored: suite '{suite_name}' reads its own "
            "packaged files; drop --data-dir, or pick a suite that reads a data folder "
            "(`moebench tasks`)."
        )


def _stored_config(db: str | None, run_id: int) -> dict[str, Any]:
    from moebench import store

    return dict(store.get_run(store.open_existing_store(db), run_id)["config"])


def _setup_logging(verbose: bool) -> None:
    """moebench's INFO lines, and libraries' own warnings, only with --verbose."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
    if not verbose:
        _quiet_libraries()


# Deprecation notices from torch and transformers are about calls inside moebench: a user can
# do nothing about them, and every run printed one. Set in the environment too, so the workers
# and ranks a command starts are as quiet; a user's own PYTHONWARNINGS or TRANSFORMERS_VERBOSITY
# is left alone.
_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _quiet_libraries() -> None:
    if "PYTHONWARNINGS" not in os.environ and not sys.warnoptions:
        for category in _LIBRARY_NOISE:
            warnings.filterwarnings("ignore", category=category)
        os.environ["PYTHONWARNINGS"] = ",".join(f"ignore::{c.__name__}" for c in _LIBRARY_NOISE)
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers is imported
        logging.getLogger("transformers").setLevel(logging.ERROR)  # if it already was
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        # transformers' "Loading weights" bar: in a job's log file or a pipe, a line of \r
        # frames per model load (moebench's own progress lines say what is happening)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def _print_metrics(db: str | None, run_id: int) -> None:
    from moebench import store

    s = store.open_existing_store(db)
    row = store.get_run(s, run_id)
    table = Table(title=f"run {run_id}: {row['method']} on {row['model']} ({row['status']})")
    for col in ("task", "metric", "value %", "± stderr", "n", "parse fail", "protocol"):
        table.add_column(col)
    metrics = store.get_metrics(s, run_id)
    fails = {
        (m["task"], m["protocol"]): m["value"]
        for m in metrics
        if m["metric"] == "parse_failure_rate"
    }
    for m in metrics:
        if m["metric"] == "parse_failure_rate":
            continue
        fail = fails.get((m["task"], m["protocol"]))
        table.add_row(
            m["task"],
            m["metric"],
            pct_text(m["value"]),
            pct_text(m["stderr"]) if m["stderr"] is not None else "",
            str(m["n"]),
            f"{100 * fail:.1f}%" if fail is not None else "",
            m["protocol"],
        )
    console.print(table)
    console.print(f"stored in {store.db.display_url(s.url)} as run {run_id}")


@app.command()
def methods() -> None:
    """List registered methods with their config fields, defaults and help, then the loop's."""
    from moebench.method_listing import COLUMNS, method_tables

    for t in method_tables():
        table = Table(title=t.title, title_justify="left")
        for col in COLUMNS:
            table.add_column(col)
        for name, default, accepted, help_text in t.rows:
            table.add_row(name, escape(default), escape(accepted), help_text)
        console.print(table)


@app.command()
def budget(
    model: Annotated[str, typer.Option(help="Alias, hub id or local folder.")] = "smollm2-135m",
    target: Annotated[
        str | None,
        typer.Option(help="A method config whose trainable parameters to match, e.g. lora:r=16."),
    ] = None,
    params: Annotated[
        str | None,
        typer.Option(help="A share of the base model (0.5%) or a count (2.3M) instead."),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Allowed relative miss.")] = 0.05,
) -> None:
    """For every method, the config whose trainable parameters land within tolerance of a target."""
    from moebench.budget import model_shapes, parse_target, solve_all

    if (target is None) == (params is None):
        raise ConfigError("Give exactly one of --target (e.g. lora:r=16) or --params (e.g. 0.5%).")
    if not 0 < tolerance < 1:
        raise ConfigError(f"--tolerance {tolerance} must be in (0, 1), e.g. 0.05.")
    shapes, total = model_shapes(model)
    goal = parse_target(target or params or "", shapes, total)
    table = Table(
        title=f"budget {goal.text} on {model}: {goal.params:,} trainable parameters "
        f"({100 * goal.params / total:.3f}% of {total:,}), tolerance {tolerance:.0%}",
        title_justify="left",
    )
    for col in ("method", "config", "trainable", "vs target", "% of base", "active/token", "fits"):
        table.add_column(col)
    for s in solve_all(shapes, goal.params, tolerance):
        if s.achieved is None:
            table.add_row(
                s.method,
                f"budget_params={goal.params}",
                "set at run time",
                "",
                "",
                "",
                "by its allocation",
            )
            continue
        table.add_row(
            s.method,
            ", ".join(f"{k}={v}" for k, v in s.knobs.items()) or "(default)",
            f"{s.achieved:,}",
            f"{s.error:+.1%}",
            f"{100 * s.achieved / total:.3f}%",
            f"{s.active:,}" if s.active is not None else "",
            "yes" if s.within(tolerance) else "NO",
        )
    console.print(table)


@app.command()
def models() -> None:
    """List model aliases and what they resolve to."""
    from moebench.models import ALIASES

    table = Table(title="model aliases (or pass a hub id or a local folder)")
    for col in ("alias", "source", "resolves to", "about"):
        table.add_column(col)
    for a in ALIASES.values():
        table.add_row(a.alias, a.source, a.ref, a.help)
    console.print(table)


@app.command()
def tasks(
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="LLM-Adapters-style folder to count rows in [env MOEBENCH_DATA]; without one, "
            "sizes are shown for packaged data only."
        ),
    ] = None,
) -> None:
    """List eval tasks and suites, with their sizes where the data is at hand."""
    from moebench.suites import SUITES, data_root, row_counts
    from moebench.task import TASKS

    root = data_root(data_dir)
    table = Table(title="tasks")
    for col in ("task", "family", "rows", "new tokens", "scoring", "source"):
        table.add_column(col)
    for name, t in TASKS:
        n = row_counts(t, root)
        table.add_row(
            name,
            t.family,
            f"{n:,}" if n is not None else "-",
            str(t.max_new_tokens),
            t.scoring_rule,
            t.data_source,
        )
    console.print(table)
    suites = Table(title="suites" + (f" (rows counted in {root})" if root else ""))
    for col in ("suite", "version", "training data", "eval sets", "defaults it sets", "about"):
        suites.add_column(col)
    for s in SUITES.values():
        defaults = [f"train.{k}={v}" for k, v in s.train_defaults.items()]
        defaults += [f"eval.{k}={v}" for k, v in s.eval_defaults.items()]
        train = [f.path + (f" (sample {f.sample:,})" if f.sample else "") for f in s.train]
        train += [f"{h.task}: {h.train_fraction:.0%} of its test file" for h in s.held_out]
        suites.add_row(
            s.name,
            s.version,
            "\n".join(train),
            ", ".join(s.eval_tasks),
            ", ".join(defaults),
            s.help,
        )
    console.print(suites)


@runs_app.command("list")
def runs_list(
    db: DbOpt = None,
    method: Annotated[str | None, typer.Option(help="Only this method.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most N runs (1 or more).")] = 50,
) -> None:
    """Stored runs, newest first."""
    from moebench import store

    if limit < 1:
        raise ConfigError(f"--limit {limit} must be 1 or more (the number of runs listed).")

    s = store.open_existing_store(db)
    table = Table(title=f"runs in {store.db.display_url(s.url)}")
    for col in (
        "id",
        "created",
        "method",
        "model",
        "suite",
        "seed",
        "status",
        "trainable",
        "reason",
    ):
        table.add_column(col)
    for r in store.list_runs(s, method=method, model=model, status=status, limit=limit):
        table.add_row(
            str(r["id"]),
            r["created_at"].strftime("%Y-%m-%d %H:%M"),
            r["method"],
            r["model"],
            r["suite"],
            str(r["seed"]),
            r["status"],
            f"{r['trainable_params'] or 0:,}",
            (r["status_reason"] or "")[:80],
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="Run id.")],
    db: DbOpt = None,
    config_only: Annotated[
        bool, typer.Option("--config", help="Print only the config (reusable with run --config).")
    ] = False,
) -> None:
    """One run: its record, config and scores."""
    from moebench import store

    s = store.open_existing_store(db)
    row = store.get_run(s, run_id)
    if config_only:
        print(json.dumps(row["config"], indent=2))
        return
    for key, value in row.items():
        if key == "config":
            continue
        if isinstance(value, float):
            value = f"{value:,.2f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int) and key.endswith(("params", "bytes")):
            value = f"{value:,}"
        console.print(f"[bold]{key}[/]: {escape(str(value))}")
    console.print("[dim]settings: moebench runs show ID --config[/]")
    _print_artifacts(store.get_artifacts(s, run_id))
    _print_metrics(db, run_id)


def _print_artifacts(artifacts: dict[str, Any]) -> None:
    """A run's named results in brief: notes, budget, allocation map, router summary."""
    for note in artifacts.get("notes", []):
        console.print(f"[bold]note[/]: {escape(note)}")
    budget = artifacts.get("budget")
    if budget:
        console.print(
            f"[bold]budget[/]: {budget['target']} = {budget['target_params']:,} parameters; "
            f"achieved {budget['achieved_params']:,} ({budget['relative_error']:+.1%}), "
            f"{budget['active_params']:,} active per token"
        )
    for switch in artifacts.get("phase_switches", []):
        if switch.get("ratio") is not None:
            console.print(
                f"[bold]phase switch[/] {switch['from']} -> {switch['to']} at step "
                f"{switch['step']}: adapter output norm {switch['adapter_out_norm_before']:.4g}"
                f" -> {switch['adapter_out_norm_after']:.4g} (x{switch['ratio']:.3g})"
            )
    allocation = artifacts.get("allocation")
    if allocation and allocation.get("modules"):
        _layer_table("experts per module (allocation)", allocation["modules"], str)
    router = artifacts.get("router_stats")
    if router:
        entropy = {
            k.removesuffix(".entropy"): v
            for k, v in router["mean"].items()
            if k.endswith("entropy")
        }
        _layer_table(
            f"mean gate entropy (nats) over {router['logged_steps']} logged steps",
            entropy,
            lambda v: f"{v:.2f}",
        )


def _layer_table(title: str, values: dict[str, Any], fmt: Callable[[Any], str]) -> None:
    """Values keyed by module name as a layers x module-type grid (a text heat map)."""
    grid: dict[int, dict[str, Any]] = {}
    columns: list[str] = []
    for name, value in values.items():
        match = re.search(r"layers\.(\d+)\..*?([A-Za-z_]+)$", name)
        if not match:
            continue
        layer, module = int(match.group(1)), match.group(2)
        grid.setdefault(layer, {})[module] = value
        if module not in columns:
            columns.append(module)
    if not grid:
        return
    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    for c in columns:
        table.add_column(c)
    for layer in sorted(grid):
        table.add_row(
            str(layer), *(fmt(grid[layer][c]) if c in grid[layer] else "" for c in columns)
        )
    console.print(table)


@app.command("eval")
def eval_run(
    run_id: Annotated[int, typer.Argument(help="Stored run id whose adapter to score.")],
    lm_eval_tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated lm-eval task names, e.g. boolq,gsm8k."),
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="Folder of extra lm-eval task YAMLs (local data).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most N items per task.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="lm-eval batch size [default: the run's eval.batch_size].")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot examples [default: each task's own].")
    ] = None,
    db: DbOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library details.")] = False,
) -> None:
    """Score a stored run's adapter on lm-eval tasks; the scores are stored with the run."""
    from moebench import store
    from moebench.lmeval_bridge import evaluate_run, parse_task_names

    _setup_logging(verbose)
    # lm-eval warns about things that are expected here (an in-memory model, default
    # aggregations); its errors still show.
    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)
    if lm_eval_tasks is None:
        raise ConfigError("Give the tasks to score with --lm-eval-tasks, e.g. boolq,gsm8k.")
    for flag, value, low in (("--limit", limit, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value} must be {low} or more.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be 0 or more (0: zero-shot).")
    result = evaluate_run(
        store.open_existing_store(db),
        run_id,
        parse_task_names(lm_eval_tasks),
        include_path=include_path,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
    )
    table = Table(title=f"run {run_id} on lm-eval tasks", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "n", "protocol"):
        table.add_column(col)
    for m in result.metrics:
        table.add_row(
            m["task"],
            m["metric"],
            f"{m['value']:.4f}",
            f"{m['stderr']:.4f}" if m["stderr"] is not None else "",
            str(m["n"]),
            m["protocol"],
        )
    console.print(table)
    merged = ", adapter merged" if result.merged else ""
    console.print(
        f"stored {len(result.metrics)} metrics and {len(result.predictions)} per-item "
        f"predictions with run {run_id}{merged}"
    )


@app.command()
def export(
    db: DbOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    run_ids: Annotated[
        list[int] | None, typer.Option("--run", help="Run id (repeatable; default all).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    predictions: Annotated[
        bool, typer.Option(help="JSON only: include per-item predictions.")
    ] = False,
    bundle: Annotated[
        Path | None, typer.Option(help="Write a bundle with every record (`moebench import`).")
    ] = None,
) -> None:
    """Export runs and their metrics as CSV or JSON, or every record as a bundle."""
    from moebench import store

    if bundle is not None:
        from moebench.cli_leaderboard import export_bundle_command

        export_bundle_command(db, bundle, run_ids)
        return
    if predictions and fmt != "json":
        raise ConfigError(
            f"--predictions is JSON only (CSV has no place for per-item predictions), so it "
            f"would be ignored with --format {fmt}; use --format json --predictions."
        )

    if out is not None:
        output_file(out, "--out")
    text = store.export_runs(
        store.open_existing_store(db), run_ids or None, fmt, out, include_predictions=predictions
    )
    if out is None:
        sys.stdout.write(text)


@app.command()
def compare(
    run_a: Annotated[int, typer.Argument(help="Baseline run id (A).")],
    run_b: Annotated[int, typer.Argument(help="Run id compared against it (B).")],
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Only this set (repeatable).")
    ] = None,
    flips: Annotated[
        int, typer.Option(help="List up to N flipped item ids per set and direction.")
    ] = 10,
    resamples: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap (0 to 2^63-1).")] = 0,
    db: DbOpt = None,
) -> None:
    """Run B against run A item by item: B-A, its 95% interval, bootstrap and McNemar p."""
    from moebench import store
    from moebench.comparisons import compare_runs

    if flips < 0:
        raise ConfigError(f"--flips {flips} must be 0 or more (0: list no item ids).")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed} is out of range; accepted: an integer in [0, 2^63-1].")
    opened = store.open_existing_store(db)
    c = compare_runs(opened, run_a, run_b, tasks=task, resamples=resamples, seed=seed)
    for label, r in (("A", c.run_a), ("B", c.run_b)):
        console.print(
            f"[bold]{label}[/]: run {r['id']}, {r['method']} on {r['model']}, "
            f"suite {r['suite']}, seed {r['seed']}"
        )
    table = Table(
        title=f"B - A on the items both runs scored under one protocol; 95% interval from "
        f"{resamples:,} paired bootstrap resamples (seed {seed})",
        title_justify="left",
    )
    for col in ("set", "n", "A %", "B %", "B-A pts", "95% CI", "p boot", "p McNemar"):
        table.add_column(col)
    for col in ("A only", "B only", "verdict", "protocol"):
        table.add_column(col)
    for s in c.sets:
        table.add_row(s.task, *_paired_cells(s.result, per_item=True), s.protocol)
    for a in c.averages:
        table.add_row(
            f"{a.name} ({len(a.sets)} sets)",
            *_paired_cells(a.result, per_item=False),
            f"mean of {', '.join(a.sets)}",
        )
    console.print(table)
    console.print(
        "[dim]verdict: better where the 95% interval excludes 0; p boot: paired bootstrap, "
        "null-shifted; p McNemar: exact, on the items only one run got right[/]"
    )
    multi = {s.task for s in c.sets if sum(t.task == s.task for t in c.sets) > 1}
    for s in c.sets:
        name = f"{s.task} ({s.protocol})" if s.task in multi else s.task
        if s.mismatched:
            console.print(
                f"{name}: {s.mismatched} item ids stored by both runs hold different prompts "
                "or golds and were not paired"
            )
        for who, ids in (("A right, B wrong", s.a_only_ids), ("A wrong, B right", s.b_only_ids)):
            if flips and ids:
                more = f" (+{len(ids) - flips} more)" if len(ids) > flips else ""
                shown = escape(", ".join(ids[:flips]))
                console.print(f"{name}, {who} ({len(ids)}): {shown}{more}")
    for name, reason in c.skipped:
        console.print(f"not compared: {name}: {escape(reason)}")
    for note in c.notes:
        console.print(f"[dim]{escape(note)}[/]")


def _paired_cells(r: Any, *, per_item: bool) -> list[str]:
    """Table cells from n to verdict for one `moebench.stats.PairedResult`."""
    from moebench.stats import binomial_stderr

    def acc(p: float) -> str:
        # A mean over sets is not one binomial proportion: no ± for it.
        if not per_item:
            return pct_text(p)
        return f"{pct_text(p)} ± {pct_text(binomial_stderr(p, r.n))}"

    verdict = "B better" if r.low > 0 else "A better" if r.high < 0 else "no clear difference"
    return [
        str(r.n),
        acc(r.acc_a),
        acc(r.acc_b),
        pct_text(r.diff, sign=True),
        f"[{pct_text(r.low, sign=True)}, {pct_text(r.high, sign=True)}]",
        # No resample as far from the observed difference as 0 is: B resamples resolve no lower.
        f"<={1 / (r.samples.size + 1):.1e}"
        if r.p_bootstrap <= 1 / (r.samples.size + 1)
        else _p_value(r.p_bootstrap),
        _p_value(r.p_mcnemar) if r.p_mcnemar is not None else "",
        str(r.a_only),
        str(r.b_only),
        verdict,
    ]


def _p_value(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


@runs_app.command("summary")
def runs_summary(
    method: Annotated[str | None, typer.Option(help="Only this method.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    suite: Annotated[str | None, typer.Option(help="Only this suite.")] = None,
    min_seeds: Annotated[int, typer.Option(help="Show groups with at least N seeds.")] = 2,
    db: DbOpt = None,
) -> None:
    """Finished runs that differ only in seed: per-set mean, std and 95% t interval."""
    from moebench import store
    from moebench.comparisons import seed_groups

    s = store.open_existing_store(db)
    groups = seed_groups(s, method=method, model=model, suite=suite, min_seeds=min_seeds)
    if not groups:
        console.print(
            f"No {min_seeds} or more finished runs in {store.db.display_url(s.url)} match the "
            "filters and share a config apart from the seed."
        )
    for g in groups:
        table = Table(
            title=f"{g.method} on {g.model}, suite {g.suite}: runs "
            f"{', '.join(map(str, g.runs))} (seeds {', '.join(map(str, g.seeds))})",
            title_justify="left",
        )
        for col in ("set", "metric", "seeds", "mean %", "std pts", "95% interval (t)"):
            table.add_column(col)
        for col in ("one-run se", "values %", "protocol"):
            table.add_column(col)
        for row in g.sets:
            m = row.summary
            table.add_row(
                row.task,
                row.metric,
                ", ".join(map(str, row.seeds)),
                pct_text(m.mean),
                pct_text(m.std) if m.std is not None else "",
                f"[{pct_text(m.low)}, {pct_text(m.high)}]" if m.low is not None else "one seed",
                pct_text(row.binomial_se) if row.binomial_se is not None else "",
                ", ".join(pct_text(v) for v in row.values),
                row.protocol,
            )
        console.print(table)
        if g.repeats:
            console.print(
                f"[dim]runs {', '.join(map(str, g.repeats))} repeat a seed of this group; "
                "only the newest run per seed is counted[/]"
            )


# `sweep`, `worker`, `jobs`, `analyze` and `runs delete|checkpoints|log` live in their own
# modules, registered on `app` when imported.
import moebench.cli_leaderboard  # noqa: E402, F401  (`leaderboard`, bundles)
from moebench import cli_analyze, cli_jobs, cli_runs  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except MoebenchError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
