"""The paper's figures (2, 3 and 4) and a whole-study heatmap, drawn from a run's curves.

Every builder returns ``(stem, figure)`` pairs, one per combination of :data:`SETTING` values in
the run (a study over two datasets gives two grids per intervention). Within a combination, the
trials of one setting (same ``label``) that differ only by seed are averaged epoch by epoch and
drawn with a min..max band; trials of that combination that differ in other hyperparameters
(a second ``eps``, say) would be averaged too, so keep those in separate runs.

Figures are built with :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so no
GUI backend or global figure registry is involved (safe in threads and on headless machines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import layers
from ..errors import AblateError
from ..io import atomic_path
from ..layers import LAYER_WISE
from . import SETTING, Run, display_name, label

# The paper's panels (Figures 2(a), 3(a), 4(a)) and the heatmap's rows, as ``layers`` strings of
# the curves table.
PANELS: tuple[tuple[str, ...], ...] = tuple(tuple(layers.to_column(s) for s in panel)
                                            for panel in layers.PANELS)
SUBSETS: tuple[str, ...] = tuple(layers.to_column(s) for s in layers.ALL_SUBSETS)

# Okabe-Ito colours (colour-blind safe), one per position within a panel; baselines are black.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7")
BASELINE_COLOUR = "black"
# Sizes in points at the saved size (the figures are saved at their design size, never scaled).
STYLE = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9,
         "ytick.labelsize": 9, "legend.fontsize": 8, "figure.titlesize": 12}
DPI = 150
OVERFIT_FLOOR = 1.0  # pp: the heatmap's colour scale never ends below this

_METRIC_NAMES = {
    "test_robust_acc": "Test robust accuracy", "test_acc": "Test natural accuracy",
    "train_robust_acc": "Train robust accuracy", "train_acc": "Train natural accuracy",
    "train_eval_robust_acc": "Train robust accuracy (eval mode)",
    "train_eval_acc": "Train natural accuracy (eval mode)",
}


@dataclass(frozen=True)
class Curve:
    """One setting's curve of one metric, averaged over its seeds."""

    label: str
    x: np.ndarray  # 1-based epochs (the last of 200 epochs is drawn at 200)
    y: np.ndarray  # mean over seeds, in plot units (percent for accuracies)
    lo: np.ndarray  # min over seeds (equal to y with one seed)
    hi: np.ndarray
    seeds: int
    complete: bool  # every seed's trial has all its epochs

    @property
    def legend(self) -> str:
        return self.label if self.complete else f"{self.label} (running)"

    @property
    def style(self) -> str:
        """Dotted for a trial still running; otherwise solid (callers may override)."""
        return "-" if self.complete else ":"


def metric_columns(curves: pd.DataFrame) -> list[str]:
    """The per-epoch measurements among the curve columns (what a figure can plot)."""
    return [c for c in curves.columns
            if c.endswith(("_acc", "_loss", "_seconds")) or c in ("lr", "lr_fixed")]


def _is_percent(metric: str) -> bool:
    return metric.endswith("_acc")


def metric_name(metric: str) -> str:
    """Axis label of a curve column: 'Test robust accuracy (%)', 'Test robust loss', ..."""
    if metric in _METRIC_NAMES:
        name = _METRIC_NAMES[metric]
    else:
        name = metric.replace("_acc", "_accuracy").replace("_", " ").capitalize()
    return f"{name} (%)" if _is_percent(metric) else name


def _setting_title(values: dict[str, str]) -> str:
    return " · ".join(display_name(c, values[c]) for c in SETTING)


def _stem(kind: str, values: dict[str, str], suffix: str = "") -> str:
    parts = [kind, *(str(values[c]) for c in SETTING)] + ([suffix] if suffix else [])
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts)


def _settings(run: Run) -> Iterator[tuple[dict[str, str], pd.DataFrame]]:
    """Each combination of SETTING values present, in sorted order, with its curve rows."""
    for values, rows in run.curves.groupby(SETTING, sort=True):
        yield dict(zip(SETTING, values)), rows


