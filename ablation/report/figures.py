"""The paper's figures (2, 3 and 4) and a whole-study heatmap, drawn from a run's curves.

Every builder returns ``(stem, figure)`` pairs, one per combination of :data:`SETTING` values in
the run (a study over two datasets gives two grids per intervention). Within a combination, the
trials of one setting (same ``label``) that differ only by seed are averaged epoch by epoch and
drawn with a min..max band; trials of that combination that differ in other hyperparameters
(a second ``eps``, say) would be averaged too, so keep those in separate runs.

Conventions shared by every figure: the x axis is the curves' 0-based ``epoch`` (the tables'
best epoch is counted the same way); Diff = Best - Last, as in the tables; a trial still running
keeps its line style, ends in an open circle at its latest epoch and says "(running)" in the
legend; legends sit outside the axes. Figures come in two widths (:data:`WIDTHS`): a column of a
two-column paper and the full text width, with 8-9 pt fonts at that size (they are saved at it,
never scaled) and TrueType fonts in the PDF.

Figures are built with :class:`matplotlib.figure.Figure` directly, not through ``pyplot``, so no
GUI backend or global figure registry is involved (safe in threads and on headless machines).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .. import layers
from ..errors import AblateError
from ..io import atomic_path
from .. import strategies
from . import SETTING, RunData, display_name, label

# The paper's panels (Figures 2(a), 3(a), 4(a)) and the heatmap's rows, as ``layers`` strings of
# the curves table.
PANELS: tuple[tuple[str, ...], ...] = tuple(tuple(layers.to_column(s) for s in panel)
                                            for panel in layers.PANELS)
SUBSETS: tuple[str, ...] = tuple(layers.to_column(s) for s in layers.ALL_SUBSETS)

# Okabe-Ito colours (colour-blind safe), one per position within a panel; baselines are black.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7")
BASELINE_COLOUR = "black"
# Figure widths in inches: one column and the full text width of a two-column paper (IEEE: 3.5
# and 7.16 in; ACM: 3.33 and 7.0 in). The paper's grids span the text width, hence the default.
WIDTHS = {"column": 3.5, "full": 7.2}
DEFAULT_SIZE = "full"
# Sizes in points at the saved size (the figures are saved at their design size, never scaled).
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8, "figure.titlesize": 9,
         "figure.labelsize": 8, "lines.linewidth": 1.2, "axes.linewidth": 0.6,
         "xtick.major.width": 0.6, "ytick.major.width": 0.6, "grid.linewidth": 0.5,
         "legend.handlelength": 2.6,  # long enough to tell dashed from solid
         # TrueType (Type 42) fonts in PDF and PS: IEEE and ACM PDF checks reject Type 3 fonts.
         "pdf.fonttype": 42, "ps.fonttype": 42}
DPI = 300  # print resolution for the PNGs at their design size
EPOCH_LABEL = "Epoch (0-based)"  # the curves' epoch column, as the tables' best epoch
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
    x: np.ndarray  # the curves' 0-based epochs (the last of 200 epochs is drawn at 199)
    y: np.ndarray  # mean over seeds, in plot units (percent for accuracies)
    lo: np.ndarray  # min over seeds (equal to y with one seed)
    hi: np.ndarray
    seeds: int
    complete: bool  # every seed's trial has all its epochs

    @property
    def legend(self) -> str:
        return self.label if self.complete else f"{self.label} (running)"


def metric_columns(curves: pd.DataFrame) -> list[str]:
    """The per-epoch measurements among the curve columns (what a figure can plot)."""
    return [c for c in curves.columns
            if c.endswith(("_acc", "_loss", "_seconds")) or c in ("lr", "lr_fixed")]


def _is_percent(metric: str) -> bool:
    return metric.endswith("_acc")


def _values(column: pd.Series) -> str:
    return "/".join(str(v) for v in sorted(column.unique()))


def attack(metric: str, rows: pd.DataFrame) -> str | None:
    """The attack behind a robust curve column of these trials (None for a clean one), as the
    trainer measures it (``eval_rows``, ``train_epoch``; docs/method.md C.4): PGD with
    ``test_steps`` on the test set, PGD with ``train_steps`` in eval mode on the fixed train
    subset, and the method's own training attack in the training pass."""
    if "_robust_" not in metric:
        return None
    if metric.startswith("test_"):
        return f"PGD-{_values(rows.test_steps)}"
    if metric.startswith("train_eval_"):
        return f"PGD-{_values(rows.train_steps)}"
    methods = "/".join(strategies.method_label(m) for m in sorted(rows.method.unique()))
    return f"{_values(rows.train_steps)}-step {methods} attack"


