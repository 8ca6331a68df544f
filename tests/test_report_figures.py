"""The paper's figure grids, the gap figure and the heatmap, drawn from a real (tiny) run."""

from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_sweep_in_process, tiny_study
from matplotlib.image import imread
from matplotlib.text import Text

from ablation.cli import main
from ablation.curves import best_last
from ablation.errors import AblateError
from ablation.report import load_run
from ablation.report.figures import (
    EMPTY_PANEL,
    FIGURES,
    SUBSETS,
    WIDTHS,
    FigureOptions,
    gap_figure,
    heatmap,
    intervention_grid,
    write_figures,
)

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
    """Legend order: the baseline first (AT; full AWP in the awp grid, as the paper's Figure
    4(a) draws "AT_awp_standard"), then the panel's subsets in the paper's order."""
    panels = [["1", "2", "3", "4"], ["1, 2", "1, 3", "1, 4"], ["2, 3", "2, 4", "3, 4"],
              ["1, 2, 3", "1, 2, 4", "1, 3, 4", "2, 3, 4", "1, 2, 3, 4"]]
    baseline = "AWP" if intervention == "awp" else "AT"
    return [[baseline] + [f"AT_{intervention}_[{s}]" for s in panel] for panel in panels]


@pytest.mark.parametrize("intervention", ["fix_param", "fix_lr", "awp"])
def test_grid_panels_hold_the_papers_settings_and_the_stored_curves(run, intervention):
    (stem, fig), = intervention_grid(run, intervention)
    assert stem == intervention + STEM
    axes = fig.axes
    assert len(axes) == 4
    for ax, labels in zip(axes, expected_panels(intervention)):
        assert legend(ax) == labels
    assert fig.get_supxlabel() == "Epoch (0-based)"
    assert fig.get_supylabel() == "Test robust accuracy, PGD-2 (%)"  # tiny_study's test_steps
    assert [ax.get_title() for ax in axes] == ["Single layers", "Pairs with layer 1",
                                               "Other pairs", "Triples and all four"]
    assert not [t for ax in axes for t in ax.texts]  # every panel has its trials: no note
    assert len({ax.get_ylim() for ax in axes}) == 1  # one y range for the four panels
    label = f"AT_{intervention}_[3, 4]"
    np.testing.assert_allclose(line(axes[2], label).get_ydata(),
                               stored(run, label, "test_robust_acc"))
    baseline = expected_panels(intervention)[0][0]
    np.testing.assert_allclose(line(axes[0], baseline).get_xdata(), [0, 1])  # as stored
    np.testing.assert_allclose(line(axes[0], baseline).get_ydata(),
                               stored(run, baseline, "test_robust_acc"))
    assert line(axes[0], baseline).get_color() == "black"
    title = fig.get_suptitle()
    assert intervention in title and "L∞" in title and "partial" not in title


def test_grid_of_another_metric_plots_that_column_and_names_it(run):
    (stem, fig), = intervention_grid(run, "fix_lr", "train_robust_acc")
    assert stem == "fix_lr" + STEM + "-train_robust_acc"
    assert fig.get_supylabel() == "Train robust accuracy, 1-step AT attack (%)"  # train_steps
    np.testing.assert_allclose(line(fig.axes[3], "AT_fix_lr_[1, 2, 3, 4]").get_ydata(),
                               stored(run, "AT_fix_lr_[1, 2, 3, 4]", "train_robust_acc"))
    (_, loss), = intervention_grid(run, "awp", "test_robust_loss")  # losses are not percent
    np.testing.assert_allclose(line(loss.axes[0], "AWP").get_ydata(),
                               stored(run, "AWP", "test_robust_loss") / 100)
    with pytest.raises(AblateError, match="colour"):
        intervention_grid(run, "fix_lr", "colour")


def test_heatmap_cells_are_best_and_diff_best_minus_last_from_the_parquet(run, study_run):
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
    # One sign everywhere, the tables' Diff = Best - Last: the colour and the text agree.
    assert cells[(0, 13)] == f"{best:.1f}\n({best - last:.1f})"
    np.testing.assert_allclose(image.get_array()[13, 0], best - last)
    at = curves[curves.intervention == "none"].sort_values("epoch").test_robust_acc * 100
    title = fig.get_suptitle().replace("\n", " · ")
    assert (f"AT: Best {at.max():.1f}, Last {at.iloc[-1]:.1f}, "
            f"Diff {at.max() - at.iloc[-1]:.1f}") in title
    assert "Diff = Best − Last" in title and "seed" not in title  # one seed: the tables' numbers
    assert "Diff = Best − Last" in fig.axes[1].get_ylabel()  # the colourbar
    assert "overfitting" not in fig.axes[1].get_ylabel() + title  # the demo shows none


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
    (_, heat), = heatmap(seeds)  # a cell is the seed-mean curve's, not the tables' number
    assert "Best, Last of the mean curve of 3 seeds (the tables: mean of per-seed values)" \
        in heat.get_suptitle().replace("\n", " · ").split(" · ")


