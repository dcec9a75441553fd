"""`moebench leaderboard --export`: every format, the documented CSV columns, bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from tests.test_leaderboard_data import PLAN, seed_store

DOC = Path(__file__).resolve().parents[1] / "docs" / "leaderboard.md"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "board.db"
    seed_store(path)
    return path


def _export(db: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["leaderboard", "--db", str(db), "--export", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out.read_text()


def _documented_columns() -> set[str]:
    """Every backticked name in the first cell of the CSV section's table rows."""
    section = DOC.read_text().split("## CSV columns")[1].split("\n## ")[0]
    cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}


def _generic(col: str, sets: set[str]) -> str:
    """`boolq_low` -> `<set>_low`, `math_avg_high` -> `<family>_avg_high`; others unchanged."""
    m = re.fullmatch(r"(.+?)(_low|_high)?", col)
    assert m is not None
    base, tail = m[1], m[2] or ""
    if base in sets:
        return "<set>" + tail
    if base.endswith("_avg") and tail:
        return "<family>_avg" + tail
    return col


def test_csv_columns_are_the_documented_ones(seeded: Path, tmp_path: Path) -> None:
    text = _export(seeded, tmp_path / "view.csv", "--target", "10k")
    header = next(csv.reader(text.splitlines()))
    sets = {"boolq", "piqa", "gsm8k", "svamp", "ifeval"}
    assert {_generic(c, sets) for c in header} <= _documented_columns()
    rows = list(csv.DictReader(text.splitlines()))
    assert {r["method"] for r in rows} == set(PLAN)
    assert {r["method"]: r["in_band"] for r in rows}["mixlora"] == "False"


def test_markdown_latex_html(seeded: Path, tmp_path: Path) -> None:
    md = _export(seeded, tmp_path / "view.md", "--target", "10000")
    assert (
        sum(line.startswith("| ") for line in md.splitlines()) == 4
    )  # header + lora, loramoe, loracoe (mixlora is out of band)
    assert "loracoe" in md and "mixlora" not in md
    assert "+" in md.split("loracoe")[1].split("\n")[0] and "*" in md
    tex = _export(seeded, tmp_path / "view.tex", "--target", "10000")
    assert tex.startswith("\\begin{tabular}") and "commonsense\\_avg" in tex
    page = _export(seeded, tmp_path / "view.html", "--target", "10000")
    assert (
        "<table>" in page and "Plotly.newPlot" in page and not re.search(r"<script[^>]*src=", page)
    )


def test_a_band_with_no_row_is_explained_and_the_csv_keeps_its_header(
    seeded: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["leaderboard", "--db", str(seeded), "--export", str(tmp_path / "v.md"),
         "--target", "20k", "--band", "2.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    note = " ".join(result.output.split())
    assert "No row is within ±2.5% of 20,000 trainable parameters" in note
    assert "nearest measured budgets are 10,000, 10,200, 30,000" in note
    empty = _export(seeded, tmp_path / "none.csv", "--model", "no-such-model")
    assert empty.splitlines()[0].startswith("rank,method,model,suite,source")
    assert len(empty.splitlines()) == 1


def test_export_makes_a_missing_folder_as_moebench_export_does(
    seeded: Path, tmp_path: Path
) -> None:
    text = _export(seeded, tmp_path / "new" / "deeper" / "view.csv")
    assert text.splitlines()[0].startswith("rank,method,model")
    (tmp_path / "folder.csv").mkdir()
    result = CliRunner().invoke(
        app, ["leaderboard", "--db", str(seeded), "--export", str(tmp_path / "folder.csv")]
    )
    assert result.exit_code != 0
    assert "folder.csv is a folder; give a file name inside it" in str(result.exception)


def test_paper_tables_round_a_tie_as_the_page_does(seeded: Path, tmp_path: Path) -> None:
    """mixlora's math average is 48.125 (385/8): the page's grid writes 48.13 (toFixed, see
    test_leaderboard_browser), so the Markdown and LaTeX must too, not Python's even 48.12."""
    text = _export(seeded, tmp_path / "v.csv")
    rows = {r["method"]: r for r in csv.DictReader(text.splitlines())}
    assert float(rows["mixlora"]["math_avg"]) == 48.125
    md = _export(seeded, tmp_path / "v.md")
    header = next(ln for ln in md.splitlines() if ln.startswith("| Rank"))
    mix = next(ln for ln in md.splitlines() if "| mixlora |" in ln)
    cell = mix.split(" | ")[header.split(" | ").index("math_avg")]
    assert cell.startswith("48.13 ± ")
    assert "48.13" in _export(seeded, tmp_path / "v.tex").split("mixlora")[1].split("\\\\")[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--export", "v.txt"], "unknown format '.txt'"),
        (["--export", "v.csv", "--target", "lots"], "not a parameter count"),
        (["--export", "v.csv", "--band", "0"], "--band 0 is not a budget band; give a percentage"),
        (["--export", "v.csv", "--band", "100"], "--band 100 is not a budget band"),
        (["--port", "0"], "--port 0 is not a TCP port"),
    ],
)
def test_bad_input_is_one_sentence(seeded: Path, tmp_path: Path, args, message) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["leaderboard", "--db", str(seeded), *args])
    assert result.exit_code != 0
    assert message in str(result.exception) or message in result.output
