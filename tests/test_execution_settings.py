"""Each setting left out of a run's hash must leave its numbers unchanged: proved here, setting by
setting, on a tiny model (metrics and every per-item prediction identical to the baseline's).

A setting that fails this test does not belong in `EXECUTION_FIELDS`; it goes back in the hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moebench import store
from moebench.config import EXECUTION_FIELDS
from moebench.runner import RunEnv, execute
from moebench.runspec import resolve

# A value differing from the baseline's for every execution field. Adding a field to
# EXECUTION_FIELDS without a case here fails `test_every_execution_field_has_a_case`.
VARIANTS: dict[str, str] = {
    "train.checkpoint_every": "1",
    "train.keep_checkpoints": "5",
    "train.stats_every": "1",
    "eval.engine": "hf",
    "eval.batch_size": "1",
}
BASE_SETS = [
    ("train.batch_size", "4"),
    ("train.micro_batch_size", "2"),
    ("train.checkpoint_every", "3"),
    ("train.stats_every", "10"),
    ("eval.tasks", "boolq,arc_challenge,gsm8k"),
    ("eval.batch_size", "16"),
    ("eval.engine", "moebench"),
    ("eval.max_new_tokens", "12"),
]
OPTIONS = {"method": "loracoe", "model": "tiny-llama", "max_steps": 4, "limit": 6}


def _run(tmp_path: Path, name: str, extra: list[tuple[str, str]]) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path / f'{name}.db'}"
    sets = [kv for kv in BASE_SETS if kv[0] not in dict(extra)] + extra
    spec = resolve(options=OPTIONS, sets=sets)
    run_id = execute(spec, RunEnv(db=url, output_dir=str(tmp_path / name)))
    s = store.open_store(url)
    keep = ("task", "metric", "value", "n", "protocol")
    return {
        "hash": spec.hash,
        "metrics": [{k: m[k] for k in keep} for m in store.get_metrics(s, run_id)],
        "predictions": [
            (p["task"], p["item_id"], p["output"], p["correct"], p["protocol"])
            for p in store.get_predictions(s, run_id)
        ],
        "losses": [r["loss"] for r in store.get_training_log(s, run_id)],
    }


def test_every_execution_field_has_a_case() -> None:
    fields = {f"{sec}.{name}" for sec, names in EXECUTION_FIELDS.items() for name in names}
    assert fields == set(VARIANTS)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("base"), "base", [])


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(VARIANTS))
def test_an_execution_setting_leaves_every_number_unchanged(
    setting: str, baseline: dict[str, Any], tmp_path: Path
) -> None:
    varied = _run(tmp_path, "varied", [(setting, VARIANTS[setting])])
    assert varied["hash"] == baseline["hash"]
    assert varied["losses"] == baseline["losses"]
    assert varied["metrics"] == baseline["metrics"]
    assert varied["predictions"] == baseline["predictions"]


def test_a_setting_that_changes_numbers_changes_the_hash() -> None:
    a = resolve(options=OPTIONS, sets=BASE_SETS)
    b = resolve(options=OPTIONS, sets=[*BASE_SETS, ("train.lr", "1e-4")])
    c = resolve(options=OPTIONS, sets=[*BASE_SETS, ("eval.num_beams", "2")])
    assert len({a.hash, b.hash, c.hash}) == 3
