"""The out-of-tree example plugin (examples/moebench-rslora), installed as a user would install it.

The package is built and installed with pip into a temporary folder, never into the shared
environment, and every check runs in a subprocess whose PYTHONPATH adds that folder: the method
must be found through its `moebench.methods` entry point alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moebench import store
from tests.test_cli import TINY, moebench

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "moebench-rslora"


def _setuptools_builds_wheels() -> bool:
    """--no-build-isolation builds with this interpreter's setuptools, which makes wheels by
    itself from 70.1 on (older ones need `wheel` too); torch 2.13 requires setuptools>=77."""
    try:
        major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PYTHONPATH that holds the installed example (its code and its dist-info entry point)."""
    if not _setuptools_builds_wheels():
        pytest.skip("building the example offline needs setuptools>=70.1 in this interpreter")
    root = tmp_path_factory.mktemp("rslora")
    # pip builds in the source folder (build/, *.egg-info): build a copy, not the checkout.
    source = shutil.copytree(
        EXAMPLE, root / "source", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    site = root / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "moebench_rslora" / "__init__.py").is_file()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def test_the_installed_example_is_listed(plugin_env: dict[str, str], tmp_path: Path) -> None:
    r = moebench("methods", cwd=tmp_path, env=plugin_env)
    assert r.returncode == 0, r.stderr
    assert "rslora: rsLoRA" in r.stdout and "alpha / sqrt(rank)" in r.stdout


def test_the_installed_example_trains_and_scores(
    plugin_env: dict[str, str], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    one_set = ["--set", "eval.tasks=boolq"]  # the point is the plugin, not the scoring
    r = moebench(
        "run", "--method", "rslora", *TINY, *one_set, "--db", db, cwd=tmp_path, env=plugin_env
    )
    assert r.returncode == 0, r.stderr
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert run["method"] == "rslora" and run["status"] == "done", run["status_reason"]
    assert run["config"]["method_config"]["alpha"] == 8.0  # the plugin's own default is stored
    assert run["trainable_params"] > 0
    metrics = {(m["task"], m["metric"]): m for m in store.get_metrics(s, run["id"])}
    assert metrics[("boolq", "accuracy")]["n"] == 3
    assert len(store.get_predictions(s, run["id"], task="boolq")) == 3
    assert [row["step"] for row in store.get_training_log(s, run["id"])] == [1, 2, 3, 4]


# Run in the subprocess: rsLoRA(alpha) must equal LoRA(alpha * sqrt(r)) for the same random
# factors (both scale by alpha / sqrt(r)), one layer must match the formula written out, merging
# must not change the output, and the closed-form count must match the counted tensors.
NUMERIC_CHECK = """
import math, torch
from moebench.inject import inject
from moebench.method import ModelShapes, get_method
from moebench.models import count_parameters, load_model

method = get_method("rslora")
assert type(method).__module__ == "moebench_rslora", type(method).__module__
r, alpha = 9, 6.0  # alpha / sqrt(r) = 2, alpha / r = 2/3: the two scalings are told apart
model, tok = load_model("tiny-qwen2")
rs = inject(model, method, method.config_cls(rank=r, alpha=alpha, dropout=0.0))
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for _, p in rs.adapter_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
lora_method = get_method("lora")
lora_model, _ = load_model("tiny-qwen2")
lora_cfg = lora_method.config_cls(rank=r, alpha=alpha * math.sqrt(r), dropout=0.0)
lora = inject(lora_model, lora_method, lora_cfg)
lora.load_adapter_state_dict(rs.adapter_state_dict())
plain, _ = load_model("tiny-qwen2")
for m in (model, lora_model, plain):
    m.eval()
ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model(input_ids=ids).logits
    ref = lora_model(input_ids=ids).logits
    base = plain(input_ids=ids).logits
    assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    assert (out - base).abs().max() > 1e-2, "the adapter changed nothing: vacuous comparison"

    name, layer = next(iter(rs.layers.items()))
    x = torch.randn(3, layer.base.in_features, generator=g)
    want = layer.base(x) + alpha / math.sqrt(r) * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert (layer(x) - want).abs().max() <= 1e-5, name

    assert rs.mergeable
    rs.merge()
    merged = model(input_ids=ids).logits
    rs.unmerge()
    assert (merged - out).abs().max() <= 1e-4, (merged - out).abs().max()

trainable, _ = count_parameters(model)
assert method.trainable_parameters(rs.config, ModelShapes.from_config(model.config)) == trainable
print("ok")
"""


def test_the_installed_example_scales_by_alpha_over_sqrt_rank(
    plugin_env: dict[str, str], tmp_path: Path
) -> None:
    r = subprocess.run(
        [sys.executable, "-c", NUMERIC_CHECK],
        cwd=tmp_path,
        env={**os.environ, **plugin_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_the_installed_example_passes_the_contract_tests(plugin_env: dict[str, str]) -> None:
    """The contract tests are parametrised over every registered method, entry points included:
    installed where pytest runs, a plugin gets the same tests as a built-in one. (The end-to-end
    ones in test_method_runs.py are left out here for time; the run test above covers them.)"""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_methods.py"),
            str(REPO / "tests" / "test_budget.py"),
            "-k",
            "rslora",
        ],
        cwd=REPO,
        env={**os.environ, **plugin_env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_an_entry_point_reusing_a_registered_name_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real dist-info on sys.path declares a plugin under a taken name: the registered one
    stays, and the log says which entry point was ignored instead of dropping it silently."""
    import logging

    from moebench.registry import Registry

    dist = tmp_path / "dup_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dup-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[moebench.test_dup]\nlora = json\nfresh = json\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry: Registry[object] = Registry("method", (), "moebench.test_dup")
    builtin = object()
    registry.add("lora", builtin)
    with caplog.at_level(logging.WARNING, logger="moebench.registry"):
        assert registry.names() == ["lora"]  # `fresh` loads a module: it registers nothing
    assert registry.get("lora") is builtin
    assert "method plugin 'lora' from json is ignored" in caplog.text