def test_heatmap_marks_missing_cells(run):
    fewer = replace(run, curves=run.curves[run.curves.label != "AT_awp_[1, 3]"])
    (_, fig), = heatmap(fewer)
    ax = fig.axes[0]
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert cells[(2, SUBSETS.index("1,3"))] == "–"
    assert np.ma.is_masked(ax.get_images()[0].get_array()[SUBSETS.index("1,3"), 2])


def names(ax):
    return [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_gap_figures_are_the_papers_panels_with_eval_mode_train_curves(run):
    (lr_stem, lr_fig), (awp_stem, awp_fig) = gap_figure(run)
    assert (lr_stem, awp_stem) == ("gap" + STEM + "-fix_lr", "gap" + STEM + "-awp")
    # Figure 3(b): AT vs a fixed LR on all layers; 3(c): latter layers vs all; robust and
    # natural accuracy in separate panels.
    rob_b, nat_b, rob_c, nat_c = lr_fig.axes
    assert [ax.get_title() for ax in lr_fig.axes] == ["3(b) robust", "3(b) natural",
                                                      "3(c) robust", "3(c) natural"]
    everything = "AT_fix_lr_[1, 2, 3, 4]"
    assert names(rob_b) == names(nat_b) == ["AT (test)", "AT (train)", f"{everything} (test)",
                                            f"{everything} (train)"]
    assert names(rob_c) == ["AT_fix_lr_[3, 4] (test)", "AT_fix_lr_[3, 4] (train)",
                            f"{everything} (test)", f"{everything} (train)"]
    # Train is the eval-mode pass on the fixed train subset, not the running average.
    for ax, test_col, train_col in ((rob_b, "test_robust_acc", "train_eval_robust_acc"),
                                    (nat_b, "test_acc", "train_eval_acc")):
        np.testing.assert_allclose(line(ax, "AT (train)").get_ydata(),
                                   stored(run, "AT", train_col))
        np.testing.assert_allclose(line(ax, "AT (test)").get_ydata(),
                                   stored(run, "AT", test_col))
    assert not np.allclose(stored(run, "AT", "train_eval_robust_acc"),
                           stored(run, "AT", "train_robust_acc"))  # so the check can tell
    test, train = line(rob_c, "AT_fix_lr_[3, 4] (test)"), line(rob_c, "AT_fix_lr_[3, 4] (train)")
    assert test.get_color() == train.get_color()
    assert (test.get_linestyle(), train.get_linestyle()) == ("-", "--")
    assert line(rob_b, f"{everything} (test)").get_color() == \
        line(nat_c, f"{everything} (train)").get_color()  # one colour per setting
    assert line(rob_b, "AT (test)").get_color() == "black"
    # One legend per figure: the settings' colours, then what each line style means.
    assert all(ax.get_legend() is None for ax in lr_fig.axes)
    (shared,) = lr_fig.legends
    texts = [t.get_text() for t in shared.get_texts()]
    assert texts[:3] == ["AT", everything, "AT_fix_lr_[3, 4]"]
    assert texts[3:] == ["test", "train: eval mode, fixed train subset"]
    # Figure 4(b): AWP on the front vs the latter layers; 4(c): full AWP's and AT's gap.
    assert [ax.get_title() for ax in awp_fig.axes] == ["4(b) robust", "4(b) natural",
                                                       "4(c) AWP", "4(c) AT"]
    assert names(awp_fig.axes[0])[::2] == ["AT_awp_[1, 2, 3] (test)", "AT_awp_[3, 4] (test)"]
    assert names(awp_fig.axes[2]) == ["AWP (test)", "AWP (train)", "AWP (gap)"]
    gap = line(awp_fig.axes[2], "AWP (gap)")
    np.testing.assert_allclose(gap.get_ydata(), stored(run, "AWP", "train_eval_robust_acc")
                               - stored(run, "AWP", "test_robust_acc"))
    assert gap.get_linestyle() == ":"
    assert len({line(awp_fig.axes[i], f"{n} (test)").get_color()
                for i, n in ((0, "AT_awp_[1, 2, 3]"), (0, "AT_awp_[3, 4]"), (2, "AWP"),
                             (3, "AT"))}) == 4
    assert "robust gap: train − test (pp)" in [t.get_text() for t in awp_fig.legends[0].texts]
    (stem, chosen), = gap_figure(run, ["AT_fix_param_[4]"])
    assert stem == "gap" + STEM
    assert [ax.get_title() for ax in chosen.axes if ax.get_visible()] == [
        "robust", "natural", "AT_fix_param_[4]"]
    assert gap_figure(run, ["nothing-like-this"]) == []


def test_gap_falls_back_to_the_running_average_and_says_so(run):
    curves = run.curves.copy()
    curves[["train_eval_robust_acc", "train_eval_acc"]] = np.nan  # train_eval_size: 0
    (_, fig), _ = gap_figure(replace(run, curves=curves))
    np.testing.assert_allclose(line(fig.axes[0], "AT (train)").get_ydata(),
                               stored(run, "AT", "train_robust_acc"))
    np.testing.assert_allclose(line(fig.axes[1], "AT (train)").get_ydata(),
                               stored(run, "AT", "train_acc"))
    assert "train: running average of the training pass" in [
        t.get_text() for t in fig.legends[0].get_texts()]


def test_epoch_axis_counts_as_the_tables_best_epoch(run):
    rows = run.curves[run.curves.label == "AT_fix_lr_[3, 4]"].sort_values("epoch")
    (_, fig), = intervention_grid(run, "fix_lr")
    drawn = line(fig.axes[2], "AT_fix_lr_[3, 4]")
    assert drawn.get_xdata()[np.argmax(drawn.get_ydata())] == best_last(rows)["best_epoch"]
    assert list(drawn.get_xdata()) == list(rows.epoch)


def test_awp_grid_without_full_awp_says_so_and_does_not_stand_in_at(run):
    no_awp = replace(run, curves=run.curves[run.curves.intervention != "awp_full"])
    (_, fig), = intervention_grid(no_awp, "awp")
    assert legend(fig.axes[0])[0] == "AT_awp_[1]"
    assert "AWP baseline (awp_full) not in this run" in fig.get_suptitle()


def test_an_incomplete_grid_says_what_is_absent_and_titles_panels_by_what_they_draw(run):
    """The old demo's design: fix_lr and awp on [3, 4] and [1, 2], AT, no AWP baseline."""
    kept = {"AT", "AT_fix_lr_[3, 4]", "AT_fix_lr_[1, 2]", "AT_awp_[3, 4]", "AT_awp_[1, 2]"}
    few = replace(run, curves=run.curves[run.curves.label.isin(kept)])
    for intervention in ("fix_lr", "awp"):
        (_, fig), = intervention_grid(few, intervention)
        notes = [[t.get_text() for t in ax.texts] for ax in fig.axes]
        assert notes == [[EMPTY_PANEL], [], [], [EMPTY_PANEL]]  # singles; triples and all four
        assert "no trial of this\ngroup in the run" == EMPTY_PANEL
        assert [ax.get_title() for ax in fig.axes][::3] == ["Single layers",
                                                            "Triples and all four"]
        assert fig.get_supylabel() == "Test robust accuracy, PGD-2 (%)"
    assert "AWP baseline (awp_full) not in this run" in fig.get_suptitle()  # the awp grid's
    (_, lr_fig), (_, awp_fig) = gap_figure(few)
    # Figure 3(b) is AT vs fix_lr on all layers, 3(c) [3, 4] vs all layers: neither is drawn,
    # so the panels are named by the settings they hold, and the title says what is missing.
    assert [ax.get_title() for ax in lr_fig.axes] == [
        "AT robust", "AT natural", "AT_fix_lr_[3, 4] robust", "AT_fix_lr_[3, 4] natural"]
    assert [ax.get_title() for ax in awp_fig.axes if ax.get_visible()] == [
        "AT_awp_[3, 4] robust", "AT_awp_[3, 4] natural", "AT"]
    lr_title = lr_fig.get_suptitle().replace("\n", " · ")
    assert "AT_fix_lr_[1, 2, 3, 4] not in this run (Figure 3(b), 3(c))" in lr_title
    awp_title = awp_fig.get_suptitle().replace("\n", " · ")
    assert "AT_awp_[1, 2, 3] not in this run (Figure 4(b))" in awp_title
    assert "AWP not in this run (Figure 4(c))" in awp_title
    # Robust panels name the attacks of their curves: PGD-test_steps on the test set,
    # PGD-train_steps on the fixed train subset; natural ones name none.
    assert lr_fig.axes[0].get_ylabel() == "Robust accuracy (%)\ntest PGD-2, train PGD-1"
    assert awp_fig.axes[2].get_ylabel() == "Robust accuracy, gap (%, pp)\ntest PGD-2, train PGD-1"
    assert lr_fig.axes[1].get_ylabel() == "Natural accuracy (%)"
    (_, heat), = heatmap(few)
    assert "PGD-2" in heat.axes[1].get_ylabel()


def test_ylim_fixes_the_grids_y_range(run):
    (_, fig), = intervention_grid(run, "fix_lr", ylim=(40.0, 60.0))
    assert {ax.get_ylim() for ax in fig.axes} == {(40.0, 60.0)}


def all_figures(run, size):
    options = FigureOptions(size=size)
    return [fig for kind in FIGURES.values() for _, fig in kind.build(run, options)]


@pytest.mark.parametrize("size", ["column", "full"])
def test_figures_are_the_chosen_width_with_8_to_9_pt_fonts(run, size):
    figures = all_figures(run, size)
    assert len(figures) == 6
    for fig in figures:
        fig.savefig(BytesIO(), format="png", dpi=20)  # outside the style: what a caller may do
        assert fig.get_size_inches()[0] == pytest.approx(WIDTHS[size])
        sizes = {t.get_fontsize() for t in fig.findobj(Text) if t.get_text() and t.get_visible()}
        assert sizes and min(sizes) >= 8 and max(sizes) <= 9, (fig.get_suptitle(), sizes)


def test_legends_lie_outside_every_axes(run):
    for fig in all_figures(run, "column"):
        fig.draw_without_rendering()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + fig.legends
        for found in legends:
            assert found._loc != 0  # never loc="best", which lands on the curves
            box = found.get_window_extent()
            for ax in (ax for ax in fig.axes if ax.get_visible()):
                assert not box.overlaps(ax.get_window_extent()), fig.get_suptitle()


def test_pdfs_embed_truetype_fonts_not_type3(run, tmp_path):
    written = write_figures(run, ["fix_lr", "gap", "heatmap"], tmp_path)
    for pdf in (p for p in written if p.suffix == ".pdf"):
        data = pdf.read_bytes()
        assert b"/Type3" not in data and b"/FontFile2" in data, pdf.name  # TrueType embedded


@pytest.mark.parametrize("args, needle", [
    (("--ylim", "40"), "--ylim '40'"), (("--ylim", "60,40"), "--ylim '60,40'"),
    (("--ylim", "a,b"), "LOW,HIGH"), (("--ylim", "nan,50"), "LOW < HIGH"),
    (("--size", "huge"), "--size 'huge' is unknown; choose from column, full")])
def test_report_refuses_a_bad_size_or_ylim_in_one_line(study_run, tmp_path, capsys, args,
                                                       needle):
    with pytest.raises(SystemExit) as stopped:
        main(["report", str(study_run), "--figure", "fix_lr", "--out", str(tmp_path), *args])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_report_size_and_ylim_reach_the_saved_figures(study_run, tmp_path):
    main(["report", str(study_run), "--figure", "fix_lr", "--size", "column", "--ylim", "40,60",
          "--out", str(tmp_path)])
    width = imread(tmp_path / f"fix_lr{STEM}.png").shape[1]
    assert width == round(WIDTHS["column"] * 300)  # 3.5 in at 300 dpi


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
    assert line(panel, f"{running} (running)").get_linestyle() == "-"  # keeps its meaning
    (mark,) = [ln for ln in panel.get_lines() if ln.get_label() == "_running"]
    assert mark.get_marker() == "o" and list(mark.get_xdata()) == [0]  # its latest epoch
    assert "partial run" in fig.get_suptitle()
    (_, heat), = heatmap(partial)
    assert "partial run" in heat.get_suptitle()
    assert any(t.get_text().split("\n")[0].endswith("*") for t in heat.axes[0].texts)
