"""The paper's tables from a run folder (ablation/report/tables.py): numbers against plain-pandas
hand computations, seeds, AutoAttack columns, a partial run, and the files they are written to.
The writers' formats: tests/test_report_writers.py; the factorial effects:
tests/test_report_effects.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from ablation.report import RunData, load_run
from ablation.layers import ALL_SUBSETS as SUBSETS
from ablation.report.tables import (TABLES, ablation_table as ablation,
                                    awp_compare_table as awp_compare,
                                    best_last_table as best_last, setting_names,
                                    write_tables)
from conftest import check_latex, run_sweep_in_process, small_sweep


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


def test_write_tables_files_and_latex(study_run: Path, tmp_path: Path) -> None:
    paths = [p for t in write_tables(load_run(study_run), TABLES, tmp_path) for p in t.paths]
    stems = {p.stem for p in paths}
    assert {"best-last", "awp-compare", "ablation-fix_param", "ablation-fix_lr", "ablation-awp",
            "effects-diff", "effects-best"} == stems
    assert {p.suffix for p in paths} == {".md", ".csv", ".tex"}
    for tex in (p for p in paths if p.suffix == ".tex"):
        check_latex(tex.read_text())
    assert r"RAT\_LR" in (tmp_path / "best-last.tex").read_text()
    md = (tmp_path / "best-last.md").read_text()
    assert "| Method |" in md and "| RAT_LR |" in md
    # CSV: raw numbers, missing AutoAttack as an empty cell.
    csv = pd.read_csv(tmp_path / "best-last.csv")
    assert csv.aa_best.isna().all() and csv.pgd_best.dtype == float
    assert ",," in (tmp_path / "best-last.csv").read_text()


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
    sweep = small_sweep("part", epochs=3, train_eval_size=32)
    root = run_sweep_in_process(sweep, tmp_path / "part", stop_after={0: 1})
    run = load_run(root)
    assert run.partial
    table = best_last(run)
    assert sum(m.endswith(" *") for m in table.display.Method) == 1
    assert any("still running" in n for n in table.notes)
    write_tables(run, ["best-last"], tmp_path / "out")
    md = (tmp_path / "out" / "best-last.md").read_text()
    assert "\n\n\\* still running" in md  # its own paragraph, not a list bullet


def test_skipped_tables_are_one_note_per_reason(study_run: Path, tmp_path: Path) -> None:
    """The old demo's design (fix_lr and awp on two subsets, AT, no AWP): the tables it cannot
    fill are notes, the two effects tables under one line, the rest written."""
    from dataclasses import replace

    run = load_run(study_run)
    kept = {"AT", "AT_fix_lr_[3, 4]", "AT_fix_lr_[1, 2]", "AT_awp_[3, 4]", "AT_awp_[1, 2]"}
    few = replace(run, curves=run.curves[run.curves.label.isin(kept)],
                  summary=run.summary[run.summary.label.isin(kept)])
    said: list[str] = []
    written = write_tables(few, TABLES, tmp_path, warn=said.append)
    assert "best-last" in [t.stem for t in written]
    assert len(said) == 2 and all(line.startswith("note: no ") for line in said), said
    assert said[0].startswith("note: no awp-compare table: ") and "awp_full" in said[0]
    assert said[1].startswith("note: no effects-diff or effects-best table: ")
    assert "too few" in said[1] and "\n" not in said[1]
