"""The run folder: a summary table derived from the trial folders."""

import re

import pandas as pd
import pytest
from conftest import run_sweep_in_process, tiny_trial

from ablation.errors import AblateError
from ablation.grid import sweep_from_dict
from ablation.report import load_run
from ablation.store import RunDir, plan


def small_sweep():
    base = tiny_trial(epochs=1, width=2, train_steps=1, test_steps=1, train_eval_size=16)
    return {"name": "small", "base": base,
            "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
            "baselines": {"AT": {"intervention": "none"}}}


def test_a_summary_table_left_short_is_rebuilt_from_the_trial_folders(tmp_path):
    # The state a driver killed between a worker's summary.json and the table row leaves.
    root = run_sweep_in_process(small_sweep(), tmp_path / "small")
    full = pd.read_parquet(root / "summary.parquet")
    assert len(full) == 2
    full[full.key != full.key.iloc[0]].to_parquet(root / "summary.parquet")
    # `ablate report` sees both trials without writing anything...
    assert sorted(load_run(root).summary.key) == sorted(full.key)
    assert len(pd.read_parquet(root / "summary.parquet")) == 1
    # ...and the next `ablate run` (its planning) stores the row again, nothing left to run.
    run = RunDir.attach(root)
    assert plan(run, sweep_from_dict(small_sweep(), source="small"), False) == {}
    rebuilt = pd.read_parquet(root / "summary.parquet")
    pd.testing.assert_frame_equal(rebuilt.sort_values("key").reset_index(drop=True),
                                  full.sort_values("key").reset_index(drop=True))


def test_a_corrupt_trial_summary_is_one_line_naming_it(tmp_path):
    root = run_sweep_in_process(small_sweep(), tmp_path / "small")
    victim = next((root / "trials").glob("*/summary.json"))
    victim.write_text("{not json")
    with pytest.raises(AblateError, match=re.escape(str(victim))) as err:
        RunDir.attach(root).rebuild_summaries()
    assert "\n" not in str(err.value)
