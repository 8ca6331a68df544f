"""The run folder: a summary table derived from the trial folders; what each trial receives."""

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_sweep_in_process, tiny_trial

from ablation.config import from_dict
from ablation.errors import AblateError
from ablation.fork import Fork, ForkWaits
from ablation.grid import sweep_from_dict
from ablation.report import load_run
from ablation.store import RunDir, plan, trial_params


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


def test_trial_params_carry_the_forks_and_fork_points_and_an_absolute_data_root(tmp_path):
    sweep = sweep_from_dict({**small_sweep(), "base": {**small_sweep()["base"],
                                                       "data_root": "data"}}, source="small")
    (child,) = [k for k, c in sweep.by_key.items() if c.intervention == "fix_lr"]
    (parent,) = [k for k, c in sweep.by_key.items() if c.intervention == "none"]
    run = RunDir(tmp_path / "run")
    waits = ForkWaits(waiting={child: Fork(parent, 1)}, ready=frozenset(),
                      points={parent: (1,)})
    params = {p["key"]: p for p in trial_params(run, sweep.by_key, 3, 8, waits)}
    assert params[child]["fork"] == {"parent": parent, "epochs": 1}
    assert params[parent]["fork"] is None
    assert (params[parent]["fork_points"], params[child]["fork_points"]) == ([1], [])
    for key, p in params.items():
        assert (p["run"], p["threads"], p["autoattack"]) == (str(run.root), 3, 8)
        assert p["config"]["data_root"] == str(Path("data").resolve())
        assert from_dict(p["config"]).key == key  # the same trial: data_root is not in the key
