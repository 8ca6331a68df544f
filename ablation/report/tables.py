"""The paper's tables (1-5) and a factorial analysis of layer effects, from a run folder.

Every number is computed from ``run.curves`` (per-epoch rows), so a table works on a partial run:
a trial that is still running shows its Best so far and its latest epoch as Last, and its row is
marked with `` *``. Only AutoAttack comes from ``run.summary``, because AutoAttack is evaluated
after a trial finishes (and maybe only for some trials); where it is missing a cell shows "–".

Definitions (METHOD.md A.9): Best = the highest test PGD-20 robust accuracy over epochs (the first
such epoch on ties); Last = the final (here: latest) epoch; Diff = Best - Last. Clean ("Natural")
accuracy is taken at the Best epoch of robust accuracy, not at its own maximum.

A table function returns a *display* frame: flat string columns ("PGD-20 Best", ...) with
percentages to 2 decimals, "mean ± std" (sample std, ddof=1, over seeds) when a row has several
seeds and "–" for a missing value. Its ``attrs`` carry what the writers need besides:
``attrs["numbers"]`` is the same table with raw numbers (percent, full precision; NaN where
missing; ``<metric>_std`` columns next to the means when any row has several seeds) and
``attrs["notes"]`` is a list of footnote lines.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from ..errors import AblateError
from ..io import atomic_path
from . import METHOD_NAMES, SETTING, Run, display_name, label as setting_label

TABLES = ("best-last", "awp-compare", "ablation", "effects")

# Interventions that are applied to a subset of layers (and so have an ablation over subsets).
SUBSET_INTERVENTIONS = ("fix_param", "fix_lr", "awp")
# The 15 non-empty subsets of the 4 layer groups, by size, then lexicographically (the order of
# the paper's Table 5 and of the sweep's "all").
SUBSETS: list[tuple[int, ...]] = [s for r in range(1, 5)
                                  for s in itertools.combinations(range(1, 5), r)]
DASH = "–"  # en dash: a missing value (never 0)
RUNNING = " *"
RUNNING_NOTE = "* still running; Last is the latest epoch so far."
# Metric prefixes in the numbers frames, their display group, and where they come from.
METRICS = {"nat": "Natural", "pgd": "PGD-20", "aa": "AA"}
PARTS = ("best", "last", "diff")
ID_COLUMNS = {"dataset": "Dataset", "model": "Network", "threat": "Threat"}


# ----------------------------------------------------------------------------------------------
# Per-trial numbers


def _layers_key(layers: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(layers).split(",") if x.strip())


def per_trial(run: Run) -> pd.DataFrame:
    """One row per trial: setting, label, seed, ``complete`` and nat/pgd/aa best/last/diff in %.

    Best/Last come from the curves (so unfinished trials count, with their latest epoch as Last);
    AutoAttack comes from the summary where its columns exist, NaN otherwise.
    """
    curves = run.curves.sort_values(["key", "epoch"], kind="stable").reset_index(drop=True)
    if curves.empty:
        return pd.DataFrame()
    groups = curves.groupby("key", sort=False)
    best = curves.loc[groups.test_robust_acc.idxmax()].set_index("key")  # idxmax: first max
    last = groups.tail(1).set_index("key")
    ident = [c for c in (*SETTING, "intervention", "layers", "seed") if c in curves]
    out = last[ident].copy()
    out["label"] = (last["label"] if "label" in last else
                    [setting_label(m, i, l) for m, i, l in
                     zip(last.method, last.intervention, last.layers)])
    out["complete"] = last["complete"] if "complete" in last else True
    out["epochs_done"] = groups.size()
    for prefix, column in (("nat", "test_acc"), ("pgd", "test_robust_acc")):
        if column in curves:
            out[f"{prefix}_best"] = 100 * best[column]
            out[f"{prefix}_last"] = 100 * last[column]
            out[f"{prefix}_diff"] = out[f"{prefix}_best"] - out[f"{prefix}_last"]
        else:
            for part in PARTS:
                out[f"{prefix}_{part}"] = np.nan
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


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def _cell(mean: float, std: float, n: int) -> str:
    """``52.31``, ``52.31 ± 0.40`` (several seeds), or "–" (missing)."""
    if isinstance(mean, float) and math.isnan(mean):
        return DASH
    if n > 1 and not (isinstance(std, float) and math.isnan(std)):
        return f"{_fmt(mean)} ± {_fmt(std)}"
    return _fmt(mean)


def _aggregate(trials: pd.DataFrame, by: list[str], metrics: Iterable[str]) -> pd.DataFrame:
    """Mean and sample std over seeds of each ``<metric>_<part>``; ``seeds`` counts the trials.

    A metric missing for some seeds (AutoAttack run for only some) averages the seeds that have
    it; missing for all gives NaN. ``complete`` is True only when every seed's trial finished.
    """
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


def _display(numbers: pd.DataFrame, ids: dict[str, str], metrics: Iterable[str],
             notes: list[str]) -> pd.DataFrame:
    """Turn an aggregated numbers frame into the display frame (strings) with ``attrs`` set."""
    metrics = list(metrics)
    several = bool((numbers["seeds"] > 1).any()) if len(numbers) else False
    shown = _pretty_setting(numbers) if len(numbers) else numbers
    display = pd.DataFrame({title: shown[col].astype(str) for col, title in ids.items()})
    if several:
        display["Seeds"] = numbers["seeds"].astype(str)
    for m in metrics:
        for p in PARTS:
            c = f"{m}_{p}"
            display[f"{METRICS[m]} {p.title()}"] = [
                _cell(mean, std, n) for mean, std, n in
                zip(numbers[c], numbers[f"{c}_std"], numbers[f"{c}_n"])]
    if len(numbers) and not numbers["complete"].all():
        notes = [*notes, RUNNING_NOTE]
    keep = [*ids, "seeds", "complete"]
    for m in metrics:
        for p in PARTS:
            keep.append(f"{m}_{p}")
            if several:
                keep.append(f"{m}_{p}_std")
    display.attrs["numbers"] = numbers[keep].reset_index(drop=True)
    display.attrs["notes"] = notes
    return display.reset_index(drop=True)


def _empty(why: str) -> pd.DataFrame:
    """A table without rows whose note says why (the writers skip it and pass the note on)."""
    return _display(pd.DataFrame(columns=[*SETTING, "name", "seeds", "complete"]), {}, [], [why])


def _mark_running(numbers: pd.DataFrame, column: str) -> pd.DataFrame:
    numbers = numbers.copy()
    numbers[column] = [f"{v}{RUNNING}" if not done else v
                       for v, done in zip(numbers[column], numbers["complete"])]
    return numbers


def _pretty_setting(numbers: pd.DataFrame) -> pd.DataFrame:
    """Paper names for network, threat and dataset (unknown names are shown as they are)."""
    numbers = numbers.copy()
    for column in ("model", "threat", "dataset"):
        if column in numbers:
            numbers[column] = [display_name(column, v) for v in numbers[column]]
    return numbers


def _aa_note(trials: pd.DataFrame) -> list[str]:
    if trials["aa_best"].isna().all():
        return [f"{DASH} AutoAttack was not run."]
    if trials["aa_best"].isna().any():
        return [f"{DASH} AutoAttack was not run for this setting."]
    return []


# ----------------------------------------------------------------------------------------------
# Tables 1-5


def _rat_names(method: str) -> dict[str, str]:
    """The paper's names for the RAT realizations: AT_fix_lr_[3, 4] -> RAT_LR, and for TRADES
    (Table 4) TRADES_awp_[3, 4] -> TRADES-RAT_WP."""
    base = METHOD_NAMES.get(method, method.upper())
    prefix = "" if method == "at" else f"{base}-"
    return {setting_label(method, "fix_lr", "3,4"): f"{prefix}RAT_LR",
            setting_label(method, "awp", "3,4"): f"{prefix}RAT_WP"}


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


def best_last(run: Run, labels: list[str] | None = None) -> pd.DataFrame:
    """Tables 1-3: PGD-20 and AutoAttack Best/Last/Diff (%) per setting for AT, RAT_LR, RAT_WP.

    ``labels`` adds more settings by their label (e.g. ``"AT_awp_[4]"``, ``"AWP"``); rows come
    per (dataset, network, threat, method) in that order, AT-family first.
    """
    trials = per_trial(run)
    if trials.empty:
        return _empty("the run has no curves")
    wanted = []
    for m in dict.fromkeys(trials.method):
        wanted += [METHOD_NAMES.get(m, m.upper()), *_rat_names(m).values()]
    trials = _setting_rows(trials, wanted, labels or ())
    numbers = _aggregate(trials, [*SETTING, "name", "order"], ["pgd", "aa"])
    numbers = _mark_running(_ordered(numbers), "name")
    ids = {**ID_COLUMNS, "name": "Method"}
    return _display(numbers, ids, ["pgd", "aa"], _aa_note(trials))


def awp_compare(run: Run) -> pd.DataFrame:
    """Table 4: Natural, PGD-20 and AutoAttack Best/Last/Diff for AT, AWP and RAT_WP.

    Only settings with an AWP (``awp_full``) trial; empty when there is none.
    """
    trials = per_trial(run)
    if trials.empty or not (trials.intervention == "awp_full").any():
        return _empty("the run has no AWP (intervention awp_full) trial")
    with_awp = trials[trials.intervention == "awp_full"][SETTING].drop_duplicates()
    trials = trials.merge(with_awp, on=SETTING)
    wanted = []
    for m in dict.fromkeys(trials.method):
        base = METHOD_NAMES.get(m, m.upper())
        wanted += [base, setting_label(m, "awp_full", ""), _rat_names(m)[
            setting_label(m, "awp", "3,4")]]
    trials = _setting_rows(trials, wanted)
    numbers = _aggregate(trials, [*SETTING, "name", "order"], ["nat", "pgd", "aa"])
    numbers = _mark_running(_ordered(numbers), "name")
    ids = {**ID_COLUMNS, "name": "Method"}
    return _display(numbers, ids, ["nat", "pgd", "aa"], _aa_note(trials))


def ablation(run: Run, intervention: str = "awp") -> pd.DataFrame:
    """Table 5: one row per layer subset of ``intervention``, after the baseline row "[-]".

    Subsets come in the fixed order [1], [2], [3], [4], [1,2], ..., [1,2,3,4] (those present);
    columns are Natural, PGD-20 and AutoAttack Best/Last/Diff (%). Empty when not run.
    """
    if intervention not in SUBSET_INTERVENTIONS:
        raise AblateError(f"no ablation over layers for intervention {intervention!r}; "
                          f"choose from {', '.join(SUBSET_INTERVENTIONS)}")
    trials = per_trial(run)
    if trials.empty or not (trials.intervention == intervention).any():
        return _empty(f"the run has no {intervention} trial")
    settings = trials[trials.intervention == intervention][SETTING].drop_duplicates()
    trials = trials.merge(settings, on=SETTING)
    rank = {s: i + 1 for i, s in enumerate(SUBSETS)}
    base = trials.intervention == "none"
    mine = trials.intervention == intervention
    trials = trials[base | mine].copy()
    subsets = [_layers_key(l) for l in trials.layers]
    trials["order"] = [0 if iv == "none" else rank.get(s, len(SUBSETS) + 1)
                       for iv, s in zip(trials.intervention, subsets)]
    trials["subset"] = ["[-]" if iv == "none" else "[" + ",".join(map(str, s)) + "]"
                        for iv, s in zip(trials.intervention, subsets)]
    trials["name"] = [f"{METHOD_NAMES.get(m, m.upper())}_{intervention}" for m in trials.method]
    numbers = _aggregate(trials, [*SETTING, "name", "subset", "order"], ["nat", "pgd", "aa"])
    numbers = _mark_running(_ordered(numbers), "subset")
    ids = {**ID_COLUMNS, "name": "Method", "subset": "Layer"}
    notes = _aa_note(trials)
    if not (trials.intervention == "none").any():
        notes.append("No baseline (intervention none) trial: the [-] row is missing.")
    return _display(numbers, ids, ["nat", "pgd", "aa"], notes)


# ----------------------------------------------------------------------------------------------
# Factorial effects of the layers


# Model terms of the 2^4 design with main effects and two-way interactions.
MAIN_TERMS = [(k,) for k in range(1, 5)]
PAIR_TERMS = list(itertools.combinations(range(1, 5), 2))
TERMS = [*MAIN_TERMS, *PAIR_TERMS]


def _term_name(term: tuple[int, ...]) -> str:
    return " x ".join(f"layer {k}" for k in term)


def _design(subsets: Iterable[tuple[int, ...]]) -> np.ndarray:
    """Rows [1, z1..z4, z1z2, ..., z3z4] with z_k = +1/2 when layer k is in the subset, else
    -1/2 (effect coding: a coefficient is then a difference averaged over the other layers)."""
    rows = []
    for s in subsets:
        x = {k: 0.5 if k in s else -0.5 for k in range(1, 5)}
        rows.append([1.0, *(math.prod(x[k] for k in t) for t in TERMS)])
    return np.array(rows).reshape(-1, 1 + len(TERMS))


def fit_effects(subsets: list[tuple[int, ...]], y: np.ndarray, level: float = 0.95
                ) -> pd.DataFrame | None:
    """Least-squares fit of y = b0 + sum_k b_k z_k + sum_{j<k} b_jk z_j z_k, z_k = ±1/2.

    One observation per (subset, seed). Returns rows (term, estimate, ci_low, ci_high, df) with
    the mean first, then main effects, then interactions; the interval is
    estimate ± t_{df, (1+level)/2} * se from the residual variance, NaN when df = 0. ``None``
    when the design is not estimable (rank below the 11 model terms).
    """
    from scipy import stats

    x = _design(subsets)
    y = np.asarray(y, dtype=float)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(y) - x.shape[1]
    if df > 0:
        resid = y - x @ coef
        sigma2 = float(resid @ resid) / df
        se = np.sqrt(sigma2 * np.diag(np.linalg.inv(x.T @ x)))
        half = stats.t.ppf((1 + level) / 2, df) * se
        low, high = coef - half, coef + half
    else:
        low = high = np.full_like(coef, np.nan)
    return pd.DataFrame({"term": ["mean", *map(_term_name, TERMS)], "estimate": coef,
                         "ci_low": low, "ci_high": high, "df": df})


def effects(run: Run, response: str = "diff") -> pd.DataFrame:
    """Layer effects on robust overfitting (``response="diff"``) or on Best (``"best"``).

    Per setting and per intervention (fix_param, fix_lr, awp), the 15 layer subsets plus the
    baseline (the empty subset: AT/TRADES without intervention) form a 2^4 factorial design in
    the factors "layer k is in the subset". The response (PGD-20 Diff or Best, percentage points,
    one observation per trial, so seeds are replicates) is fitted by least squares, in effect
    coding z_k = +1/2 (layer k in) or -1/2 (out), to

        y = b0 + sum_k b_k z_k + sum_{j<k} b_jk z_j z_k.

    So, as in the textbook analysis of a 2^k design: the *main effect of layer k*, b_k, is the
    change in y from putting layer k in the subset, averaged over the other layers being in or
    out (with all 16 cells equally replicated it equals mean(y | k in) - mean(y | k out)); the
    *interaction* "layer j x layer k", b_jk, is how much layer j's effect changes when layer k is
    in rather than out; ``mean`` is b0, the average over the 16 cells. The 95% interval uses the
    residual variance with a t quantile; with one seed and all 16 cells the residual (5 df) is
    made only of the 3- and 4-way interactions left out of the model, and with no residual df
    there is no interval ("–"). Missing cells are fine while all 11 terms stay estimable;
    otherwise that intervention is skipped with a note.
    """
    if response not in ("diff", "best"):
        raise AblateError(f"unknown effects response {response!r}; choose from diff, best")
    trials = per_trial(run)
    notes: list[str] = []
    rows: list[dict] = []
    column = f"pgd_{response}"
    if trials.empty:
        return _effects_display(pd.DataFrame(), notes, response)
    for setting, group in trials.groupby(SETTING, sort=True):
        base = group[group.intervention == "none"]
        for iv in SUBSET_INTERVENTIONS:
            cells = group[group.intervention == iv]
            if cells.empty:
                continue
            data = pd.concat([base, cells])
            subsets = [() if i == "none" else _layers_key(l)
                       for i, l in zip(data.intervention, data.layers)]
            fit = fit_effects(subsets, data[column].to_numpy())
            where = f"{'/'.join(map(str, setting))} {iv}"
            if fit is None:
                notes.append(f"{where}: skipped; {len(set(subsets))} of the 16 layer subsets "
                             f"(baseline included) were run, too few to estimate 4 main "
                             f"effects and 6 interactions.")
                continue
            df = int(fit.df.iloc[0])
            seeds = int(data.groupby([data.intervention, data.layers]).size().max())
            if df == 0:
                notes.append(f"{where}: no residual degrees of freedom (one seed gives no "
                             f"error estimate), so no interval.")
            elif seeds == 1:
                notes.append(f"{where}: one seed; the interval's error estimate comes only "
                             f"from the 3- and 4-way interactions ({df} df), assumed zero.")
            incomplete = not data.complete.all()
            for rec in fit.to_dict("records"):
                rows.append({**dict(zip(SETTING, setting)), "intervention": iv, **rec,
                             "cells": len(set(subsets)), "seeds": seeds,
                             "complete": not incomplete})
    return _effects_display(pd.DataFrame(rows), notes, response)


def _effects_display(numbers: pd.DataFrame, notes: list[str], response: str) -> pd.DataFrame:
    if numbers.empty:
        display = pd.DataFrame()
        display.attrs["numbers"] = numbers
        display.attrs["notes"] = notes
        return display
    name = {"diff": "Diff", "best": "Best"}[response]
    shown = _pretty_setting(numbers)  # paper names on screen, raw values in the CSV
    display = pd.DataFrame({title: shown[col].astype(str)
                            for col, title in ID_COLUMNS.items()})
    display["Method"] = [f"{METHOD_NAMES.get(m, m.upper())}_{iv}"
                         for m, iv in zip(numbers.method, numbers.intervention)]
    display["Method"] = [f"{v}{RUNNING}" if not done else v
                         for v, done in zip(display.Method, numbers.complete)]
    display["Term"] = numbers.term
    display[f"{name} estimate (pp)"] = [_fmt(v) for v in numbers.estimate]
    display["95% CI"] = [DASH if math.isnan(lo) else f"[{_fmt(lo)}, {_fmt(hi)}]"
                         for lo, hi in zip(numbers.ci_low, numbers.ci_high)]
    display["Cells"] = numbers.cells.astype(str)
    display["Seeds"] = numbers.seeds.astype(str)
    if not numbers.complete.all():
        notes = [*notes, "* still running; the response uses the latest epoch so far."]
    notes = [f"Main effect of layer k: the change in PGD-20 {name} (percentage points) from "
             f"applying the intervention to layer k too, averaged over the other layers; "
             f"layer j x layer k: how much layer j's effect changes when layer k is included; "
             f"mean: the average over the 16 subsets (the baseline is the empty one).", *notes]
    display.attrs["numbers"] = numbers.reset_index(drop=True)
    display.attrs["notes"] = notes
    return display


# ----------------------------------------------------------------------------------------------
# Writers

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
             r"\label{tab:" + latex_escape(stem) + "}",
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


def write_table(frame: pd.DataFrame, out: Path, stem: str, caption: str) -> list[Path]:
    """Write ``<stem>.md`` (pipe table after a bold caption line, footnotes below),
    ``<stem>.csv`` (raw numbers from ``frame.attrs["numbers"]`` when present: percent, full
    precision, empty cells where missing, ``*_std`` columns when seeds > 1) and ``<stem>.tex``
    (a booktabs ``table``); return the three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(frame.attrs.get("notes", []))
    numbers = frame.attrs.get("numbers")
    md, csv, tex = (out / f"{stem}{ext}" for ext in (".md", ".csv", ".tex"))
    with atomic_path(md) as tmp:
        tmp.write_text(_markdown(frame, caption, notes), encoding="utf-8")
    with atomic_path(csv) as tmp:
        (numbers if isinstance(numbers, pd.DataFrame) else frame).to_csv(tmp, index=False)
    with atomic_path(tex) as tmp:
        tmp.write_text(_latex(frame, caption, notes, stem), encoding="utf-8")
    return [md, csv, tex]


