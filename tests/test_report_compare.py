"""The paper's numbers beside a run's (ablation/report/paper.py, ``ablate report --compare
paper``): the shipped transcription against cells read off the paper by hand, and compared tables
of runs with known curves against hand-computed published values, differences and marks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ablation import open_run
from ablation.config import DATASETS, MODELS, THREATS
from ablation.errors import ConfigError
from ablation.report import RunData, label
from ablation.report.paper import (OUTSIDE_NOTE, PAPER_STD, compare, published, unpublished)
from ablation.report.tables import TABLES, ablation_table, awp_compare_table, best_last_table
from conftest import ablate, check_latex, one_error_line

# 2 sqrt(0.6^2 + 0.6^2 / 5): the band of a one-seed row, written out apart from the code's.
ONE_SEED_BAND = 2 * math.sqrt(0.36 + 0.072)


def _paper(table, dataset, threat, model, method, metric, part, layers=""):
    rows = published()
    hit = rows[(rows.table == table) & (rows.dataset == dataset) & (rows.threat == threat)
               & (rows.model == model) & (rows.method == method) & (rows.layers == layers)
               & (rows.metric == metric) & (rows.part == part)]
    assert len(hit) == 1, (table, method, metric, part)
    return hit.value.iloc[0]


def test_transcription_parses_with_valid_keys_and_hand_checked_cells() -> None:
    rows = published()
    assert len(rows) == 12 * 3 * 6 + 9 * 9 + 5 * 9  # Tables 1-3, 4 and 5, every cell once
    assert set(rows.dataset) <= set(DATASETS) and set(rows.model) <= set(MODELS)
    assert set(rows.threat) <= set(THREATS) and set(rows.table) == {1, 2, 3, 4, 5}
    assert set(rows.metric) == {"nat", "pgd", "aa"} and set(rows.part) == {"best", "last", "diff"}
    names = {"AT", "RAT_LR", "RAT_WP", "AWP", "TRADES", "TRADES-AWP", "TRADES-RAT_WP",
             "TRADES_awp"}
    assert set(rows.method) == names
    assert set(rows.layers) == {"", "[-]", "[4]", "[3, 4]", "[2, 3, 4]", "[1, 2, 3, 4]"}
    assert not rows.duplicated(["table", "dataset", "threat", "model", "method", "layers",
                                "metric", "part"]).any()
    # Five cells read off the paper's text by hand (two of them from mangled lines there).
    assert _paper(1, "cifar10", "linf", "preact18", "AT", "pgd", "best") == 52.31
    assert _paper(1, "cifar10", "l2", "wrn34_10", "RAT_LR", "pgd", "last") == 68.94
    assert _paper(2, "cifar100", "l2", "preact18", "RAT_WP", "pgd", "diff") == 0.3
    assert _paper(3, "svhn", "l2", "preact18", "RAT_WP", "aa", "best") == 65.17
    assert _paper(4, "cifar10", "linf", "wrn34_10", "AWP", "nat", "last") == 85.39
    assert _paper(5, "cifar10", "linf", "preact18", "TRADES_awp", "aa", "diff",
                  "[2, 3, 4]") == 0.04


def test_transcription_agrees_with_itself_as_the_paper_does() -> None:
    rows = published().pivot_table(index=["table", "dataset", "threat", "model", "method",
                                          "layers", "metric"], columns="part", values="value")
    # Diff = Best - Last in every row, up to the paper's rounding to two decimals, except in
    # three AutoAttack rows where the paper's own Diff is off (as printed, checked by hand).
    error = (rows.best - rows["last"] - rows["diff"]).abs()
    assert sorted((t, d, th, m, n) for t, d, th, m, n, _, _ in error[error > 0.0201].index) == [
        (2, "cifar100", "l2", "preact18", "RAT_LR"), (2, "cifar100", "linf", "preact18", "RAT_WP"),
        (3, "svhn", "linf", "wrn34_10", "RAT_WP")]
    # Table 4's AT and RAT_WP rows repeat Table 1's; Table 5's rows repeat Table 4's TRADES rows.
    for model in ("preact18", "wrn34_10"):
        for method in ("AT", "RAT_WP"):
            for metric in ("pgd", "aa"):
                for part in ("best", "last", "diff"):
                    assert _paper(4, "cifar10", "linf", model, method, metric, part) == \
                        _paper(1, "cifar10", "linf", model, method, metric, part)
    for layers, method in (("[-]", "TRADES"), ("[3, 4]", "TRADES-RAT_WP"),
                           ("[1, 2, 3, 4]", "TRADES-AWP")):
        for metric in ("nat", "pgd", "aa"):
            assert _paper(5, "cifar10", "linf", "preact18", "TRADES_awp", metric, "best",
                          layers) == _paper(4, "cifar10", "linf", "preact18", method, metric,
                                            "best")


# ----------------------------------------------------------------------------------------------
# A run with known curves: each trial has two epochs, Best at the first, Last the second.

# (method, intervention, layers, seed, model) -> ((robust, clean) at epoch 0, at epoch 1)
TRIALS = {
    ("at", "none", "", 0, "preact18"): ((0.53, 0.80), (0.44, 0.84)),
    ("at", "none", "", 1, "preact18"): ((0.52, 0.81), (0.45, 0.84)),
    ("at", "fix_lr", "3,4", 0, "preact18"): ((0.54, 0.80), (0.4907, 0.80)),
    ("at", "awp_full", "", 0, "preact18"): ((0.5539, 0.8111), (0.5473, 0.8200)),
    ("at", "none", "", 0, "preact34"): ((0.50, 0.80), (0.45, 0.80)),
    ("trades", "none", "", 0, "preact18"): ((0.5267, 0.8277), (0.4965, 0.8294)),
    ("trades", "awp", "3,4", 0, "preact18"): ((0.5533, 0.80), (0.5485, 0.8308)),
    ("trades", "awp_full", "", 0, "preact18"): ((0.55, 0.82), (0.54, 0.82)),
}
AUTOATTACK = {("at", "none", "", 0, "preact18"): (0.48, 0.42),
              ("at", "none", "", 1, "preact18"): (0.47, 0.41)}


def _known_run(test_steps: int = 20) -> RunData:
    rows, summary = [], []
    for (method, iv, layers, seed, model), epochs in TRIALS.items():
        key = f"{model}-{method}-{iv}-{layers.replace(',', '')}-s{seed}"
        for epoch, (robust, clean) in enumerate(epochs):
            rows.append({"key": key, "dataset": "cifar10", "threat": "linf", "model": model,
                         "method": method, "intervention": iv, "layers": layers, "seed": seed,
                         "test_steps": test_steps, "epoch": epoch, "epochs": 2,
                         "test_robust_acc": robust, "test_acc": clean, "complete": True,
                         "label": label(method, iv, layers)})
        best, last = AUTOATTACK.get((method, iv, layers, seed, model), (math.nan, math.nan))
        summary.append({"key": key, "best_autoattack_acc": best, "last_autoattack_acc": last,
                        "diff_autoattack_acc": best - last})
    return RunData(root=Path("."), name="known", description="", curves=pd.DataFrame(rows),
                   summary=pd.DataFrame(summary))


def _rows(table, method: str, source: str, model: str = "preact18") -> pd.DataFrame:
    numbers = table.numbers
    return numbers[(numbers.name == method) & (numbers.source == source)
                   & (numbers.model == model)]


def test_best_last_gets_published_values_differences_and_marks() -> None:
    table = compare("best-last", best_last_table(_known_run()))
    # AT: two seeds, PGD Best 53 and 52 -> 52.50 +- 0.71 against the paper's 52.31.
    paper = _rows(table, "AT", "paper").iloc[0]
    assert (paper.pgd_best, paper.pgd_last, paper.aa_best, paper.paper_table) == \
        (52.31, 44.45, 47.95, 1)
    diff = _rows(table, "AT", "ours - paper").iloc[0]
    assert diff.pgd_best == pytest.approx(52.5 - 52.31)
    assert diff.pgd_diff == pytest.approx(8.0 - 7.86)
    assert diff.aa_best == pytest.approx(47.5 - 47.95)  # AutoAttack 48 and 47
    assert diff.outside == ""  # 0.19 < 2 sqrt(0.5/2 + 0.072) = 1.13
    # RAT_LR: one seed, 54.00 / 49.07 against 51.57 / 49.07: Best and Diff 2.43 outside 1.31.
    rat = _rows(table, "RAT_LR", "ours - paper").iloc[0]
    assert rat.pgd_best == pytest.approx(54.0 - 51.57) and rat.pgd_last == pytest.approx(0)
    assert 2.43 > ONE_SEED_BAND and rat.outside == "pgd_best pgd_diff"
    assert math.isnan(rat.aa_best)  # no AutoAttack for this trial: nothing to compare
    shown = table.display.set_index(["Network", "Method", "Source"])
    one = shown.loc[("PreAct ResNet-18", "RAT_LR", "ours - paper")]
    assert (one["PGD-20 Best"], one["PGD-20 Last"], one["PGD-20 Diff"], one["AA Best"]) == \
        ("2.43 †", "0.00", "2.43 †", "–")
    assert shown.loc[("PreAct ResNet-18", "RAT_LR", "paper (Table 1)"), "AA Best"] == "46.89"
    assert shown.loc[("PreAct ResNet-18", "AT", "paper (Table 1)"), "Seeds"] == "5"
    assert list(table.display.Source[:3]) == ["ours", "paper (Table 1)", "ours - paper"]
    # Rows the paper has not published: named in one note, with only our row in the table.
    assert ("No published counterpart: CIFAR-10 PreAct ResNet-18 L∞ TRADES; CIFAR-10 PreAct "
            "ResNet-18 L∞ TRADES-RAT_WP; CIFAR-10 PreAct ResNet-34 L∞ AT.") in table.notes
    assert list(table.numbers[table.numbers.model == "preact34"].source) == ["ours"]
    assert OUTSIDE_NOTE in table.notes and f"{PAPER_STD}" in OUTSIDE_NOTE


def test_awp_compare_and_ablation_match_tables_4_and_5() -> None:
    run = _known_run()
    table = compare("awp-compare", awp_compare_table(run))
    awp = _rows(table, "AWP", "ours - paper").iloc[0]  # the curve is the paper's row exactly
    assert [awp[c] for c in ("nat_best", "nat_last", "pgd_best", "pgd_last")] == \
        pytest.approx([0, 0, 0, 0], abs=1e-9)
    at = _rows(table, "AT", "ours - paper").iloc[0]
    assert at.nat_best == pytest.approx(80.5 - 81.16) and at.paper_table == 4
    # TRADES-RAT_WP: clean 80.00 at the Best epoch against 82.61; -2.61 is outside one seed's band.
    rat = _rows(table, "TRADES-RAT_WP", "ours - paper").iloc[0]
    assert rat.nat_best == pytest.approx(-2.61) and rat.outside == "nat_best nat_diff"
    ablation = compare("ablation", ablation_table(run, "awp"))
    trades = ablation.numbers[ablation.numbers.name == "TRADES_awp"]
    assert list(zip(trades.subset, trades.source)) == [
        ("[-]", "ours"), ("[-]", "paper"), ("[-]", "ours - paper"),
        ("[3, 4]", "ours"), ("[3, 4]", "paper"), ("[3, 4]", "ours - paper")]
    assert list(trades[trades.source == "paper"].pgd_best) == [52.67, 55.33]
    assert set(trades.paper_table.dropna()) == {5}
    assert any("published means of 5 runs, Table 5 of" in n for n in ablation.notes)


def test_pgd_of_other_steps_is_not_compared() -> None:
    table = compare("best-last", best_last_table(_known_run(test_steps=10)))
    paper = _rows(table, "AT", "paper").iloc[0]
    assert math.isnan(paper.pgd_best) and paper.aa_best == 47.95 and paper.test_steps == 20
    assert "PGD-10 Best" in table.display and "PGD is not compared where our test PGD used " \
        "10 steps (the paper's: 20)." in table.notes


def test_a_setting_the_paper_never_published_is_one_line() -> None:
    run = _known_run()
    run = RunData(run.root, run.name, "", run.curves.assign(dataset="svhn", model="preact34"),
                  run.summary)
    assert unpublished(run).startswith("--compare paper: the paper published no numbers for "
                                       "SVHN L∞ PreAct ResNet-34 (its Tables 1-5 cover CIFAR-10")
    before = best_last_table(run)
    after = compare("best-last", before)
    assert after.display.equals(before.display)
    assert after.notes[-1] == "No row has a published counterpart in the paper's Tables 1, 2, 3."
    assert unpublished(_known_run()) is None
    effects = TABLES["effects"]  # a kind the paper has no table for is left as it is
    assert effects.what and compare("effects", before) is before


def _as_published_setting(source: Path, target: Path) -> Path:
    """A copy of a run folder whose curves say CIFAR-10, PreAct ResNet-18 and PGD-20: the
    setting of Table 1's first rows (the numbers stay the tiny run's own)."""
    shutil.copytree(source, target)
    for path in (target / "curves").glob("*.parquet"):
        curve = pd.read_parquet(path)
        curve.assign(dataset="cifar10", model="preact18", test_steps=20).to_parquet(path)
    return target


def test_cli_compare_paper_end_to_end(seeds_run: Path, tmp_path: Path) -> None:
    run = _as_published_setting(seeds_run, tmp_path / "seeds")
    out = tmp_path / "report"
    done = ablate("report", run, "--table", "best-last", "--compare", "paper", "--out", out)
    assert done.returncode == 0, done.stderr
    curves = pd.read_parquet(run / "curves")
    at = curves[curves.intervention == "none"].sort_values("epoch").groupby("seed")
    best = 100 * at.test_robust_acc.max()
    csv = pd.read_csv(out / "best-last.csv", keep_default_na=False, na_values=[""])
    paper = csv[(csv.name == "AT") & (csv.source == "paper")].iloc[0]
    diff = csv[(csv.name == "AT") & (csv.source == "ours - paper")].iloc[0]
    assert paper.pgd_best == 52.31 and paper.seeds == 5
    assert diff.pgd_best == pytest.approx(best.mean() - 52.31)
    band = 2 * math.sqrt(best.var() / 3 + 0.072)  # three seeds
    assert ("pgd_best" in diff.outside.split()) == (abs(best.mean() - 52.31) > band)
    md = (out / "best-last.md").read_text()
    assert "| Source |" in md and "| paper (Table 1) |" in md and "| ours - paper |" in md
    check_latex((out / "best-last.tex").read_text())
    # The notebook API compares with the same code: the same numbers as the CSV.
    mine = open_run(run).tables("best-last", compare="paper")["best-last"].numbers
    row = mine[(mine.name == "AT") & (mine.source == "ours - paper")].iloc[0]
    assert row.pgd_best == pytest.approx(diff.pgd_best, abs=1e-9)
    with pytest.raises(ConfigError, match="compare 'papers' is unknown"):
        open_run(run).tables("best-last", compare="papers")
    # A run of a setting the paper never published: one line, and the tables as usual.
    done = ablate("report", seeds_run, "--table", "best-last", "--compare", "paper", "--out",
                  tmp_path / "plain")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("--compare paper: the paper published no numbers for") == 1
    assert "| Source |" not in (tmp_path / "plain" / "best-last.md").read_text()
    # Anything but "paper": one line naming the choice.
    line = one_error_line(ablate("report", run, "--compare", "papers"), 2)
    assert "--compare 'papers' is unknown; choose from paper" in line


@pytest.mark.slow
def test_index_html_shows_the_comparison(seeds_run: Path, tmp_path: Path) -> None:
    run = _as_published_setting(seeds_run, tmp_path / "seeds")
    done = ablate("report", run, "--compare", "paper", "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "paper (Table 1)" in page and "ours - paper" in page
    assert "outside the paper&#x27;s spread" in page  # the table's note, escaped
