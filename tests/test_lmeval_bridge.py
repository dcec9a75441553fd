"""`moebench eval RUN --lm-eval-tasks ...`: a stored run scored by lm-eval on local task files.

The run is made by the CLI on tiny-llama; the lm-eval scores it stores are checked against a
forward pass of the adapted model computed here, outside lm-eval and outside the bridge: each
choice's log-likelihood for a multiple-choice task, and a plain greedy loop for a generation task.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moebench import store
from moebench.cli import main
from moebench.config import build
from moebench.errors import ConfigError, DataError, NotFoundError
from moebench.inject import inject
from moebench.lmeval_bridge import evaluate_run, protocol_id
from moebench.method import get_method
from moebench.models import load_model
from moebench.suites import mini_root
from tests.test_cli import moebench

pytest.importorskip("lm_eval")

BOOLQ_ROWS, GSM_ROWS, LIMIT, NEW_TOKENS = 6, 4, 5, 8
CHOICES = ["false", "true"]
STOP = "\n\n"


def _boolq_prompt(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}?\nAnswer:"


def _gsm_prompt(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def _write_tasks(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Two lm-eval tasks on rows of the packaged mini data, and one whose data file is missing."""
    folder.mkdir()
    boolq = []
    for r in json.loads((mini_root() / "boolq" / "test.json").read_text())[:BOOLQ_ROWS]:
        question = re.search(r"question: (.*?)\n", r["instruction"])
        assert question is not None
        boolq.append({"question": question.group(1), "label": CHOICES.index(r["answer"])})
    gsm = [
        {"question": r["instruction"], "answer": r["answer"]}
        for r in json.loads((mini_root() / "gsm8k" / "test.json").read_text())[:GSM_ROWS]
    ]
    for name, rows in (("boolq.jsonl", boolq), ("gsm.jsonl", gsm)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: mini_boolq_mc\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'boolq.jsonl'}\n"
        + "output_type: multiple_choice\n"
        + 'doc_to_text: "Question: {{question}}?\\nAnswer:"\n'
        + "doc_to_target: label\n"
        + f"doc_to_choice: {json.dumps(CHOICES)}\n"
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        + "metadata:\n  version: 1.0\n"
    )
    (folder / "gen.yaml").write_text(
        "task: mini_gsm_gen\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gsm.jsonl'}\n"
        + "output_type: generate_until\n"
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        + 'doc_to_target: "{{answer}}"\n'
        + f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n"
        + f"  max_gen_toks: {NEW_TOKENS}\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n"
        + "metadata:\n  version: 2.0\n"
    )
    (folder / "broken.yaml").write_text(
        "task: mini_missing_data\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'nowhere.jsonl'}\n"
        + "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: 0\n"
        + 'doc_to_choice: ["a", "b"]\nmetric_list:\n  - metric: acc\n'
    )
    return {"mini_boolq_mc": boolq, "mini_gsm_gen": gsm}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished tiny-llama LoRA run (2 steps at a high lr, so the adapter matters)."""
    tmp = tmp_path_factory.mktemp("lmeval")
    env = {"HF_DATASETS_CACHE": str(tmp / "hf-datasets")}
    db = f"sqlite:///{tmp / 'r.db'}"
    r = moebench(
        "run",
        "--model",
        "tiny-llama",
        "--suite",
        "mini",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.lr=1e-2",
        "--set",
        "eval.limit=2",
        "--set",
        "eval.tasks=boolq",
        "--db",
        db,
        "--output-dir",
        str(tmp / "out"),
        cwd=tmp,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    (run,) = store.list_runs(store.open_store(db))
    return {
        "tmp": tmp,
        "db": db,
        "run_id": run["id"],
        "env": env,
        "adapter": Path(run["output_dir"]) / "adapter",  # its own folder under the root
        "docs": _write_tasks(tmp / "tasks"),
    }


def _adapted_by_hand(adapter: Path) -> torch.nn.Module:
    """The trained model from the saved files, unmerged: not the bridge's code path."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    method = get_method(cfg["method"])
    model, _ = load_model(cfg["model"])
    adapted = inject(
        model, method, build(method.config_cls, cfg["method_config"], section=method.name)
    )
    adapted.load_adapter_state_dict(load_file(str(adapter / "adapter.safetensors")))
    return model.eval()


@torch.no_grad()
def _loglik(model: torch.nn.Module, tok: Any, context: str, continuation: str) -> float:
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx) :]
    logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


@torch.no_grad()
def _greedy(model: torch.nn.Module, tok: Any, prompt: str) -> str:
    ids, new = tok(prompt)["input_ids"], []
    for _ in range(NEW_TOKENS):
        nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split(STOP)[0]