def _curves(rows: pd.DataFrame, metric: str) -> dict[str, Curve]:
    """Label -> seed-averaged curve of ``metric``. Seeds that stopped early average over the
    seeds that reached each epoch."""
    if metric not in metric_columns(rows):
        raise AblateError(f"metric {metric!r} is not a curve column; choose from "
                          f"{', '.join(metric_columns(rows))}")
    scale = 100.0 if _is_percent(metric) else 1.0
    out = {}
    for name, trial_rows in rows.groupby("label", sort=False):
        stats = trial_rows.groupby("epoch")[metric].agg(["mean", "min", "max"]).sort_index()
        out[name] = Curve(label=name, x=stats.index.to_numpy() + 1,
                          y=stats["mean"].to_numpy() * scale, lo=stats["min"].to_numpy() * scale,
                          hi=stats["max"].to_numpy() * scale, seeds=trial_rows.seed.nunique(),
                          complete=bool(trial_rows.complete.all()))
    return out


def _draw(ax, curve: Curve, colour: str, linestyle: str = "-", legend: str | None = None,
          linewidth: float = 1.6, zorder: float = 2) -> None:
    """A curve (dotted while its trial runs) with its min..max band over seeds, if several."""
    ax.plot(curve.x, curve.y, color=colour, linewidth=linewidth, zorder=zorder,
            linestyle=linestyle if curve.complete else ":",
            label=curve.legend if legend is None else legend)
    if curve.seeds > 1:
        alpha = 0.1 if colour == BASELINE_COLOUR else 0.18  # grey must not hide the others
        ax.fill_between(curve.x, curve.lo, curve.hi, color=colour, alpha=alpha, linewidth=0)


def _title(text: str, partial: bool) -> str:
    return f"{text} — partial run (dotted: still running)" if partial else text


