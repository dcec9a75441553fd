"""Sweep files: expansion, precedence, dedup, every kind of bad input at its line, estimates."""

from __future__ import annotations

import itertools
import math
import textwrap
from pathlib import Path

import pytest

from moebench.data import Example, step_batches, tokenize_row
from moebench.errors import ConfigError
from moebench.inject import inject
from moebench.method import Method, get_method
from moebench.models import count_parameters, load_model
from moebench.runner import prepare_data
from moebench.runspec import RunSpec, resolve
from moebench.suites import get_suite
from moebench.suites import resolve as resolve_suite
from moebench.sweep import SweepExecution, SweepJob, load_sweep
from moebench.sweep_estimate import estimate
from moebench.train import train
from tests.conftest import METHOD_NAMES

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "sweeps").glob("*.yaml"))

GRID = """\
name: grid
axes:
  method: [lora, loracoe]
  model: tiny-llama
  seed: [1, 2]
set:
  train.max_steps: 4
  eval: {limit: 2}
methods:
  loracoe: {rank: 8}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, sets: list[tuple[str, str]] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_sweep(path, sets or [])
    return str(e.value).splitlines()


def test_the_grid_is_every_combination_with_shared_and_per_method_settings(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, GRID))
    assert sweep.name == "grid"
    assert [(j.spec.method, j.spec.seed) for j in sweep.jobs] == [
        ("lora", 1),
        ("lora", 2),
        ("loracoe", 1),
        ("loracoe", 2),
    ]
    assert all(j.spec.train.max_steps == 4 and j.spec.eval.limit == 2 for j in sweep.jobs)
    assert [j.spec.method_config.rank for j in sweep.jobs] == [16, 16, 8, 8]
    assert all(j.spec.model == "tiny-llama" and j.spec.suite == "mini" for j in sweep.jobs)
    assert {j.line for j in sweep.jobs} == {2}
    assert sweep.jobs[2].label == "loracoe tiny-llama seed=1"
    assert all(j.budget is None for j in sweep.jobs)


def test_command_line_sets_win_over_the_file(tmp_path: Path) -> None:
    sweep = load_sweep(write(tmp_path, GRID), [("train.max_steps", "7"), ("rank", "4")])
    assert {j.spec.train.max_steps for j in sweep.jobs} == {7}
    assert {j.spec.method_config.rank for j in sweep.jobs} == {4}


def test_yaml_values_mean_what_the_same_set_means_on_the_command_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        axes: {method: lora, model: tiny-llama, seed: 3}
        set:
          target_modules: [q_proj, v_proj]
          data.decontaminate: true
          train.max_grad_norm: null
          train.lr: 1.0e-4
          eval.tasks: [boolq, piqa]
        """,
    )
    (job,) = load_sweep(path).jobs
    assert job.spec.method_config.target_modules == ("q_proj", "v_proj")
    assert job.spec.data.decontaminate is True
    assert job.spec.train.max_grad_norm is None
    assert job.spec.train.lr == 1e-4
    assert job.spec.eval.tasks == ("boolq", "piqa")
    typed = resolve(
        sets=[
            ("target_modules", "q_proj,v_proj"),
            ("data.decontaminate", "true"),
            ("train.max_grad_norm", "none"),
            ("train.lr", "1e-4"),
            ("eval.tasks", "boolq,piqa"),
        ],
        options={"method": "lora", "model": "tiny-llama", "seed": 3},
    )
    assert job.spec.hash == typed.hash


def test_include_adds_jobs_over_the_grid_seeds_with_its_own_settings(tmp_path: Path) -> None:
    text = GRID + "include:\n  - {method: loracoe, set: {num_experts: 3}}\n"
    text += "  - method: lora\n    seed: 9\n    budget: lora:r=8\n"
    sweep = load_sweep(write(tmp_path, text))
    extra = sweep.jobs[4:]
    assert [(j.spec.method, j.spec.seed, j.line) for j in extra] == [
        ("loracoe", 1, 12),
        ("loracoe", 2, 12),
        ("lora", 9, 13),
    ]
    assert [j.spec.method_config.num_experts for j in extra[:2]] == [3, 3]
    assert extra[0].spec.method_config.rank == 8  # methods.loracoe applies to includes too
    assert extra[0].label == "loracoe tiny-llama seed=1 num_experts=3"
    budgeted = extra[2]
    assert budgeted.budget is not None and budgeted.budget["target"] == "lora:r=8"
    assert budgeted.spec.method_config.rank == budgeted.budget["knobs"]["rank"] == 8
    assert budgeted.label == "lora tiny-llama seed=9 budget=lora:r=8"


