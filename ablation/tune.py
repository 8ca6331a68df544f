"""Ray Tune as the dispatcher: one Tune trial per ablate trial; the trainer stays Ray-free.

Resuming does not depend on Tune's experiment restore (which, measured on Ray 2.60, can restart
trials from epoch 0 or lose trials added to the grid): every ``ablate run`` starts a Tune experiment
over the trials that are not done, and each trial resumes from the checkpoint in its own folder
``trials/<key>/``. The driver's curve store dedupes on (trial, epoch), so an epoch that is reported
again after a crash is stored once.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from . import files
from .config import TrialConfig, from_dict
from .evaluate import write_summary
from .store import RunDir, trial_params
from .trainer import Reporter, Trainer


class TuneReporter(Reporter):
    """Reports each epoch to Tune; on start it replays the epochs a checkpoint already holds, so
    the driver's store is complete even if an earlier driver died before receiving them. Each
    epoch's checkpoint reaches the run folder's URI (if any) before the epoch is reported."""

    def __init__(self, run: RunDir):
        self.run = run

    def start(self, config, history):
        from ray import tune

        for row in history:
            tune.report({"row": row, "pid": os.getpid()})

    def epoch(self, row, checkpoint):
        from ray import tune

        self.run.push(checkpoint)
        tune.report({"row": row, "pid": os.getpid()})


def ablate_trial(params: dict[str, Any]) -> None:
    """The Tune trainable (its name must stay stable): train or resume one trial in its folder."""
    import torch
    from ray import tune

    spec = params["trial"]
    key, config = spec["key"], from_dict(spec["config"], source=spec["key"])
    run = RunDir.attach(spec["run"])  # on another node, a URI's mirror on that node
    workdir = run.trial_dir(key)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(spec["threads"])))
    with open(workdir / ".lock", "w") as lock:
        # A worker orphaned by a killed driver may still hold this trial; wait for it to end
        # rather than write the same checkpoint from two processes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in (files.CHECKPOINT, files.SUMMARY, files.ATTEMPTS):
            run.sync(files.trial_file(key, name))  # the URI's copy is the truth, not this node's
        trainer = Trainer(config, workdir)
        with open(workdir / files.ATTEMPTS, "a") as log:  # one line per start: resumed where
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on "
                      f"{socket.gethostname()} starts at epoch {trainer.epochs_done}\n")
        run.push(workdir / files.ATTEMPTS)
        history = trainer.fit(TuneReporter(run))
        summary = write_summary(config, workdir, history, autoattack=spec.get("autoattack"),
                                data=trainer.data, weights_changed=not trainer.finished_at_start)
        run.push(workdir / files.SUMMARY)
    tune.report({"summary": summary, "pid": os.getpid()})


class SweepProgress:
    """A live bar over every epoch of the sweep, with trial counts by state."""

    def __init__(self, total_epochs: int, stored: set[tuple[str, int]], quiet: bool):
        from tqdm import tqdm

        self.seen = set(stored)  # (key, epoch) already in the store: a replay adds nothing
        self.bar = tqdm(total=total_epochs, initial=len(self.seen), unit="epoch", disable=quiet,
                        dynamic_ncols=True, mininterval=0.5)

    def epoch(self, key: str, row: dict[str, Any]) -> None:
        if (key, row["epoch"]) not in self.seen:
            self.seen.add((key, row["epoch"]))
            self.bar.update(1)

    def update_states(self, states: dict[str, str]) -> None:
        counts = {s: sum(v == s for v in states.values()) for s in ("running", "done", "errored")}
        self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in counts.items()))

    def close(self) -> None:
        self.bar.close()


def _key(trial) -> str:
    return trial.config["trial"]["key"]


def make_callback(run: RunDir, configs: dict[str, TrialConfig], states: dict[str, str],
                  progress):
    """The driver's one writer: epoch rows to the curve store, summaries, trial states."""
    from ray import tune

    class StoreCallback(tune.Callback):
        def _state(self, trial, state: str) -> None:
            states[_key(trial)] = state
            run.write_states(states)
            progress.update_states(states)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._state(trial, "running")

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._state(trial, "running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = _key(trial)
            if "row" in result:
                run.add_epochs(configs[key], [result["row"]])
                run.write_states(states)  # refreshes the heartbeat that `ablate status` reads
                progress.epoch(key, result["row"])
            if "summary" in result:
                run.add_summary(configs[key], result["summary"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            run.clear_error(_key(trial))
            self._state(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            error = getattr(trial, "error_file", None)
            text = Path(error).read_text() if error and Path(error).exists() else "unknown error"
            run.mark_errored(_key(trial), text)
            self._state(trial, "errored")

    return StoreCallback()


def run_sweep(run: RunDir, todo: dict[str, TrialConfig], *, address: str | None,
              cpus_per_trial: float, gpus_per_trial: float | None, max_concurrent: int | None,
              max_failures: int, autoattack: int | None, progress) -> dict[str, str]:
    """Dispatch the trials through Ray Tune; returns the final state of each trial.

    ``gpus_per_trial=None`` means one GPU per trial if the Ray cluster has GPUs, else none.
    """
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; ours shows
    import ray
    from ray import tune

    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local Ray, its dashboard (if installed) reachable from this machine only
        ray.init(dashboard_host="127.0.0.1", include_dashboard=False, log_to_driver=False)
    if gpus_per_trial is None:  # ask the cluster, not this machine: the head may have no GPU
        gpus_per_trial = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    states = {key: "pending" for key in todo}
    run.write_states(states)
    threads = max(1, int(cpus_per_trial))
    params = trial_params(run, todo, threads, autoattack)
    trainable = tune.with_resources(ablate_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(params)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            trial_name_creator=_key, trial_dirname_creator=_key),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=str(run.root / "ray"),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[make_callback(run, todo, states, progress)], verbose=0),
    )
    try:
        tuner.fit()
    finally:
        ray.shutdown()
    return states
