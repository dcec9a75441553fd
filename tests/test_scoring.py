"""Scoring rules against hand-computed cases, quirks of LLM-Adapters' evaluators included.

Also: every registered task scores its own gold training text as correct on the packaged mini
data, and bad data files fail with one sentence naming the file and the row.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench.errors import ConfigError, DataError, NotFoundError
from moebench.prompts import build_prompt
from moebench.task import TASKS, Item, Score, Task, get_task
from moebench.tasks import MINI_DIR

PROMPT = build_prompt("alpaca", "A question with the number 42 in it?")
UPSTREAM_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"


def score(task: str, completion: str, answer: str, prompt: str = PROMPT) -> Score:
    return get_task(task).score(prompt, completion, answer)


# --- commonsense: first match of a lowercase, case-sensitive regex, exact match ---------------


@pytest.mark.parametrize(
    ("task", "completion", "answer", "expected"),
    [
        ("boolq", "the correct answer is true", "true", Score("true", True, False)),
        ("boolq", "the correct answer is false", "true", Score("false", False, False)),
        # upstream quirk: `true` matches inside `untrue`
        ("boolq", "that is untrue", "true", Score("true", True, False)),
        # the FIRST match wins
        ("boolq", "false, not true", "true", Score("false", False, False)),
        ("boolq", "True", "true", Score(None, False, True)),
        ("piqa", "solution2 then solution1", "solution2", Score("solution2", True, False)),
        ("winogrande", "option1", "option2", Score("option1", False, False)),
        ("social_i_qa", "answer3", "answer3", Score("answer3", True, False)),
        # upstream quirk: capitalised labels are not matched
        ("arc_challenge", "Answer1", "answer1", Score(None, False, True)),
        ("arc_easy", "the correct answer is answer5", "answer5", Score("answer5", True, False)),
        ("openbookqa", "answer2 or answer1", "answer1", Score("answer2", False, False)),
        ("hellaswag", "ending4", "ending4", Score("ending4", True, False)),
        ("openbookqa", "", "answer1", Score(None, False, True)),
    ],
)
def test_commonsense_rule(task: str, completion: str, answer: str, expected: Score) -> None:
    assert score(task, completion, answer) == expected


# --- math: commas removed, LAST number, |pred - gold| <= 0.001 -------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("3 apples and 5 pears make 8. The answer is 8.", "8.0", Score("8.", True, False)),
        # the LAST number wins, even after the stated answer
        ("The answer is 8. Check: 8 - 5 = 3", "8.0", Score("3", False, False)),
        ("The answer is 1,000.", "1000", Score("1000.", True, False)),
        ("It falls to -3.5 degrees", "-3.5", Score("-3.5", True, False)),
        ("The answer is 0.6666", "0.6666666666666666", Score("0.6666", True, False)),
        ("The answer is 0.667", "0.6666666666666666", Score("0.667", True, False)),
        ("The answer is 0.66", "0.6666666666666666", Score("0.66", False, False)),
        # a rounded answer fails for a non-integer gold (AddSub, SingleEq)
        ("The answer is 1", "0.6666666666666666", Score("1", False, False)),
        ("2.001", "2", Score("2.001", True, False)),
        ("2.0011", "2", Score("2.0011", False, False)),
        ("I do not know.", "42", Score(None, False, True)),
    ],
)
@pytest.mark.parametrize("task", ["gsm8k", "svamp", "addsub", "multiarith", "singleeq", "mawps"])
def test_math_rule(task: str, completion: str, answer: str, expected: Score) -> None:
    """Every numeric set scores by the same upstream rule (evaluate.py has one for all)."""
    assert score(task, completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is (C).", "C", Score("C", True, False)),
        # the first capital A-E anywhere counts, even a word
        ("A train covers it; the answer is (C).", "C", Score("A", False, False)),
        ("the answer is (c).", "C", Score(None, False, True)),
    ],
)
def test_aqua_rule(completion: str, answer: str, expected: Score) -> None:
    assert score("aqua", completion, answer) == expected


# --- which text is the response -----------------------------------------------------------


def test_numbers_in_the_prompt_are_not_taken() -> None:
    assert score("gsm8k", " I cannot tell.", "42") == Score(None, False, True)
    assert score("boolq", "no idea", "true", prompt=build_prompt("alpaca", "true or false?")) == (
        Score(None, False, True)
    )


def test_text_after_a_second_marker_is_ignored() -> None:
    completion = "The answer is 3.\n\n### Response: 9"
    assert score("gsm8k", completion, "3") == Score("3.", True, False)


def test_upstream_eval_prompt_with_trailing_indent() -> None:
    prompt = build_prompt("llm-adapters-eval", "Is it so?")
    assert score("boolq", " the correct answer is false", "false", prompt) == Score(
        "false", True, False
    )


def test_without_a_marker_the_completion_is_the_response() -> None:
    """Chat templates have no `### Response:`; upstream would crash here."""
    assert score("gsm8k", "The answer is 7", "7", prompt="<|user|>3 + 4?<|assistant|>") == (
        Score("7", True, False)
    )


# --- the registry and each task's declaration ----------------------------------------------


LLM_ADAPTERS_TASKS = [n for n in TASKS.names() if get_task(n).protocol_name == "llm-adapters"]


def test_every_registered_task_is_declared_by_a_known_protocol() -> None:
    assert set(TASKS.names()) - set(LLM_ADAPTERS_TASKS) == {"ifeval"}  # tests/test_ifeval.py


@pytest.mark.parametrize("name", LLM_ADAPTERS_TASKS)
def test_task_declaration(name: str) -> None:
    task = get_task(name)
    assert task.name == name == name.lower()
    assert (task.family, task.knowledge, task.max_new_tokens) in {
        ("commonsense", 1, 32),
        ("math", 0, 256),
    }
    assert (task.labels is None) == (task.family == "math")
    assert task.num_beams_upstream == 4
    assert task.stop_strings == ("### Instruction",)
    assert task.scoring_rule.startswith("llm-adapters/")
    assert task.test_file(Path("/d")) == Path("/d") / task.folder / "test.json"


def test_scoring_rule_ids() -> None:
    assert get_task("boolq").scoring_rule == "llm-adapters/first-regex:true|false"
    assert get_task("gsm8k").scoring_rule == r"llm-adapters/last-number(tol=0.001):-?\d+\.?\d*"
    assert get_task("aqua").scoring_rule == "llm-adapters/first-regex:A|B|C|D|E"


def test_unknown_task_lists_choices() -> None:
    with pytest.raises(NotFoundError, match="Did you mean 'arc_challenge'"):
        get_task("arc-challenge")


def mini_file(task: Task) -> Path:
    path = task.test_file(MINI_DIR)
    if not path.exists():
        pytest.skip(f"no mini eval file for {task.name} ({task.folder} is not in the mini suite)")
    return path


@pytest.mark.parametrize("name", TASKS.names())
def test_gold_training_text_scores_correct_on_mini(name: str) -> None:
    """Each row's `output` ("the correct answer is X" / a worked solution ending "The answer is
    N.") is an oracle completion. The mini draw keeps only math rows whose solution is right
    (upstream's were model-generated; ~40% of gsm8k's are wrong), so every row must score."""
    task = get_task(name)
    for item in task.load_items(mini_file(task)):
        verdict = task.score(
            build_prompt("alpaca", item.instruction, item.input), item.output, item.answer
        )
        assert verdict.correct, (item.item_id, item.output, item.answer)


@pytest.mark.parametrize("name", LLM_ADAPTERS_TASKS)
def test_full_upstream_file_loads_and_commonsense_oracle_is_perfect(name: str) -> None:
    task = get_task(name)
    path = task.test_file(UPSTREAM_DATA)
    if not path.exists():
        pytest.skip(f"{path} not available")
    items = task.load_items(path)
    if task.family == "commonsense":
        prompt = build_prompt("alpaca", "Q")
        assert all(task.score(prompt, it.output, it.answer).correct for it in items)


# --- log-likelihood candidates ---------------------------------------------------------------


def item(instruction: str, task: str = "arc_challenge") -> Item:
    return Item(f"{task}/0", task, instruction, "", "", "answer1")


@pytest.mark.parametrize(
    ("task", "instruction", "expected"),
    [
        (
            "arc_challenge",
            "Q\n\nAnswer format: answer1/answer2/answer3",
            ("answer1", "answer2", "answer3"),
        ),
        (
            "arc_easy",
            "Q\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
            tuple(f"answer{i}" for i in range(1, 6)),
        ),
        (
            "winogrande",
            "Option1: A Option2: B Answer format: option1/option2",
            ("option1", "option2"),
        ),
        ("boolq", "Q\n\nAnswer format: true/false", ("true", "false")),
        ("openbookqa", "Q without a format line", ("answer1", "answer2", "answer3", "answer4")),
        # a format line naming labels the task does not know falls back to the task's labels
        ("piqa", "Q\n\nAnswer format: yes/no", ("solution1", "solution2")),
    ],
)
def test_candidate_labels(task: str, instruction: str, expected: tuple[str, ...]) -> None:
    assert get_task(task).candidate_labels(item(instruction, task)) == expected


def test_candidate_labels_of_real_arc_items_follow_their_choices() -> None:
    task = get_task("arc_challenge")
    for it in task.load_items(mini_file(task)):
        labels = task.candidate_labels(it)
        assert it.answer in labels
        assert all(f"Answer{label[-1]}:" in it.instruction for label in labels)


def test_math_has_no_candidate_labels() -> None:
    with pytest.raises(ConfigError, match="generation mode"):
        get_task("gsm8k").candidate_labels(item("Q", "gsm8k"))


# --- loading: limits, ids, and one-sentence errors -------------------------------------------


def test_limit_keeps_the_first_rows_with_source_indices() -> None:
    task = get_task("boolq")
    path = mini_file(task)
    rows = json.loads(path.read_text(encoding="utf-8"))
    items = task.load_items(path, limit=3)
    assert [it.item_id for it in items] == ["boolq/0", "boolq/1", "boolq/2"]
    assert [it.instruction for it in items] == [r["instruction"] for r in rows[:3]]
    with pytest.raises(ConfigError):
        task.load_items(path, limit=0)


def test_numeric_gold_is_accepted_for_math(tmp_path: Path) -> None:
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "1+1?", "input": "", "output": "", "answer": 2}]))
    assert get_task("addsub").load_items(path)[0].answer == "2"


def write_bad(tmp_path: Path, source: str, row: int, **changes: object) -> Path:
    """A copy of a real mini file with one row changed (a value of None drops the key)."""
    rows = json.loads((MINI_DIR / source).read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            del rows[row][key]
        else:
            rows[row][key] = value
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return path


def assert_one_sentence(err: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert message.rstrip().endswith((".", "?"))
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize(
    ("task", "source", "changes", "expected"),
    [
        ("boolq", "boolq/test.json", {"instruction": None}, "no 'instruction' field"),
        ("boolq", "boolq/test.json", {"answer": None}, "no 'answer' field"),
        ("boolq", "boolq/test.json", {"instruction": 7}, "'instruction' must be a string"),
        ("boolq", "boolq/test.json", {"output": ["x"]}, "'output' must be a string"),
        ("boolq", "boolq/test.json", {"answer": "yes"}, "gold answer 'yes'"),
        ("gsm8k", "gsm8k/test.json", {"answer": "twelve"}, "'twelve' is not a number"),
        ("gsm8k", "gsm8k/test.json", {"answer": "nan"}, "is not a number"),
    ],
)
def test_bad_rows_name_file_and_row(
    tmp_path: Path, task: str, source: str, changes: dict[str, object], expected: str
) -> None:
    path = write_bad(tmp_path, source, 3, **changes)
    with pytest.raises(DataError) as err:
        get_task(task).load_items(path, limit=1)  # rows past the limit are still checked
    assert_one_sentence(err, f"Row 3 of {path}", expected)


def test_aqua_gold_must_be_a_letter(tmp_path: Path) -> None:
    rows = [{"instruction": "Q (A) 1 (B) 2", "input": "", "output": "", "answer": a} for a in "ABF"]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        get_task("aqua").load_items(path)
    assert_one_sentence(err, f"Row 2 of {path}", "gold answer 'F'", "A|B|C|D|E")


def test_truncated_json_names_line_and_column(tmp_path: Path) -> None:
    text = (MINI_DIR / "boolq" / "test.json").read_text(encoding="utf-8")
    path = tmp_path / "test.json"
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(DataError) as err:
        get_task("boolq").load_items(path)
    assert_one_sentence(err, str(path), "not valid JSON", "line ", "column ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[]", "empty array"),
        ('{"instruction": "Q"}', "holds a JSON object, expected an array"),
        ('["just a string"]', "Row 0 of"),
    ],
)
def test_bad_file_shapes(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "test.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        get_task("boolq").load_items(path)
    assert_one_sentence(err, str(path), expected)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "test.json"
    with pytest.raises(DataError) as err:
        get_task("piqa").load_items(path)
    assert_one_sentence(err, str(path), "does not exist")
