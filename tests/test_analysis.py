"""The notebook API (ablation/analysis.py, ``ablation.open_run``) and the notebook example that
uses it (docs/examples/notebook.py), on finished and partial runs: every number is checked
against the run folder's own files read here with pandas."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_sweep_in_process, small_sweep
from matplotlib.figure import Figure

from ablation import open_run
from ablation.errors import AblateError

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "notebook.py"


def parquet_curves(run: Path) -> pd.DataFrame:
    """Every stored curve row, read straight from the run folder's Parquet files."""
    return pd.read_parquet(run / "curves").sort_values(["key", "epoch"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> Path:
    """AT and fix_lr on [3, 4], 3 epochs; the AT trial stopped after its first epoch."""
    return run_sweep_in_process(small_sweep("partial", epochs=3),
                                tmp_path_factory.mktemp("partial") / "partial",
                                stop_after={1: 1})


def test_open_run_gives_curves_configs_and_states_as_stored(seeds_run):
    run = open_run(seeds_run)
    stored = parquet_curves(seeds_run)
    assert len(run.curves) == len(stored) == 6 * 2 and run.curves.complete.all()
    pd.testing.assert_frame_equal(run.curves[stored.columns].reset_index(drop=True), stored)
    assert set(run.curves.label) == {"AT", "AT_fix_lr_[3, 4]"}
    assert len(run.summary) == 6

    trials = json.loads((seeds_run / "sweep.json").read_text())["trials"]
    configs = run.configs.set_index("key")
    assert sorted(configs.index) == sorted(trials)
    for key, raw in trials.items():
        for field, value in raw.items():  # every field of the sweep's full configs
            want = ",".join(map(str, value)) if isinstance(value, list) else value
            assert configs.loc[key, field] == want, (key, field)
    assert set(configs.state) == {"done"} and set(run.status.state) == {"done"}
    assert configs.label.value_counts().to_dict() == {"AT": 3, "AT_fix_lr_[3, 4]": 3}


def test_tables_and_figures_are_the_reports(seeds_run):
    run = open_run(seeds_run)
    stored = parquet_curves(seeds_run)
    at = stored[stored.intervention == "none"].groupby("key")
    best = 100 * at.test_robust_acc.max()
    last = 100 * at.test_robust_acc.last()

    table = run.tables("best-last")["best-last"]
    row = table.numbers.set_index("name").loc["AT"]
    assert row.seeds == 3
    assert row.pgd_best == pytest.approx(best.mean()) and row.pgd_diff == pytest.approx(
        (best - last).mean())
    assert row.pgd_best_std == pytest.approx(best.std(ddof=1))
    assert list(table.display.Method) == ["AT", "RAT_LR"]
    empty = run.tables("awp-compare")["awp-compare"]
    assert empty.empty and "no AWP" in empty.notes[0]

    grids = run.figures("fix_lr")
    assert list(grids) == ["fix_lr-synthetic-linf-preact_small-at"]
    panels = grids["fix_lr-synthetic-linf-preact_small-at"].axes[0]
    baseline = next(line for line in panels.lines if line.get_label() == "AT")
    mean = 100 * stored[stored.intervention == "none"].groupby("epoch").test_robust_acc.mean()
    assert list(baseline.get_ydata()) == pytest.approx(list(mean))
    assert run.figures("awp") == {}
    gap = run.figures("gap", settings=("RAT_LR",), size="column")
    (figure,) = gap.values()  # the chosen setting alone, RAT_LR named by its label
    assert isinstance(figure, Figure)
    assert {line.get_label() for line in figure.axes[0].lines} == {
        "AT_fix_lr_[3, 4] (test)", "AT_fix_lr_[3, 4] (train)"}


@pytest.mark.parametrize("call, message", [
    (lambda run: run.figures("fix_lrr"), "figure 'fix_lrr' is unknown; choose from fix_param"),
    (lambda run: run.tables("best"), "table 'best' is unknown; choose from best-last"),
    (lambda run: run.figures("gap", settings=("RAT_WP",)), "setting 'RAT_WP' is not in this run"),
    (lambda run: run.figures("fix_lr", size="a4"), "size 'a4' is unknown"),
    (lambda run: run.figures("fix_lr", metric="acc"), "metric 'acc' is not a curve column"),
])
def test_bad_names_are_one_line(seeds_run, call, message):
    with pytest.raises(AblateError, match=message.replace("(", r"\(")):
        call(open_run(seeds_run))


def test_a_folder_that_is_no_run_is_one_line_as_in_ablate_report(tmp_path):
    with pytest.raises(AblateError) as err:
        open_run(tmp_path / "nothing")
    assert str(err.value) == f"{tmp_path / 'nothing'}: not an ablate run folder (no sweep.json)"


def test_a_running_sweep_is_read_as_far_as_it_got_and_refreshed(tmp_path):
    sweep = small_sweep("going", epochs=3)
    root = run_sweep_in_process(sweep, tmp_path / "going", stop_after={0: 1, 1: 2})
    run = open_run(root)
    assert len(run.curves) == 3 and not run.curves.complete.any()
    assert "AT *" in list(run.tables("best-last")["best-last"].display.Method)
    assert set(run.status.state) == {"pending"} and len(run.summary) == 0

    run_sweep_in_process(sweep, root)  # the trials resume from their checkpoints and finish
    assert len(run.curves) == 3, "nothing changes until refresh()"
    assert run.refresh() is run
    pd.testing.assert_frame_equal(run.curves[parquet_curves(root).columns], parquet_curves(root))
    assert len(run.curves) == 6 and run.curves.complete.all()
    assert set(run.configs.state) == {"done"} and len(run.summary) == 2


def test_open_run_loads_neither_torch_nor_ray(seeds_run):
    code = ("import sys\nfrom ablation import open_run\nrun = open_run(sys.argv[1])\n"
            "run.figures('fix_lr'); run.tables('best-last')\n"
            "print(len(run.curves), [m for m in ('torch', 'ray') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code, str(seeds_run)], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "12 []", done.stdout + done.stderr


def gap_onsets(run: Path, threshold: float) -> pd.Series:
    """By hand: per trial, the first epoch whose robust train - test gap is above ``threshold``
    percentage points (NaN: none)."""
    curves = parquet_curves(run)
    onsets = {}
    for key, rows in curves.groupby("key"):
        gap = 100 * (rows.train_eval_robust_acc - rows.test_robust_acc)
        above = rows.epoch[gap > threshold]
        onsets[key] = float(above.iloc[0]) if len(above) else float("nan")
    return pd.Series(onsets, name="gap_onset_epoch").sort_index()


@pytest.mark.parametrize("which", ["finished", "partial"])
def test_the_notebook_example_runs_and_computes_its_number(seeds_run, partial_run, which,
                                                           tmp_path):
    run = seeds_run if which == "finished" else partial_run
    curves = parquet_curves(run)
    gaps = (100 * (curves.train_eval_robust_acc - curves.test_robust_acc)).groupby(
        curves.key).max().sort_values()
    threshold = (gaps.iloc[0] + gaps.iloc[-1]) / 2  # some trials cross it, some never do
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(run), str(out), str(threshold)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out / 'robust_gap.png'}" in done.stdout

    written = pd.read_csv(out / "gap_onset.csv", index_col="key").sort_index()
    want = gap_onsets(run, threshold)
    assert want.notna().any() and want.isna().any()
    pd.testing.assert_series_equal(written.gap_onset_epoch, want, check_names=False,
                                   check_index_type=False)
    assert list(written.complete) == [bool(curves[curves.key == k].epochs.iloc[0]
                                            == (curves.key == k).sum()) for k in written.index]
    assert (out / "robust_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