def check_names(names: Iterable[str]) -> list[str]:
    """The table names, or a one-line AblateError naming the allowed ones."""
    names = list(names)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise AblateError(f"unknown table {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(TABLES)}")
    return names


def write_tables(run: Run, names: Iterable[str], out: Path, settings: Iterable[str] = (),
                 warn: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Write each named table (``TABLES``) under ``out``; a table with no data is skipped and
    ``warn`` is told why in one line.

    ``settings`` are extra rows for ``best-last`` by label (``AT_awp_[4]``, ``AWP``, ...).

    ``ablation`` writes one table per intervention present (``ablation-fix_lr``, ...) and
    ``effects`` writes ``effects-diff`` and ``effects-best``.
    """
    names = check_names(names)
    where = f"run {run.name}"
    jobs: list[tuple[str, pd.DataFrame, str]] = []
    for name in dict.fromkeys(names):
        if name == "best-last":
            jobs.append((name, best_last(run, list(settings)), f"Test robustness (%): PGD-20 and AutoAttack "
                         f"Best / Last / Diff ({where})."))
        elif name == "awp-compare":
            jobs.append((name, awp_compare(run), f"RAT_WP compared with AWP: natural, PGD-20 "
                         f"and AutoAttack accuracy (%) ({where})."))
        elif name == "ablation":
            present = set(run.curves.intervention)
            for iv in SUBSET_INTERVENTIONS:
                if iv in present:
                    jobs.append((f"ablation-{iv}", ablation(run, iv),
                                 f"Ablation over the layers given {iv}: natural, PGD-20 and "
                                 f"AutoAttack accuracy (%) ({where})."))
        elif name == "effects":
            for response, what in (("diff", "robust overfitting (PGD-20 Diff)"),
                                   ("best", "best robustness (PGD-20 Best)")):
                jobs.append((f"effects-{response}", effects(run, response),
                             f"Factorial layer effects on {what}, percentage points, "
                             f"95% CI ({where})."))
    paths: list[Path] = []
    for stem, frame, caption in jobs:
        if frame.empty:
            why = " ".join(frame.attrs.get("notes", [])) or "no trials for it"
            warn(f"no {stem} table: {why}")
            continue
        paths += write_table(frame, out, stem, caption)
    return paths
