"""The paper's tables from a run folder: Tables 1-3 (Best / Last / Diff), Table 4 (AWP against
RAT_WP), Table 5 (the ablation over layer subsets), and the factorial layer effects; the registry
``TABLES`` maps each name to its builder and caption.

Definitions (method A.9): Best = the highest test PGD-20 robust accuracy over epochs (the first
such epoch on ties); Last = the final (here: latest) epoch; Diff = Best - Last. Clean ("Natural")
accuracy is taken at the Best epoch of robust accuracy, not at its own maximum. Headers and
captions name the PGD steps the trials' test evaluation used (``test_steps``; 20 in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from .. import layers
from ..errors import ConfigError
from ..strategies import layer_wise, method_label
from . import SETTING, RunData, label as setting_label
from . import paper
from .effects import effects_table
from .numbers import (ID_COLUMNS, STEPS, Table, aa_note, aggregate, display_table,
                      empty_table, mark_running, per_trial, pgd_title)
from .writers import write_table

RAT_LAYERS = layers.to_column(layers.RAT)  # RAT_LR and RAT_WP's groups, as stored


def _rat_names(method: str) -> dict[str, str]:
    """The paper's names for the RAT realizations: AT_fix_lr_[3, 4] -> RAT_LR, and for TRADES
    (Table 4) TRADES_awp_[3, 4] -> TRADES-RAT_WP."""
    base = method_label(method)
    prefix = "" if method == "at" else f"{base}-"
    return {setting_label(method, "fix_lr", RAT_LAYERS): f"{prefix}RAT_LR",
            setting_label(method, "awp", RAT_LAYERS): f"{prefix}RAT_WP"}


def setting_names(run: RunData) -> dict[str, str]:
    """Every name ``ablate report --setting`` accepts -> the trial label the figures use: the
    labels themselves (``AT_fix_lr_[3, 4]``, ``AWP``) and the names the tables print for them
    (``RAT_LR``, ``TRADES-RAT_WP``)."""
    names = {lab: lab for lab in dict.fromkeys(run.curves.label)}
    for method in dict.fromkeys(run.curves.method):
        for lab, name in _rat_names(method).items():
            if lab in names:
                names.setdefault(name, lab)
    return names


def resolve_settings(run: RunData, given: Iterable[str]) -> tuple[str, ...]:
    """The trial labels of settings named as :func:`setting_names` accepts; a name that is not
    in this run is one line listing those that are."""
    names = setting_names(run)  # legend labels and the tables' names (RAT_LR) -> labels
    for name in given:
        if name not in names:
            raise ConfigError(f"setting {name!r} is not in this run; choose from "
                              f"{', '.join(names)}")
    return tuple(names[name] for name in given)


def _pgd(run: RunData) -> str:
    """"PGD-<test_steps>" of the run's trials (plain "PGD" when they differ)."""
    return pgd_title(run.curves[STEPS] if STEPS in run.curves else ())


def _setting_rows(trials: pd.DataFrame, wanted: list[str], extra: Iterable[str] = ()
                  ) -> pd.DataFrame:
    """Trials whose (renamed) label is in ``wanted`` or ``extra``; adds ``name`` and ``order``."""
    renamed = [_rat_names(m).get(lab, lab) for m, lab in zip(trials.method, trials.label)]
    trials = trials.assign(name=renamed)
    order = {n: i for i, n in enumerate(dict.fromkeys([*wanted, *extra]))}
    # A label asked for may be given as the trial label (AT_fix_lr_[3, 4]) or renamed (RAT_LR).
    hit = [(n in order) or (lab in order) for n, lab in zip(trials.name, trials.label)]
    trials = trials[hit].copy()
    trials["order"] = [order.get(n, order.get(lab)) for n, lab in zip(trials.name, trials.label)]
    return trials


def _ordered(numbers: pd.DataFrame) -> pd.DataFrame:
    return numbers.sort_values([*SETTING, "order"], kind="stable").reset_index(drop=True)