def test_eval_stores_lm_eval_scores_equal_to_an_independent_forward(
    stored: dict[str, Any],
) -> None:
    r = moebench(
        "eval",
        str(stored["run_id"]),
        "--lm-eval-tasks",
        "mini_boolq_mc,mini_gsm_gen",
        "--include-path",
        str(stored["tmp"] / "tasks"),
        "--limit",
        str(LIMIT),
        "--batch-size",
        "4",
        "--db",
        stored["db"],
        cwd=stored["tmp"],
        env=stored["env"],
    )
    assert r.returncode == 0, r.stderr
    s = store.open_store(stored["db"])
    run_id = stored["run_id"]
    metrics = {(m["task"], m["metric"]): m for m in store.get_metrics(s, run_id)}
    assert ("boolq", "accuracy") in metrics  # the run's own scores stay beside the new ones

    model = _adapted_by_hand(stored["adapter"])
    base, tok = load_model("tiny-llama")
    base.eval()

    # multiple choice: the choice with the highest log-likelihood, computed here
    docs = stored["docs"]["mini_boolq_mc"][:LIMIT]
    preds = {p["item_id"]: p for p in store.get_predictions(s, run_id, task="mini_boolq_mc")}
    assert sorted(preds) == [f"mini_boolq_mc/{i}" for i in range(LIMIT)]
    hits, hits_norm = [], []
    adapter_moved = 0.0
    for i, doc in enumerate(docs):
        ll = [_loglik(model, tok, _boolq_prompt(doc), " " + c) for c in CHOICES]
        stored_ll = preds[f"mini_boolq_mc/{i}"]["detail"]["loglikelihoods"]
        assert stored_ll == pytest.approx(ll, abs=1e-4)
        base_ll = [_loglik(base, tok, _boolq_prompt(doc), " " + c) for c in CHOICES]
        adapter_moved = max(adapter_moved, *(abs(a - b) for a, b in zip(ll, base_ll, strict=True)))
        best = max(range(2), key=ll.__getitem__)
        hits.append(best == doc["label"])
        hits_norm.append(max(range(2), key=lambda k: ll[k] / len(CHOICES[k])) == doc["label"])
        assert preds[f"mini_boolq_mc/{i}"]["output"] == CHOICES[best]
        assert preds[f"mini_boolq_mc/{i}"]["correct"] == (best == doc["label"])
        assert preds[f"mini_boolq_mc/{i}"]["gold"] == CHOICES[doc["label"]]
    assert adapter_moved > 1e-3, "the scored model must be the adapted one, not the base"

    pid = protocol_id("mini_boolq_mc", 1.0, 0)
    assert pid == "lm-eval/mini_boolq_mc/v1.0/0shot"
    acc, acc_norm = metrics[("mini_boolq_mc", "acc")], metrics[("mini_boolq_mc", "acc_norm")]
    for row, values in ((acc, hits), (acc_norm, hits_norm)):
        p = sum(values) / LIMIT
        assert row["value"] == pytest.approx(p)
        assert row["n"] == LIMIT and row["protocol"] == pid
        # lm-eval's standard error of a mean: the sample standard deviation over sqrt(n)
        assert row["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
    detail = acc["protocol_detail"]
    assert detail["lm_eval_version"] == version("lm_eval")
    assert detail["num_fewshot"] == 0 and detail["task_version"] == 1.0
    assert detail["limit"] == LIMIT and detail["batch_size"] == 4
    assert detail["task_config"]["output_type"] == "multiple_choice"
    assert detail["task_config"]["dataset_path"] == "json"
    data = stored["tmp"] / "tasks" / "boolq.jsonl"
    assert detail["data_sha256"] == {f"test:{data}": hashlib.sha256(data.read_bytes()).hexdigest()}

    # generation: the same greedy continuations from a one-prompt, no-cache loop
    gen = {p["item_id"]: p for p in store.get_predictions(s, run_id, task="mini_gsm_gen")}
    gsm = stored["docs"]["mini_gsm_gen"]
    assert len(gen) == len(gsm)
    for i, doc in enumerate(gsm):
        row = gen[f"mini_gsm_gen/{i}"]
        assert row["output"] == _greedy(model, tok, _gsm_prompt(doc))
        assert row["gold"] == doc["answer"]
        assert row["prompt_hash"] == hashlib.sha256(_gsm_prompt(doc).encode()).hexdigest()
    em = metrics[("mini_gsm_gen", "exact_match")]
    assert em["value"] == pytest.approx(sum(p["correct"] for p in gen.values()) / len(gsm))
    assert em["protocol"] == "lm-eval/mini_gsm_gen/v2.0/0shot" and em["n"] == len(gsm)


def test_a_task_whose_data_cannot_load_is_named_in_one_sentence(
    stored: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CLI's own entry point, in this process (a subprocess would re-import torch and lm-eval).
    argv = ["moebench", "eval", str(stored["run_id"]), "--db", stored["db"]]
    argv += ["--lm-eval-tasks", "mini_boolq_mc,mini_missing_data"]
    argv += ["--include-path", str(stored["tmp"] / "tasks")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HF_DATASETS_CACHE", stored["env"]["HF_DATASETS_CACHE"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == DataError.exit_code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    message = " ".join(out.err.split())
    assert message.startswith("error: lm-eval task 'mini_missing_data' could not load its data")
    assert "--include-path" in message and "mini_gsm_gen" in message


def test_unknown_task_names_and_runs_are_refused_before_loading_a_model(
    stored: dict[str, Any],
) -> None:
    s = store.open_store(stored["db"])
    tasks = stored["tmp"] / "tasks"
    with pytest.raises(ConfigError, match=r"Unknown lm-eval task 'mini_boolq_mcq'.*mini_gsm_gen"):
        evaluate_run(s, stored["run_id"], ["mini_boolq_mcq"], include_path=tasks)
    with pytest.raises(ConfigError, match="is not a folder"):
        evaluate_run(s, stored["run_id"], ["x"], include_path=tasks / "mc.yaml")
    with pytest.raises(NotFoundError, match="No run with id 999"):
        evaluate_run(s, 999, ["mini_boolq_mc"], include_path=tasks)
    # a run that never got to save its adapter (here: one interrupted before training)
    row = store.get_run(s, stored["run_id"])
    stopped = store.create_run(
        s,
        **{k: row[k] for k in ("method", "model", "suite", "config", "config_hash", "seed")},
        versions=row["versions"],
        git_sha=None,
        hardware=row["hardware"],
        output_dir=str(stored["tmp"] / "stopped"),
        status="interrupted",
    )
    with pytest.raises(ConfigError, match=rf"Run {stopped} \(interrupted\) has no saved adapter"):
        evaluate_run(s, stopped, ["mini_boolq_mc"], include_path=tasks)
