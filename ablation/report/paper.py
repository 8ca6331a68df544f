"""The paper's published numbers beside a run's: ``ablate report --compare paper``.

``paper_tables.csv`` (package data, its source in its header) holds one row per number of the
paper's Tables 1-5. :func:`compare` takes a built report table and returns it with, under each
row that has a published counterpart, the paper's row and the row ours - paper; every writer
(Markdown, CSV, LaTeX, index.html) then writes that one Table as it writes any other.
"""

from __future__ import annotations

import functools
import io
import math
from importlib import resources
from typing import Iterable

import pandas as pd

from . import RunData, display_name
from .numbers import PARTS, RUNNING, STEPS, STEPS_TITLE, Table, fmt

COMPARE = ("paper",)  # what --compare accepts
# Our table kind -> the paper's tables whose rows it reproduces (docs/method.md A.9: Best, Last).
PAPER_TABLES = {"best-last": (1, 2, 3), "awp-compare": (4,), "ablation": (5,)}
PAPER_STEPS = 20  # the paper's test attack: "20-step PGD (PGD-20)" (Section 4.1)
PAPER_RUNS = 5
# Tables 1-3: "We omit the standard deviations of 5 runs as they are very small (<0.6%)"; taken
# as the std of one run for Tables 4 and 5 too, which state none and repeat rows of Table 1.
PAPER_STD = 0.6
CITATION = ('Nguyen et al., "On Intriguing Layer-Wise Properties of Robust Overfitting in '
            'Adversarial Training", TMLR 2024')
SOURCE = "Source"  # the display column that says whose numbers a row holds
OURS, PAPER, DIFFERENCE = "ours", "paper", "ours - paper"
OUTSIDE = " †"
OUTSIDE_NOTE = (f"{OUTSIDE.strip()} outside the paper's spread: |ours - paper| > "
                f"2 sqrt(s²/n + {PAPER_STD}²/{PAPER_RUNS}), where s is the sample std of our n "
                f"seeds (with one seed, s = {PAPER_STD}: the paper's bound for one run) and "
                f"{PAPER_STD} the paper's stated bound on the std of its {PAPER_RUNS} runs "
                f"(Tables 1-3).")


@functools.cache
def published() -> pd.DataFrame:
    """The paper's numbers: one row per (table, dataset, threat, model, method, layers, metric,
    part) with its ``value`` in percent."""
    text = resources.files(__package__).joinpath("paper_tables.csv").read_text(encoding="utf-8")
    return pd.read_csv(io.StringIO(text), comment="#", keep_default_na=False,
                       dtype={"layers": str, "method": str, "value": float})


def unpublished(run: RunData) -> str | None:
    """One line when the paper published numbers for none of the run's (dataset, threat model,
    network) settings, so that no table row can have a counterpart; None otherwise."""
    columns = ["dataset", "threat", "model"]
    ours = run.curves[columns].drop_duplicates()
    theirs = published()[columns].drop_duplicates()
    if len(ours.merge(theirs)):
        return None
    settings = ", ".join(" ".join(display_name(c, row[c]) for c in columns)
                         for _, row in ours.iterrows())
    covered = "; ".join(", ".join(display_name(c, v) for v in dict.fromkeys(theirs[c]))
                        for c in columns)
    return (f"--compare paper: the paper published no numbers for {settings} (its Tables 1-5 "
            f"cover {covered}); the tables are written without a comparison")


def _row_key(row: pd.Series) -> tuple[str, str, str, str, str]:
    """(dataset, threat, model, method, layers) of a numbers row, as paper_tables.csv names it."""
    def plain(value: object) -> str:
        return str(value).removesuffix(RUNNING)

    layers = plain(row["subset"]) if "subset" in row else ""
    return (row["dataset"], row["threat"], row["model"], plain(row["name"]), layers)