def best_last_table(run: RunData, labels: list[str] | None = None) -> Table:
    """Tables 1-3: PGD-20 and AutoAttack Best/Last/Diff (%) per setting for AT, RAT_LR, RAT_WP.

    ``labels`` adds more settings by their label (e.g. ``"AT_awp_[4]"``, ``"AWP"``); rows come
    per (dataset, network, threat, method) in that order, AT-family first.
    """
    trials = per_trial(run)
    if trials.empty:
        return empty_table("the run has no curves")
    wanted = []
    for m in dict.fromkeys(trials.method):
        wanted += [method_label(m), *_rat_names(m).values()]
    trials = _setting_rows(trials, wanted, labels or ())
    numbers = aggregate(trials, [*SETTING, "name", "order"], ["pgd", "aa"])
    numbers = mark_running(_ordered(numbers), "name")
    ids = {**ID_COLUMNS, "name": "Method"}
    return display_table(numbers, ids, ["pgd", "aa"], aa_note(trials))


def awp_compare_table(run: RunData) -> Table:
    """Table 4: Natural, PGD-20 and AutoAttack Best/Last/Diff for AT, AWP and RAT_WP.

    Only settings with an AWP (``awp_full``) trial; empty when there is none.
    """
    trials = per_trial(run)
    if trials.empty or not (trials.intervention == "awp_full").any():
        return empty_table("the run has no AWP (intervention awp_full) trial")
    with_awp = trials[trials.intervention == "awp_full"][SETTING].drop_duplicates()
    trials = trials.merge(with_awp, on=SETTING)
    wanted = []
    for m in dict.fromkeys(trials.method):
        base = method_label(m)
        wanted += [base, setting_label(m, "awp_full", ""), _rat_names(m)[
            setting_label(m, "awp", RAT_LAYERS)]]
    trials = _setting_rows(trials, wanted)
    numbers = aggregate(trials, [*SETTING, "name", "order"], ["nat", "pgd", "aa"])
    numbers = mark_running(_ordered(numbers), "name")
    ids = {**ID_COLUMNS, "name": "Method"}
    return display_table(numbers, ids, ["nat", "pgd", "aa"], aa_note(trials))


def ablation_table(run: RunData, intervention: str = "awp") -> Table:
    """Table 5: one row per layer subset of ``intervention``, after the baseline row "[-]".

    Subsets come in the fixed order [1], [2], [3], [4], [1,2], ..., [1,2,3,4] (those present);
    columns are Natural, PGD-20 and AutoAttack Best/Last/Diff (%). Empty when not run.
    """
    if intervention not in layer_wise():
        raise ValueError(f"no ablation over layers for intervention {intervention!r}")  # a bug
    trials = per_trial(run)
    if trials.empty or not (trials.intervention == intervention).any():
        return empty_table(f"the run has no {intervention} trial")
    settings = trials[trials.intervention == intervention][SETTING].drop_duplicates()
    trials = trials.merge(settings, on=SETTING)
    rank = {s: i + 1 for i, s in enumerate(layers.ALL_SUBSETS)}
    base = trials.intervention == "none"
    mine = trials.intervention == intervention
    trials = trials[base | mine].copy()
    subsets = [layers.from_column(l) for l in trials.layers]
    trials["order"] = [0 if iv == "none" else rank.get(s, len(rank) + 1)
                       for iv, s in zip(trials.intervention, subsets)]
    trials["subset"] = ["[-]" if iv == "none" else layers.display(s)
                        for iv, s in zip(trials.intervention, subsets)]
    trials["name"] = [f"{method_label(m)}_{intervention}" for m in trials.method]
    numbers = aggregate(trials, [*SETTING, "name", "subset", "order"], ["nat", "pgd", "aa"])
    numbers = mark_running(_ordered(numbers), "subset")
    ids = {**ID_COLUMNS, "name": "Method", "subset": "Layer"}
    notes = aa_note(trials)
    if not (trials.intervention == "none").any():
        notes.append("No baseline (intervention none) trial: the [-] row is missing.")
    return display_table(numbers, ids, ["nat", "pgd", "aa"], notes)