def metric_name(metric: str, rows: pd.DataFrame | None = None) -> str:
    """Axis label of a curve column: 'Test robust accuracy (%)', 'Test robust loss', ...; with
    the trials' ``rows``, a robust column names its attack: 'Test robust accuracy, PGD-10 (%)'."""
    if metric in _METRIC_NAMES:
        name = _METRIC_NAMES[metric]
    else:
        name = metric.replace("_acc", "_accuracy").replace("_", " ").capitalize()
    used = attack(metric, rows) if rows is not None else None
    if used:
        name = f"{name}, {used}"
    return f"{name} (%)" if _is_percent(metric) else name


def _setting_title(values: dict[str, str]) -> str:
    return " · ".join(display_name(c, values[c]) for c in SETTING)


def _stem(kind: str, values: dict[str, str], suffix: str = "") -> str:
    parts = [kind, *(str(values[c]) for c in SETTING)] + ([suffix] if suffix else [])
    return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p) for p in parts)


def _settings(run: RunData) -> Iterator[tuple[dict[str, str], pd.DataFrame]]:
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
        out[name] = Curve(label=name, x=stats.index.to_numpy(),
                          y=stats["mean"].to_numpy() * scale, lo=stats["min"].to_numpy() * scale,
                          hi=stats["max"].to_numpy() * scale, seeds=trial_rows.seed.nunique(),
                          complete=bool(trial_rows.complete.all()))
    return out


def _draw(ax, curve: Curve, colour: str, linestyle: str = "-", legend: str | None = None,
          linewidth: float = 1.2, zorder: float = 2) -> None:
    """A curve with its min..max band over seeds, if several; a trial still running keeps its
    line style (which may already mean train or baseline) and ends in an open circle."""
    ax.plot(curve.x, curve.y, color=colour, linewidth=linewidth, zorder=zorder,
            linestyle=linestyle, label=curve.legend if legend is None else legend)
    if not curve.complete:
        ax.plot(curve.x[-1:], curve.y[-1:], linestyle="none", marker="o", markersize=3.5,
                markerfacecolor="white", markeredgecolor=colour, zorder=zorder + 0.5,
                label="_running")
    if curve.seeds > 1:
        alpha = 0.1 if colour == BASELINE_COLOUR else 0.18  # grey must not hide the others
        ax.fill_between(curve.x, curve.lo, curve.hi, color=colour, alpha=alpha, linewidth=0)


RUNNING_NOTE = "partial run: ○ = latest epoch of a trial still running"


def _suptitle(fig: Figure, parts: list[str], size: str) -> None:
    """The figure's title from ``parts``, joined by " · " and broken between parts so that no
    line is wider than the figure (about 0.55 em per character in DejaVu Sans)."""
    per_line = int(WIDTHS[size] * 72 / (0.55 * STYLE["figure.titlesize"]))
    lines = [""]
    for part in parts:
        joined = f"{lines[-1]} · {part}" if lines[-1] else part
        if len(joined) <= per_line or not lines[-1]:
            lines[-1] = joined
        else:
            lines.append(part)
    fig.suptitle("\n".join(lines))


def _seeds_note(curves: Iterable[Curve]) -> list[str]:
    seeds = max((c.seeds for c in curves), default=1)
    return [f"mean of {seeds} seeds, band: min–max"] if seeds > 1 else []


