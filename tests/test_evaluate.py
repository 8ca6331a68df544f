"""A trial's final numbers (ablation/evaluate.py): what its summary records, and ``evaluate_run``
adding AutoAttack to the finished trials of a run folder, resumably. AutoAttack itself:
tests/test_attacks.py."""

import json

import pandas as pd
import pytest
import torch
from conftest import run_sweep_in_process, small_sweep, tiny_trial

import ablation
from ablation.config import from_dict
from ablation.evaluate import evaluate_run, write_summary
from ablation.trainer import Trainer


def test_a_summary_records_what_the_trial_ran_on(tmp_path):
    config = from_dict(tiny_trial(epochs=1))
    trainer = Trainer(config, tmp_path)
    summary = write_summary(config, tmp_path, trainer.fit())
    assert summary["ablate_version"] == ablation.__version__ != "0+unknown"
    assert summary["torch_version"] == torch.__version__ and summary["device_name"] == "cpu"
    assert "git_commit" in summary


@pytest.mark.slow
def test_evaluate_adds_autoattack_to_finished_trials_only_and_resumes(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small", stop_after={0: 1})
    logged = []
    assert len(evaluate_run(root, 8, echo=logged.append)) == 1  # the unfinished trial waits
    table = pd.read_parquet(root / "summary.parquet")
    (row,) = table.itertuples()
    assert row.autoattack_n == 8 and 0 <= row.best_autoattack_acc <= 1
    assert evaluate_run(root, 8, echo=logged.append) == []  # nothing left to do
    assert len(evaluate_run(root, 4, echo=logged.append)) == 1  # another size: done again


@pytest.mark.slow
def test_an_evaluation_stopped_after_the_best_weights_does_not_attack_them_again(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small")
    key = sorted(p.name for p in (root / "trials").iterdir())[0]
    # What a stop between the two attacks leaves behind (an impossible accuracy, to recognise).
    (root / "trials" / key / "autoattack.partial.json").write_text(
        json.dumps({"autoattack_n": 8, "best_autoattack_acc": 0.125}))
    evaluate_run(root, 8, echo=lambda m: None)
    table = pd.read_parquet(root / "summary.parquet").set_index("key")
    assert table.loc[key, "best_autoattack_acc"] == 0.125  # kept, not recomputed
    assert table.loc[key, "diff_autoattack_acc"] == 0.125 - table.loc[key, "last_autoattack_acc"]
    assert not (root / "trials" / key / "autoattack.partial.json").exists()
