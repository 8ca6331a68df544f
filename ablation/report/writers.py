"""Writers of report tables: Markdown, CSV (the raw numbers), LaTeX booktabs and HTML.

The LaTeX needs only ``booktabs`` besides pdflatex's base. It is sized for a two-column paper: a
column that is the same on every row (dataset, network, seeds, ...) becomes one note, AutoAttack
columns that are all "–" go, and the table goes in a one-column ``table`` when its estimated width
fits a column (``COLUMN_PT``), else in a ``table*`` across both (``TEXT_PT``); tests compile every
generated table and fail on an overfull box. Markdown and HTML show every column.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd

from ..io import atomic_path
from .numbers import AA_NOT_RUN, DASH, ID_COLUMNS, STEPS_TITLE, Table
from .paper import SOURCE

# Widths of a 10 pt two-column article (\columnwidth, \textwidth); ICML's and IEEE's columns are
# a few points wider, so what fits here fits there.
COLUMN_PT = 229.0
TEXT_PT = 469.0
# Widths (pt) of Computer Modern characters at 9 pt (\small), rounded up so that an estimate
# that fits is a table that fits; other sizes scale them. _SPACE: 2 \tabcolsep between columns.
_CHAR_PT = {**dict.fromkeys(".,:; ", 3.0), **dict.fromkeys("[]()|'!", 3.6),
            **dict.fromkeys("±–%*", 7.0)}
_LOWER_PT, _UPPER_PT, _SPACE = 4.7, 7.0, 8.0
_TABCOLSEP = r"\setlength{\tabcolsep}{4pt}"
# (float, font size, its pt) in order of preference: the first whose estimate fits is used.
_LAYOUTS = (("table", r"\small", 9.0), ("table", r"\footnotesize", 8.0),
            ("table*", r"\small", 9.0), ("table*", r"\footnotesize", 8.0),
            ("table*", r"\scriptsize", 7.0))
# Columns that name rows rather than measure them: the LaTeX drops one that is the same on
# every row and states its value in a note.
_ROW_NAMES = (*ID_COLUMNS.values(), "Method", "Layer", SOURCE, STEPS_TITLE, "Seeds", "Cells")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                  "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "∞": r"$_\infty$",
                  "†": r"\dag{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ % & #`` and the rest); ± becomes math, – becomes --, and ∞ a
    subscript (it only follows L, the threat model: L∞ is typeset ``L$_\\infty$``)."""
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
    for note in notes:
        # One paragraph each (adjacent lines would run together), a leading "*" escaped so
        # that the running-trial footnote is not read as a list bullet.
        lines += ["", "\\" + note if note.startswith("*") else note]
    return "\n".join(lines) + "\n"


def _is_id(column: str) -> bool:
    return column in (*ID_COLUMNS.values(), "Method", "Layer", "Term", SOURCE, STEPS_TITLE)


def latex_label(name: str) -> str:
    """``tab:<name>`` with the name lower-cased and anything but a-z 0-9 : - made "-": a label
    is a name pdflatex writes to its .aux, not text, so escaping it would break the next pass."""
    return "tab:" + re.sub(r"[^a-z0-9:-]+", "-", name.lower()).strip("-")