def compare(kind: str, table: Table) -> Table:
    """``table`` (a ``TABLES`` kind's) with the paper's row and the difference under each of its
    rows that the paper published; a kind the paper has no table for is returned as it is.

    The display gains a Source column (ours, paper (Table N), ours - paper); the numbers the
    same rows with ``source`` and ``paper_table`` columns, and on difference rows ``outside``,
    the metrics outside the paper's spread (marked † in the display; the rule is the table's
    note). PGD is compared only where our test PGD used the paper's 20 steps. ``n`` is the row's
    seed count, also for AutoAttack run on only some of them (a slightly narrower band then).
    """
    if kind not in PAPER_TABLES or table.empty:
        return table
    paper = published()
    paper = paper[paper.table.isin(PAPER_TABLES[kind])]
    by_row = dict(list(paper.groupby(["dataset", "threat", "model", "method", "layers"])))
    numbers, display = table.numbers, table.display
    metrics = [c for c in numbers.columns if c.partition("_")[0] in ("nat", "pgd", "aa")
               and c.rpartition("_")[2] in PARTS]
    titles = [c for c in display.columns if c.rpartition(" ")[2] in ("Best", "Last", "Diff")]
    names = [c for c in ("Dataset", "Network", "Threat", "Method", "Layer") if c in display]
    at = list(display.columns).index(names[-1]) + 1
    columns = [*display.columns[:at], SOURCE, *display.columns[at:]]
    shown, raw, missing, other_steps, found = [], [], [], set(), []
    for (_, ours), (_, looks) in zip(numbers.iterrows(), display.iterrows()):
        shown.append({**looks, SOURCE: OURS})
        raw.append({**ours, "source": OURS})
        group = by_row.get(_row_key(ours))
        if group is None:
            missing.append(" ".join(str(looks[c]).removesuffix(RUNNING) for c in names))
            continue
        published_ = dict(zip(group.metric + "_" + group.part, group.value))
        steps = ours.get(STEPS, PAPER_STEPS)
        if not pd.isna(steps) and int(steps) != PAPER_STEPS:
            other_steps.add(int(steps))
            published_ = {c: v for c, v in published_.items() if not c.startswith("pgd_")}
        values = {c: published_.get(c, math.nan) for c in metrics}
        difference = {c: ours[c] - values[c] for c in metrics}
        outside = [c for c in metrics if abs(difference[c]) > 2 * _spread(ours, c)]
        number = int(group.table.iloc[0])
        found.append(number)
        ids = {c: looks[c] for c in names}
        raw_ids = {c: ours[c] for c in numbers.columns
                   if c not in metrics and not c.endswith("_std") and c not in ("seeds",
                                                                                "complete")}
        paper_steps = {STEPS: PAPER_STEPS} if STEPS in numbers else {}
        raw.append({**raw_ids, **paper_steps, "seeds": PAPER_RUNS, "source": PAPER,
                    "paper_table": number, **values})
        raw.append({**raw_ids, "source": DIFFERENCE, "paper_table": number,
                    "outside": " ".join(outside), **difference})
        paper_row = {**ids, SOURCE: f"{PAPER} (Table {number})",
                     **{t: fmt(values[c]) for c, t in zip(metrics, titles)}}
        for column, value in ((STEPS_TITLE, PAPER_STEPS), ("Seeds", PAPER_RUNS)):
            if column in display:
                paper_row[column] = str(value)
        shown.append(paper_row)
        shown.append({**ids, SOURCE: DIFFERENCE,
                      **{t: fmt(difference[c]) + (OUTSIDE if c in outside else "")
                         for c, t in zip(metrics, titles)}})
    notes = list(table.notes)
    if not found:
        return Table(display, numbers, (*notes, f"No row has a published counterpart in the "
                                                f"paper's {_tables(PAPER_TABLES[kind])}."))
    notes.append(f"Paper rows: the published means of {PAPER_RUNS} runs, "
                 f"{_tables(dict.fromkeys(found))} of {CITATION}.")
    notes.append(OUTSIDE_NOTE)
    if other_steps:
        notes.append(f"PGD is not compared where our test PGD used "
                     f"{', '.join(map(str, sorted(other_steps)))} steps (the paper's: "
                     f"{PAPER_STEPS}).")
    if missing:
        notes.append(f"No published counterpart: {'; '.join(missing)}.")
    raw_frame = pd.DataFrame(raw).astype({"seeds": "Int64", "paper_table": "Int64"})
    rest = [c for c in numbers.columns if c in metrics or c.endswith("_std")]
    first = [c for c in raw_frame.columns if c not in rest and c != "outside"]
    return Table(pd.DataFrame(shown, columns=columns).fillna(""),
                 raw_frame[[*first, *rest, "outside"]], tuple(notes))


def _spread(ours: pd.Series, column: str) -> float:
    """The std of ours - paper for one cell: our mean's (s / sqrt(n), or the paper's one-run
    bound with one seed) and the paper's mean's (PAPER_STD / sqrt(PAPER_RUNS)) combined."""
    n, std = int(ours["seeds"]), ours.get(f"{column}_std", math.nan)
    ours_var = std ** 2 / n if n > 1 and not pd.isna(std) else PAPER_STD ** 2
    return math.sqrt(ours_var + PAPER_STD ** 2 / PAPER_RUNS)


def _tables(numbers: Iterable[int]) -> str:
    """"Table 4" or "Tables 1, 2, 3"."""
    numbers = list(numbers)
    return ("Table " if len(numbers) == 1 else "Tables ") + ", ".join(map(str, numbers))
