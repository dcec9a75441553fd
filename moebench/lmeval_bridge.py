"""Score a stored run on lm-evaluation-harness tasks and keep the numbers with the run.

lm-eval's own tasks (its boolq, gsm8k, ...) use other prompts and often other data than the
LLM-Adapters protocol, so they are a separate protocol: every number stored here carries the
protocol id `lm-eval/<task>/v<task version>/<k>shot` and a description of how lm-eval made it
(lm-eval version, the task's data source and split, its templates, generation settings, filters).

The model lm-eval sees is the run's adapted model rebuilt from what the store holds: the run's
config, the prepared method config and adapter weights that `runner.save_adapter` wrote to
`<output_dir>/adapter/`. It is handed to lm-eval's `HFLM` as an in-memory model together with
its tokenizer object, so lm-eval never looks for either on the model hub.

Task names are checked, and each task's data is loaded, before any weight loads; a task that is
unknown or whose data cannot be read fails with one sentence that names it and says what is
available. Offline, lm-eval's built-in tasks cannot download their datasets; a task YAML in
`--include-path` with `dataset_path: json` and local `data_files` works without network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from moebench import store as db
from moebench.adapted import build_adapted
from moebench.config import build
from moebench.errors import ConfigError, DataError, did_you_mean
from moebench.inject import Adapted
from moebench.method import get_method
from moebench.runner import spec_of
from moebench.runspec import RunSpec

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

PROTOCOL_PREFIX = "lm-eval"
PROTOCOL_MAX = 64  # the store's protocol column width
# What lm-eval's regex filters put in place of a response they could not parse.
LMEVAL_NO_MATCH = "[invalid]"
# Task-config fields that say how a number was made; stored with every metric.
CONFIG_ESSENTIALS = (
    "task",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "test_split",
    "validation_split",
    "fewshot_split",
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "generation_kwargs",
    "metric_list",
    "filter_list",
    "repeats",
)


@dataclass
class RebuiltRun:
    """A stored run's adapted model, ready to score, and how it was built."""

    adapted: Adapted
    tokenizer: PreTrainedTokenizerBase
    spec: RunSpec
    device: torch.device
    amp: torch.dtype | None
    adapter_dir: Path


def lm_eval_version() -> str:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise ConfigError(
            "lm-eval is not installed; `pip install 'moebench[eval]' accelerate` (or "
            "scripts/setup.sh) adds it."
        ) from None


# --- the run's model ---------------------------------------------------------------------------


def adapter_dir(row: Mapping[str, Any]) -> Path:
    """The folder holding a run's final adapter; fails with a sentence when it is not there."""
    folder = Path(row["output_dir"] or "") / "adapter"
    needed = ("adapter.safetensors", "adapter_config.json")
    missing = [f for f in needed if not (folder / f).is_file()]
    if row["output_dir"] is None or missing:
        hint = (
            f"finish it first with `moebench run --resume {row['id']}`"
            if row["status"] != "done"
            else "was its output folder moved or deleted?"
        )
        raise ConfigError(
            f"Run {row['id']} ({row['status']}) has no saved adapter in '{folder}' "
            f"(missing {', '.join(missing) or 'output folder'}); {hint}"
        )
    return folder


def rebuild_run(store: db.Store, run_id: int) -> RebuiltRun:
    """The run's adapted model as training left it, rebuilt from the store and its adapter folder.

    Built as the runner builds it: the base model at the run's precision, the same seed before
    injection (so anything a method draws at init that is not a saved weight comes out the same),
    the prepared method config (no preparation stage runs again), the saved adapter weights
    (fp32, as training keeps them), and the method's last phase, the form training ended in.
    """
    row = db.get_run(store, run_id)
    folder = adapter_dir(row)
    saved = json.loads((folder / "adapter_config.json").read_text())
    spec = spec_of(row)  # refused if the stored spec no longer resolves to the same settings
    if (saved.get("method"), saved.get("model")) != (spec.method, spec.model):
        raise ConfigError(
            f"The adapter in '{folder}' was saved for {saved.get('method')} on "
            f"{saved.get('model')}, but run {run_id} is {spec.method} on {spec.model}; "
            "the run's output folder holds another run's adapter."
        )
    method = get_method(spec.method)
    method_config = build(method.config_cls, saved["method_config"], section=method.name)
    built = build_adapted(spec, method_config, adapter=folder)
    return RebuiltRun(built.adapted, built.tokenizer, spec, built.device, built.amp, folder)


