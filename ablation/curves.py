"""Best / Last / Diff of a trial's per-epoch curve: the paper's numbers, defined once (method A.9).

Torch-free: the trainer (which epoch's weights to keep), ``ablate status`` and the reports all
call :func:`best_last`, so the statistic cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

SELECT_BY = "test_robust_acc"  # best = the first epoch with the highest test PGD robust accuracy
REPORTED = ("test_robust_acc", "test_acc")  # each read at the best and at the last epoch


def best_last(curve: pd.DataFrame | Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Best, Last and Diff = Best - Last of test robust and clean accuracy for one trial.

    ``curve`` holds the trial's epochs in order (a frame or rows with ``epoch`` and the metrics).
    Best is the first epoch with the highest test robust accuracy (strict >, selected on the test
    set as the paper does); clean accuracy is read at that same epoch. Last is the final row, so
    an unfinished trial's Last is its latest epoch. A reported metric the curve lacks is left out.
    """
    frame = curve if isinstance(curve, pd.DataFrame) else pd.DataFrame(list(curve))
    if frame.empty:
        raise ValueError("best_last needs at least one epoch")  # a caller's bug
    best = frame.loc[frame[SELECT_BY].idxmax()]  # idxmax: the first of equal maxima
    last = frame.iloc[-1]
    out: dict[str, Any] = {"epochs_done": len(frame), "best_epoch": int(best["epoch"]),
                           "last_epoch": int(last["epoch"])}
    for metric in (m for m in REPORTED if m in frame):
        b, l = float(best[metric]), float(last[metric])
        out[f"best_{metric}"], out[f"last_{metric}"], out[f"diff_{metric}"] = b, l, b - l
    return out
