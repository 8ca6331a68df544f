"""One trial run into its run folder, without Ray: the messages a worker sends (epoch rows with the
fork files its folder holds, replayed on a resume; the summary; a failure as one line), what the
driver stores of them, and the device a trial is given."""

import pandas as pd
import pytest
import torch
from conftest import TIMING, starts, tiny_trial

from ablation import files
from ablation.errors import ConfigError
from ablation.fork import ForkWaits
from ablation.grid import sweep_from_dict
from ablation.store import RunDir, trial_params
from ablation.trainer import Trainer
from ablation.worker import failure, receive, run_trial, trial_device


class Stop(Exception):
    """Ends a worker mid-trial, after an epoch's checkpoint (as a killed worker would)."""


def test_a_trial_sends_its_rows_and_fork_files_resumes_with_a_replay_and_ends_stored(tmp_path):
    sweep = sweep_from_dict({"name": "one", "base": tiny_trial(epochs=3, train_eval_size=32),
                             "baselines": {"AT": {"intervention": "none"}}}, source="one")
    (config,) = sweep.trials
    run = RunDir(tmp_path / "run")
    run.write_manifest(sweep)
    waits = ForkWaits(waiting={}, ready=frozenset(), points={config.key: (1,)})
    (params,) = trial_params(run, sweep.by_key, 1, None, waits)  # a fork file after 1 epoch
    sent = []

    def send(message, stop_at=None):
        sent.append(message)
        receive(run, sweep.by_key, message)
        if "row" in message and message["row"]["epoch"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        run_trial(params, lambda m: send(m, stop_at=1))
    assert [(m["row"]["epoch"], m["forks"], m["trial"]) for m in sent] == [
        (0, [1], config.key), (1, [1], config.key)]
    first, sent[:] = list(sent), []
    summary = run_trial(params, send)
    pd.testing.assert_frame_equal(pd.DataFrame([m["row"] for m in sent[:2]]),  # replayed from
                                  pd.DataFrame([m["row"] for m in first]))  # the checkpoint
    assert [(m["row"]["epoch"], m["forks"]) for m in sent[:3]] == [(0, [1]), (1, [1]), (2, [1])]
    assert sent[3:] == [{"summary": summary, "trial": config.key}]

    threads = torch.get_num_threads()
    try:
        reference = pd.DataFrame(Trainer(config, tmp_path / "alone").fit()).drop(columns=TIMING)
    finally:
        torch.set_num_threads(threads)
    stored = pd.read_parquet(run.root / files.curves_file(config.key))
    pd.testing.assert_frame_equal(stored[reference.columns], reference, check_exact=True)
    assert run.summaries().set_index("key").loc[config.key, "best_test_robust_acc"] == \
        summary["best_test_robust_acc"]
    assert [s.epoch for s in starts(run.root, config.key)] == [0, 2]


def test_a_failure_is_one_line_naming_the_trial_and_the_driver_marks_it_errored(tmp_path):
    assert failure("k1", ConfigError("key 'x':\n  bad")) == {"failed": "trial k1: key 'x': bad",
                                                              "trial": "k1"}
    assert failure("k1", ConfigError("trial k1 diverged"))["failed"] == "trial k1 diverged"
    sweep = sweep_from_dict({"name": "f", "base": tiny_trial(epochs=1), "grid": {"seed": [0]}},
                            source="f")
    (config,) = sweep.trials
    run = RunDir(tmp_path / "run")
    run.write_manifest(sweep)
    receive(run, sweep.by_key, failure(config.key, ConfigError("no")))
    assert (run.trial_dir(config.key) / files.ERROR).read_text() == f"trial {config.key}: no\n"


def test_a_trial_given_no_gpu_trains_on_the_cpu_and_one_that_asks_for_cuda_is_refused():
    assert trial_device("auto", []) == "cpu"  # Ray 2.60 leaves the GPUs visible to such a trial
    assert trial_device("cpu", []) == trial_device("cpu", [0]) == "cpu"
    assert trial_device("auto", [0]) == "auto"  # its own GPU, as cuda:0
    assert trial_device("cuda", ["0"]) == "cuda"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"key 'device': {device!r} asks for a GPU, but "
                                              "Ray gave this trial none; pass --gpus-per-trial"):
            trial_device(device, [])