def _styled(build: Callable[..., list[tuple[str, Figure]]]):
    """Build figures under the package's font sizes, leaving the caller's rcParams alone."""

    def wrapper(*args, **kwargs) -> list[tuple[str, Figure]]:
        with matplotlib.rc_context(STYLE):
            return build(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = build.__name__, build.__doc__
    return wrapper


PANEL_HEIGHT = {"column": 1.45, "full": 1.75}  # inches of plotting area per row of panels
EMPTY_PANEL = "no trial of this\ngroup in the run"  # inside a grid panel none of whose subsets ran


def _legend_below(ax) -> None:
    """The panel's legend under its tick labels (2 font sizes below the axes), never on data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), borderaxespad=2.0, frameon=False,
              handlelength=2.0)


@_styled
def intervention_grid(run: RunData, intervention: str, metric: str = "test_robust_acc",
                      size: str = DEFAULT_SIZE,
                      ylim: tuple[float, float] | None = None) -> list[tuple[str, Figure]]:
    """Figures 2(a)/3(a)/4(a): ``metric`` vs epoch in 4 panels (singles, pairs with layer 1,
    other pairs, triples + all four), each with the paper's baseline for that grid
    (its description's ``grid_baseline``: AT or TRADES for fix_param and fix_lr, full AWP for
    awp, as the paper's Figure 4(a) compares layer-wise AWP with AWP on all layers).

    One row of four panels at ``size`` "full", two rows of two at "column"; ``ylim`` (in the
    metric's plot units: percent for accuracies) fixes the shared y range. Legend order in each
    panel (below it): the baseline first, then the panel's subsets in :data:`PANELS` order; a
    subset's colour is fixed by its position in that list (so it never shifts when a trial is
    missing). Each panel is titled with its group (``layers.PANEL_TITLES``); a panel none of
    whose subsets ran says so inside it, a missing baseline is named in the title, and the y
    label names the attack of a robust metric (:func:`attack`). Settings without any
    ``intervention`` trial give no figure.
    """
    if intervention not in strategies.layer_wise():
        raise ValueError(f"no figure grid for intervention {intervention!r}")  # a caller's bug
    figures = []
    base = strategies.intervention(intervention).grid_baseline
    for values, rows in _settings(run):
        chosen = rows[rows.intervention == intervention]
        if chosen.empty:
            continue
        curves = _curves(chosen, metric)
        by_layers = {layers: curves[name] for layers, name in
                     chosen.groupby("layers").label.first().items()}
        base_rows = rows[rows.intervention == base]
        baseline = _curves(base_rows, metric) if not base_rows.empty else {}
        columns = 4 if size == "full" else 2
        grid_rows = len(PANELS) // columns
        # Each row: the plotting area, the tick labels, and a legend of up to six lines below.
        height = grid_rows * (PANEL_HEIGHT[size] + 1.35) + 0.75
        fig = Figure(figsize=(WIDTHS[size], height), layout="constrained")
        # One x and y range for the four panels (an empty panel keeps the epochs' range).
        axes = fig.subplots(grid_rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, panel, title in zip(axes, PANELS, layers.PANEL_TITLES):
            for curve in baseline.values():  # one, unless the run mixes baselines
                _draw(ax, curve, BASELINE_COLOUR, "--", linewidth=1.3, zorder=3)  # on top
            for colour, subset in zip(PALETTE, panel):
                if subset in by_layers:
                    _draw(ax, by_layers[subset], colour)
            ax.set_title(title)
            if not any(subset in by_layers for subset in panel):
                ax.text(0.5, 0.5, EMPTY_PANEL, transform=ax.transAxes, ha="center",
                        va="center", color="#555555", zorder=5,  # over the baseline, legible
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                _legend_below(ax)
            ax.tick_params(labelbottom=True)  # sharex hides inner rows' tick labels
        if ylim is not None:
            axes[0].set_ylim(*ylim)  # shared by all four panels
        fig.supylabel(metric_name(metric, rows))
        fig.supxlabel(EPOCH_LABEL)
        partial = not chosen.complete.all() or not base_rows.complete.all()
        parts = [_setting_title(values), intervention]
        if not baseline:
            parts.append(f"{label(values['method'], base, '')} baseline ({base}) not in this run")
        parts += _seeds_note([*curves.values(), *baseline.values()])
        _suptitle(fig, parts + ([RUNNING_NOTE] if partial else []), size)
        suffix = "" if metric == "test_robust_acc" else metric
        figures.append((_stem(intervention, values, suffix), fig))
    return figures


@dataclass(frozen=True)
class GapRow:
    """A row of panels of a gap figure: ``"pair"`` draws the settings' train and test accuracy,
    robust and natural side by side (Figures 3(b), 3(c), 4(b)); ``"gap"`` gives each setting a
    panel of robust train, test and train - test (Figure 4(c))."""

    name: str  # the paper's subfigure, in panel titles ("" for a chosen set)
    kind: str  # "pair" or "gap"
    settings: tuple[tuple[str, str], ...]  # (intervention, layers) in legend order


# The paper's gap figures, one file each, as rows of panels: Figure 3(b) standard AT vs a fixed
# LR on all layers, 3(c) a fixed LR on the latter layers vs all; Figure 4(b) AWP on the front
# layers vs the latter ones, 4(c) the robust generalisation gap of full AWP and of AT.
GAP_SETS: dict[str, tuple[GapRow, ...]] = {
    "fix_lr": (GapRow("3(b)", "pair", (("none", ""), ("fix_lr", "1,2,3,4"))),
               GapRow("3(c)", "pair", (("fix_lr", "3,4"), ("fix_lr", "1,2,3,4")))),
    "awp": (GapRow("4(b)", "pair", (("awp", "1,2,3"), ("awp", "3,4"))),
            GapRow("4(c)", "gap", (("awp_full", ""), ("none", "")))),
}
# Accuracy panels of a "pair" row: (y label, the test column, the train columns by preference).
# The eval-mode pass on a fixed train subset is measured on the same weights as the test set;
# the running average of the training pass lags the weights by up to an epoch (and is taken on
# augmented data in train mode), so it is only the fallback when train_eval_size was 0.
ACCURACIES = (("Robust accuracy (%)", "test_robust_acc",
               ("train_eval_robust_acc", "train_robust_acc")),
              ("Natural accuracy (%)", "test_acc", ("train_eval_acc", "train_acc")))
TRAIN_SOURCE = {"train_eval_robust_acc": "eval mode, fixed train subset",
                "train_eval_acc": "eval mode, fixed train subset",
                "train_robust_acc": "running average of the training pass",
                "train_acc": "running average of the training pass"}


@_styled
def gap_figure(run: RunData, labels: list[str] | None = None,
               size: str = DEFAULT_SIZE) -> list[tuple[str, Figure]]:
    """Figures 3(b,c)/4(b,c): train (dashed) and test (solid) accuracy, robust and natural in
    separate panels, one colour per setting; Figure 4(c)'s panels add the robust generalisation
    gap train - test (dotted, percentage points on the same axis, as the paper draws it).

    "Train" is the eval-mode pass on the fixed train subset (``train_eval_*``), which measures
    the same weights as the test columns; the running average of the training pass is used, and
    named in the legend, only for trials that did not record it. By default two figures per
    setting (:data:`GAP_SETS`): ``gap-...-fix_lr`` (rows 3(b), 3(c)) and ``gap-...-awp`` (rows
    4(b), 4(c)); ``labels`` draws one figure of exactly those settings instead (robust and
    natural panels of all of them, then a gap panel each). Two panels per row at either size;
    settings absent from the run are left out and named in the title, and so is a row left
    empty; a row missing some of its settings no longer draws the paper's panel, so its panels
    are titled with the settings they draw instead of the paper's number. Robust panels' y
    labels name the attacks of their test and train curves.
    """
    figures = []
    for values, all_rows in _settings(run):
        if labels is not None:
            wanted = tuple(labels)
            choices = {"": (("", "pair", wanted), ("", "gap", wanted))}
        else:
            choices = {name: tuple((row.name, row.kind,
                                    tuple(label(values["method"], i, l) for i, l in row.settings))
                                   for row in rows)
                       for name, rows in GAP_SETS.items()}
        for suffix, chosen in choices.items():
            figure = _gap(values, all_rows, chosen, size)
            if figure is not None:
                figures.append((_stem("gap", values, suffix), figure))
    return figures


def _train_column(rows: pd.DataFrame, preferred: tuple[str, ...]) -> str:
    """The first of ``preferred`` that these trials recorded (train_eval_size 0 leaves NaN)."""
    return next((c for c in preferred if c in rows and rows[c].notna().all()), preferred[-1])


def _gap(values: dict[str, str], rows: pd.DataFrame,
         chosen: tuple[tuple[str, str, tuple[str, ...]], ...], size: str) -> Figure | None:
    """One gap figure of the rows in ``chosen`` ((title, kind, labels)), each row holding the
    labels present in ``rows`` (None if no row has any)."""
    present = set(rows.label)
    panels = []  # (title, kind, labels, accuracy) with accuracy an ACCURACIES entry
    missing: dict[str, list[str]] = {}  # a setting absent from the run -> the rows that want it
    for title, kind, labels in chosen:
        names = [n for n in labels if n in present]
        for name in labels:
            if name not in present:
                missing.setdefault(name, []).append(title)
        if not names:
            continue
        if len(names) < len(labels):  # not what the paper's panel draws: named by what it does
            title = ", ".join(names) if kind == "pair" else ""
        if kind == "pair":
            panels += [(f"{title} {acc[0].split()[0].lower()}".strip(), kind, names, acc)
                       for acc in ACCURACIES]
        else:
            panels += [(f"{title} {name}".strip(), kind, [name], ACCURACIES[0]) for name in names]
    if not panels:
        return None
    drawn = rows[rows.label.isin({n for p in panels for n in p[2]})]
    baselines = set(drawn.label[drawn.intervention == "none"])
    others = iter(PALETTE * 4)  # the baseline in black, the rest in palette order
    colours = {n: BASELINE_COLOUR if n in baselines else next(others)
               for n in dict.fromkeys(n for p in panels for n in p[2])}
    grid_rows = math.ceil(len(panels) / 2)
    # Rows of panels with their titles and ticks, the title, and the legend's two columns.
    legend_columns = 2 if size == "full" else 1
    legend_lines = math.ceil((len(colours) + 3) / legend_columns)
    height = grid_rows * (PANEL_HEIGHT[size] + 0.55) + 0.9 + 0.16 * legend_lines
    fig = Figure(figsize=(WIDTHS[size], height), layout="constrained")
    axes = fig.subplots(grid_rows, 2, squeeze=False).ravel()
    sources, curves = set(), []
    for ax, (title, kind, names, (ylabel, test_col, train_cols)) in zip(axes, panels):
        for name in names:
            setting = rows[rows.label == name]
            train_col = _train_column(setting, train_cols)
            sources.add(TRAIN_SOURCE[train_col])
            test, train = _curves(setting, test_col)[name], _curves(setting, train_col)[name]
            _draw(ax, test, colours[name], "-", legend=f"{name} (test)")
            _draw(ax, train, colours[name], "--", legend=f"{name} (train)")
            curves += [test, train]
            if kind == "gap":
                # The gap of the seed-mean curves; no band (a min..max of a difference would
                # mix different seeds' extremes).
                diff = train.y - test.y
                _draw(ax, Curve(name, test.x, diff, diff, diff, 1, test.complete),
                      colours[name], ":", legend=f"{name} (gap)")
        if kind == "gap":
            ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(title)
        if kind == "gap":
            ylabel = "Robust accuracy, gap (%, pp)"
        if test_col == "test_robust_acc":  # the attacks of its test and train curves
            panel_rows = rows[rows.label.isin(names)]
            used = [f"{role} {attack(column, panel_rows)}" for role, column in
                    (("test", test_col), ("train", _train_column(panel_rows, train_cols)))]
            ylabel += "\n" + ", ".join(used)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)  # an odd number of gap panels leaves one cell empty
    for ax in axes[len(panels) - 2:len(panels)]:  # above the legend, so not fig.supxlabel
        ax.set_xlabel(EPOCH_LABEL)
    # One legend for the figure: a colour per setting, then what each line style means.
    running = set(drawn.label[~drawn.complete])
    handles = [Line2D([], [], color=c, label=f"{n} (running)" if n in running else n)
               for n, c in colours.items()]
    handles += [Line2D([], [], color="grey", linestyle="-", label="test"),
                Line2D([], [], color="grey", linestyle="--",
                       label="train: " + " / ".join(sorted(sources)))]
    if any(p[1] == "gap" for p in panels):
        handles.append(Line2D([], [], color="grey", linestyle=":",
                              label="robust gap: train − test (pp)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=legend_columns, frameon=False)
    parts = [_setting_title(values), "train vs test"] + _seeds_note(curves)
    for name, wanted_by in missing.items():
        where = f" (Figure {', '.join(wanted_by)})" if any(wanted_by) else ""
        parts.append(f"{name} not in this run{where}")
    _suptitle(fig, parts + ([RUNNING_NOTE] if running else []), size)
    return fig


def _mean_curve_best_last(curve: Curve) -> tuple[float, float]:
    """Max over epochs and final epoch of a seed-mean curve: with one seed these are the trial's
    Best and Last (``curves.best_last``); with several, not the mean of per-seed Best and Last
    that the tables show, and the figure's title says so."""
    return float(np.max(curve.y)), float(curve.y[-1])


@_styled
def heatmap(run: RunData, size: str = DEFAULT_SIZE) -> list[tuple[str, Figure]]:
    """The whole study at a glance: rows the 15 layer subsets, columns the interventions present.

    Colour: Diff = Best − Last test robust accuracy (percentage points, >= 0, the tables' sign;
    sequential colormap, darker = a larger drop from the best epoch). Text: Best (%) over
    ``(Diff)``, e.g. ``52.3\n(8.1)``; ``*`` marks a trial still running; missing cells are grey
    with "–". The baselines' Best/Last/Diff are in the title. With several seeds a cell is the
    seed-mean curve's Best and Diff, which the title says (the tables average per-seed values).
    The colour scale runs from 0 to the largest Diff among the cells and the baselines (at least
    1 pp), so a cell as dark as it gets drops as much as the worst setting, baselines included.
    """
    figures = []
    for values, rows in _settings(run):
        present = [i for i in strategies.layer_wise() if (rows.intervention == i).any()]
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
        diff = best - last  # Diff = Best - Last, as in the tables
        fig = Figure(figsize=(WIDTHS[size], 6.4), layout="constrained")
        ax = fig.subplots()
        cmap = matplotlib.colormaps["YlOrRd"].with_extremes(bad="#d0d0d0")  # grey: missing
        baselines, base_diff = [], []
        for base in ("none", "awp_full"):  # AT (or TRADES) first, then AWP
            for curve in _curves(rows[rows.intervention == base], "test_robust_acc").values():
                top_acc, final = _mean_curve_best_last(curve)
                base_diff.append(top_acc - final)
                baselines.append(f"{curve.legend}: Best {top_acc:.1f}, Last {final:.1f}, "
                                 f"Diff {top_acc - final:.1f}")
        # One scale from 0 to the largest Diff of the cells and the baselines, and at least
        # OVERFIT_FLOOR, so that sub-point noise is never drawn in the darkest colour.
        top = max([OVERFIT_FLOOR, *base_diff, *diff[np.isfinite(diff)]])
        norm = Normalize(0.0, top)
        image = ax.imshow(np.ma.masked_invalid(diff), cmap=cmap, norm=norm, aspect="auto")
        for i in range(len(SUBSETS)):
            for j in range(len(present)):
                if np.isnan(best[i, j]):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#555555")
                    continue
                dark = norm(diff[i, j]) > 0.6  # white text on the dark end of the colormap
                star = "*" if running[i, j] else ""
                ax.text(j, i, f"{best[i, j]:.1f}{star}\n({diff[i, j]:.1f})",
                        ha="center", va="center", fontsize=8, linespacing=1.0,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(present)), present)
        ax.set_yticks(range(len(SUBSETS)), [layers.display(s) for s in layers.ALL_SUBSETS])
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        ax.set_ylabel("Layers with the intervention")
        pgd = attack("test_robust_acc", rows)
        fig.colorbar(image, ax=ax, shrink=0.8,
                     label=f"Diff = Best − Last, test robust acc, {pgd} (pp)")
        seeds = rows.seed.nunique()
        parts = [_setting_title(values),
                 f"cell: Best test robust acc % ({pgd}) (Diff = Best − Last)"]
        if seeds > 1:  # then a cell is the seed-mean curve's, not the tables' per-seed mean
            parts.append(f"Best, Last of the mean curve of {seeds} seeds (the tables: mean "
                         "of per-seed values)")
        parts += baselines
        if not rows.complete.all():
            parts.append("partial run: * = still running")
        _suptitle(fig, parts, size)
        figures.append((_stem("heatmap", values), fig))
    return figures


@dataclass(frozen=True)
class FigureOptions:
    """What ``ablate report`` passes to every figure builder (each uses what applies to it)."""

    metric: str = "test_robust_acc"  # the intervention grids' curve column
    settings: tuple[str, ...] = ()  # labels for the gap figure instead of the paper's sets
    size: str = DEFAULT_SIZE  # a key of WIDTHS
    ylim: tuple[float, float] | None = None  # the grids' y range, in the metric's plot units


@dataclass(frozen=True)
class FigureKind:
    """A figure name's builder: (run, options) -> [(file stem, figure)]."""

    build: Callable[[RunData, FigureOptions], list[tuple[str, Figure]]]
    what: str  # one line for the README and --help


FIGURES: dict[str, FigureKind] = {
    **{iv: FigureKind(lambda run, o, iv=iv: intervention_grid(run, iv, o.metric, o.size, o.ylim),
                      f"Figure {n}(a): the {iv} grid, four panels of layer subsets")
       for iv, n in (("fix_param", 2), ("fix_lr", 3), ("awp", 4))},
    "gap": FigureKind(lambda run, o: gap_figure(run, list(o.settings) or None, o.size),
                      "Figures 3(b,c), 4(b,c): train and test accuracy, robust and natural"),
    "heatmap": FigureKind(lambda run, o: heatmap(run, o.size),
                          "15 subsets x interventions, coloured by Diff = Best - Last"),
}


def write_figures(run: RunData, names: Iterable[str], out: Path, metric: str = "test_robust_acc",
                  settings: Iterable[str] = (), size: str = DEFAULT_SIZE,
                  ylim: tuple[float, float] | None = None) -> list[Path]:
    """Save the named figures (names of ``FIGURES``, checked by the caller; each setting's) as
    PNG (300 dpi) and PDF (TrueType fonts) under ``out``, ``size`` wide (a key of WIDTHS).

    ``metric`` and ``ylim`` apply to the intervention grids; ``settings`` (labels), when given,
    are the curves of the gap figure instead of the paper's two sets. A figure without data in
    this run (say, no fix_param trials) is skipped. Returns the written paths; the figures are
    released.
    """
    out = Path(out)
    options = FigureOptions(metric, tuple(settings), size, ylim)
    written: list[Path] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        for stem, fig in FIGURES[name].build(run, options):
            for suffix in ("png", "pdf"):
                path = out / f"{stem}.{suffix}"
                # The font type is read when saving, so the style applies here too.
                with atomic_path(path) as tmp, matplotlib.rc_context(STYLE):
                    fig.savefig(tmp, format=suffix, dpi=DPI)  # the temporary name hides it
                written.append(path)
            fig.clear()  # not pyplot-managed, so nothing to close: drop its artists now
    return written
