"""One trial of a sweep run into its run folder, both ends of it: the worker trains the trial where
it was placed and sends what the driver must know (:func:`run_trial`); the driver, the run folder's
one writer, stores each message (:func:`receive`). Ray-free: :mod:`ablation.tune` carries the
messages through Tune (a trial's ``tune.report`` reaches the driver's callback), and the tests'
in-process runner hands them straight from one end to the other.

The messages, each a dict:

- ``{"row": <epoch row>, "forks": [<epochs>, ...]}`` after each epoch: its row, and the fork
  files the trial folder holds, each by the epochs after which it was written. A start first
  sends the rows its checkpoint already holds (the driver's store dedupes), so the store is
  complete even if an earlier driver died before receiving them.
- ``{"summary": <summary.json>}`` once the trial is done and its summary is at the run folder.
- ``{"failed": <one line naming the trial>}`` when it failed in a way a retry cannot fix
  (:func:`failure`; the dispatcher sends it, having caught the error).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import files
from .checkpoint import load_torch
from .config import TrialConfig, from_dict
from .datafiles import check_data
from .errors import ConfigError, DataError
from .evaluate import write_summary
from .fork import Fork
from .remote import BackgroundUploads
from .store import RunDir
from .trainer import Reporter, Trainer

Send = Callable[[dict[str, Any]], None]


class TrialReporter(Reporter):
    """Sends each epoch to the driver, after replaying the epochs a checkpoint already holds.

    At a URI, each epoch's files go up on a background thread while the next epoch trains (a
    worker killed before its checkpoint arrives costs that epoch again, never a wrong one: the
    resumed trial recomputes it, bit for bit on a CPU, to rounding on a GPU); a fork file is sent
    before its epoch is reported, since the driver then releases the trials that start from it,
    maybe on another node."""

    def __init__(self, run: RunDir, workdir: Path, send: Send):
        self.run, self.workdir, self.send = run, workdir, send
        self.uploads = BackgroundUploads(run.remote, run.root) if run.remote else None

    def _send(self, row: dict[str, Any]) -> None:
        names = (p.name for p in self.workdir.glob(files.fork_checkpoint("*")))
        forks = sorted(e for e in map(files.fork_epochs, names) if e is not None)
        self.send({"row": row, "forks": forks})

    def start(self, config, history):
        for row in history:
            self._send(row)

    def written(self, paths, removed):
        if self.uploads:
            self.uploads.submit(paths, removed)
            if any(files.fork_epochs(p.name) is not None for p in paths):
                self.uploads.flush()

    def epoch(self, row, checkpoint):
        self._send(row)

    def flush(self) -> None:
        if self.uploads:
            self.uploads.flush()


def trial_device(device: str, gpu_ids: Sequence[Any]) -> str:
    """The ``device`` a trial trains on, from its config's field and the GPUs Ray gave it.

    Ray 2.60 no longer hides the GPUs from a trial that asked for none (CUDA_VISIBLE_DEVICES
    stays as it was), so without this ``auto`` would put every such trial on GPU 0, which Ray
    does not account for. A trial given a GPU sees only its own, as cuda:0."""
    if gpu_ids:
        return device
    if device == "auto":
        return "cpu"
    if device.startswith("cuda"):
        raise ConfigError(f"key 'device': {device!r} asks for a GPU, but Ray gave this trial "
                          "none; pass --gpus-per-trial (e.g. 1, or 0.5 to share one) or set "
                          "device: auto")
    return device


def run_trial(params: dict[str, Any], send: Send,
              gpu_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """Train or resume one trial in its folder of the run folder, and end it with its summary.

    params: what :func:`ablation.store.trial_params` gives the trial.
    send: called with each message for the driver (see the module's docstring), in order.
    gpu_ids: the GPUs Ray gave the trial (see :func:`trial_device`); None keeps the config's
        ``device`` (a trial run in the driver's own process).

    Returns the summary. A failure raises: RunFailed or AblateError for one that a retry cannot
    fix (the caller sends :func:`failure`), anything else for the dispatcher's retries.
    """
    key, config = params["key"], from_dict(params["config"], source=params["key"])
    if gpu_ids is not None:
        config = config.replace(device=trial_device(config.device, gpu_ids))  # not in the key
    fork = Fork(**params["fork"]) if params.get("fork") else None
    fork_points = params.get("fork_points", ())
    try:  # this node's copy of the data, before anything is pulled or trained
        check_data(config.dataset, config.data_root, config.download)
    except DataError as err:
        raise DataError(f"on node {socket.gethostname()}: {err}") from None
    run = RunDir.attach(params["run"])  # on another node, a URI's mirror on that node
    workdir = run.trial_dir(key)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(params["threads"])))
    with open(workdir / files.TRIAL_LOCK, "w") as lock:
        # A worker orphaned by a killed driver may still hold this trial; wait for it to end
        # rather than write the same checkpoint from two processes.
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The URI's copy is the truth, not this node's.
        for name in (files.SUMMARY, files.ATTEMPTS,
                     *(files.fork_checkpoint(e) for e in fork_points)):
            run.sync(files.trial_file(key, name))
        if run.sync(files.trial_file(key, files.CHECKPOINT)):
            best = load_torch(workdir / files.CHECKPOINT).get("best_epoch")
            if best is not None:  # else a 0.2.0 checkpoint, which holds the best weights
                run.sync(files.trial_file(key, files.best_checkpoint(best)))
        elif fork:
            run.sync(files.trial_file(fork.parent, files.fork_checkpoint(fork.epochs)))
        trainer = Trainer(config, workdir, fork=fork, fork_points=fork_points)
        start = f"starts at epoch {trainer.epochs_done}" + (
            f" from {trainer.forked_from}'s checkpoint" if trainer.forked_from else "")
        with open(workdir / files.ATTEMPTS, "a") as log:  # one line per start: resumed where
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on "
                      f"{socket.gethostname()} {start}, device {trainer.device}\n")
        run.push(workdir / files.ATTEMPTS)
        reporter = TrialReporter(run, workdir, send)
        try:
            history = trainer.fit(reporter)
        finally:  # the last checkpoint is at the URI before the summary says done, and before
            reporter.flush()  # a failure is reported: the next run resumes from it
        trainer.release()  # the GPU memory of training, before AutoAttack needs its own
        summary = write_summary(config, workdir, history, autoattack=params.get("autoattack"),
                                data=trainer.data, weights_changed=not trainer.finished_at_start)
        run.push(workdir / files.SUMMARY)
    send({"summary": summary})
    return summary


def failure(key: str, err: BaseException) -> dict[str, str]:
    """The message for a failure a retry cannot fix: one line (error.txt holds it), naming the
    trial."""
    line = " ".join(str(err).split())
    return {"failed": line if key in line else f"trial {key}: {line}"}


def receive(run: RunDir, config: TrialConfig, message: dict[str, Any]) -> None:
    """Store one message of trial ``config``'s worker in the run folder (the driver's side):
    an epoch row in the curve store, a summary in the summary table (the worker wrote and pushed
    summary.json before sending it), a failure in the trial's error.txt. Other keys (the
    dispatcher's own) are ignored."""
    if "row" in message:
        run.add_epochs(config, [message["row"]])
    if "summary" in message:
        run.rebuild_summaries()
    if "failed" in message:
        run.mark_errored(config.key, message["failed"] + "\n")
