"""Commonsense reasoning sets (LLM-Adapters' eight), scored by the first match of a label regex.

Generation settings follow commonsense_evaluate.py: 4 beams, 32 new tokens. LoRAMoE treats these
as world-knowledge tasks (type 1). The regexes are upstream's, lowercase and case-sensitive.
"""

from __future__ import annotations

from moebench.task import TASKS, Task


def _choices(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


# Upstream uses one answer regex for all four multiple-choice sets, whatever their choice count.
_ANSWERS = "|".join(_choices("answer", 5))

# name, LLM-Adapters folder, extraction regex, labels for log-likelihood mode (the most an item
# offers; items narrow it through their "Answer format: ..." line).
_SETS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("boolq", "boolq", "true|false", ("true", "false")),
    ("piqa", "piqa", "solution1|solution2", _choices("solution", 2)),
    ("social_i_qa", "social_i_qa", _ANSWERS, _choices("answer", 3)),
    ("hellaswag", "hellaswag", "ending1|ending2|ending3|ending4", _choices("ending", 4)),
    ("winogrande", "winogrande", "option1|option2", _choices("option", 2)),
    ("arc_challenge", "ARC-Challenge", _ANSWERS, _choices("answer", 5)),
    ("arc_easy", "ARC-Easy", _ANSWERS, _choices("answer", 5)),
    ("openbookqa", "openbookqa", _ANSWERS, _choices("answer", 4)),
)

for _name, _folder, _pattern, _labels in _SETS:
    TASKS.add(
        _name,
        Task(
            name=_name,
            folder=_folder,
            family="commonsense",
            pattern=_pattern,
            pick="first",
            numeric=False,
            knowledge=1,
            max_new_tokens=32,
            labels=_labels,
        ),
    )