def _styled(build: Callable[..., list[tuple[str, Figure]]]):
    """Build figures under the package's font sizes, leaving the caller's rcParams alone."""

    def wrapper(*args, **kwargs) -> list[tuple[str, Figure]]:
        with matplotlib.rc_context(STYLE):
            return build(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = build.__name__, build.__doc__
    return wrapper


@_styled
def intervention_grid(run: Run, intervention: str,
                      metric: str = "test_robust_acc") -> list[tuple[str, Figure]]:
    """Figures 2(a)/3(a)/4(a): ``metric`` vs epoch in 4 panels (singles, pairs with layer 1,
    other pairs, triples + all four), each with the standard (AT or TRADES) baseline.

    Legend order in each panel: the baseline first, then the panel's subsets in :data:`PANELS`
    order; a subset's colour is fixed by its position in that list (so it never shifts when a
    trial is missing). Settings without any ``intervention`` trial give no figure.
    """
    if intervention not in LAYER_WISE:
        raise ValueError(f"no figure grid for intervention {intervention!r}")  # a caller's bug
    figures = []
    for values, rows in _settings(run):
        chosen = rows[rows.intervention == intervention]
        if chosen.empty:
            continue
        curves = _curves(chosen, metric)
        by_layers = {layers: curves[name] for layers, name in
                     chosen.groupby("layers").label.first().items()}
        baseline = _curves(rows[rows.intervention == "none"], metric)
        fig = Figure(figsize=(16, 4.3), layout="constrained")
        axes = fig.subplots(1, len(PANELS), sharey=True)  # same y range across the panels
        for ax, panel in zip(axes, PANELS):
            for curve in baseline.values():  # one, unless the run mixes baselines
                _draw(ax, curve, BASELINE_COLOUR, "--", linewidth=1.8, zorder=3)  # on top
            for colour, subset in zip(PALETTE, panel):
                if subset in by_layers:
                    _draw(ax, by_layers[subset], colour)
            ax.set_xlabel("Epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", framealpha=0.85)
        axes[0].set_ylabel(metric_name(metric))
        partial = not chosen.complete.all() or not rows[rows.intervention == "none"].complete.all()
        seeds = max(c.seeds for c in [*curves.values(), *baseline.values()])
        spread = f" · mean of {seeds} seeds, band: min–max" if seeds > 1 else ""
        fig.suptitle(_title(f"{_setting_title(values)} · {intervention}{spread}", partial))
        suffix = "" if metric == "test_robust_acc" else metric
        figures.append((_stem(intervention, values, suffix), fig))
    return figures


# The paper's gap figures, as (intervention, layers) settings: Figure 3(b,c) sets the fixed-LR
# latter layers against all layers, Figure 4(b,c) AWP on the front layers against the latter ones.
GAP_SETS = {
    "fix_lr": (("none", ""), ("fix_lr", "3,4"), ("fix_lr", "1,2,3,4")),
    "awp": (("none", ""), ("awp_full", ""), ("awp", "1,2,3"), ("awp", "3,4")),
}


@_styled
def gap_figure(run: Run, labels: list[str] | None = None) -> list[tuple[str, Figure]]:
    """Figures 3(b,c)/4(b,c): train (dashed) and test (solid) robust accuracy per setting, and
    the robust generalisation gap ``train_robust_acc - test_robust_acc`` (percentage points).

    By default two figures per setting, as in the paper (:data:`GAP_SETS`): ``gap-...-fix_lr``
    (AT, AT_fix_lr_[3, 4], AT_fix_lr_[1, 2, 3, 4]) and ``gap-...-awp`` (AT, AWP, AT_awp_[1, 2, 3],
    AT_awp_[3, 4]); ``labels`` draws one figure of exactly those settings instead. Legends:
    ``<label> (test)``, ``<label> (train)`` in panel 1 and ``<label>`` in panel 2; settings
    absent from the run are left out.
    """
    figures = []
    for values, all_rows in _settings(run):
        if labels is not None:
            choices = {"": list(labels)}
        else:
            choices = {name: [label(values["method"], i, l) for i, l in settings]
                       for name, settings in GAP_SETS.items()}
        for suffix, wanted in choices.items():
            figure = _gap(values, all_rows[all_rows.label.isin(wanted)], wanted)
            if figure is not None:
                figures.append((_stem("gap", values, suffix), figure))
    return figures


def _gap(values: dict[str, str], rows: pd.DataFrame, wanted: list[str]) -> Figure | None:
    """One gap figure of the ``wanted`` labels present in ``rows`` (None if none is)."""
    if rows.empty:
        return None
    test = _curves(rows, "test_robust_acc")
    train = _curves(rows, "train_robust_acc")
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    acc_ax, gap_ax = fig.subplots(1, 2)
    present = [name for name in wanted if name in test]
    baselines = set(rows.label[rows.intervention == "none"])
    others = iter(PALETTE * 4)  # the baseline in black, the rest in palette order
    for name in present:
        colour = BASELINE_COLOUR if name in baselines else next(others)
        running = "" if test[name].complete else " (running)"
        _draw(acc_ax, test[name], colour, "-", legend=f"{name} (test){running}")
        _draw(acc_ax, train[name], colour, "--", legend=f"{name} (train){running}")
        # The gap of the seed-mean curves; no band (a min..max of a difference would mix
        # different seeds' extremes).
        diff = train[name].y - test[name].y
        _draw(gap_ax, Curve(name, test[name].x, diff, diff, diff, 1, test[name].complete),
              colour)
    gap_ax.axhline(0, color="grey", linewidth=0.8)
    acc_ax.set_ylabel("Robust accuracy (%)")
    gap_ax.set_ylabel("Robust generalisation gap: train − test (pp)")
    for ax in (acc_ax, gap_ax):
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", framealpha=0.85)
    fig.suptitle(_title(f"{_setting_title(values)} · robust train/test and gap "
                        "(train: running average over the training pass)",
                        not rows.complete.all()))
    return fig


def _mean_curve_best_last(curve: Curve) -> tuple[float, float]:
    """Max over epochs and final epoch of a seed-mean curve: with one seed these are the trial's
    Best and Last (``curves.best_last``); with several, not the mean of per-seed Best and Last
    that the tables show, and the figure's title says so."""
    return float(np.max(curve.y)), float(curve.y[-1])


@_styled
def heatmap(run: Run) -> list[tuple[str, Figure]]:
    """The whole study at a glance: rows the 15 layer subsets, columns the interventions present.

    Colour: robust overfitting = best − last test robust accuracy (percentage points, >= 0;
    sequential colormap, darker = more overfitting). Text: best accuracy (%) over
    ``(last − best)``, e.g. ``52.3\\n(-8.1)``; ``*`` marks a trial still running; missing cells
    are grey with "–". The baselines' best/last are in the title. The colour scale runs from 0
    to the largest overfitting among the cells and the baselines (at least 1 pp), so a cell as
    dark as it gets overfits as much as the worst setting, the baseline included.
    """
    figures = []
    for values, rows in _settings(run):
        present = [i for i in LAYER_WISE if (rows.intervention == i).any()]
        if not present:
            continue
        best = np.full((len(SUBSETS), len(present)), np.nan)
        last = best.copy()
        running = np.zeros(best.shape, dtype=bool)
        for j, intervention in enumerate(present):
            chosen = rows[rows.intervention == intervention]
            curves = _curves(chosen, "test_robust_acc")
            for subset, name in chosen.groupby("layers").label.first().items():
                if subset in SUBSETS:
                    i = SUBSETS.index(subset)
                    best[i, j], last[i, j] = _mean_curve_best_last(curves[name])
                    running[i, j] = not curves[name].complete
        overfit = best - last
        fig = Figure(figsize=(2.0 + 1.7 * len(present), 8.2), layout="constrained")
        ax = fig.subplots()
        cmap = matplotlib.colormaps["YlOrRd"].with_extremes(bad="#d0d0d0")  # grey: missing
        baselines, base_overfit = [], []
        for base in ("none", "awp_full"):  # AT (or TRADES) first, then AWP
            for curve in _curves(rows[rows.intervention == base], "test_robust_acc").values():
                top_acc, final = _mean_curve_best_last(curve)
                base_overfit.append(top_acc - final)
                baselines.append(f"{curve.legend}: best {top_acc:.1f}, last {final:.1f} "
                                 f"({final - top_acc:.1f})")
        # One scale from 0 to the largest overfitting of the cells and the baselines, and at
        # least OVERFIT_FLOOR, so that sub-point noise is never drawn in the darkest colour.
        top = max([OVERFIT_FLOOR, *base_overfit, *overfit[np.isfinite(overfit)]])
        norm = Normalize(0.0, top)
        image = ax.imshow(np.ma.masked_invalid(overfit), cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(SUBSETS)):
            for j in range(len(present)):
                if np.isnan(best[i, j]):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=9, color="#555555")
                    continue
                dark = norm(overfit[i, j]) > 0.6  # white text on the dark end of the colormap
                star = "*" if running[i, j] else ""
                ax.text(j, i, f"{best[i, j]:.1f}{star}\n({last[i, j] - best[i, j]:.1f})",
                        ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(present)), present)
        ax.set_yticks(range(len(SUBSETS)), [layers.display(s) for s in layers.ALL_SUBSETS])
        ax.xaxis.tick_top()
        ax.set_ylabel("Layers with the intervention")
        fig.colorbar(image, ax=ax, shrink=0.8,
                     label="Robust overfitting: best − last test robust acc (pp)")
        several = rows.seed.nunique() > 1  # then a cell is the seed-mean curve's, not the tables'
        lines = [_setting_title(values), "cell: best test robust acc % (last − best)"
                 + (" of the seed-mean curve" if several else "")]
        lines += ["; ".join(baselines)] if baselines else []
        if not rows.complete.all():
            lines.append("partial run: * = still running")
        fig.suptitle("\n".join(lines), fontsize=10)
        figures.append((_stem("heatmap", values), fig))
    return figures


