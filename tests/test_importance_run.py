"""`moebench analyze importance` on a stored run, end to end, and the out-of-tree plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebench import store
from moebench.errors import MoebenchError
from moebench.importance_run import analyze_run, gold_example, length_batches
from moebench.importance_stats import rank_groups
from moebench.lmeval_bridge import rebuild_run
from moebench.runner import RunEnv, execute
from moebench.runspec import resolve
from moebench.suites import get_suite
from moebench.suites import resolve as resolve_suite
from tests.test_cli import moebench
from tests.test_example_plugin import plugin_env  # noqa: F401  (a fixture)
from tests.test_importance import _independent

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    root = tmp_path_factory.mktemp("imp")
    db = f"sqlite:///{root / 'r.db'}"
    spec = resolve(
        options={"method": "loracoe", "model": "tiny-llama", "max_steps": 2, "limit": 1},
        sets=[("eval.tasks", "boolq"), ("train.batch_size", "4")],
    )
    run_id = execute(spec, RunEnv(db=db, output_dir=str(root / "out")))
    return db, run_id


def test_cli_stores_importance_that_matches_autograd_on_the_rebuilt_model(
    stored_run: tuple[str, int], tmp_path: Path
) -> None:
    db, run_id = stored_run
    plots = tmp_path / "plots"
    r = moebench(
        "analyze", "importance", str(run_id), "--tasks", "boolq,gsm8k", "--batches", "2",
        "--batch-size", "2", "--plots", str(plots), "--db", db, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "q_proj" in r.stdout and "lora_A" in r.stdout  # the Figure 2 table
    s = store.open_store(db)
    record = store.get_artifacts(s, run_id)["importance"]
    assert sorted(record["tasks"]) == ["boolq", "gsm8k"]
    assert record["tasks"]["gsm8k"]["items"] == 4

    rebuilt = rebuild_run(s, run_id)
    suite = resolve_suite(get_suite(rebuilt.spec.suite), None, ("gsm8k",))
    items = suite.eval_items(None)["gsm8k"][1][:4]
    tok = rebuilt.tokenizer
    batches = length_batches([gold_example(i, tok, rebuilt.spec) for i in items], 2, 0)
    want = _independent(rebuilt.adapted, batches)
    stored = record["tasks"]["gsm8k"]
    for name, w in want.items():
        assert stored["tensors"][name] == pytest.approx(float(w.sum()), rel=1e-3, abs=1e-12)
    for g in rank_groups(rebuilt.adapted):
        a, b = (want[n] for n, _ in g.tensors)
        ranks = (a.sum(1) + b.sum(0)).tolist()
        assert stored["ranks"][g.key] == pytest.approx(ranks, rel=1e-3, abs=1e-12)
    assert sum(stored["tensors"].values()) > 0
    routers = [n for n, t in record["layout"]["tensors"].items() if t["role"] == "router"]
    assert routers and all(record["layout"]["tensors"][n]["rank_set"] is None for n in routers)

    figure = record["figures"]
    assert {r["module_type"] for r in figure["figure2"]} >= {"q_proj", "down_proj"}
    assert figure["task_correlation"]["all"]["labels"] == ["boolq", "gsm8k"]
    assert len(figure["rank_correlation"]["q_proj"]["matrix"]) == rebuilt.adapted.config.rank
    names = sorted(p.name for p in plots.iterdir())
    assert "figure2.html" in names and "figure4.html" in names and "plotly.min.js" in names
    html = (plots / "figure4.html").read_text()
    assert "gsm8k" in html and "Figure 4" in html


def test_a_missing_run_or_bad_tasks_is_one_sentence(
    stored_run: tuple[str, int], tmp_path: Path
) -> None:
    db, run_id = stored_run
    r = moebench("analyze", "importance", "999", "--db", db, cwd=tmp_path)
    assert r.returncode != 0 and "999" in r.stderr and "Traceback" not in r.stderr
    s = store.open_store(db)
    with pytest.raises(MoebenchError, match="nosuchset"):
        analyze_run(s, run_id, tasks=["nosuchset"])
    with pytest.raises(MoebenchError, match="--batches 0"):
        analyze_run(s, run_id, batches=0)
    r = moebench("analyze", "importance-plots", str(run_id), "--db", db, cwd=tmp_path)
    assert r.returncode != 0 or "wrote" in r.stdout  # analysed by the test above, or told to


def test_the_installed_example_plugin_passes_the_importance_tests(
    plugin_env: dict[str, str],  # noqa: F811
) -> None:
    """Parametrised over every registered method, entry points included: installed where
    pytest runs, the out-of-tree rsLoRA gets the same importance tests as a built-in method."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(REPO / "tests" / "test_importance.py"), "-k", "rslora"],
        cwd=REPO,
        env={**os.environ, **plugin_env},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 passed" in r.stdout, r.stdout[-2000:]


def test_gold_example_supervises_only_the_response(stored_run: tuple[str, int]) -> None:
    db, run_id = stored_run
    rebuilt = rebuild_run(store.open_store(db), run_id)
    suite = resolve_suite(get_suite("mini"), None, ("boolq",))
    item = suite.eval_items(1)["boolq"][1][0]
    e = gold_example(item, rebuilt.tokenizer, rebuilt.spec)
    supervised = [t for t, label in zip(e.input_ids, e.labels, strict=True) if label != -100]
    text = rebuilt.tokenizer.decode(supervised)
    assert item.output.strip() in text and item.instruction[:20] not in text
    assert torch.tensor(e.labels[: len(e.labels) - len(supervised)]).eq(-100).all()
