"""A run folder opened in a notebook: its curves, summaries, trial configs and states as DataFrames,
and the figures and tables of ``ablate report`` as matplotlib Figures and Tables.

``ablation.open_run(path_or_uri)`` returns a :class:`Run`. Like ``ablate report``, it reads only
the run folder's store (never Ray state), so it works on a copy of the folder and on a sweep that
is still going; :meth:`Run.refresh` reads the folder again (a URI's store is pulled again) for the
epochs written since. Nothing here loads torch or Ray.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .errors import ConfigError, quote
from .report import RunData, label, load_run, paper
from .report.figures import DEFAULT_SIZE, FIGURES, WIDTHS, FigureOptions
from .report.numbers import Table
from .report.tables import TABLES, resolve_settings
from .store import RunDir, status_table


class Run:
    """A run folder's data as of the last :meth:`refresh` (or the opening).

    Attributes:
        curves: one row per (trial, epoch), every identifying config field a column, plus
            ``label`` (the name the figures use: ``AT_fix_lr_[3, 4]``) and ``complete`` (the
            trial has all its epochs; False for a trial still running or interrupted).
        summary: one row per finished trial (``summary.json``'s numbers), plus ``label``.
        configs: one row per trial of the sweep, started or not: ``key``, the full trial config
            (a layer subset written ``"3,4"`` as in the curves), ``label`` and ``state``.
        status: ``ablate status``'s table: key, state (done, running, interrupted, errored,
            pending), epochs ("3/8"), pack, best_robust and current_robust (fractions).
        seconds_left: ``ablate status``'s estimate of the time left (None: nothing timed yet).
        data: the :class:`~ablation.report.RunData` that ``ablate report``'s builders take.
        name: the sweep's name.
    """

    def __init__(self, location: str | Path):
        self.location = location
        self.refresh()

    def refresh(self) -> Run:
        """Read the run folder again, a URI's store pulled first (a one-line AblateError if it is
        not a run folder or no epoch has finished yet, as ``ablate report``); returns the run."""
        self.data: RunData = load_run(self.location)
        folder = RunDir.attach(self.location)  # load_run pulled a URI's store into its mirror
        self.status, self.seconds_left = status_table(folder)
        rows = []
        for config in folder.trials().values():
            row = config.columns()  # the key and the identifying fields, flat as in the curves
            row.update((k, v) for k, v in config.to_dict().items() if k not in row)
            rows.append(row)
        frame = pd.DataFrame(rows)
        frame["label"] = [label(m, i, ls) for m, i, ls in
                          zip(frame.method, frame.intervention, frame.layers)]
        self.configs = frame.merge(self.status[["key", "state"]], on="key", how="left")
        return self

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def curves(self) -> pd.DataFrame:
        return self.data.curves

    @property
    def summary(self) -> pd.DataFrame:
        return self.data.summary

    def figures(self, name: str, metric: str = "test_robust_acc", settings: tuple[str, ...] = (),
                size: str = DEFAULT_SIZE, ylim: tuple[float, float] | None = None
                ) -> dict[str, Figure]:
        """The figures ``ablate report --figure NAME`` draws, by the file stem it saves them
        under (one per setting of the run; none when the run has no trial for it).

        Args:
            name: fix_param, fix_lr, awp (Figures 2-4(a)), gap or heatmap.
            metric: the curve column of the intervention grids (``--metric``).
            settings: labels (``AT_awp_[4]``) or table names (``RAT_LR``): the gap figure
                draws these instead of the paper's sets (``--setting``).
            size: "column" (3.5 in) or "full" (7.2 in) wide (``--size``).
            ylim: the grids' y range in the metric's plot units (``--ylim``).
        """
        _check_name("figure", name, FIGURES)
        if size not in WIDTHS:
            raise ConfigError(f"size {quote(size)} is unknown; choose from {', '.join(WIDTHS)}")
        options = FigureOptions(metric, resolve_settings(self.data, settings), size, ylim)
        return dict(FIGURES[name].build(self.data, options))

    def tables(self, name: str, settings: tuple[str, ...] = (),
               compare: str | None = None) -> dict[str, Table]:
        """The tables ``ablate report --table NAME`` writes, by file stem. A :class:`Table` has
        ``display`` (the strings the report shows), ``numbers`` (raw, in percent) and ``notes``;
        a table without rows is kept, its notes saying why.

        Args:
            name: best-last, awp-compare, ablation or effects.
            settings: extra rows of best-last by label or table name (``--setting``).
            compare: "paper" puts the paper's numbers and the differences under the rows it
                published, as ``ablate report --compare paper``.
        """
        _check_name("table", name, TABLES)
        if compare is not None:
            _check_name("compare", compare, paper.COMPARE)
        labels = list(resolve_settings(self.data, settings))
        return {stem: paper.compare(name, table) if compare and not table.empty else table
                for stem, table, _ in TABLES[name].build(self.data, labels)}

    def __repr__(self) -> str:
        counts = self.status.state.value_counts()
        return (f"<Run {self.name}: {len(self.status)} trials ("
                + ", ".join(f"{n} {state}" for state, n in counts.items()) + f"), {self.location}>")


def _check_name(what: str, name: str, known: Collection[str]) -> None:
    if name not in known:
        raise ConfigError(f"{what} {quote(name)} is unknown; choose from {', '.join(known)}")
