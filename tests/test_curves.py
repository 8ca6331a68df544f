"""Best / Last / Diff of a trial's curve (ablation/curves.py), the paper's numbers defined once."""

import pytest

from ablation.curves import best_last


def test_best_last_takes_the_first_best_epoch():
    rows = [{"epoch": e, "test_robust_acc": r, "test_acc": c}
            for e, (r, c) in enumerate([(0.1, 0.5), (0.3, 0.6), (0.3, 0.7), (0.2, 0.8)])]
    s = best_last(rows)
    assert s["best_epoch"] == 1 and s["last_epoch"] == 3
    assert s["diff_test_robust_acc"] == pytest.approx(0.1)
    assert s["best_test_acc"] == 0.6 and s["diff_test_acc"] == pytest.approx(-0.2)
