"""Tables from a run folder: numbers against plain-pandas hand computations, writers, effects."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablation.errors import AblateError
from ablation.report import RunData, load_run
from ablation.layers import ALL_SUBSETS as SUBSETS
from ablation.report.effects import effects_table as effects, fit_effects, holm
from ablation.report.tables import (TABLES, ablation_table as ablation,
                                    awp_compare_table as awp_compare,
                                    best_last_table as best_last, setting_names,
                                    write_tables)
from ablation.report.numbers import Table
from ablation.report.writers import write_table
from conftest import run_sweep_in_process, tiny_trial


def _hand(curves: pd.DataFrame, intervention: str, layers: str) -> dict[str, float]:
    """Best / Last / Diff (%) of one trial's PGD accuracy with plain pandas."""
    one = curves[(curves.intervention == intervention) & (curves.layers == layers)]
    one = one.sort_values("epoch")
    best = 100 * one.test_robust_acc.max()
    last = 100 * one.test_robust_acc.iloc[-1]
    return {"PGD-2 Best": best, "PGD-2 Last": last, "PGD-2 Diff": best - last}  # test_steps 2


def test_best_last_matches_hand_computation(study_run: Path) -> None:
    curves = pd.read_parquet(study_run / "curves")
    result = best_last(load_run(study_run))
    table = result.display.set_index("Method")
    assert list(table.index) == ["AT", "RAT_LR", "RAT_WP"]
    for name, (iv, layers) in {"AT": ("none", ""), "RAT_LR": ("fix_lr", "3,4")}.items():
        for column, value in _hand(curves, iv, layers).items():
            assert table.loc[name, column] == f"{value:.2f}".replace("-0.00", "0.00")
    # No AutoAttack was run: a dash, never 0.
    assert (table[["AA Best", "AA Last", "AA Diff"]] == "–").all().all()
    assert result.numbers.aa_best.isna().all()


def test_ablation_rows_in_documented_order(study_run: Path) -> None:
    table = ablation(load_run(study_run), "awp").display
    expected = ["[-]"] + ["[" + ", ".join(map(str, s)) + "]" for s in SUBSETS]
    assert list(table.Layer) == expected
    assert len(expected) == 16 and expected[1:5] == ["[1]", "[2]", "[3]", "[4]"]
    assert expected[-1] == "[1, 2, 3, 4]"
    # The baseline row is AT's numbers; natural accuracy is taken at the Best PGD epoch.
    curves = pd.read_parquet(study_run / "curves")
    at = curves[curves.intervention == "none"].sort_values("epoch").reset_index(drop=True)
    best_epoch = at.test_robust_acc.idxmax()
    assert table["Natural Best"].iloc[0] == f"{100 * at.test_acc[best_epoch]:.2f}"


def test_awp_compare_rows(study_run: Path) -> None:
    table = awp_compare(load_run(study_run)).display
    assert list(table.Method) == ["AT", "AWP", "RAT_WP"]
    assert {"Natural Best", "PGD-2 Diff", "AA Last"} <= set(table.columns)
    assert not any("PGD-20" in c for c in table.columns)  # the trials ran PGD-2