# --- lm-eval tasks ------------------------------------------------------------------------------


def parse_task_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ConfigError(
            f"--lm-eval-tasks {text!r} has an empty name; give comma-separated lm-eval task "
            "names, e.g. boolq,gsm8k."
        )
    return list(dict.fromkeys(names))


def task_manager(names: Sequence[str], include_path: Path | None) -> TaskManager:
    """An lm-eval TaskManager that knows every name, or a one-sentence error naming the unknown.

    With `--include-path` whose tasks cover every name, lm-eval's ~15,000 built-in task files are
    not indexed (a few seconds saved); otherwise both are searched, the local folder first.
    """
    from lm_eval.tasks import TaskManager

    local: list[str] = []
    if include_path is not None:
        if not include_path.is_dir():
            raise ConfigError(
                f"--include-path '{include_path}' is not a folder; give a folder of lm-eval "
                "task YAML files."
            )
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        local = manager.all_tasks
        if all(_known(manager, n) for n in names):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if not _known(manager, n)]
    if unknown:
        name = unknown[0]
        where = (
            f"tasks in '{include_path}': {', '.join(local) or 'none'}; "
            if include_path is not None
            else ""
        )
        raise ConfigError(
            f"Unknown lm-eval task '{name}'; {where}lm-eval knows {len(manager.all_tasks):,} "
            "built-in task, group and tag names (`lm-eval ls tasks` lists them)."
            + did_you_mean(name, manager.all_tasks)
        )
    return manager


def _known(manager: TaskManager, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file())


def load_tasks(manager: TaskManager, names: Sequence[str], include_path: Path | None) -> list[Any]:
    """Build each task (which reads its dataset) one at a time, so a failure names its task.

    `datasets` draws a progress bar per split it builds; on a terminal they would bury the one
    sentence a failing task ends with, so they are off here (moebench shows its own progress).
    """
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    built: list[Any] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # datasets, network, YAML and template errors alike
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            local = (
                f" (tasks found there: {', '.join(manager.all_tasks[:20])})"
                if include_path is not None and len(manager.all_tasks) < 200
                else ""
            )
            raise DataError(
                f"lm-eval task '{name}' could not load its data ({type(e).__name__}: {reason}); "
                "without network, copy the data locally, describe it in a task YAML with "
                "`dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}`, and "
                f"pass that YAML's folder as --include-path{local}."
            ) from e
        groups = loaded.get("groups") or {}
        built += [groups[name]] if name in groups else list(loaded["tasks"].values())
    return built


# --- scoring and storing ------------------------------------------------------------------------


def protocol_id(task: str, task_version: Any, num_fewshot: Any) -> str:
    """`lm-eval/<task>/v<version>/<k>shot`, shortened with a hash if the store cannot hold it."""
    tail = f"/v{task_version}/{num_fewshot}shot"
    pid = f"{PROTOCOL_PREFIX}/{task}{tail}"
    if len(pid) <= PROTOCOL_MAX:
        return pid
    digest = hashlib.sha256(task.encode()).hexdigest()[:8]
    room = PROTOCOL_MAX - len(PROTOCOL_PREFIX) - len(tail) - len(digest) - 3
    return f"{PROTOCOL_PREFIX}/{task[:room]}~{digest}{tail}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return _number(value.item())
    return None


