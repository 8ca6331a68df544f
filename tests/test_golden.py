"""Golden curves: the digits trial and the demo sweep must keep computing exactly these numbers.

A refactor that changes no behaviour leaves every value bit-identical. A deliberate change to what
the trainer computes regenerates the files (``python tests/test_golden.py``) in the same commit,
and the README says which stored runs it affects. The numbers are CPU, one thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
TIMING = ["train_seconds", "eval_seconds"]


class _Stop(Exception):
    pass


def trial_curve(epochs: int | None = None) -> pd.DataFrame:
    """The curve of sweeps/trials/digits_tiny.yaml (its first ``epochs`` epochs), one thread."""
    import tempfile

    import torch

    from ablation.config import load_trial
    from ablation.trainer import Reporter, Trainer

    class StopAfter(Reporter):
        def epoch(self, row, checkpoint):
            if epochs is not None and row["epoch"] + 1 == epochs:
                raise _Stop

    torch.set_num_threads(1)
    config = load_trial(ROOT / "sweeps/trials/digits_tiny.yaml")
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, folder)
        try:
            trainer.fit(StopAfter())
        except _Stop:
            pass
        return pd.DataFrame(trainer.history).drop(columns=TIMING)


def demo_curves(root: Path) -> pd.DataFrame:
    """Every curve of sweeps/demo_digits.yaml, run in-process (the real grid, trainer, store)."""
    import yaml
    from conftest import run_sweep_in_process

    sweep = yaml.safe_load((ROOT / "sweeps/demo_digits.yaml").read_text())
    folder = run_sweep_in_process(sweep, root / "demo")
    curves = pd.read_parquet(folder / "curves").sort_values(["key", "epoch"])
    # forked_from says where a row was trained, not what: the golden file predates it
    return curves.reset_index(drop=True).drop(columns=[*TIMING, "forked_from"])


def read(name: str) -> pd.DataFrame:
    return pd.read_csv(GOLDEN / name, keep_default_na=False, na_values=[""])


def assert_same(got: pd.DataFrame, name: str) -> None:
    want = read(name)
    got = pd.read_csv(pd.io.common.StringIO(got.to_csv(index=False, float_format="%.17g")),
                      keep_default_na=False, na_values=[""])  # the same round trip as the file
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_first_two_epochs_of_the_digits_trial_are_unchanged():
    assert_same(trial_curve(epochs=2), "digits_tiny_2.csv")


@pytest.mark.slow
def test_the_digits_trial_is_unchanged():
    assert_same(trial_curve(), "digits_tiny.csv")


@pytest.mark.slow
def test_the_demo_sweep_is_unchanged(tmp_path):
    assert_same(demo_curves(tmp_path), "demo_digits.csv")


if __name__ == "__main__":  # regenerate after a deliberate change of what is computed
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    write = lambda frame, name: frame.to_csv(GOLDEN / name, index=False, float_format="%.17g")
    write(trial_curve(epochs=2), "digits_tiny_2.csv")
    write(trial_curve(), "digits_tiny.csv")
    with tempfile.TemporaryDirectory() as tmp:
        write(demo_curves(Path(tmp)), "demo_digits.csv")
