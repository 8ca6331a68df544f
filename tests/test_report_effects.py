"""The factorial effects of the layer groups (ablation/report/effects.py) on a synthetic store with
planted effects: estimates, simultaneous intervals and Holm's p-values against hand computations."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ablation.errors import AblateError
from ablation.layers import ALL_SUBSETS as SUBSETS
from ablation.report import RunData
from ablation.report.effects import effects_table as effects, fit_effects, holm


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