def test_a_budget_axis_resizes_each_method_and_null_keeps_its_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        axes:
          method: [lora, loracoe]
          model: tiny-llama
          budget: [null, "lora:r=4"]
        """,
    )
    jobs = load_sweep(path).jobs
    assert [j.budget is None for j in jobs] == [True, False, True, False]
    for job in jobs:
        if job.budget is not None:
            assert estimate(job)["trainable_params"] == job.budget["achieved_params"]
            knobs = job.budget["knobs"]
            assert all(getattr(job.spec.method_config, k) == v for k, v in knobs.items())


def test_jobs_are_deduplicated_by_spec_hash(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        axes: {method: lora, model: tiny-llama, seed: [1, 1, 2]}
        include:
          - {method: lora, seed: 2}
          - {method: lora, seed: 2, set: {rank: 16}}
        """,
    )
    jobs = load_sweep(path).jobs
    assert [j.spec.seed for j in jobs] == [1, 2]
    assert len({j.spec.hash for j in jobs}) == 2
    assert all(j.line == 1 for j in jobs)  # the first of equal jobs is kept


def test_execution_settings_are_read_and_never_change_a_job(tmp_path: Path) -> None:
    plain = load_sweep(write(tmp_path, GRID, "a.yaml"))
    assert plain.execution == SweepExecution()
    tuned = load_sweep(write(tmp_path, GRID + "execution: {retries: 0, workers: 3}\n", "b.yaml"))
    assert tuned.execution == SweepExecution(retries=0, workers=3)
    assert [j.spec.hash for j in tuned.jobs] == [j.spec.hash for j in plain.jobs]


def test_the_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path, "axes: {method: lora, model: tiny-llama}\n", "my-sweep.yaml")
    assert load_sweep(path).name == "my-sweep"


