"""The run folder: a summary table derived from the trial folders; what the next run plans (added,
changed and errored trials); what each trial receives."""

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_sweep_in_process, small_sweep

from ablation import files
from ablation.config import from_dict
from ablation.errors import AblateError, ConfigError
from ablation.fork import Fork, ForkWaits
from ablation.grid import sweep_from_dict
from ablation.report import load_run
from ablation.store import RunDir, plan, trial_params

TINY = {"epochs": 1, "test_steps": 1, "train_eval_size": 16}  # small_sweep at its smallest


def test_a_summary_table_left_short_is_rebuilt_from_the_trial_folders(tmp_path):
    # The state a driver killed between a worker's summary.json and the table row leaves.
    root = run_sweep_in_process(small_sweep(**TINY), tmp_path / "small")
    full = pd.read_parquet(root / "summary.parquet")
    assert len(full) == 2
    full[full.key != full.key.iloc[0]].to_parquet(root / "summary.parquet")
    # `ablate report` sees both trials without writing anything...
    assert sorted(load_run(root).summary.key) == sorted(full.key)
    assert len(pd.read_parquet(root / "summary.parquet")) == 1
    # ...and the next `ablate run` (its planning) stores the row again, nothing left to run.
    run = RunDir.attach(root)
    assert plan(run, sweep_from_dict(small_sweep(**TINY), source="small"), False) == {}
    rebuilt = pd.read_parquet(root / "summary.parquet")
    pd.testing.assert_frame_equal(rebuilt.sort_values("key").reset_index(drop=True),
                                  full.sort_values("key").reset_index(drop=True))


def test_a_corrupt_trial_summary_is_one_line_naming_it(tmp_path):
    root = run_sweep_in_process(small_sweep(**TINY), tmp_path / "small")
    victim = next((root / "trials").glob("*/summary.json"))
    victim.write_text("{not json")
    with pytest.raises(AblateError, match=re.escape(str(victim))) as err:
        RunDir.attach(root).rebuild_summaries()
    assert "\n" not in str(err.value)


def test_a_damaged_summary_table_is_rebuilt_not_refused(tmp_path):
    root = run_sweep_in_process(small_sweep(**TINY), tmp_path / "small")
    full = pd.read_parquet(root / "summary.parquet")
    (root / "summary.parquet").write_bytes(b"PAR1 then nothing")
    run = RunDir.attach(root)
    assert run.summaries().empty  # derived: reads as absent...
    assert sorted(load_run(root).summary.key) == sorted(full.key)  # ...report derives it...
    run.rebuild_summaries()  # ...and the next run, report or evaluate writes it again
    assert sorted(pd.read_parquet(root / "summary.parquet").key) == sorted(full.key)


HOSTILE_STATES = {
    "not JSON": "{", "a list": "[]", "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "a fractional pid": '{"driver": {"pid": 1.5, "host": "HOST", "time": 1e9}}',
    "a huge pid": '{"driver": {"pid": 1e300, "host": "HOST", "time": 1e9}}',
    "a pid beyond any": '{"driver": {"pid": 99999999999999, "host": "HOST", "time": 1e9}}',
    "a list of trials": '{"trials": [1, 2], "driver": null}',
    "a number for waiting": '{"trials": {}, "waiting": 7, "driver": null}',
}


@pytest.mark.parametrize("case", HOSTILE_STATES)
def test_a_damaged_or_hostile_state_json_reads_as_absent(tmp_path, case):
    # state.json is the driver's heartbeat and is rewritten by every driver: derived.
    import socket

    from ablation.store import status_table, waiting_line

    run = RunDir(tmp_path / "run")
    run.write_manifest(sweep_from_dict(small_sweep(**TINY), source="small"))
    run.state_path.write_text(HOSTILE_STATES[case].replace("HOST", socket.gethostname()))
    states = run.states()
    assert isinstance(states["trials"], dict) and states.get("waiting") in (None,)
    assert waiting_line(run) is None
    assert len(status_table(run)) == 2


def test_the_next_run_plans_added_trials_refuses_changed_ones_and_restarts_errored_ones(tmp_path):
    """store.plan as ``ablate run`` calls it on a folder that holds a run (through Ray, with a
    changed sweep file and --restart-errored: the slow tests of tests/test_tune.py)."""
    root = run_sweep_in_process(small_sweep(**TINY), tmp_path / "small", stop_after={1: 1})
    run = RunDir.attach(root)
    sweep = lambda **fields: sweep_from_dict(small_sweep(**{**TINY, **fields}), source="small")
    (unfinished,) = plan(run, sweep(), False)  # the other trial is done: never run again
    added = sweep(layers=((3, 4), (2,)))
    todo = plan(run, added, False)
    assert sorted(todo) == sorted([unfinished, *(k for k, c in added.by_key.items()
                                                 if c.layers == (2,))])
    with pytest.raises(ConfigError, match=r"the sweep file changed 3 trial\(s\) already in") as err:
        plan(run, sweep(epochs=2, layers=((3, 4), (2,))), False)  # epochs: other keys
    assert "\n" not in str(err.value)
    error = run.trial_dir(unfinished) / files.ERROR  # as the driver marks a failed trial
    error.parent.mkdir(parents=True, exist_ok=True)
    error.write_text(f"trial {unfinished}: no\n")
    assert unfinished in plan(run, added, False) and error.exists()  # kept until asked
    assert unfinished in plan(run, added, True) and not run.trial_dir(unfinished).exists()


def test_trial_params_carry_the_forks_and_fork_points_and_an_absolute_data_root(tmp_path):
    sweep = sweep_from_dict({**small_sweep(**TINY), "base": {**small_sweep(**TINY)["base"],
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
