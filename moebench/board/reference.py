"""Reference rows shown beside measured ones, always labelled external: chance and Table 1.

Never mixed into measured aggregates: they are returned as their own rows and carry
`source`, so a table or export can keep them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebench.task import TASKS

# The seed paper (LoRACoE, ACL submission, Table 1: "Evaluating results of different methods on
# commonsense, math and Instruction following tasks"), in percent: commonsense, math, instruction
# following, and their mean. Model names are moebench's aliases for the paper's models.
TABLE1_SOURCE = "LoRACoE (ACL submission), Table 1"
TABLE1: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "llama2-7b": {
        "FT": (65.07, 85.69, 49.52, 66.76),
        "LoRA": (63.26, 75.42, 55.75, 64.81),
        "LoRAMoE": (74.01, 82.94, 57.79, 71.58),
        "LoRACoE": (80.83, 86.49, 56.47, 74.60),
    },
    "llama2-13b": {
        "FT": (74.49, 83.63, 61.03, 73.05),
        "LoRA": (68.17, 82.36, 61.27, 70.60),
        "LoRAMoE": (79.18, 87.10, 62.23, 76.17),
        "LoRACoE": (81.53, 90.50, 65.22, 79.08),
    },
    "llama3-8b": {
        "FT": (65.08, 85.78, 56.95, 69.27),
        "LoRA": (68.11, 82.69, 65.34, 72.05),
        "LoRAMoE": (78.89, 88.98, 67.38, 78.42),
        "LoRACoE": (81.09, 92.28, 64.62, 79.33),
    },
    "qwen2-0.5b": {
        "FT": (53.98, 76.13, 37.29, 55.80),
        "LoRA": (55.15, 69.57, 35.61, 53.44),
        "LoRAMoE": (57.50, 72.35, 31.89, 53.91),
        "LoRACoE": (64.24, 74.40, 35.97, 58.20),
    },
    "qwen2-1.5b": {
        "FT": (65.15, 82.79, 41.72, 63.22),
        "LoRA": (73.17, 85.03, 48.08, 68.76),
        "LoRAMoE": (73.81, 85.98, 46.64, 68.81),
        "LoRACoE": (74.91, 86.18, 48.68, 69.92),
    },
    "qwen2-7b": {
        "FT": (86.15, 93.71, 61.63, 80.50),
        "LoRA": (84.78, 93.88, 62.95, 80.54),
        "LoRAMoE": (85.18, 94.36, 62.11, 80.55),
        "LoRACoE": (85.97, 94.71, 64.26, 81.65),
    },
}
TABLE1_COLUMNS = ("commonsense_avg", "math_avg", "instruction_avg", "overall")


@dataclass(frozen=True)
class ReferenceRow:
    """A row that was not measured here: its label, where it comes from, scores in [0, 1]."""

    label: str
    model: str | None
    source: str
    scores: dict[str, float]


def chance_level(task: str) -> float | None:
    """Accuracy of a uniform guess over the set's answer labels (None: no closed label set).

    Commonsense sets guess among their label candidates (the most an item offers, so a lower
    bound where items offer fewer); AQuA among A-E; open numeric answers and IFEval have none.
    """
    if task not in TASKS:
        return None
    t = TASKS.get(task)
    if t.labels:
        return 1.0 / len(t.labels)
    if t.pattern == "A|B|C|D|E":
        return 0.2
    return 0.0 if t.numeric else None


def chance_row(tasks: list[str]) -> ReferenceRow:
    """The chance row over `tasks`, with the family averages the measured rows use."""
    scores = {t: c for t in tasks if (c := chance_level(t)) is not None}
    families: dict[str, list[float]] = {}
    for t, c in scores.items():
        families.setdefault(TASKS.get(t).family, []).append(c)
    for family, values in families.items():
        scores[f"{family}_avg"] = sum(values) / len(values)
    return ReferenceRow("chance", None, "uniform guess over answer labels", scores)


def table1_rows(model: str | None = None) -> list[ReferenceRow]:
    """The seed paper's published rows (all models, or one), as fractions."""
    rows = []
    for name, methods in TABLE1.items():
        if model is not None and name != model:
            continue
        for method, values in methods.items():
            scores = {c: v / 100.0 for c, v in zip(TABLE1_COLUMNS, values, strict=True)}
            rows.append(ReferenceRow(f"{method} (published)", name, TABLE1_SOURCE, scores))
    return rows
