"""The main view as records, and those records as CSV, Markdown, LaTeX or a static HTML page.

The column names and meanings are documented in docs/leaderboard.md; scores are in percent.
Reference rows (chance, published numbers) come after the measured ones with `source` set to
where they come from, and carry no intervals, ranks or seeds: they are not measurements here.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moebench.board.reference import ReferenceRow
from moebench.board.table import Board, BoardRow
from moebench.digits import fixed, pct
from moebench.errors import ConfigError

MEASURED = "measured"
TABLE_NOTE = (
    "Mean over seeds ± half the 95% t interval (no interval for one seed); "
    "* : paired test against LoRA holds."
)
FORMATS = (".csv", ".md", ".tex", ".html")


def row_record(row: BoardRow, score_columns: Sequence[str]) -> dict[str, Any]:
    """One measured row as flat fields (the CSV columns)."""
    rec: dict[str, Any] = {
        "rank": row.rank,
        "method": row.method,
        "model": row.model,
        "suite": row.suite,
        "source": MEASURED,
        "n_seeds": row.n_seeds,
        "seeds": " ".join(map(str, row.seeds)),
        "runs": " ".join(map(str, row.runs)),
        "trainable_params": row.trainable_params,
        "pct_of_base": None if row.percent_of_base is None else round(row.percent_of_base, 4),
        "active_params": row.active_params,
        "in_band": row.in_band,
    }
    for c in score_columns:
        s = row.scores.get(c)
        rec[c] = pct(s.mean) if s else None
        rec[f"{c}_low"] = pct(s.low) if s else None
        rec[f"{c}_high"] = pct(s.high) if s else None
    p = row.vs_lora
    rec["vs_lora"] = pct(p.diff) if p else None
    rec["vs_lora_low"] = pct(p.low) if p else None
    rec["vs_lora_high"] = pct(p.high) if p else None
    rec["vs_lora_holds"] = p.holds if p else None
    rec["vs_lora_verdict"] = _verdict(p)
    rec["step_time_s"] = None if row.step_time_s is None else round(row.step_time_s, 6)
    rec["peak_memory_mib"] = (
        None if row.peak_memory_bytes is None else round(row.peak_memory_bytes / 2**20, 3)
    )
    rec["protocols"] = " ".join(f"{t}={p}" for t, p in sorted(row.protocols.items()))
    return rec


def _verdict(p: Any) -> str:
    """'better' or 'worse' only where the paired test holds; blank otherwise."""
    if p is None or not p.holds:
        return ""
    return "better" if p.diff > 0 else "worse"


def reference_record(ref: ReferenceRow, fields: Sequence[str]) -> dict[str, Any]:
    rec: dict[str, Any] = dict.fromkeys(fields)
    rec.update(method=ref.label, model=ref.model or "", source=ref.source)
    for c, v in ref.scores.items():
        if c in rec:
            rec[c] = pct(v)
    return rec


def records(
    board: Board,
    references: Sequence[ReferenceRow] = (),
    rows: Sequence[BoardRow] | None = None,
) -> list[dict[str, Any]]:
    """The view as flat records: measured rows in board order, then reference rows."""
    cols = board.score_columns()
    out = [row_record(r, cols) for r in (board.rows if rows is None else rows)]
    fields = list(out[0]) if out else list(row_record(_EMPTY, cols))
    return out + [reference_record(ref, fields) for ref in references]


_EMPTY = BoardRow("", "", "", "", (), (), None, None, None, {}, {})


def to_csv(recs: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """The records as CSV; a view with no row is its header alone, so that a script reading
    it still finds the columns."""
    fields = list(recs[0]) if recs else list(row_record(_EMPTY, columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in recs)
    return buf.getvalue()


def paper_table(recs: list[dict[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """Header and cells of a paper-ready table: mean with its interval's half width."""
    head = ["Rank", "Method", "Model", "Seeds", "Params (%)", *columns, "vs LoRA"]
    body = []
    for r in recs:
        cells = [str(r["rank"] or ""), str(r["method"]), str(r["model"]), str(r["n_seeds"] or "")]
        cells.append("" if r["pct_of_base"] is None else fixed(r["pct_of_base"], 3))
        for c in columns:
            v, lo, hi = r.get(c), r.get(f"{c}_low"), r.get(f"{c}_high")
            if v is None:
                cells.append("")
            elif lo is None or hi is None:
                cells.append(fixed(v))
            else:
                cells.append(f"{fixed(v)} ± {fixed((hi - lo) / 2)}")
        d = r.get("vs_lora")
        mark = "*" if r.get("vs_lora_holds") else ""
        cells.append("" if d is None else f"{fixed(d, sign=True)}{mark}")
        body.append(cells)
    return [head, *body]


def to_markdown(recs: list[dict[str, Any]], columns: Sequence[str]) -> str:
    table = paper_table(recs, columns)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table[1:]]
    note = f"\n{TABLE_NOTE}\n"
    return "\n".join(lines) + "\n" + note


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_")):
        text = text.replace(a, b)
    for a in "#$":
        text = text.replace(a, "\\" + a)
    return text.replace("±", r"$\pm$")


def to_latex(recs: list[dict[str, Any]], columns: Sequence[str]) -> str:
    table = paper_table(recs, columns)
    spec = "rll" + "r" * (len(table[0]) - 3)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    lines.append(" & ".join(_tex_escape(c) for c in table[0]) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(_tex_escape(c) for c in row) + r" \\" for row in table[1:]]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_html(recs: list[dict[str, Any]], columns: Sequence[str], charts: Sequence[str]) -> str:
    """A static, self-contained page: the table and the given charts (plotly HTML divs)."""
    table = paper_table(recs, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:]
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>moebench leaderboard</title>"
        f"<style>{style}</style></head><body><h1>moebench leaderboard</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<p>{html.escape(TABLE_NOTE)}</p>" + "".join(charts) + "</body></html>"
    )


def write_export(
    path: Path, recs: list[dict[str, Any]], columns: Sequence[str], charts: Sequence[str] = ()
) -> None:
    """Write the view to `path`, the format chosen by its extension."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"--export {path}: unknown format '{suffix or '(none)'}'; use one of "
            f"{', '.join(FORMATS)}."
        )
    if suffix == ".csv":
        text = to_csv(recs, columns)
    elif suffix == ".md":
        text = to_markdown(recs, columns)
    elif suffix == ".tex":
        text = to_latex(recs, columns)
    else:
        text = to_html(recs, columns, charts)
    path.write_text(text, encoding="utf-8")
