"""The trials of a sweep run into their run folder, both ends of it: the worker trains what the
dispatcher handed out (a pack of one trial or more, :func:`run_unit`) where it was placed and
sends what the driver must know; the driver, the run folder's one writer, stores each message
(:func:`receive`). Ray-free: :mod:`ablation.tune` carries the messages through Tune (a unit's
``tune.report`` reaches the driver's callback), and the tests' in-process runner hands them
straight from one end to the other.

The messages, each a dict naming its ``"trial"`` (a trial key):

- ``{"row": <epoch row>, "forks": [<epochs>, ...]}`` after each epoch: its row, and the fork
  files the trial folder holds, each by the epochs after which it was written. A start first
  sends the rows its checkpoint already holds (the driver's store dedupes), so the store is
  complete even if an earlier driver died before receiving them.
- ``{"summary": <summary.json>}`` once the trial is done and its summary is at the run folder.
- ``{"failed": <one line naming the trial>}`` when it failed in a way a retry cannot fix
  (:func:`failure`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from . import files, plugins
from .checkpoint import read, read_fork
from .config import TrialConfig, from_dict
from .datafiles import check_data
from .errors import ConfigError, DataError
from .evaluate import write_summary
from .fork import Fork
from .packed import PackTrainer
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

    def __init__(self, run: RunDir, workdir: Path, send: Send, key: str):
        self.run, self.workdir, self.send, self.key = run, workdir, send, key
        self.uploads = BackgroundUploads(run.remote, run.root) if run.remote else None

    def _send(self, row: dict[str, Any]) -> None:
        names = (p.name for p in self.workdir.glob(files.fork_checkpoint("*")))
        forks = sorted(e for e in map(files.fork_epochs, names) if e is not None)
        self.send({"row": row, "forks": forks, "trial": self.key})

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


def run_unit(unit: dict[str, Any], send: Send,
             gpu_ids: Sequence[Any] | None = None) -> None:
    """Train or resume what the dispatcher handed out: a pack of one trial or more
    (:func:`ablation.store.dispatch_units`), each ending with its summary or its failure.

    unit: ``{"key": ..., "trials": [params of each trial], "fork": ...}``; a unit released
        without its fork (``"fork": None``: the file cannot come) trains its trials from scratch.
    send: called with each message for the driver (see the module's docstring), in order.
    gpu_ids: the GPUs Ray gave the unit (see :func:`trial_device`); None keeps each config's
        ``device`` (a unit run in the driver's own process).

    A failure of one trial that a retry cannot fix (a diverged loss in a pack) is sent as its
    :func:`failure`; a failure of the whole unit raises: RunFailed or AblateError for one that
    a retry cannot fix (the caller sends :func:`failure` for each trial), anything else for the
    dispatcher's retries.
    """
    trials = [dict(p, fork=None) if unit.get("fork", True) is None else p
              for p in unit["trials"]]
    if len(trials) == 1:
        run_trial(trials[0], send, gpu_ids)
    else:
        run_pack(trials, send, gpu_ids)


def _config(params: dict[str, Any], gpu_ids: Sequence[Any] | None) -> TrialConfig:
    # the sweep's plugins, shipped as text: this node may not see the user's files
    plugins.load(plugins.from_dicts(params.get("plugins", []), params["key"]))
    config = from_dict(params["config"], source=params["key"])
    if gpu_ids is not None:
        config = config.replace(device=trial_device(config.device, gpu_ids))  # not in the key
    try:  # this node's copy of the data, before anything is pulled or trained
        check_data(config.dataset, config.data_root, config.download)
    except DataError as err:
        raise DataError(f"on node {socket.gethostname()}: {err}") from None
    return config


def _pull(run: RunDir, params: dict[str, Any]) -> Fork | None:
    """This node's copy of a trial's files, from the URI (the truth, not this node's); the fork
    the trial may start from."""
    key = params["key"]
    fork = Fork(**params["fork"]) if params.get("fork") else None
    for name in (files.SUMMARY, files.ATTEMPTS,
                 *(files.fork_checkpoint(e) for e in params.get("fork_points", ()))):
        run.sync(files.trial_file(key, name))
    if run.sync(files.trial_file(key, files.CHECKPOINT)):
        best = read(run.trial_dir(key) / files.CHECKPOINT, key).get("best_epoch")
        if best is not None:  # else a 0.2.0 checkpoint, which holds the best weights
            run.sync(files.trial_file(key, files.best_checkpoint(best)))
    elif fork:
        run.sync(files.trial_file(fork.parent, files.fork_checkpoint(fork.epochs)))
    return fork


def _log_start(run: RunDir, key: str, line: str) -> None:
    workdir = run.trial_dir(key)
    with open(workdir / files.ATTEMPTS, "a") as log:  # one line per start: resumed where
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on "
                  f"{socket.gethostname()} {line}\n")
    run.push(workdir / files.ATTEMPTS)


@contextmanager
def _locked(run: RunDir, keys: Sequence[str]) -> Iterator[None]:
    """The trials' folders, each held by this process: a worker orphaned by a killed driver
    may still hold one; wait for it to end rather than write the same checkpoint twice."""
    with ExitStack() as stack:
        for key in keys:
            run.trial_dir(key).mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(run.trial_dir(key) / files.TRIAL_LOCK, "w"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _finish(run: RunDir, params: dict[str, Any], config: TrialConfig, history, data,
            weights_changed: bool, send: Send) -> dict[str, Any]:
    summary = write_summary(config, run.trial_dir(params["key"]), history,
                            autoattack=params.get("autoattack"), data=data,
                            weights_changed=weights_changed)
    run.push(run.trial_dir(params["key"]) / files.SUMMARY)
    send({"summary": summary, "trial": params["key"]})
    return summary


def run_trial(params: dict[str, Any], send: Send,
              gpu_ids: Sequence[Any] | None = None) -> dict[str, Any]:
    """Train or resume one trial in its folder of the run folder, and end it with its summary
    (see :func:`run_unit`; ``params``: what :func:`ablation.store.trial_params` gives it).
    Returns the summary."""
    key, config = params["key"], _config(params, gpu_ids)
    run = RunDir.attach(params["run"])  # on another node, a URI's mirror on that node
    workdir = run.trial_dir(key)
    torch.set_num_threads(max(1, int(params["threads"])))
    with _locked(run, [key]):
        fork = _pull(run, params)
        trainer = Trainer(config, workdir, fork=fork, fork_points=params.get("fork_points", ()))
        _log_start(run, key, f"starts at epoch {trainer.epochs_done}" + (
            f" from {trainer.forked_from}'s checkpoint" if trainer.forked_from else "")
            + f", device {trainer.device}")
        reporter = TrialReporter(run, workdir, send, key)
        try:
            history = trainer.fit(reporter)
        finally:  # the last checkpoint is at the URI before the summary says done, and before
            reporter.flush()  # a failure is reported: the next run resumes from it
        trainer.release()  # the GPU memory of training, before AutoAttack needs its own
        return _finish(run, params, config, history, trainer.data,
                       not trainer.finished_at_start, send)


def _epochs_done(run: RunDir, key: str, fork: Fork | None) -> int:
    """Where a trial of a pack stands before it starts: its checkpoint's epochs, else its
    fork's (when the file is there), else 0."""
    path = run.trial_dir(key) / files.CHECKPOINT
    if path.exists():
        return len(read(path, key)["history"])
    if fork and read_fork(run.trial_dir(fork.parent) / files.fork_checkpoint(fork.epochs),
                          fork) is not None:
        return fork.epochs
    return 0


def run_pack(trials: list[dict[str, Any]], send: Send,
             gpu_ids: Sequence[Any] | None = None) -> None:
    """Train or resume K >= 2 trials as one pack (:class:`ablation.packed.PackTrainer`), each in
    its own folder with the files it would write alone, each ending with its summary or its
    failure. A trial that stands behind the others (a kill between two of the pack's
    checkpoints, a fork file that never came) first catches up alone."""
    run = RunDir.attach(trials[0]["run"])
    with _locked(run, [p["key"] for p in trials]):
        forks = [_pull(run, p) for p in trials]
        done = [_epochs_done(run, p["key"], f) for p, f in zip(trials, forks)]
    finished = [p for p, d in zip(trials, done) if d >= p["config"]["epochs"]]
    for params in finished:  # trained, but stopped before its summary: that alone is left
        run_trial(params, send, gpu_ids)
    rest = [(p, f, d) for p, f, d in zip(trials, forks, done) if p not in finished]
    if len(rest) == 1:
        run_trial(rest[0][0], send, gpu_ids)
    elif rest:
        _train_pack(run, *map(list, zip(*rest)), send, gpu_ids)


def _train_pack(run: RunDir, trials: list[dict[str, Any]], forks: list[Fork | None],
                done: list[int], send: Send, gpu_ids: Sequence[Any] | None) -> None:
    keys = [p["key"] for p in trials]
    configs = [_config(p, gpu_ids) for p in trials]
    torch.set_num_threads(max(1, int(trials[0]["threads"])))
    with _locked(run, keys):
        for params, config, fork, epochs in zip(trials, configs, forks, done):
            if epochs < max(done):
                alone = Trainer(config, run.trial_dir(params["key"]), fork=fork,
                                fork_points=params.get("fork_points", ()))
                _log_start(run, params["key"], f"starts at epoch {alone.epochs_done}, alone "
                           f"until epoch {max(done)} (its pack is there), device {alone.device}")
                reporter = TrialReporter(run, run.trial_dir(params["key"]), send, params["key"])
                try:
                    alone.fit(reporter, until=max(done))
                finally:
                    reporter.flush()
                alone.release()
        pack = PackTrainer(configs, [run.trial_dir(k) for k in keys], forks=forks,
                           fork_points=[p.get("fork_points", ()) for p in trials])
        for slot in pack.slots:
            start = f"starts at epoch {len(slot.history)}" + (
                f" from {slot.forked_from}'s checkpoint" if slot.forked_from else "")
            _log_start(run, slot.config.key, f"{start} in a pack of {pack.k} with "
                       f"{', '.join(k for k in keys if k != slot.config.key)}, device "
                       f"{pack.device}")
        reporters = [TrialReporter(run, run.trial_dir(k), send, k) for k in keys]
        finished_at_start = dict(zip(keys, pack.finished_at_start))
        try:
            histories, failed = pack.fit(reporters)
        finally:
            for reporter in reporters:
                reporter.flush()
        pack.release()
        for key, err in failed.items():
            send(failure(key, err))
        for params, config in zip(trials, configs):
            if params["key"] not in failed:
                _finish(run, params, config, histories[params["key"]], pack.data,
                        not finished_at_start[params["key"]], send)


def failure(key: str, err: BaseException) -> dict[str, str]:
    """The message for a failure a retry cannot fix: one line (error.txt holds it), naming the
    trial."""
    line = " ".join(str(err).split())
    return {"failed": line if key in line else f"trial {key}: {line}", "trial": key}


def receive(run: RunDir, configs: dict[str, TrialConfig], message: dict[str, Any]) -> None:
    """Store one message of a worker in the run folder (the driver's side): an epoch row of the
    trial it names (``configs`` by key) in the curve store, a summary in the summary table (the
    worker wrote and pushed summary.json before sending it), a failure in the trial's error.txt.
    Other keys (the dispatcher's own) are ignored."""
    config = configs[message["trial"]]
    if "row" in message:
        run.add_epochs(config, [message["row"]])
    if "summary" in message:
        run.rebuild_summaries()
    if "failed" in message:
        run.mark_errored(config.key, message["failed"] + "\n")