# ----------------------------------------------------------------------------------------------
# The registry: each name's builder and caption, so the list of names and the dispatch are one


@dataclass(frozen=True)
class TableKind:
    """A table name's builder: (run, extra settings) -> [(file stem, table, caption start)]."""

    build: Callable[[RunData, list[str]], list[tuple[str, Table, str]]]
    what: str  # one line for the README and --help


def _effects_jobs(run: RunData, settings: list[str]) -> list[tuple[str, Table, str]]:
    return [(f"effects-{response}", effects_table(run, response),
             f"Factorial layer effects on {what} ({_pgd(run)} {part}), percentage points, "
             f"simultaneous 95% intervals and Holm-adjusted p-values")
            for response, part, what in (("diff", "Diff", "robust overfitting"),
                                         ("best", "Best", "best robustness"))]


TABLES: dict[str, TableKind] = {
    "best-last": TableKind(
        lambda run, settings: [("best-last", best_last_table(run, settings),
                                f"Test robustness (%): {_pgd(run)} and AutoAttack Best / Last / "
                                f"Diff")],
        "Tables 1-3: PGD and AutoAttack Best / Last / Diff for AT, RAT_LR and RAT_WP"),
    "awp-compare": TableKind(
        lambda run, settings: [("awp-compare", awp_compare_table(run),
                                f"RAT_WP compared with AWP: natural, {_pgd(run)} and AutoAttack "
                                f"accuracy (%)")],
        "Table 4: natural, PGD and AutoAttack Best / Last / Diff for AT, AWP and RAT_WP"),
    "ablation": TableKind(
        lambda run, settings: [
            (f"ablation-{iv}", ablation_table(run, iv),
             f"Ablation over the layers given {iv}: natural, {_pgd(run)} and AutoAttack "
             f"accuracy (%)")
            for iv in layer_wise() if iv in set(run.curves.intervention)],
        "Table 5: one row per layer subset, one table per intervention"),
    "effects": TableKind(_effects_jobs, "the main effect of each layer on Diff and Best, with "
                                        "pairwise interactions (a 2^4 factorial design)"),
}


@dataclass(frozen=True)
class WrittenTable:
    """One table as written: its file stem, caption, the Table itself (which index.html shows)
    and its files (.md, .csv, .tex)."""

    stem: str
    caption: str
    table: Table
    paths: list[Path]


def write_tables(run: RunData, names: Iterable[str], out: Path, settings: Iterable[str] = (),
                 warn: Callable[[str], None] = lambda message: None,
                 compare: str | None = None) -> list[WrittenTable]:
    """Write each named table (names of ``TABLES``, checked by the caller) under ``out``; a table
    with no data is skipped, and ``warn`` is told why in one note line per reason (effects-diff
    and effects-best share theirs). ``settings`` are extra rows
    for ``best-last`` by label (``AT_awp_[4]``, ``AWP``, ...). LaTeX labels are
    ``tab:<run name>:<stem>``, so tables of two runs can share a paper. ``compare="paper"``
    puts the paper's numbers under the rows it published (:func:`.paper.compare`)."""
    written: list[WrittenTable] = []
    skipped: dict[str, list[str]] = {}  # why -> the tables skipped for it
    for name in dict.fromkeys(names):
        for stem, table, caption in TABLES[name].build(run, list(settings)):
            if table.empty:
                skipped.setdefault(" ".join(table.notes) or "no trials for it", []).append(stem)
                continue
            if compare == "paper":
                table = paper.compare(name, table)
            caption = f"{caption} (run {run.name})."
            paths = write_table(table, out, stem, caption, label=f"{run.name}:{stem}")
            written.append(WrittenTable(stem, caption, table, paths))
    for why, stems in skipped.items():  # notes, not errors: the other tables were written
        warn(f"note: no {' or '.join(stems)} table: {why}")
    return written
