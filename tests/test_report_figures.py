"""The paper's figure grids, the gap figure and the heatmap, drawn from a real (tiny) run."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_sweep_in_process, tiny_study

from ablation.errors import AblateError
from ablation.report import load_run
from ablation.report.figures import (FIGURES, SUBSETS, gap_figure, heatmap, intervention_grid,
                                     write_figures)

STEM = "-synthetic-linf-preact_small-at"


@pytest.fixture(scope="module")
def run(study_run):
    return load_run(study_run)


def legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def line(ax, label):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def stored(run, label, metric):
    rows = run.curves[run.curves.label == label].sort_values("epoch")
    return rows[metric].to_numpy() * 100


def expected_panels(intervention):
    """Legend order: the AT baseline first, then the panel's subsets in the paper's order."""
    panels = [["1", "2", "3", "4"], ["1, 2", "1, 3", "1, 4"], ["2, 3", "2, 4", "3, 4"],
              ["1, 2, 3", "1, 2, 4", "1, 3, 4", "2, 3, 4", "1, 2, 3, 4"]]
    return [["AT"] + [f"AT_{intervention}_[{s}]" for s in panel] for panel in panels]


@pytest.mark.parametrize("intervention", ["fix_param", "fix_lr", "awp"])
def test_grid_panels_hold_the_papers_settings_and_the_stored_curves(run, intervention):
    (stem, fig), = intervention_grid(run, intervention)
    assert stem == intervention + STEM
    axes = fig.axes
    assert len(axes) == 4
    for ax, labels in zip(axes, expected_panels(intervention)):
        assert legend(ax) == labels
        assert ax.get_xlabel() == "Epoch"
    assert axes[0].get_ylabel() == "Test robust accuracy (%)"
    assert len({ax.get_ylim() for ax in axes}) == 1  # one y range for the four panels
    label = f"AT_{intervention}_[3, 4]"
    np.testing.assert_allclose(line(axes[2], label).get_ydata(),
                               stored(run, label, "test_robust_acc"))
    np.testing.assert_allclose(line(axes[0], "AT").get_xdata(), [1, 2, 3])
    assert line(axes[0], "AT").get_color() == "black"
    title = fig.get_suptitle()
    assert intervention in title and "L∞" in title and "partial" not in title


def test_grid_of_another_metric_plots_that_column_and_names_it(run):
    (stem, fig), = intervention_grid(run, "fix_lr", "train_robust_acc")
    assert stem == "fix_lr" + STEM + "-train_robust_acc"
    assert fig.axes[0].get_ylabel() == "Train robust accuracy (%)"
    np.testing.assert_allclose(line(fig.axes[3], "AT_fix_lr_[1, 2, 3, 4]").get_ydata(),
                               stored(run, "AT_fix_lr_[1, 2, 3, 4]", "train_robust_acc"))
    (_, loss), = intervention_grid(run, "awp", "test_robust_loss")  # losses are not percent
    np.testing.assert_allclose(line(loss.axes[0], "AT").get_ydata(),
                               stored(run, "AT", "test_robust_loss") / 100)
    with pytest.raises(AblateError, match="colour"):
        intervention_grid(run, "fix_lr", "colour")


def test_heatmap_cells_are_best_and_last_minus_best_from_the_parquet(run, study_run):
    (stem, fig), = heatmap(run)
    assert stem == "heatmap" + STEM
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.get_array().shape == (15, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fix_param", "fix_lr", "awp"]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows[0] == "[1]" and rows[4] == "[1, 2]" and rows[-1] == "[1, 2, 3, 4]"
    assert len(SUBSETS) == 15
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert len(cells) == 45
    # By hand: fix_param (column 0) on layers 2,3,4 (row 13).
    assert SUBSETS.index("2,3,4") == 13
    curves = pd.read_parquet(study_run / "curves")
    acc = curves[(curves.intervention == "fix_param") & (curves.layers == "2,3,4")]
    acc = acc.sort_values("epoch").test_robust_acc * 100
    best, last = acc.max(), acc.iloc[-1]
    assert cells[(0, 13)] == f"{best:.1f}\n({last - best:.1f})"
    np.testing.assert_allclose(image.get_array()[13, 0], best - last)
    at = curves[curves.intervention == "none"].sort_values("epoch").test_robust_acc * 100
    assert f"AT: best {at.max():.1f}, last {at.iloc[-1]:.1f}" in fig.get_suptitle()
    assert "overfitting" in fig.axes[1].get_ylabel()  # the colourbar


def test_seeds_are_drawn_as_their_mean_with_a_min_max_band(seeds_run):
    seeds = load_run(seeds_run)
    (_, fig), = intervention_grid(seeds, "fix_lr")
    panel = fig.axes[2]  # [2, 3] [2, 4] [3, 4]
    rows = seeds.curves[seeds.curves.label == "AT_fix_lr_[3, 4]"]
    per_epoch = rows.groupby("epoch").test_robust_acc
    np.testing.assert_allclose(line(panel, "AT_fix_lr_[3, 4]").get_ydata(),
                               100 * per_epoch.mean().to_numpy())
    bands = [c for c in panel.collections if len(c.get_paths())]
    assert len(bands) == 2  # the baseline's and the setting's
    ys = np.concatenate([p.vertices[:, 1] for c in bands for p in c.get_paths()])
    # the bands span exactly the seeds' extremes of both settings (baseline and fix_lr)
    assert np.isclose(ys.max(), 100 * seeds.curves.test_robust_acc.max())
    assert np.isclose(ys.min(), 100 * seeds.curves.test_robust_acc.min())
    assert per_epoch.max().gt(per_epoch.min()).any()  # the seeds differ: a band, not a line


def test_heatmap_marks_missing_cells(run):
    fewer = replace(run, curves=run.curves[run.curves.label != "AT_awp_[1, 3]"])
    (_, fig), = heatmap(fewer)
    ax = fig.axes[0]
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert cells[(2, SUBSETS.index("1,3"))] == "–"
    assert np.ma.is_masked(ax.get_images()[0].get_array()[SUBSETS.index("1,3"), 2])


def test_gap_figures_plot_train_test_and_their_difference(run):
    (lr_stem, lr_fig), (awp_stem, awp_fig) = gap_figure(run)
    assert (lr_stem, awp_stem) == ("gap" + STEM + "-fix_lr", "gap" + STEM + "-awp")
    assert legend(lr_fig.axes[1]) == ["AT", "AT_fix_lr_[3, 4]", "AT_fix_lr_[1, 2, 3, 4]"]
    acc_ax, gap_ax = awp_fig.axes
    labels = ["AT", "AWP", "AT_awp_[1, 2, 3]", "AT_awp_[3, 4]"]
    assert legend(gap_ax) == labels
    assert legend(acc_ax) == [f"{n} ({part})" for n in labels for part in ("test", "train")]
    for name in ("AT", "AT_awp_[3, 4]"):
        np.testing.assert_allclose(line(gap_ax, name).get_ydata(),
                                   stored(run, name, "train_robust_acc")
                                   - stored(run, name, "test_robust_acc"))
        test, train = line(acc_ax, f"{name} (test)"), line(acc_ax, f"{name} (train)")
        assert test.get_color() == train.get_color()
        assert (test.get_linestyle(), train.get_linestyle()) == ("-", "--")
    assert line(gap_ax, "AT").get_color() == "black"
    assert len({line(gap_ax, n).get_color() for n in labels}) == len(labels)
    (stem, chosen), = gap_figure(run, ["AT_fix_param_[4]"])
    assert stem == "gap" + STEM and legend(chosen.axes[1]) == ["AT_fix_param_[4]"]
    assert gap_figure(run, ["nothing-like-this"]) == []


def test_write_figures_saves_png_and_pdf_per_figure(run, tmp_path):
    written = write_figures(run, FIGURES, tmp_path / "figs")
    stems = [f"{name}{STEM}" for name in FIGURES if name != "gap"]
    stems += [f"gap{STEM}-fix_lr", f"gap{STEM}-awp"]
    assert sorted(written) == sorted(tmp_path / "figs" / f"{s}.{ext}"
                                     for s in stems for ext in ("png", "pdf"))
    for path in written:
        assert path.stat().st_size > 1000
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[1].read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(p.name for p in written)
    assert list(FIGURES) == ["fix_param", "fix_lr", "awp", "gap", "heatmap"]  # the CLI's names


def test_figures_without_data_are_skipped(run, tmp_path):
    only_lr = replace(run, curves=run.curves[run.curves.intervention != "fix_param"])
    assert intervention_grid(only_lr, "fix_param") == []
    written = write_figures(only_lr, ["fix_param", "fix_lr"], tmp_path)
    assert [p.name for p in written] == [f"fix_lr{STEM}.png", f"fix_lr{STEM}.pdf"]
    (_, fig), = heatmap(only_lr)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["fix_lr", "awp"]


def test_partial_run_marks_running_trials(tmp_path: Path):
    sweep = tiny_study(epochs=2)
    sweep["grid"] = {"intervention": ["fix_lr"], "layers": [[3, 4], [4]]}
    root = run_sweep_in_process(sweep, tmp_path / "partial", stop_after={0: 1})
    partial = load_run(root)
    assert partial.partial
    stopped = partial.curves.groupby("key").complete.first()
    (running,) = partial.curves[~partial.curves.complete].label.unique()
    assert stopped.sum() == len(stopped) - 1
    (_, fig), = intervention_grid(partial, "fix_lr")
    texts = [t for ax in fig.axes if ax.get_legend() for t in legend(ax)]
    assert f"{running} (running)" in texts
    assert sum(t.endswith(" (running)") for t in texts) == 1
    panel = next(ax for ax in fig.axes if f"{running} (running)" in legend(ax))
    assert line(panel, f"{running} (running)").get_linestyle() == ":"
    assert "partial run" in fig.get_suptitle()
    (_, heat), = heatmap(partial)
    assert "partial run" in heat.get_suptitle()
    assert any(t.get_text().split("\n")[0].endswith("*") for t in heat.axes[0].texts)
