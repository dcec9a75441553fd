"""Arithmetic reasoning sets, scored by the last number in the response (AQuA: first letter A-E).

Generation settings follow evaluate.py: 4 beams, 256 new tokens. LoRAMoE treats math as the
downstream task type 0. AddSub and SingleEq have non-integer golds (0.6666...), which a rounded
answer misses under the 0.001 tolerance; upstream's rule is kept so numbers stay comparable.
"""

from __future__ import annotations

from typing import Literal

from moebench.task import TASKS, Task

_NUMBER = r"-?\d+\.?\d*"

# name, LLM-Adapters folder, extraction regex, which match, numeric comparison
_SETS: tuple[tuple[str, str, str, Literal["first", "last"], bool], ...] = (
    ("gsm8k", "gsm8k", _NUMBER, "last", True),
    ("svamp", "SVAMP", _NUMBER, "last", True),
    ("addsub", "AddSub", _NUMBER, "last", True),
    ("multiarith", "MultiArith", _NUMBER, "last", True),
    ("singleeq", "SingleEq", _NUMBER, "last", True),
    ("mawps", "mawps", _NUMBER, "last", True),
    ("aqua", "AQuA", "A|B|C|D|E", "first", False),
)

for _name, _folder, _pattern, _pick, _numeric in _SETS:
    TASKS.add(
        _name,
        Task(
            name=_name,
            folder=_folder,
            family="math",
            pattern=_pattern,
            pick=_pick,
            numeric=_numeric,
            knowledge=0,
            max_new_tokens=256,
        ),
    )