def _sha256_files(dataset_kwargs: Any) -> dict[str, str]:
    """sha256 of each local data file a task reads (provenance for `dataset_path: json`)."""
    files = (dataset_kwargs or {}).get("data_files") if isinstance(dataset_kwargs, dict) else None
    if isinstance(files, str | list):
        files = {"data": files}
    out: dict[str, str] = {}
    for split, paths in (files or {}).items():
        for p in [paths] if isinstance(paths, str) else list(paths):
            path = Path(str(p))
            if path.is_file():
                out[f"{split}:{path}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _task_names_under(results: Mapping[str, Any], name: str) -> list[str]:
    """The leaf tasks of a group (the name itself for a task)."""
    children = (results.get("group_subtasks") or {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _task_names_under(results, child)]


def metric_rows(
    results: Mapping[str, Any], settings: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Store rows for every numeric metric lm-eval reports, and the protocol id of each task.

    lm-eval keys a metric `<metric>,<filter>`; the filter "none" (no post-processing) is dropped,
    any other is kept as lm-eval writes it (e.g. `exact_match,strict-match`).
    """
    configs = results.get("configs") or {}
    n_samples = results.get("n-samples") or {}
    rows: list[dict[str, Any]] = []
    protocols: dict[str, str] = {}
    for name, values in (results.get("results") or {}).items():
        leaves = _task_names_under(results, name)
        n = sum(int((n_samples.get(t) or {}).get("effective", 0)) for t in leaves)
        if not n:
            n = int(values.get("sample_len") or 0)
        shots = (results.get("n-shot") or {}).get(name, 0)
        task_version = (results.get("versions") or {}).get(name)
        pid = protocol_id(name, task_version, shots)
        protocols[name] = pid
        config = configs.get(name) or {}
        detail = {
            "backend": "lm-eval",
            "task_version": task_version,
            "num_fewshot": shots,
            "n": n,
            "subtasks": leaves if leaves != [name] else None,
            "task_config": {k: config[k] for k in CONFIG_ESSENTIALS if k in config} or None,
            "config_source": (config.get("metadata") or {}).get("config_source"),
            "data_sha256": _sha256_files(config.get("dataset_kwargs")) or None,
            **settings,
        }
        for key, value in values.items():
            metric, _, flt = key.partition(",")
            if not flt or metric.endswith("_stderr"):
                continue
            number = _number(value)
            if number is None:
                continue
            stderr = _number(values.get(f"{metric}_stderr,{flt}"))
            rows.append(
                {
                    "task": name,
                    "metric": metric if flt == "none" else key,
                    "value": number,
                    "n": n,
                    "stderr": stderr,
                    "protocol": pid,
                    "protocol_detail": detail,
                }
            )
    return rows, protocols


def prediction_rows(
    results: Mapping[str, Any], protocols: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One stored prediction per lm-eval sample (per filter, when a task has several).

    `output` is the generated text (generate_until) or the chosen choice (multiple_choice);
    `correct` says the task's first metric scored 1 on the item; every per-item metric value and
    the choices' log-likelihoods go to `detail`.
    """
    configs = results.get("configs") or {}
    rows: list[dict[str, Any]] = []
    for task, samples in (results.get("samples") or {}).items():
        config = configs.get(task) or {}
        kind = config.get("output_type")
        filters = {s.get("filter", "none") for s in samples}
        for s in samples:
            flt = s.get("filter", "none")
            item_id = f"{task}/{s['doc_id']}" + ("" if len(filters) == 1 else f"/{flt}")
            scores = {m: _number(s.get(m)) for m in s.get("metrics", [])}
            first = next(iter(scores.values()), None)
            prompt = _prompt_text(s)
            detail: dict[str, Any] = {"filter": flt, "metrics": scores}
            output, extracted, parse_failed = _response(s, kind, detail)
            rows.append(
                {
                    "task": task,
                    "item_id": item_id,
                    "prompt_hash": hashlib.sha256(prompt.encode()).hexdigest(),
                    "output": output,
                    "extracted": extracted,
                    "gold": _gold(s.get("target"), detail.get("choices")),
                    "correct": first == 1.0,
                    "parse_failed": parse_failed,
                    "protocol": protocols[task],
                    "detail": detail,
                }
            )
    return rows


def _prompt_text(sample: Mapping[str, Any]) -> str:
    args = sample.get("arguments") or [[""]]
    first = args[0][0] if isinstance(args[0], list | tuple) else args[0]
    return first if isinstance(first, str) else json.dumps(first, default=str)


def _response(
    sample: Mapping[str, Any], kind: str | None, detail: dict[str, Any]
) -> tuple[str, str | None, bool]:
    """(output, extracted, parse failed) of one sample; fills `detail` with what is below it."""
    filtered = sample.get("filtered_resps") or []
    if kind == "multiple_choice":
        choices = [a[1] for a in sample.get("arguments") or []]
        logliks = [float(r[0]) for r in filtered]
        detail.update(
            choices=choices,
            loglikelihoods=logliks,
            is_greedy=[bool(r[1]) for r in filtered],
        )
        best = max(range(len(logliks)), key=logliks.__getitem__) if logliks else None
        text = choices[best].strip() if best is not None else ""
        return text, text, False
    if kind == "generate_until":
        raw = (sample.get("resps") or [[""]])[0]
        raw_text = raw[0] if isinstance(raw, list) and raw else str(raw)
        final = filtered[0] if filtered else ""
        final = final if isinstance(final, str) else json.dumps(final, default=str)
        if final != raw_text:
            detail["filtered"] = final
        return str(raw_text), final, final == LMEVAL_NO_MATCH
    values = [_number(r[0] if isinstance(r, list | tuple) else r) for r in filtered]
    detail["responses"] = values
    return json.dumps(values), None, False


def _gold(target: Any, choices: Sequence[str] | None) -> str:
    if choices and isinstance(target, int) and 0 <= target < len(choices):
        return choices[target].strip()
    return target if isinstance(target, str) else json.dumps(target, default=str)


@dataclass(frozen=True)
class LmEvalResult:
    metrics: list[dict[str, Any]]
    predictions: list[dict[str, Any]]
    merged: bool


def evaluate_run(
    store: db.Store,
    run_id: int,
    task_names: Sequence[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    num_fewshot: int | None = None,
) -> LmEvalResult:
    """Score run `run_id` on lm-eval tasks and store the metrics and per-item predictions."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be a positive number of items per task.")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be >= 0.")
    lm_version = lm_eval_version()
    adapter_dir(db.get_run(store, run_id))  # fail before the slow steps
    manager = task_manager(task_names, include_path)
    tasks = load_tasks(manager, task_names, include_path)

    import lm_eval

    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ConfigError(
            f"lm-eval's Hugging Face backend cannot load ({e}); `pip install 'lm-eval[hf]'` "
            "adds what it needs (accelerate)."
        ) from e

    run = rebuild_run(store, run_id)
    adapted = run.adapted
    # As score_all: merging saves the adapter's extra matmuls; never on a bf16 base, which
    # would round a small update away.
    fp32_base = all(p.dtype == torch.float32 for p in adapted.model.parameters())
    merged = run.spec.eval.merge and adapted.mergeable and fp32_base
    if merged:
        adapted.merge()
    batch = batch_size or run.spec.eval.batch_size
    lm = HFLM(
        pretrained=adapted.model,
        tokenizer=run.tokenizer,
        backend="causal",
        batch_size=batch,
        mixed_precision_dtype=run.amp,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=True,
    )
    if results is None:  # only on a non-zero rank of a distributed launch
        return LmEvalResult([], [], merged)
    settings = {
        "limit": limit,
        "batch_size": batch,
        "bootstrap_iters": (results.get("config") or {}).get("bootstrap_iters"),
        "adapter": str(run.adapter_dir),
        "adapter_merged": merged,
        "autocast": str(run.amp).removeprefix("torch.") if run.amp else None,
        "device": str(run.device),
        "lm_eval_version": lm_version,
    }
    metrics, protocols = metric_rows(results, settings)
    predictions = prediction_rows(results, protocols)
    if predictions:
        db.add_predictions(store, run_id, predictions)
    db.add_metrics(store, run_id, metrics)
    return LmEvalResult(metrics, predictions, merged)
