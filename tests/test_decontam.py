"""Train/eval overlap checks: known facts of the LLM-Adapters files and hand-made cases."""

from __future__ import annotations

import json
from pathlib import Path

from moebench import store
from moebench.data import Row
from moebench.decontam import check_overlap, ngrams
from moebench.runner import prepare_data
from moebench.runspec import resolve
from moebench.suites import get_suite
from moebench.suites import resolve as resolve_suite
from moebench.task import Item, question_key
from tests.conftest import shared_data_or_skip
from tests.test_cli import moebench


def _item(task: str, k: int, text: str) -> Item:
    return Item(f"{task}/{k}", task, text, "", "", "1")


def test_mawps_trainset_holds_327_of_addsubs_395_questions() -> None:
    """The fact in ../shared/data/README.md, found by the run's own check."""
    shared = shared_data_or_skip()
    spec = resolve(options={"suite": "la-mawps"})
    d = prepare_data(spec, resolve_suite(get_suite("la-mawps"), str(shared)))
    sets = d.overlap["sets"]
    assert (sets["addsub"]["n"], sets["addsub"]["question_matches"]) == (395, 327)
    assert sets["multiarith"]["question_matches"] == 452
    assert sets["singleeq"]["question_matches"] == 416
    # an independent count: exact normalised-question membership, computed here directly
    train = {
        question_key(r["original_text"])
        for r in json.loads((shared / "mawps" / "trainset.json").read_text())
    }
    addsub = json.loads((shared / "AddSub" / "test.json").read_text())
    assert sum(question_key(r["instruction"]) in train for r in addsub) == 327
    # the n-gram check finds at least those (it also sees reworded copies)
    assert sets["addsub"]["either"] >= 327 and not d.overlap["dropped"]


def test_decontaminate_drops_exactly_the_flagged_rows() -> None:
    shared = shared_data_or_skip()
    kept = prepare_data(
        resolve(options={"suite": "la-mawps"}), resolve_suite(get_suite("la-mawps"), str(shared))
    )
    clean = prepare_data(
        resolve(options={"suite": "la-mawps", "decontaminate": True}),
        resolve_suite(get_suite("la-mawps"), str(shared)),
    )
    flagged = kept.overlap["flagged_training_rows"]
    assert flagged > 327 and clean.overlap["dropped"] == flagged and not kept.overlap["dropped"]
    assert len(clean.train_rows) == len(kept.train_rows) - flagged
    # the stored report is about the rows trained on (none overlap now); what was dropped is
    # kept beside it
    assert clean.overlap["flagged_training_rows"] == 0
    assert all(v["either"] == 0 for v in clean.overlap["sets"].values())
    assert clean.overlap["before_dropping"] == kept.overlap["sets"]
    # nothing left in the clean mixture repeats an AddSub question
    addsub = {question_key(it.instruction) for it in clean.evals["addsub"][1]}
    assert not any(question_key(r.instruction) in addsub for r in clean.train_rows)
    # the eval sets are untouched: decontamination edits training data only
    assert {k: len(v[1]) for k, v in clean.evals.items()} == {
        k: len(v[1]) for k, v in kept.evals.items()
    }


def test_ngram_overlap_ignores_a_shared_prompt_template() -> None:
    template = (
        "Please answer the following question with true or false from what you know, question: "
    )
    evals = {
        "boolq": [_item("boolq", k, f"{template}is topic {k} ever true?") for k in range(30)]
        + [_item("boolq", 30, "the quick brown fox jumps over the lazy dog near the old mill pond")]
    }
    train = [
        # same template, different question: not contamination
        Row(f"{template}is something else entirely true?", "", "x", None),
        # 13 content words copied from an eval item, inside other text: contamination
        Row("copied: the quick brown fox jumps over the lazy dog near the old mill", "", "x", None),
        # 12 words only: below n
        Row("the quick brown fox jumps over the lazy dog near the old", "", "x", None),
    ]
    rep = check_overlap(train, evals, n=13, boilerplate_items=20)
    assert rep.flagged_rows == {1}
    assert rep.sets["boolq"].ngram_matches == 1 and rep.sets["boolq"].question_matches == 0
    assert rep.sets["boolq"].examples == ["boolq/30"]
    assert rep.template_ngrams > 0
    # without template detection the shared prompt alone would flag row 0 against all 30 items
    loose = check_overlap(train, evals, n=13, boilerplate_items=10_000)
    assert 0 in loose.flagged_rows and loose.sets["boolq"].ngram_matches >= 30


def test_question_match_survives_reordered_choices_and_punctuation() -> None:
    evals = {"arc_easy": [_item("arc_easy", 0, "Which is a metal?\n\nAnswer1: iron Answer2: wood")]}
    train = [Row("which is a METAL ?\n\nAnswer1: wood Answer2: iron", "", "x", None)]
    rep = check_overlap(train, evals)
    assert rep.sets["arc_easy"].question_matches == 1 and rep.flagged_rows == {0}


def test_ngrams_are_word_ngrams_of_normalised_text() -> None:
    assert ngrams("A, b; c!", 2) == {"a b", "b c"}
    assert ngrams("one two", 3) == set()


def test_run_prints_and_stores_the_overlap(tmp_path: Path) -> None:
    shared = shared_data_or_skip()
    db = f"sqlite:///{tmp_path / 'r.db'}"
    r = moebench(
        "run",
        "--suite",
        "la-mawps",
        "--data-dir",
        str(shared),
        "--model",
        "tiny-llama",
        "--max-steps",
        "1",
        "--limit",
        "1",
        "--set",
        "eval.num_beams=1",
        "--set",
        "eval.max_new_tokens=4",
        "--db",
        db,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "addsub: " in text and "of 395 eval items (question match 327" in text
    s = store.open_store(db)
    (run,) = store.list_runs(s)
    assert store.get_artifacts(s, run["id"])["overlap"]["sets"]["addsub"]["question_matches"] == 327