def _check_latex(text: str) -> None:
    """Every \\begin{X} closed by \\end{X} in nesting order; booktabs rules; escaped _."""
    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, f"\\end{{{env}}} out of order"
    assert not stack, f"unclosed: {stack}"
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{"):
        assert rule in text
    for label in re.findall(r"\\label\{([^}]*)\}", text):  # a name pdflatex can write to .aux
        assert re.fullmatch(r"tab:[a-z0-9:-]+", label), label
    body = re.sub(r"\\(begin|end)\{[^}]*\}", "", text)
    body = re.sub(r"(?<!\\)\$[^$]*\$", "", body)  # math ($_\infty$) may subscript
    assert not re.search(r"(?<!\\)_", body), "unescaped underscore"
    assert not re.search(r"(?<!\\)%", body), "unescaped percent"


def test_write_tables_files_and_latex(study_run: Path, tmp_path: Path) -> None:
    paths = [p for t in write_tables(load_run(study_run), TABLES, tmp_path) for p in t.paths]
    stems = {p.stem for p in paths}
    assert {"best-last", "awp-compare", "ablation-fix_param", "ablation-fix_lr", "ablation-awp",
            "effects-diff", "effects-best"} == stems
    assert {p.suffix for p in paths} == {".md", ".csv", ".tex"}
    for tex in (p for p in paths if p.suffix == ".tex"):
        _check_latex(tex.read_text())
    assert r"RAT\_LR" in (tmp_path / "best-last.tex").read_text()
    md = (tmp_path / "best-last.md").read_text()
    assert "| Method |" in md and "| RAT_LR |" in md
    # CSV: raw numbers, missing AutoAttack as an empty cell.
    csv = pd.read_csv(tmp_path / "best-last.csv")
    assert csv.aa_best.isna().all() and csv.pgd_best.dtype == float
    assert ",," in (tmp_path / "best-last.csv").read_text()


def test_write_table_escapes_specials(tmp_path: Path) -> None:
    frame = pd.DataFrame({"Method": ["a_b & c # 5%"], "PGD-20 Best": ["1.00 ± 0.10"]})
    _, _, tex = write_table(Table(frame, frame), tmp_path, "x", "50% of a_b")
    text = tex.read_text()
    _check_latex(text)
    assert r"a\_b \& c \# 5\%" in text and r"$\pm$" in text


def test_table_registry_names_the_tables_the_cli_offers() -> None:
    assert list(TABLES) == ["best-last", "awp-compare", "ablation", "effects"]
    assert all(kind.what for kind in TABLES.values())


def test_autoattack_for_some_trials(study_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(study_run, root)
    # AutoAttack numbers for the AT trial only, where they live: its trial folder's summary.json.
    summary = pd.read_parquet(root / "summary.parquet")
    (at_key,) = summary.key[summary.intervention == "none"]
    path = root / "trials" / at_key / "summary.json"
    saved = json.loads(path.read_text())
    saved.update({"best_autoattack_acc": 0.4, "last_autoattack_acc": 0.3,
                  "diff_autoattack_acc": 0.1, "autoattack_n": 100})
    path.write_text(json.dumps(saved))
    table = best_last(load_run(root)).display.set_index("Method")
    assert list(table.loc["AT", ["AA Best", "AA Last", "AA Diff"]]) == ["40.00", "30.00", "10.00"]
    assert (table.loc[["RAT_LR", "RAT_WP"], ["AA Best", "AA Last", "AA Diff"]] == "–").all().all()


def test_seeds_mean_std(seeds_run: Path) -> None:
    curves = pd.read_parquet(seeds_run / "curves")
    result = best_last(load_run(seeds_run))
    table = result.display.set_index("Method")
    assert set(table.Seeds) == {"3"}
    for name, (iv, layers) in {"AT": ("none", ""), "RAT_LR": ("fix_lr", "3,4")}.items():
        one = curves[(curves.intervention == iv) & (curves.layers == layers)]
        per_seed = one.sort_values("epoch").groupby("seed").test_robust_acc
        best, last = 100 * per_seed.max(), 100 * per_seed.last()
        for column, values in (("PGD-2 Best", best), ("PGD-2 Last", last),
                               ("PGD-2 Diff", best - last)):
            expected = f"{values.mean():.2f} ± {values.std():.2f}".replace("-0.00", "0.00")
            assert table.loc[name, column] == expected
    assert "pgd_best_std" in result.numbers.columns
    assert any("mean ± sample std of each seed's own Best" in n for n in result.notes)


def test_pgd_header_names_the_steps_the_trials_used(seeds_run: Path) -> None:
    run = load_run(seeds_run)
    assert "PGD-2 Best" in best_last(run).display  # test_steps: 2
    # Trials that differ in test_steps: never averaged together, a column says which is which.
    curves = run.curves.copy()
    curves.loc[curves.seed == 0, "test_steps"] = 10
    table = best_last(RunData(run.root, run.name, "", curves, run.summary))
    assert "PGD Best" in table.display and "PGD-2 Best" not in table.display
    assert sorted(zip(table.display.Method, table.display["PGD steps"])) == [
        ("AT", "10"), ("AT", "2"), ("RAT_LR", "10"), ("RAT_LR", "2")]
    assert any("different numbers of steps (2, 10)" in n for n in table.notes)


def test_setting_names_map_table_names_to_labels(study_run: Path) -> None:
    names = setting_names(load_run(study_run))
    assert names["RAT_LR"] == "AT_fix_lr_[3, 4]" and names["RAT_WP"] == "AT_awp_[3, 4]"
    assert names["AWP"] == "AWP" and names["AT_awp_[4]"] == "AT_awp_[4]"


def test_partial_run_marked(tmp_path: Path) -> None:
    base = tiny_trial(epochs=3, width=2, train_steps=1, test_steps=2, train_eval_size=32)
    sweep = {"name": "part", "base": base,
             "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
             "baselines": {"AT": {"intervention": "none"}}}
    root = run_sweep_in_process(sweep, tmp_path / "part", stop_after={0: 1})
    run = load_run(root)
    assert run.partial
    table = best_last(run)
    assert sum(m.endswith(" *") for m in table.display.Method) == 1
    assert any("still running" in n for n in table.notes)
    write_tables(run, ["best-last"], tmp_path / "out")
    md = (tmp_path / "out" / "best-last.md").read_text()
    assert "\n\n\\* still running" in md  # its own paragraph, not a list bullet


# ----------------------------------------------------------------------------------------------
# Factorial effects on a synthetic store with planted effects

# The planted model below in effect coding, by hand: averaged over layer 3 in/out, adding layer 4
# changes Diff by (5 + 1) / 2 = 3; adding layer 3 by (3 + -1) / 2 = 1; layer 3's effect is 4
# lower with layer 4 in; the mean of the 16 cells is 2 + 5/2 + 3/2 - 4/4 = 5.
TRUTH = {"mean": 5.0, "layer 4": 3.0, "layer 3": 1.0, "layer 3 x layer 4": -4.0}


def _synthetic_run(subsets: list[tuple[int, ...]], seeds: int = 3, sd: float = 0.1) -> RunData:
    """A RunData whose trials have PGD Diff = 2 + 5[4 in S] + 3[3 in S] - 4[3,4 in S] + noise."""
    rng = np.random.default_rng(0)
    rows = []
    for subset, seed in itertools.product(subsets, range(seeds)):
        diff = (2 + 5 * (4 in subset) + 3 * (3 in subset) - 4 * (3 in subset and 4 in subset)
                + rng.normal(0, sd))
        iv = "awp" if subset else "none"
        key = f"{iv}-{''.join(map(str, subset))}-s{seed}"
        best = 0.6 + 0.01 * rng.random()
        for epoch, acc in enumerate((best, best - diff / 100)):  # Best at epoch 0, Diff later
            rows.append({"key": key, "dataset": "cifar10", "threat": "linf",
                         "model": "preact18", "method": "at", "intervention": iv,
                         "layers": ",".join(map(str, subset)), "seed": seed, "epoch": epoch,
                         "epochs": 2, "test_robust_acc": acc, "complete": True})
    curves = pd.DataFrame(rows)
    from ablation.report import label
    curves["label"] = [label(m, i, l) for m, i, l in
                       zip(curves.method, curves.intervention, curves.layers)]
    return RunData(root=Path("."), name="synthetic", description="", curves=curves,
               summary=pd.DataFrame())


def test_holm_against_hand_computation() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max
    # 0.02, 0.03, 0.06, 0.06; back in the given order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_effects_intervals_are_simultaneous_and_p_holm_adjusted() -> None:
    """Each layer term's interval uses t at 1 - 0.05/20 (10 terms), wider than the plain 95%
    one by that ratio; the mean keeps the plain interval; p (Holm) is holm() of the t-tests."""
    from scipy import stats

    rng = np.random.default_rng(1)
    subsets = [s for s in [(), *SUBSETS] for _ in range(2)]
    fit = fit_effects(subsets, rng.normal(0, 1, len(subsets)))
    df = 32 - 11
    half = (fit.ci_high - fit.ci_low) / 2
    assert half[0] == pytest.approx(stats.t.ppf(0.975, df) * fit.se[0])
    assert half[1:].to_numpy() == pytest.approx(stats.t.ppf(1 - 0.05 / 20, df) * fit.se[1:])
    assert (half[1:] > stats.t.ppf(0.975, df) * fit.se[1:]).all()
    p = 2 * stats.t.sf(np.abs(fit.estimate[1:] / fit.se[1:]), df)
    assert fit.p_holm[1:].to_numpy() == pytest.approx(holm(p))
    assert np.isnan(fit.p_holm[0])
    table = effects(_synthetic_run([(), *SUBSETS]))
    assert any("Holm-adjusted over the 10 terms" in n for n in table.notes)
    assert "p (Holm)" in table.display


def test_effects_recover_planted_values() -> None:
    table = effects(_synthetic_run([(), *SUBSETS]))
    numbers = table.numbers
    assert list(numbers.term[1:5]) == ["layer 1", "layer 2", "layer 3", "layer 4"]
    assert list(numbers.term[5:]) == [f"layer {a} x layer {b}"
                                      for a, b in itertools.combinations(range(1, 5), 2)]
    assert (numbers.df == 48 - 11).all()
    for row in numbers.itertuples():
        truth = TRUTH.get(row.term, 0.0)
        assert abs(row.estimate - truth) < 0.3, row.term
        assert row.ci_low <= truth <= row.ci_high, row.term
    assert table.display["95% CI"].str.startswith("[").all()
    assert "averaged over the other layers" in table.notes[0]


def test_main_effects_are_differences_of_means_in_the_full_design() -> None:
    """With all 16 cells equally replicated, the main effect of layer k is the textbook
    mean(Diff | k in the subset) - mean(Diff | k not in it), computed here with plain pandas."""
    run = _synthetic_run([(), *SUBSETS], seeds=2, sd=1.0)
    estimate = effects(run).numbers.set_index("term").estimate
    last = run.curves[run.curves.epoch == 1].set_index("key")
    diff = 100 * (run.curves[run.curves.epoch == 0].set_index("key").test_robust_acc
                  - last.test_robust_acc)
    for k in range(1, 5):
        inside = last.layers.str.contains(str(k))
        assert estimate[f"layer {k}"] == pytest.approx(diff[inside].mean() - diff[~inside].mean())
    assert estimate["mean"] == pytest.approx(diff.mean())
    three, four = last.layers.str.contains("3"), last.layers.str.contains("4")
    effect_of_3_with_4 = diff[three & four].mean() - diff[~three & four].mean()
    effect_of_3_without_4 = diff[three & ~four].mean() - diff[~three & ~four].mean()
    assert estimate["layer 3 x layer 4"] == pytest.approx(effect_of_3_with_4
                                                          - effect_of_3_without_4)


def test_effects_missing_cells_and_single_seed() -> None:
    # 3 of the 16 cells missing: still estimable, fit on what is there.
    some = [(), *SUBSETS[:10], *SUBSETS[12:]]
    numbers = effects(_synthetic_run(some)).numbers
    assert (numbers.cells == 14).all()
    estimate = numbers.set_index("term").estimate
    assert abs(estimate["layer 3 x layer 4"] + 4) < 0.3
    # Only singletons and the baseline: interactions not identifiable -> skipped with a note.
    table = effects(_synthetic_run([(), *SUBSETS[:4]]))
    assert table.empty and "skipped" in table.notes[-1]
    # One seed, 11 cells: no residual df -> no interval, and a note saying so.
    eleven = [(), *SUBSETS[:10]]
    table = effects(_synthetic_run(eleven, seeds=1))
    assert (table.display["95% CI"] == "–").all()
    assert any("one seed gives no error estimate" in n for n in table.notes)
    with pytest.raises(AblateError):
        effects(_synthetic_run(eleven, seeds=1), "nope")
