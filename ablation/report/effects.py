"""Layer effects as a 2^4 factorial design: the 15 subsets of an intervention plus its baseline.

Not in the paper: it asks of every run how much each layer's inclusion changes robust overfitting
(PGD Diff) or Best, averaged over the other layers, with pairwise interactions. The 10 layer terms
of one fit are tested together, so their intervals are simultaneous (Bonferroni) and their
p-values Holm-adjusted; without that about one in three fits on pure noise (the digits demo)
shows a "significant" layer.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import numpy as np
import pandas as pd

from .. import layers
from ..errors import AblateError
from ..strategies import layer_wise, method_label
from . import SETTING, RunData
from .numbers import (DASH, ID_COLUMNS, RUNNING, STEPS, Table, fmt, per_trial, pgd_title,
                      pretty_setting)


# Model terms of the 2^4 design with main effects and two-way interactions.
MAIN_TERMS = [(k,) for k in layers.GROUPS]
PAIR_TERMS = list(itertools.combinations(layers.GROUPS, 2))
TERMS = [*MAIN_TERMS, *PAIR_TERMS]


def _term_name(term: tuple[int, ...]) -> str:
    return " x ".join(f"layer {k}" for k in term)


def _design(subsets: Iterable[tuple[int, ...]]) -> np.ndarray:
    """Rows [1, z1..z4, z1z2, ..., z3z4] with z_k = +1/2 when layer k is in the subset, else
    -1/2 (effect coding: a coefficient is then a difference averaged over the other layers)."""
    rows = []
    for s in subsets:
        x = {k: 0.5 if k in s else -0.5 for k in layers.GROUPS}
        rows.append([1.0, *(math.prod(x[k] for k in t) for t in TERMS)])
    return np.array(rows).reshape(-1, 1 + len(TERMS))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple
    test procedure"): the i-th smallest of K p-values times K - i + 1 (i from 1), made
    non-decreasing in that order by a running maximum and capped at 1. Rejecting where the
    adjusted value is below alpha controls the family-wise error rate at alpha."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    out = np.empty_like(p)
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def fit_effects(subsets: list[tuple[int, ...]], y: np.ndarray, level: float = 0.95
                ) -> pd.DataFrame | None:
    """Least-squares fit of y = b0 + sum_k b_k z_k + sum_{j<k} b_jk z_j z_k, z_k = ±1/2.

    One observation per (subset, seed). Returns rows (term, estimate, se, ci_low, ci_high, p,
    p_holm, df) with the mean first, then main effects, then interactions. The K = 10 layer
    terms are one family: each interval is estimate ± t_{df, 1-(1-level)/(2K)} * se (Bonferroni,
    so all K cover at once with probability >= level), ``p`` is the two-sided t-test of "no
    effect" and ``p_holm`` its Holm adjustment over the K terms (uniformly more powerful than
    Bonferroni; an interval excluding 0 implies p_holm < 1 - level). The mean is no test of an
    effect: its interval is the plain one, its p-values NaN. NaN everywhere when df = 0.
    ``None`` when the design is not estimable (rank below the 11 model terms).
    """
    from scipy import stats

    x = _design(subsets)
    y = np.asarray(y, dtype=float)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(y) - x.shape[1]
    nan = np.full_like(coef, np.nan)
    se, low, high, p, adjusted = nan, nan, nan, nan.copy(), nan.copy()
    if df > 0:
        resid = y - x @ coef
        sigma2 = float(resid @ resid) / df
        se = np.sqrt(sigma2 * np.diag(np.linalg.inv(x.T @ x)))
        alpha, family = 1 - level, len(TERMS)
        quantile = np.full_like(coef, stats.t.ppf(1 - alpha / (2 * family), df))
        quantile[0] = stats.t.ppf(1 - alpha / 2, df)  # the mean: not one of the family
        low, high = coef - quantile * se, coef + quantile * se
        with np.errstate(divide="ignore", invalid="ignore"):  # se = 0 only for an exact fit
            p[1:] = 2 * stats.t.sf(np.abs(coef[1:] / se[1:]), df)
        adjusted[1:] = holm(p[1:])
    return pd.DataFrame({"term": ["mean", *map(_term_name, TERMS)], "estimate": coef,
                         "se": se, "ci_low": low, "ci_high": high, "p": p, "p_holm": adjusted,
                         "df": df})


def effects_table(run: RunData, response: str = "diff") -> Table:
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
        return _effects_display(pd.DataFrame(), notes, response, "PGD")
    pgd = pgd_title(trials[STEPS] if STEPS in trials else ())
    if pgd == "PGD" and STEPS in trials:
        notes.append(f"The trials' test PGD used different numbers of steps "
                     f"({', '.join(map(str, sorted(set(trials[STEPS].dropna().astype(int)))))})"
                     f"; a fit mixes them only where one setting's trials do.")
    for setting, group in trials.groupby(SETTING, sort=True):
        base = group[group.intervention == "none"]
        for iv in layer_wise():
            cells = group[group.intervention == iv]
            if cells.empty:
                continue
            data = pd.concat([base, cells])
            subsets = [() if i == "none" else layers.from_column(l)
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
    return _effects_display(pd.DataFrame(rows), notes, response, pgd)


def _p_value(p: float) -> str:
    return DASH if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _effects_display(numbers: pd.DataFrame, notes: list[str], response: str, pgd: str
                     ) -> Table:
    if numbers.empty:
        return Table(pd.DataFrame(), numbers, tuple(notes))
    name = {"diff": "Diff", "best": "Best"}[response]
    shown = pretty_setting(numbers)  # paper names on screen, raw values in the CSV
    display = pd.DataFrame({title: shown[col].astype(str)
                            for col, title in ID_COLUMNS.items()})
    display["Method"] = [f"{method_label(m)}_{iv}"
                         for m, iv in zip(numbers.method, numbers.intervention)]
    display["Method"] = [f"{v}{RUNNING}" if not done else v
                         for v, done in zip(display.Method, numbers.complete)]
    display["Term"] = numbers.term
    display[f"{name} estimate (pp)"] = [fmt(v) for v in numbers.estimate]
    display["95% CI"] = [DASH if math.isnan(lo) else f"[{fmt(lo)}, {fmt(hi)}]"
                         for lo, hi in zip(numbers.ci_low, numbers.ci_high)]
    display["p (Holm)"] = [_p_value(p) for p in numbers.p_holm]
    display["Cells"] = numbers.cells.astype(str)
    display["Seeds"] = numbers.seeds.astype(str)
    if not numbers.complete.all():
        notes = [*notes, "* still running; the response uses the latest epoch so far."]
    family = len(TERMS)
    notes = [f"Main effect of layer k: the change in {pgd} {name} (percentage points) from "
             f"applying the intervention to layer k too, averaged over the other layers; "
             f"layer j x layer k: how much layer j's effect changes when layer k is included; "
             f"mean: the average over the 16 subsets (the baseline is the empty one).",
             f"Multiple comparisons: the {family} layer terms of each fit (one method and "
             f"intervention) are one family. Their 95% CIs are simultaneous (Bonferroni, t "
             f"quantile at 1 - 0.05/{2 * family}) and p (Holm) is Holm-adjusted over the "
             f"{family} terms; the mean's interval is a plain 95% one.", *notes]
    return Table(display, numbers.reset_index(drop=True), tuple(notes))
