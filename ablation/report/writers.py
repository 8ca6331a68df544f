"""Writers of report tables: Markdown, CSV (the raw numbers) and LaTeX booktabs."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ..io import atomic_path
from .numbers import ID_COLUMNS, Table


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                  "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "∞": r"$\infty$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ % & #`` and the rest); ± and ∞ become math, – becomes --."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _split_header(columns: list[str]) -> list[tuple[str, str]]:
    """("PGD-20 Best") -> ("PGD-20", "Best"): a two-level header for metric columns."""
    out = []
    for c in columns:
        group, _, part = c.rpartition(" ")
        out.append((group, part) if part in ("Best", "Last", "Diff") and group else ("", c))
    return out


def _markdown(frame: pd.DataFrame, caption: str, notes: list[str]) -> str:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    lines = [f"**{caption}**", ""]
    if frame.empty:
        lines.append("(no data)")
    else:
        numeric = [c for c in frame.columns if not _is_id(c)]
        lines.append("| " + " | ".join(cell(c) for c in frame.columns) + " |")
        lines.append("|" + "|".join("---:" if c in numeric else ":---"
                                    for c in frame.columns) + "|")
        for row in frame.itertuples(index=False):
            lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"


def _is_id(column: str) -> bool:
    return column in (*ID_COLUMNS.values(), "Method", "Layer", "Term")


def _latex(frame: pd.DataFrame, caption: str, notes: list[str], stem: str) -> str:
    columns = list(frame.columns)
    header = _split_header(columns)
    spec = "".join("l" if _is_id(c) else "r" for c in columns) or "l"
    lines = [r"\begin{table}[t]", r"\centering",
             r"\caption{" + latex_escape(caption) + "}",
             # a label is a name, not text: escaping breaks pdflatex; keep letters, digits, -
             r"\label{tab:" + re.sub(r"[^A-Za-z0-9-]+", "-", stem) + "}",
             r"\begin{tabular}{" + spec + "}", r"\toprule"]
    if any(g for g, _ in header):
        # Group row: \multicolumn over runs of the same metric group, \cmidrule under each.
        cells, rules, i = [], [], 0
        while i < len(header):
            j = i
            while j + 1 < len(header) and header[j + 1][0] == header[i][0]:
                j += 1
            width, group = j - i + 1, header[i][0]
            if group:
                cells.append(r"\multicolumn{%d}{c}{%s}" % (width, latex_escape(group)))
                rules.append(r"\cmidrule(lr){%d-%d}" % (i + 1, j + 1))
            else:
                cells.extend([""] * width)
            i = j + 1
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(latex_escape(part) for _, part in header) + r" \\")
    lines.append(r"\midrule")
    for row in frame.itertuples(index=False):
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " +
                     r" \\ ".join(latex_escape(n) for n in notes) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, out: Path, stem: str, caption: str) -> list[Path]:
    """Write ``<stem>.md`` (pipe table after a bold caption line, footnotes below),
    ``<stem>.csv`` (the raw numbers: percent, full precision, empty cells where missing,
    ``*_std`` columns when seeds > 1) and ``<stem>.tex`` (a booktabs ``table``); return the
    three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(table.notes)
    md, csv, tex = (out / f"{stem}{ext}" for ext in (".md", ".csv", ".tex"))
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(table.display, caption, notes), encoding="utf-8")
    with atomic_path(csv) as tmp:
        table.numbers.to_csv(tmp, index=False)
    with atomic_path(tex) as tmp:
        tmp.write_text(_latex(table.display, caption, notes, stem), encoding="utf-8")
    return [md, csv, tex]