def compact(frame: pd.DataFrame, notes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The columns a paper's table needs: row-naming columns equal on every row (of two or more)
    become one note "All rows: Dataset CIFAR-10; ...", and AutoAttack columns that are all "–"
    are dropped (the note that AutoAttack was not run then says so without the dash)."""
    constant = [c for c in frame.columns if c in _ROW_NAMES and len(frame) > 1
                and frame[c].nunique() == 1]
    no_aa = [c for c in frame.columns if c.startswith("AA ") and (frame[c] == DASH).all()]
    if constant:
        same = "; ".join(f"{c} {frame[c].iloc[0]}" for c in constant)
        notes = [f"All rows: {same}.", *notes]
    frame = frame.drop(columns=constant + no_aa)
    if no_aa and not any(c.startswith("AA ") for c in frame.columns):
        notes = ["AutoAttack was not run (no AA columns)." if n == AA_NOT_RUN else n
                 for n in notes]
    return frame, notes


def _width(frame: pd.DataFrame, header: list[tuple[str, str]], size_pt: float) -> float:
    """Estimated natural width (pt) of the tabular at a font of ``size_pt`` with 4 pt
    \\tabcolsep (cells as _latex writes them)."""
    def text(value: object) -> float:
        return sum(_CHAR_PT.get(ch, _UPPER_PT if ch.isupper() else _LOWER_PT)
                   for ch in _latex_cell(value)) * size_pt / 9.0

    total = 0.0
    for i, (_, part) in enumerate(header):
        cells = [text(v) for v in frame.iloc[:, i]] if len(frame) else []
        total += max([text(part), *cells]) + _SPACE
    return total


def _layout(frame: pd.DataFrame, header: list[tuple[str, str]]
            ) -> tuple[str | None, str | None]:
    """(float, size): one column when the table fits there at \\small or \\footnotesize, else
    across both at \\small, \\footnotesize or \\scriptsize; (None, None) when none fits (then
    the last is used, and the compile test fails: split the table)."""
    for env, size, pt in _LAYOUTS:
        if _width(frame, header, pt) <= (COLUMN_PT if env == "table" else TEXT_PT):
            return env, size
    return None, None


def _latex_cell(value: object) -> str:
    """A cell's text before escaping: "52.31±0.40" (no spaces around ±, which a column can
    ill afford)."""
    return str(value).replace(" ± ", "±")


def _latex(frame: pd.DataFrame, caption: str, notes: list[str], label: str) -> str:
    frame, notes = compact(frame, notes)
    columns = list(frame.columns)
    header = _split_header(columns)
    spec = "".join("l" if _is_id(c) else "r" for c in columns) or "l"
    float_env, size = _layout(frame, header)
    if float_env is None and frame.apply(lambda c: c.str.contains(" ± ")).any().any():
        # Too wide even across both columns at \scriptsize: the means alone, std in the note.
        frame = frame.apply(lambda c: c.str.replace(r" ± \S+", "", regex=True))
        notes = [*notes, "Means over seeds; the std is in the Markdown and CSV tables "
                         "(left out here for width)."]
        float_env, size = _layout(frame, header)
    float_env, size = float_env or _LAYOUTS[-1][0], size or _LAYOUTS[-1][1]
    lines = [r"\begin{%s}[t]" % float_env, r"\centering", size + _TABCOLSEP,
             r"\caption{" + latex_escape(caption) + "}",
             r"\label{" + latex_label(label) + "}",
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
        line = " & ".join(latex_escape(_latex_cell(v)) for v in row)
        # "{}" keeps the previous row's "\\" from reading a leading "[1]" as its argument.
        lines.append(("{}" if line.startswith("[") else "") + line + r" \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if notes:
        # One paragraph per note: after "\\" a note's leading "*" or "[" would be read as the
        # starred form or optional argument of "\\" and vanish.
        lines.append(r"\par\smallskip{\footnotesize\raggedright")
        lines.extend(latex_escape(n) + r"\par" for n in notes)
        lines.append("}")
    lines.append(r"\end{%s}" % float_env)
    return "\n".join(lines) + "\n"


def html_table(table: Table, caption: str, anchor: str) -> str:
    """The Markdown's table as HTML: the same display columns and footnotes, all text escaped."""
    frame = table.display
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.itertuples(index=False):
        rows.append("<tr>" + "".join(
            f"<td class='{'id' if _is_id(c) else 'num'}'>{html.escape(str(v))}</td>"
            for c, v in zip(frame.columns, row)) + "</tr>")
    notes = "".join(f"<p class='fn'>{html.escape(n)}</p>" for n in table.notes)
    return (f"<table id='{html.escape(anchor)}'><caption>{html.escape(caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{notes}")


def write_table(table: Table, out: Path, stem: str, caption: str, label: str | None = None
                ) -> list[Path]:
    """Write ``<stem>.md`` (pipe table after a bold caption line, footnotes below),
    ``<stem>.csv`` (the raw numbers: percent, full precision, empty cells where missing,
    ``*_std`` columns when seeds > 1) and ``<stem>.tex`` (a booktabs ``table`` or ``table*``
    labelled ``tab:<label>``, ``label`` defaulting to the stem); return the three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(table.notes)
    md, csv, tex = (out / f"{stem}{ext}" for ext in (".md", ".csv", ".tex"))
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(table.display, caption, notes), encoding="utf-8")
    with atomic_path(csv) as tmp:
        table.numbers.to_csv(tmp, index=False)
    with atomic_path(tex) as tmp:
        tmp.write_text(_latex(table.display, caption, notes, label or stem), encoding="utf-8")
    return [md, csv, tex]
