"""The task adapter API: one `Task` per evaluation set, its data loader and its scoring rule.

Scoring replicates LLM-Adapters (Hu et al., EMNLP 2023; commonsense_evaluate.py and evaluate.py)
exactly, quirks included, so that numbers stay comparable with published ones:

- the response is the text after the first `### Response:` of `prompt + completion` and before a
  second one (upstream decodes the whole sequence and takes `split("### Response:")[1]`), stripped;
- commonsense: the FIRST match of a lowercase, case-sensitive regex, exact-matched against the gold
  (`true` matches inside `untrue`; `Answer1` is not matched);
- math: commas removed, the LAST match of `-?\\d+\\.?\\d*`, correct iff within 0.001 of the gold
  (a rounded answer to a non-integer gold such as 0.6666 fails);
- AQuA: the first capital letter A to E anywhere in the response.

A response with no match is wrong and counted as a parse failure (upstream: "" or inf).

Sets are declared in one table per family (`moebench/tasks/commonsense.py`, `.../math.py`) and
registered in `TASKS`; a third-party package can add one through the `moebench.tasks` entry-point
group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moebench.errors import ConfigError, DataError
from moebench.jsonfiles import iter_json_array, json_type
from moebench.prompts import RESPONSE_MARKER
from moebench.registry import Registry
from moebench.stats import binomial_stderr

# Upstream's `miss` in evaluate.py.
MATH_TOLERANCE = 0.001

# Text that precedes the label in the commonsense training target (`the correct answer is answer1`);
# log-likelihood mode scores " " + label after it.
LOGLIK_PREFIX = "the correct answer is"

# LoRAMoE's task types by family: world knowledge (commonsense) 1, downstream skills 0. Rows of a
# whole-family training file (commonsense_170k, OrcaMath) are labelled with the family name.
FAMILY_KNOWLEDGE = {"commonsense": 1, "math": 0, "instruction": 0}

_ANSWER_FORMAT = re.compile(r"Answer format:[ \t]*(\S+)")


@dataclass(frozen=True)
class Item:
    """One evaluation row. `item_id` is `<task>/<row index in its source file>`, so per-item
    predictions from two runs can be joined even when one of them used `limit`."""

    item_id: str
    task: str
    instruction: str
    input: str
    output: str
    answer: str
    # What a task needs beyond the LLM-Adapters fields (IFEval: instruction ids and their kwargs).
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Score:
    """The verdict on one completion; `extracted` is None exactly when parsing failed.

    `detail` holds verdicts below the item (IFEval: one per instruction, strict and loose); it is
    stored with the prediction so item-level metrics can be recomputed and compared.
    """

    extracted: str | None
    correct: bool
    parse_failed: bool
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class MetricValue:
    """One aggregate a task reports for a set, before the evaluator adds protocol and n."""

    metric: str
    value: float
    n: int
    stderr: float | None


@dataclass(frozen=True)
class Task:
    """One evaluation set and the upstream rule that scores it.

    The scoring rule is data (`pattern`, `pick`, `numeric`), so the family tables declare sets
    instead of subclassing. Log-likelihood mode (commonsense only, run by the evaluator): for each
    label in `candidate_labels(item)`, context = prompt + `LOGLIK_PREFIX`, continuation =
    `" " + label`. With a prompt ending in "### Response:\\n" this rebuilds the training text
    "...### Response:\\nthe correct answer is answer1" exactly, and the label's leading space stays
    with the continuation, where BPE tokenizers put it.
    """

    name: str  # registry key, lowercase
    folder: str  # LLM-Adapters dataset folder, e.g. "ARC-Challenge"
    family: Literal["commonsense", "math", "instruction"]
    pattern: str  # the upstream extraction regex
    pick: Literal["first", "last"]  # which regex match is the prediction
    numeric: bool  # compare as numbers within MATH_TOLERANCE (commas removed first)
    knowledge: int  # LoRAMoE task type: commonsense (world knowledge) 1, math 0
    max_new_tokens: int  # upstream: commonsense 32, math 256
    labels: tuple[str, ...] | None = None  # log-likelihood candidates; None: generation only
    num_beams_upstream: int = 4
    stop_strings: tuple[str, ...] = ("### Instruction",)
    protocol_name: str = "llm-adapters"  # prefix of the stored protocol id
    fixed_num_beams: int | None = None  # a protocol that fixes decoding (IFEval: greedy)
    headline_metric: str = "accuracy"  # the number a family average takes from this set

    @property
    def data_source(self) -> str:
        """Where the set's rows come from, stored with the run (provenance)."""
        return f"LLM-Adapters dataset/{self.folder}/test.json"

    def packaged_file(self) -> Path | None:
        """A data file that ships with an installed package (no data folder needed), or None."""
        return None

    @property
    def scoring_rule(self) -> str:
        """A short id for the rule, stored with every score."""
        if self.numeric:
            return f"llm-adapters/{self.pick}-number(tol={MATH_TOLERANCE}):{self.pattern}"
        return f"llm-adapters/{self.pick}-regex:{self.pattern}"

    def test_file(self, root: Path) -> Path:
        """Where this set's test file lies in an LLM-Adapters-style data folder."""
        return Path(root) / self.folder / "test.json"

    def score(self, prompt: str, completion: str, answer: str) -> Score:
        """Score a completion of `prompt` against the gold `answer` with the upstream rule."""
        full = prompt + completion
        # Upstream would crash without a marker (chat templates have none); the completion is then
        # the whole response.
        response = full.split(RESPONSE_MARKER)[1] if RESPONSE_MARKER in full else completion
        response = response.strip()
        if self.numeric:
            response = response.replace(",", "")
        matches = re.findall(self.pattern, response)
        if not matches:
            return Score(extracted=None, correct=False, parse_failed=True)
        pred = matches[0] if self.pick == "first" else matches[-1]
        if self.numeric:
            correct = abs(float(pred) - float(answer)) <= MATH_TOLERANCE
        else:
            correct = pred == answer
        return Score(extracted=pred, correct=correct, parse_failed=False)

    def score_item(self, prompt: str, completion: str, item: Item) -> Score:
        """Score one item; tasks whose gold is more than one string override this."""
        return self.score(prompt, completion, item.answer)

    def aggregate(self, verdicts: Sequence[Score]) -> list[MetricValue]:
        """The set's metrics from its items' verdicts: accuracy (with its binomial standard
        error) and the parse-failure rate."""
        n = len(verdicts)
        acc = sum(v.correct for v in verdicts) / n
        failures = sum(v.parse_failed for v in verdicts) / n
        return [
            MetricValue("accuracy", acc, n, binomial_stderr(acc, n)),
            MetricValue("parse_failure_rate", failures, n, None),
        ]

    def candidate_labels(self, item: Item) -> tuple[str, ...]:
        """The labels this item offers, for log-likelihood mode.

        ARC questions have 3, 4 or 5 choices, so scoring all of `labels` would let the model pick a
        choice that does not exist; the item's "Answer format: a/b/c" line says which exist.
        """
        if self.labels is None:
            raise ConfigError(
                f"Task '{self.name}' has no candidate labels; log-likelihood mode is only for "
                "commonsense tasks, score it in generation mode."
            )
        found = _ANSWER_FORMAT.findall(item.instruction)
        if found:
            offered = tuple(label for label in found[-1].split("/") if label)
            if offered and all(label in self.labels for label in offered):
                return offered
        return self.labels

    def load_items(self, path: Path, limit: int | None = None) -> list[Item]:
        """Read and validate an LLM-Adapters JSON array; keep the first `limit` rows.

        Every row is checked, even past `limit`, so that a broken file fails the same way
        whatever the limit, and before any model is loaded.
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"limit={limit} for task '{self.name}' must be a positive row count.")
        path = Path(path)
        items = [self._item(path, i, row) for i, row in enumerate(iter_json_array(path))]
        return items if limit is None else items[:limit]

    def _item(self, path: Path, index: int, row: Any) -> Item:
        where = f"Row {index} of {path}"
        if not isinstance(row, dict):
            raise DataError(
                f"{where} is a JSON {json_type(row)}, expected an object with "
                "'instruction', 'input', 'output' and 'answer'."
            )
        for key in ("instruction", "answer"):
            if key not in row:
                raise DataError(
                    f"{where} has no '{key}' field (it has: {', '.join(map(str, row)) or 'none'})."
                )
        fields = {key: row.get(key, "") for key in ("instruction", "input", "output", "answer")}
        if self.numeric and _is_number(fields["answer"]):
            fields["answer"] = str(fields["answer"])  # upstream accepts numeric golds
        for key, value in fields.items():
            if not isinstance(value, str):
                raise DataError(
                    f"{where}: '{key}' must be a string, found a JSON {json_type(value)}."
                )
        self._check_gold(where, fields["answer"])
        return Item(item_id=f"{self.name}/{index}", task=self.name, **fields)

    def _check_gold(self, where: str, answer: str) -> None:
        """A gold the rule can never produce would silently count as wrong on every run."""
        if self.numeric:
            try:
                ok = math.isfinite(float(answer))
            except ValueError:
                ok = False
            if not ok:
                raise DataError(
                    f"{where}: the gold answer {_short(answer)} is not a number, "
                    f"which '{self.name}' scores numerically."
                )
        elif re.fullmatch(self.pattern, answer) is None:
            raise DataError(
                f"{where}: the gold answer {_short(answer)} is not one the '{self.name}' rule "
                f"can extract (regex {self.pattern})."
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: str, width: int = 40) -> str:
    """repr keeps a message on one line even if the value holds a newline."""
    return repr(value if len(value) <= width else value[:width] + "...")


def question_key(instruction: str) -> str:
    """A normalised question, for train/test overlap checks.

    Takes the instruction's first paragraph (the question, without the answer choices, which a
    duplicate may list in another order), lowercased, with punctuation and spacing collapsed.
    """
    first = instruction.strip().split("\n\n", 1)[0]
    return " ".join(re.sub(r"[^0-9a-z]+", " ", first.lower()).split())


TASKS: Registry[Task] = Registry(
    "task",
    ("moebench.tasks.commonsense", "moebench.tasks.math", "moebench.tasks.ifeval"),
    "moebench.tasks",
)


def get_task(name: str) -> Task:
    """Look a task up by name; unknown names fail with the list and a did-you-mean."""
    return TASKS.get(name)
