"""Train/eval overlap: which eval items a training mixture already contains.

Two checks, both on normalised text (lowercase, letters and digits only, single spaces):
- question match: a training row's question equals an eval item's (`question_match_key`: the
  instruction's first paragraph, plus the set of words of its answer choices, so reordered
  choices still match but a short stem such as piqa's "dresser" with other solutions does not);
- n-gram overlap: they share a word n-gram (n = 13 by default, as GPT-3's decontamination) of
  content. Prompt boilerplate ("please answer the following question with true or false,
  question: ...") is shared by every item of a set, and a 13-gram of 11 template words plus the
  question's first two would match unrelated questions. So words covered by a short n-gram
  (`_MARK` words) that more than `boilerplate_items` eval items hold are template, and only
  n-grams made entirely of other words count.

The report is printed and stored with every run; `data.decontaminate` drops the flagged rows.
Known fact it must find: LLM-Adapters' mawps/trainset.json holds 327 of AddSub's 395 test questions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moebench.data import Row
from moebench.task import Item, question_key

_NON_WORD = re.compile(r"[^0-9a-z]+")


def words(text: str) -> list[str]:
    return _NON_WORD.sub(" ", text.lower()).split()


def question_match_key(instruction: str) -> str:
    """The question (first paragraph, normalised) and the unordered words of the rest."""
    rest = instruction.strip().split("\n\n", 1)[1:]
    choices = " ".join(sorted(set(words(rest[0])))) if rest else ""
    return f"{question_key(instruction)}|{choices}"


_MARK = 8  # length of the n-grams that find template words


def ngrams(text: str, n: int, template: frozenset[str] = frozenset()) -> set[str]:
    """The text's word n-grams, leaving out any that touch a template word."""
    w = words(text)
    marked = [False] * len(w)
    if template:
        for i in range(len(w) - _MARK + 1):
            if " ".join(w[i : i + _MARK]) in template:
                marked[i : i + _MARK] = [True] * _MARK
    out = set()
    run = 0  # unmarked words ending at i
    for i in range(len(w)):
        run = 0 if marked[i] else run + 1
        if run >= n:
            out.add(" ".join(w[i - n + 1 : i + 1]))
    return out


def template_ngrams(texts: Iterable[str], boilerplate_items: int) -> frozenset[str]:
    """Short n-grams held by more than `boilerplate_items` texts: a prompt template's words."""
    held: dict[str, int] = {}
    for t in texts:
        for g in ngrams(t, _MARK):
            held[g] = held.get(g, 0) + 1
    return frozenset(g for g, k in held.items() if k > boilerplate_items)


@dataclass
class SetOverlap:
    """One eval set's overlap with the training rows."""

    n: int
    question_matches: int = 0  # eval items whose question a training row repeats
    ngram_matches: int = 0  # eval items sharing a non-boilerplate n-gram with a training row
    either: int = 0
    examples: list[str] = field(default_factory=list)  # a few overlapping item ids

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "question_matches": self.question_matches,
            "ngram_matches": self.ngram_matches,
            "either": self.either,
            "examples": self.examples,
        }


@dataclass
class OverlapReport:
    n: int  # n-gram size used
    sets: dict[str, SetOverlap]
    flagged_rows: set[int]  # indices of training rows that overlap some eval item
    template_ngrams: int  # how many short n-grams were taken as prompt template

    def as_dict(self) -> dict[str, Any]:
        return {
            "ngram": self.n,
            "sets": {k: v.as_dict() for k, v in self.sets.items()},
            "flagged_training_rows": len(self.flagged_rows),
            "template_ngrams": self.template_ngrams,
        }


def _text(instruction: str, input_: str) -> str:
    return f"{instruction}\n{input_}" if input_ else instruction


def check_overlap(
    train: Sequence[Row],
    evals: Mapping[str, Iterable[Item]],
    n: int = 13,
    boilerplate_items: int = 20,
) -> OverlapReport:
    """Compare every training row with every eval item (hash sets: linear in the data)."""
    eval_items = {name: list(items) for name, items in evals.items()}
    template = template_ngrams(
        (_text(it.instruction, it.input) for items in eval_items.values() for it in items),
        boilerplate_items,
    )
    holders: dict[str, set[tuple[str, int]]] = {}  # content n-gram -> eval items holding it
    questions: dict[str, set[tuple[str, int]]] = {}
    for name, items in eval_items.items():
        for k, it in enumerate(items):
            questions.setdefault(question_match_key(it.instruction), set()).add((name, k))
            for g in ngrams(_text(it.instruction, it.input), n, template):
                holders.setdefault(g, set()).add((name, k))
    questions.pop("|", None)

    by_question: set[tuple[str, int]] = set()
    by_ngram: set[tuple[str, int]] = set()
    flagged: set[int] = set()
    for i, row in enumerate(train):
        hit = questions.get(question_match_key(row.instruction))
        if hit:
            by_question |= hit
            flagged.add(i)
        for g in ngrams(_text(row.instruction, row.input), n, template):
            h = holders.get(g)
            if h:
                by_ngram |= h
                flagged.add(i)

    sets = {}
    for name, items in eval_items.items():
        q = {k for s, k in by_question if s == name}
        g = {k for s, k in by_ngram if s == name}
        both = sorted(q | g)
        sets[name] = SetOverlap(
            n=len(items),
            question_matches=len(q),
            ngram_matches=len(g),
            either=len(both),
            examples=[items[k].item_id for k in both[:5]],
        )
    return OverlapReport(n, sets, flagged, len(template))