@dataclass(frozen=True)
class FigureKind:
    """A figure name's builder: (run, metric, settings) -> [(file stem, figure)]."""

    build: Callable[[Run, str, list[str]], list[tuple[str, Figure]]]
    what: str  # one line for the README and --help


FIGURES: dict[str, FigureKind] = {
    **{iv: FigureKind(lambda run, metric, settings, iv=iv: intervention_grid(run, iv, metric),
                      f"Figure {n}(a): the {iv} grid, four panels of layer subsets")
       for iv, n in (("fix_param", 2), ("fix_lr", 3), ("awp", 4))},
    "gap": FigureKind(lambda run, metric, settings: gap_figure(run, settings or None),
                      "Figures 3(b,c), 4(b,c): train and test robust accuracy and their gap"),
    "heatmap": FigureKind(lambda run, metric, settings: heatmap(run),
                          "15 subsets x interventions, coloured by Best - Last"),
}


def write_figures(run: Run, names: Iterable[str], out: Path, metric: str = "test_robust_acc",
                  settings: Iterable[str] = ()) -> list[Path]:
    """Save the named figures (names of ``FIGURES``, checked by the caller; each setting's) as
    PNG (dpi 150) and PDF under ``out``.

    ``metric`` applies to the intervention grids; ``settings`` (labels), when given, are the
    curves of the gap figure instead of the paper's two sets. A figure without data in this run
    (say, no fix_param trials) is skipped. Returns the written paths; the figures are released.
    """
    out = Path(out)
    written: list[Path] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        for stem, fig in FIGURES[name].build(run, metric, list(settings)):
            for suffix in ("png", "pdf"):
                path = out / f"{stem}.{suffix}"
                with atomic_path(path) as tmp:  # the temporary name hides the format: say it
                    fig.savefig(tmp, format=suffix, dpi=DPI)
                written.append(path)
            fig.clear()  # not pyplot-managed, so nothing to close: drop its artists now
    return written