BAD = {
    "unknown method": ("axes:\n  method: [lora, lorax]\n  model: tiny-llama\n", 2, "'lorax'"),
    "unknown model": ("axes:\n  method: lora\n  model: nosuch\n", 3, "Unknown model 'nosuch'"),
    "unknown suite": ("axes:\n  method: lora\n  suite: minii\n", 3, "Did you mean 'mini'"),
    "bad value": ("axes: {method: lora}\nset:\n  train.max_steps: 4\n  rank: -1\n", 4, "rank=-1"),
    "bad setting type": ("axes: {method: lora}\nset:\n  train.lr: fast\n", 3, "not a number"),
    "seed not an int": ("axes:\n  method: lora\n  seed: [1, abc]\n", 3, "'abc' is not an integer"),
    "axes not a mapping": ("name: x\naxes: 5\n", 2, "axes must be a mapping"),
    "unknown top key": ("axes: {method: lora}\nsets: {rank: 8}\n", 2, "did you mean 'set'"),
    "unknown axis": ("axes:\n  method: lora\n  seeds: [1, 2]\n", 3, "did you mean 'seed'"),
    "missing axes": ("name: x\nset: {rank: 8}\n", 1, "no 'axes'"),
    "missing method": ("set: {rank: 8}\naxes:\n  model: tiny-llama\n", 2, "axes has no 'method'"),
    "malformed yaml": ("axes:\n  method: [lora\nset: {rank: 8}\n", 3, "malformed YAML"),
    "empty axis": ("axes:\n  method: lora\n  seed: []\n", 3, "empty list"),
    "nested axis value": ("axes:\n  method: [[lora]]\n", 2, "single values"),
    "axis in set": ("axes: {method: lora}\nset:\n  seed: 3\n", 3, "'seed' is an axis"),
    "key another method lacks": (
        "axes: {method: [lora, loracoe]}\nset:\n  num_experts: 3\n",
        3,
        "'num_experts' for method 'lora'",
    ),
    "unknown override method": ("axes: {method: lora}\nmethods:\n  lorra: {}\n", 3, "'lorra'"),
    "bad override key": ("axes: {method: lora}\nmethods:\n  loracoe: {rnk: 4}\n", 3, "'rnk'"),
    "include without method": ("axes: {method: lora}\ninclude:\n  - {seed: 4}\n", 3, "no 'method'"),
    "include not a list": ("axes: {method: lora}\ninclude: {method: lora}\n", 2, "must be a list"),
    "repeated key": ("axes: {method: lora}\nset:\n  rank: 8\n  rank: 4\n", 4, "twice"),
    "empty list setting": ("axes: {method: lora}\nset:\n  target_modules: []\n", 3, "empty list"),
    "unreachable budget": ("axes:\n  method: lora\n  budget: '1'\n", 3, "No lora config lands"),
    "bad execution": ("axes: {method: lora}\nexecution:\n  retries: -1\n", 3, "retries=-1"),
    "unknown execution key": ("axes: {method: lora}\nexecution: {worker: 2}\n", 2, "'workers'"),
    "clashing settings": (
        "axes: {method: lora}\nset: {train.batch_size: 10}\n",
        2,
        "multiple of micro_batch_size",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_each_bad_input_is_one_problem_at_its_line(tmp_path: Path, case: str) -> None:
    text, line, words = BAD[case]
    path = write(tmp_path, text.replace("{method: lora}", "{method: lora, model: tiny-llama}"))
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:{line}: ")
    assert words in problem
    assert problem.endswith((".", "?"))


def test_every_problem_in_a_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        axes:
          method: [lora, lorax]
          model: tiny-llama
          seed: [1, abc]
        set:
          rank: -1
          train.lr: 0
        colour: blue
        """,
    )
    found = problems(path)
    assert [p.split(": ", 1)[0] for p in found] == [f"{path}:{n}" for n in (2, 4, 6, 7, 8)]


def test_a_bad_command_line_set_is_named_as_such(tmp_path: Path) -> None:
    found = problems(write(tmp_path, GRID), [("rank", "0"), ("seed", "3")])
    assert len(found) == 3  # rank=0 for lora and for loracoe, and seed (an axis)
    assert all(p.startswith(f"{tmp_path / 'sweep.yaml'}: --set ") for p in found)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_sweep_expands(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.jobs
    assert len({j.label for j in sweep.jobs}) == len(sweep.jobs)
    for job in sweep.jobs:
        assert set(estimate(job)) == {"trainable_params", "steps"}


def test_the_smoke_example_is_four_short_tiny_jobs() -> None:
    (path,) = [p for p in EXAMPLES if p.name == "smoke.yaml"]
    jobs = load_sweep(path).jobs
    assert len(jobs) == 4
    assert {(j.spec.model, j.spec.train.max_steps, j.spec.eval.limit) for j in jobs} == {
        ("tiny-llama", 4, 2)
    }
    assert {j.spec.train.checkpoint_every for j in jobs} == {2}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_estimated_parameters_are_what_injection_trains(tmp_path: Path, method: str) -> None:
    (job,) = load_sweep(write(tmp_path, f"axes: {{method: {method}, model: tiny-llama}}\n")).jobs
    count = estimate(job)["trainable_params"]
    m = get_method(method)
    if count is None:  # sized by its own preparation stage, so unknown before the run
        assert type(m).prepare is not Method.prepare
        return
    model, _ = load_model("tiny-llama")
    inject(model, m, job.spec.method_config)
    assert count == count_parameters(model)[0]


def _mini_job(tmp_path: Path, *settings: str) -> SweepJob:
    text = "axes: {method: lora, model: tiny-llama, suite: mini}\n"
    text += "set:\n  train.micro_batch_size: 8\n"
    (job,) = load_sweep(write(tmp_path, text + "".join(f"  {s}\n" for s in settings))).jobs
    return job


def _examples(spec: RunSpec) -> list[Example]:
    """The rows the runner would train on, tokenised: its own data path, not the estimate's."""
    data = prepare_data(spec, resolve_suite(get_suite(spec.suite), None))
    _, tokenizer = load_model(spec.model)
    cfg = spec.train
    return [
        tokenize_row(
            r,
            tokenizer,
            template=cfg.template,
            cutoff_len=cfg.cutoff_len,
            train_on_prompt=cfg.train_on_prompt,
            task_label=-1,
        )
        for r in data.train_rows
    ]


@pytest.mark.parametrize(
    "extra",
    ["train.epochs: 2.5", "data.train_rows: 50", "data.decontaminate: true"],
    ids=["fractional-epochs", "train-rows", "decontaminated"],
)
def test_estimated_steps_count_the_batches_the_loop_draws(tmp_path: Path, extra: str) -> None:
    job = _mini_job(tmp_path, extra)
    examples = _examples(job.spec)
    cfg = job.spec.train
    plans = step_batches([len(e.input_ids) for e in examples], 8, cfg.accumulation, seed=1)
    per_epoch = sum(1 for _ in itertools.takewhile(lambda p: p.epoch == 0, plans))
    assert estimate(job)["steps"] == math.ceil(cfg.epochs * per_epoch)


def test_estimated_steps_are_the_steps_train_takes(tmp_path: Path) -> None:
    job = _mini_job(tmp_path, "train.epochs: 0.5", "data.train_rows: 50")
    spec = job.spec
    model, _ = load_model(spec.model)
    adapted = inject(model, get_method(spec.method), spec.method_config)
    result = train(adapted, _examples(spec), spec.train, seed=1, checkpoint_root=tmp_path / "c")
    assert estimate(job)["steps"] == result.steps == 2


def test_steps_are_unknown_when_the_suite_data_is_not_here(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    path = write(tmp_path, "axes: {method: lora, model: tiny-llama, suite: seed-commonsense}\n")
    (job,) = load_sweep(path).jobs
    assert estimate(job, data_dir=str(tmp_path / "empty")) == {
        "trainable_params": estimate(job)["trainable_params"],
        "steps": None,
    }
    capped = load_sweep(path, [("train.max_steps", "3")]).jobs[0]
    assert estimate(capped, data_dir=str(tmp_path / "empty"))["steps"] == 3
