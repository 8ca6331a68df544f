"""The table writers (ablation/report/writers.py): specials escaped; every generated LaTeX table
compiles in a two-column paper without overfull boxes (pdflatex, where installed) and is well
formed (always): balanced, labels valid and unique across runs; constant columns folded into a
note."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import check_latex

from ablation.report import load_run
from ablation.report.numbers import AA_NOT_RUN, RUNNING_NOTE, Table
from ablation.report.tables import TABLES, write_tables
from ablation.report.writers import COLUMN_PT, compact, latex_label, write_table

PDFLATEX = shutil.which("pdflatex")
OVERFULL_TOLERANCE_PT = 1.0  # below a point is invisible in print


def check_structure(text: str) -> list[str]:
    """Problems of one .tex table: unbalanced braces or environments, bad labels, a note line
    a "\\\\" could swallow (its "*" or "[" read as an argument), unescaped _ or %."""
    problems = []
    depth = 0
    for ch in re.sub(r"\\[{}]", "", text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            problems.append("a } closes nothing")
    if depth:
        problems.append(f"{depth} unclosed {{")
    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        elif not stack or stack.pop() != env:
            problems.append(f"\\end{{{env}}} out of order")
    if stack:
        problems.append(f"unclosed {stack}")
    for label in re.findall(r"\\label\{([^}]*)\}", text):
        if not re.fullmatch(r"tab:[a-z0-9:-]+", label):
            problems.append(f"label {label!r} is not [a-z0-9:-]")
    if re.search(r"\\\\\s*[*\[]", text):
        problems.append("a line break followed by * or [ (swallowed by \\\\)")
    body = re.sub(r"\\(begin|end|label)\{[^}]*\}", "", text)
    body = re.sub(r"(?<!\\)\$[^$]*\$", "", body)  # math ($_\infty$) may subscript
    if re.search(r"(?<!\\)_", body) or re.search(r"(?<!\\)%", body):
        problems.append("unescaped _ or %")
    return problems


def _widest_tables(out: Path) -> list[Path]:
    """Tables wider than any tiny run makes: 3 seeds and AutoAttack in every column, 16 layer
    rows, every setting column varying, and a running row (its note starts with "*")."""
    cell = "52.31 ± 10.40"
    metrics = {f"{g} {p}": [cell] * 16 for g in ("Natural", "PGD-20", "AA")
               for p in ("Best", "Last", "Diff")}
    layers = ["[-]", *(f"[{k}]" for k in range(1, 5)), *(["[1, 2, 3, 4] *"] * 11)]
    ablation = pd.DataFrame({"Layer": layers, "Seeds": ["3"] * 16, **metrics})
    best_last = pd.DataFrame({
        "Dataset": ["CIFAR-100", "SVHN", "CIFAR-10"], "Network": ["PreAct ResNet-18",
                                                                  "WRN-34-10", "VGG-16"],
        "Threat": ["L∞", "L2", "L∞"], "Method": ["TRADES-RAT_WP *", "AT", "RAT_LR"],
        "Seeds": ["3", "2", "3"], **{k: v[:3] for k, v in metrics.items() if "Natural" not in k}})
    paths = []
    for stem, frame in (("wide-ablation", ablation), ("wide-best-last", best_last)):
        paths += write_table(Table(frame, frame, (RUNNING_NOTE, "[a note in brackets]")), out,
                             stem, "A wide table", label=f"wide:{stem}")
    return [p for p in paths if p.suffix == ".tex"]


@pytest.fixture(scope="module")
def generated(study_run: Path, seeds_run: Path, tmp_path_factory) -> list[Path]:
    """Every .tex the tiny study and the seeds run give, twice over (two runs' tables must not
    share labels in one paper), plus the widest tables a real run could give."""
    out = tmp_path_factory.mktemp("latex")
    paths = []
    for root in (study_run, seeds_run):
        for written in write_tables(load_run(root), TABLES, out / root.name):
            paths += [p for p in written.paths if p.suffix == ".tex"]
    return paths + _widest_tables(out / "wide")


def test_every_table_is_well_formed_and_labels_are_unique(generated: list[Path]) -> None:
    labels = []
    for tex in generated:
        text = tex.read_text()
        assert not check_structure(text), (tex.name, check_structure(text))
        labels += re.findall(r"\\label\{([^}]*)\}", text)
    assert len(labels) == len(generated) and len(set(labels)) == len(labels), labels
    assert "tab:tiny-study:ablation-fix-lr" in labels and "tab:seeds:best-last" in labels


def test_structure_check_catches_what_broke_before() -> None:
    """The checker itself: the old failures (a swallowed "*", an escaped label) are caught."""
    assert check_structure(r"\begin{table}x\\ * still running\end{table}")
    assert check_structure(r"\begin{table}\label{tab:ablation-fix\_lr}\end{table}")
    assert check_structure(r"\begin{table}{\end{table}")
    assert not check_structure(r"\begin{table}\label{tab:a:b-1}\par * ok\par\end{table}")


@pytest.mark.skipif(PDFLATEX is None, reason="pdflatex not installed")
def test_every_table_compiles_in_a_two_column_paper(generated: list[Path],
                                                   tmp_path: Path) -> None:
    inputs = "\n".join(rf"\input{{{p.as_posix()}}}\clearpage" for p in generated)
    refs = " ".join(rf"\ref{{{label}}}" for p in generated
                    for label in re.findall(r"\\label\{([^}]*)\}", p.read_text()))
    (tmp_path / "paper.tex").write_text(
        "\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        f"See {refs}.\n{inputs}\n\\end{{document}}\n")
    for _ in range(2):  # the second pass reads the labels back from paper.aux
        done = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error",
                               "paper.tex"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        log = (tmp_path / "paper.log").read_text(errors="replace")
        assert done.returncode == 0, log[-3000:]
    assert not re.search(r"^! ", log, re.M), log[-3000:]
    assert "multiply defined" not in log and "undefined references" not in log
    overfull = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert all(w <= OVERFULL_TOLERANCE_PT for w in overfull), overfull


def test_latex_drops_constant_and_empty_autoattack_columns(study_run: Path,
                                                          tmp_path: Path) -> None:
    (written,) = write_tables(load_run(study_run), ["best-last"], tmp_path)
    tex = (tmp_path / "best-last.tex").read_text()
    tabular = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    assert "AA" not in tabular and "Network" not in tabular
    assert r"All rows: Dataset synthetic; Network preact\_small; Threat L$_\infty$." in tex
    assert "AutoAttack was not run (no AA columns)." in tex
    assert tex.startswith(r"\begin{table}[t]")  # a few columns: one paper column
    # Markdown and HTML keep every column; the Table is unchanged.
    assert "AA Best" in written.table.display and "| Network |" in (
        tmp_path / "best-last.md").read_text()


def test_compact_keeps_single_rows_and_varying_columns() -> None:
    frame = pd.DataFrame({"Method": ["AT", "RAT_LR"], "Seeds": ["3", "3"],
                          "AA Best": ["40.00", "–"], "PGD-20 Best": ["1.00", "1.00"]})
    kept, notes = compact(frame, [AA_NOT_RUN])
    assert list(kept.columns) == ["Method", "AA Best", "PGD-20 Best"]  # numbers never dropped
    assert notes == ["All rows: Seeds 3.", AA_NOT_RUN]
    one, _ = compact(frame.iloc[:1], [])
    assert list(one.columns) == list(frame.columns)


def test_latex_label_is_a_name() -> None:
    assert latex_label("My Run_2:ablation-fix_lr") == "tab:my-run-2:ablation-fix-lr"
    assert COLUMN_PT < 240


def test_write_table_escapes_specials(tmp_path: Path) -> None:
    frame = pd.DataFrame({"Method": ["a_b & c # 5%"], "PGD-20 Best": ["1.00 ± 0.10"]})
    _, _, tex = write_table(Table(frame, frame), tmp_path, "x", "50% of a_b")
    text = tex.read_text()
    check_latex(text)
    assert r"a\_b \& c \# 5\%" in text and r"$\pm$" in text
