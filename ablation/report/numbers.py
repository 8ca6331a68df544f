"""Per-trial numbers and the table type every report table shares.

Every number is computed from ``run.curves`` (per-epoch rows), so a table works on a partial run:
a trial that is still running shows its Best so far and its latest epoch as Last, and its row is
marked with `` *``. Only AutoAttack comes from ``run.summary``, because AutoAttack is evaluated
after a trial finishes (and maybe only for some trials); where it is missing a cell shows "–".
Best / Last / Diff are :func:`ablation.curves.best_last`'s, per trial (method A.9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import pandas as pd

from ..curves import best_last
from . import SETTING, RunData, display_name, label as setting_label

DASH = "–"  # en dash: a missing value (never 0)
RUNNING = " *"
RUNNING_NOTE = "* still running; Last is the latest epoch so far."
SEEDS_NOTE = ("With several seeds, Best, Last and Diff are the mean ± sample std of each seed's "
              "own Best, Last and Diff; a figure drawn from the seed-mean curve (the heatmap) "
              "takes its Best and Last of that curve instead, so the two can differ.")
AA_NOT_RUN = f"{DASH} AutoAttack was not run."
# Metric prefixes in the numbers frames and their display group; "PGD" becomes "PGD-<steps>"
# with the test_steps the trials used (pgd_title), never a fixed PGD-20.
METRICS = {"nat": "Natural", "pgd": "PGD", "aa": "AA"}
PARTS = ("best", "last", "diff")
ID_COLUMNS = {"dataset": "Dataset", "model": "Network", "threat": "Threat"}
STEPS = "test_steps"  # the trial field: PGD steps of the per-epoch test evaluation
STEPS_TITLE = "PGD steps"  # its display column, shown only when rows differ in it


@dataclass(frozen=True)
class Table:
    """A report table: ``display`` has flat string columns ("PGD-20 Best", ...) with percentages
    to 2 decimals, "mean ± std" (sample std over seeds) where a row has several seeds and "–"
    for a missing value; ``numbers`` is the same table with raw numbers (percent, full precision,
    NaN where missing, ``<metric>_std`` columns when any row has several seeds); ``notes`` are
    its footnotes."""

    display: pd.DataFrame
    numbers: pd.DataFrame
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return self.display.empty


def per_trial(run: RunData) -> pd.DataFrame:
    """One row per trial: setting, label, seed, ``complete`` and nat/pgd/aa best/last/diff in %.

    Best/Last come from the curves (so unfinished trials count, with their latest epoch as Last);
    AutoAttack comes from the summary where its columns exist, NaN otherwise.
    """
    curves = run.curves.sort_values(["key", "epoch"], kind="stable").reset_index(drop=True)
    if curves.empty:
        return pd.DataFrame()
    ident = [c for c in (*SETTING, "intervention", "layers", "seed", STEPS) if c in curves]
    rows = []
    for key, curve in curves.groupby("key", sort=False):
        last = curve.iloc[-1]
        row = {"key": key, **{c: last[c] for c in ident}}
        row["label"] = (last["label"] if "label" in curve else
                        setting_label(last.method, last.intervention, last.layers))
        row["complete"] = bool(last["complete"]) if "complete" in curve else True
        row["epochs_done"] = len(curve)
        numbers = best_last(curve)
        for prefix, metric in (("nat", "test_acc"), ("pgd", "test_robust_acc")):
            best = 100 * numbers.get(f"best_{metric}", math.nan)
            final = 100 * numbers.get(f"last_{metric}", math.nan)
            row.update({f"{prefix}_best": best, f"{prefix}_last": final,
                        f"{prefix}_diff": best - final})
        rows.append(row)
    out = pd.DataFrame(rows).set_index("key")
    # AutoAttack: only for trials the summary has it for (the rest stay NaN -> "–").
    summary = run.summary
    for part in PARTS:
        column = f"{part}_autoattack_acc"
        values = (summary.set_index("key")[column] if column in summary and "key" in summary
                  else pd.Series(dtype=float))
        out[f"aa_{part}"] = 100 * pd.to_numeric(values.reindex(out.index), errors="coerce")
    return out.reset_index()


# ----------------------------------------------------------------------------------------------
# Aggregation over seeds and display formatting


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def cell(mean: float, std: float, n: int) -> str:
    """``52.31``, ``52.31 ± 0.40`` (several seeds), or "–" (missing)."""
    if isinstance(mean, float) and math.isnan(mean):
        return DASH
    if n > 1 and not (isinstance(std, float) and math.isnan(std)):
        return f"{fmt(mean)} ± {fmt(std)}"
    return fmt(mean)


def pgd_title(steps: Iterable[object]) -> str:
    """"PGD-20" when every trial's ``test_steps`` is 20; "PGD" when they differ or are unknown
    (a table then shows them in a "PGD steps" column)."""
    values = {int(v) for v in steps if not pd.isna(v)}
    return f"PGD-{values.pop()}" if len(values) == 1 else "PGD"


def aggregate(trials: pd.DataFrame, by: list[str], metrics: Iterable[str]) -> pd.DataFrame:
    """Mean and sample std over seeds of each ``<metric>_<part>``; ``seeds`` counts the trials.

    A metric missing for some seeds (AutoAttack run for only some) averages the seeds that have
    it; missing for all gives NaN. ``complete`` is True only when every seed's trial finished.
    Trials that differ in ``test_steps`` are never averaged together (it joins ``by``).
    """
    if STEPS in trials and STEPS not in by:
        by = [*by, STEPS]
    columns = [f"{m}_{p}" for m in metrics for p in PARTS]
    grouped = trials.groupby(by, sort=False, dropna=False)
    out = grouped[columns].mean()
    std = grouped[columns].std(ddof=1)
    counts = grouped[columns].count()
    for c in columns:
        out[f"{c}_std"] = std[c]
        out[f"{c}_n"] = counts[c]
    out["seeds"] = grouped.size()
    out["complete"] = grouped.complete.all()
    return out.reset_index()


def display_table(numbers: pd.DataFrame, ids: dict[str, str], metrics: Iterable[str],
             notes: list[str]) -> Table:
    """Turn an aggregated numbers frame into a Table (display strings, raw numbers, notes)."""
    metrics = list(metrics)
    several = bool((numbers["seeds"] > 1).any()) if len(numbers) else False
    shown = pretty_setting(numbers) if len(numbers) else numbers
    display = pd.DataFrame({title: shown[col].astype(str) for col, title in ids.items()})
    steps = numbers[STEPS] if STEPS in numbers else pd.Series(dtype=float)
    pgd = pgd_title(steps)
    if "pgd" in metrics and len(set(steps.dropna())) > 1:
        display[STEPS_TITLE] = [DASH if pd.isna(v) else str(int(v)) for v in steps]
        notes = [*notes, f"The rows' test PGD used different numbers of steps "
                         f"({', '.join(map(str, sorted(set(steps.dropna().astype(int)))))}): "
                         f"see the {STEPS_TITLE} column."]
    if several:
        display["Seeds"] = numbers["seeds"].astype(str)
        notes = [*notes, SEEDS_NOTE]
    for m in metrics:
        for p in PARTS:
            c = f"{m}_{p}"
            display[f"{pgd if m == 'pgd' else METRICS[m]} {p.title()}"] = [
                cell(mean, std, n) for mean, std, n in
                zip(numbers[c], numbers[f"{c}_std"], numbers[f"{c}_n"])]
    if len(numbers) and not numbers["complete"].all():
        notes = [*notes, RUNNING_NOTE]
    keep = [*ids, *([STEPS] if STEPS in numbers else []), "seeds", "complete"]
    for m in metrics:
        for p in PARTS:
            keep.append(f"{m}_{p}")
            if several:
                keep.append(f"{m}_{p}_std")
    return Table(display.reset_index(drop=True), numbers[keep].reset_index(drop=True),
                 tuple(notes))


def empty_table(why: str) -> Table:
    """A table without rows whose note says why (the writers skip it and pass the note on)."""
    columns = [*SETTING, "name", "seeds", "complete"]
    return display_table(pd.DataFrame(columns=columns), {}, [], [why])


def mark_running(numbers: pd.DataFrame, column: str) -> pd.DataFrame:
    numbers = numbers.copy()
    numbers[column] = [f"{v}{RUNNING}" if not done else v
                       for v, done in zip(numbers[column], numbers["complete"])]
    return numbers


def pretty_setting(numbers: pd.DataFrame) -> pd.DataFrame:
    """Paper names for network, threat and dataset (unknown names are shown as they are)."""
    numbers = numbers.copy()
    for column in ("model", "threat", "dataset"):
        if column in numbers:
            numbers[column] = [display_name(column, v) for v in numbers[column]]
    return numbers


def aa_note(trials: pd.DataFrame) -> list[str]:
    if trials["aa_best"].isna().all():
        return [AA_NOT_RUN]
    if trials["aa_best"].isna().any():
        return [f"{DASH} AutoAttack was not run for this setting."]
    return []


