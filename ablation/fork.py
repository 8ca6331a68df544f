"""Shared-prefix forking: a trial that computes exactly what its baseline computes for its first E
epochs starts from the baseline's checkpoint at E instead of training those epochs again.

A fix-lr trial equals its AT baseline until the first epoch in which some batch's learning rate
differs (with the paper's schedule, epochs 0-98 of 200); an AWP trial with warm-up w equals it for
its w inactive epochs. E is found by evaluating, batch by batch, the same schedule functions the
trainer uses (:mod:`ablation.schedule`), never by a formula of its own. With the same seed the two
trials draw the same random numbers in the same order (the intervention draws none), so the
fork's first E epochs are the baseline's: bit for bit against the same trial trained from scratch
on one machine's CPU (tests/test_fork.py checks it), to float rounding on a GPU, whose kernels do
not round repeatably (docs/method.md C.1).

When a sweep runs, a fork's life cycle is: :func:`fork_waits` finds, from what the run folder
holds, which trials start from a fork file and which parents write one at which epochs; a
:class:`ForkQueue` hands the trials out, holding each fork until its parent's file exists and
releasing it to train from scratch when that file can no longer come.

Torch-free and Ray-free: ``ablate run --dry-run`` plans with it, and the Tune searcher
(:mod:`ablation.tune`) is an adapter over the queue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import files, strategies
from .config import TrialConfig
from .datasets import dataset_info
from .schedule import epoch_lrs


@dataclass(frozen=True)
class Fork:
    """A trial that starts from its ``parent``'s checkpoint after ``epochs`` epochs."""

    parent: str
    epochs: int

    def to_dict(self) -> dict[str, object]:
        return {"parent": self.parent, "epochs": self.epochs}


def batches_per_epoch(config: TrialConfig, train_images: int | None = None) -> int:
    """Batches per epoch of the dataset's training split (or of ``train_images``, the data a
    trainer loaded). The planner's first differing epoch does not depend on it: every epoch's
    last batch is trained at schedule time e + 1, so a milestone inside or at the end of epoch e
    changes epoch e."""
    n = dataset_info(config.dataset).train_images if train_images is None else train_images
    return math.ceil(n / config.batch_size)


def shared_epochs(parent: TrialConfig, child: TrialConfig, batches: int) -> int:
    """How many leading epochs ``child`` computes exactly as ``parent`` does (0 if they are not
    the same trial up to the intervention), at most ``epochs - 1``: a fork trains at least its
    last epoch, so it always ends with its own weights and summary."""
    if parent.intervention != "none" or _base(parent) != _base(child):
        return 0
    return _shared(parent, child, batches)


def _shared(parent: TrialConfig, child: TrialConfig, batches: int) -> int:
    acts = [(strategies.intervention(t.intervention).acts, t) for t in (parent, child)]
    for epoch in range(child.epochs - 1):
        if any(act(trial, epoch) for act, trial in acts):
            return epoch
        if epoch_lrs(parent, epoch, batches) != epoch_lrs(child, epoch, batches):
            return epoch
    return child.epochs - 1


def same_base(a: TrialConfig, b: TrialConfig) -> bool:
    """Whether two trials are the same trial up to their intervention (runtime fields aside)."""
    return _base(a) == _base(b)


def _base(config: TrialConfig) -> str:
    """The trial's identity without its intervention."""
    return json.dumps({k: v for k, v in config.identity().items()
                       if k not in strategies.INTERVENTION_FIELDS}, sort_keys=True)


def plan_forks(trials: Iterable[TrialConfig]) -> dict[str, Fork]:
    """For each trial of a sweep that can fork: its baseline (a trial of the same sweep with
    intervention "none" and otherwise the same fields but the intervention's) and the epochs they
    share. Trials without such a baseline, or sharing no epoch with it, are left out."""
    trials = list(trials)
    baselines = {_base(t): t for t in trials if t.intervention == "none"}
    forks = {}
    for trial in trials:
        parent = baselines.get(_base(trial))
        if trial.intervention == "none" or parent is None:
            continue
        shared = shared_epochs(parent, trial, batches_per_epoch(trial))
        if shared > 0:
            forks[trial.key] = Fork(parent.key, shared)
    return forks


def epochs_to_train(trials: Iterable[TrialConfig], forks: dict[str, Fork]) -> int:
    """Training epochs of a sweep when each fork skips the epochs it shares with its parent."""
    return sum(t.epochs - (forks[t.key].epochs if t.key in forks else 0) for t in trials)


# --- a sweep's forks while it runs: who waits for which file, and when each trial starts --------


@dataclass(frozen=True)
class ForkWaits:
    """Where a sweep's forks stand in its run folder when ``ablate run`` starts."""

    waiting: dict[str, Fork]  # trial key -> the fork it starts from, once its file exists
    ready: frozenset[tuple[str, int]]  # (parent, epochs) of the fork files that exist already
    points: dict[str, tuple[int, ...]]  # parent key -> the epochs after which it writes one


def fork_waits(forks: dict[str, Fork], todo: Iterable[str],
               have: Callable[[str], bool]) -> ForkWaits:
    """Which of ``forks`` start from their parent's fork file in this run, given the keys of the
    trials still to run and ``have``, whether a file of the run folder exists (its path relative
    to the folder's root, as :mod:`ablation.files` names it).

    A trial that has a checkpoint of its own resumes from it and waits for nothing. A trial whose
    parent is done starts from the parent's fork file if there is one, else from scratch (its
    parent ran without forking). Parents write a fork file at each of their children's points."""
    todo = set(todo)
    waiting, ready, points = {}, set(), {}
    for key, fork in forks.items():
        if key not in todo or have(files.trial_file(key, files.CHECKPOINT)):
            continue
        if have(files.trial_file(fork.parent, files.fork_checkpoint(fork.epochs))):
            ready.add((fork.parent, fork.epochs))
        elif fork.parent not in todo:
            continue  # its parent finished without the file: nothing to wait for
        waiting[key] = fork
        points.setdefault(fork.parent, set()).add(fork.epochs)
    return ForkWaits(waiting, frozenset(ready),
                     {parent: tuple(sorted(epochs)) for parent, epochs in points.items()})


FINISHED = "FINISHED"  # ForkQueue.next() once every trial has been handed out


def _trials(params: dict[str, Any]) -> list[str]:
    """The trials an item of the queue trains: a pack's (``"trials"``) or its own ``"key"``."""
    return [t["key"] for t in params["trials"]] if "trials" in params else [params["key"]]


class ForkQueue:
    """The order in which a sweep's trials start: first the baselines that other trials fork
    from, then the trials that wait for nothing, and each trial of ``waiting`` once its parent's
    fork file exists (``ready`` holds the (parent, epochs) files that exist already). A waiting
    trial whose file cannot come any more, because its parent went past the fork point without
    writing it or ended, is handed out without its fork (``"fork": None``) and trains from
    scratch: nothing waits forever.

    ``params`` are what each item receives: a trial's params (:func:`ablation.store.trial_params`)
    or a pack of them (:func:`ablation.store.dispatch_units`: ``"trials"``), each naming its
    ``key``; ``waiting`` holds items by that key. The dispatcher tells the queue what the trials
    it started do (:meth:`reported`, :meth:`ended`, by trial key) and asks it for the next item
    (:meth:`next`)."""

    def __init__(self, params: Iterable[dict[str, Any]], waiting: dict[str, Fork],
                 ready: Iterable[tuple[str, int]] = ()):
        params = list(params)
        self.forks = dict(waiting)
        parents = {f.parent for f in self.forks.values()}
        self.queue = sorted((p for p in params if p["key"] not in self.forks),
                            key=lambda p: not parents & set(_trials(p)))  # stable: parents first
        self.held = {p["key"]: p for p in params if p["key"] in self.forks}
        self.ready, self.over = set(ready), set()
        self.epochs: dict[str, int] = {}  # epochs each started trial has reported

    @property
    def waiting(self) -> list[str]:
        """The keys of the trials held until their parent's fork file exists (or cannot)."""
        return sorted(k for p in self.held.values() for k in _trials(p))

    def next(self) -> dict[str, Any] | str | None:
        """The params of the next trial to start; None while only held trials are left (ask
        again after the next report); FINISHED once every trial has been handed out."""
        for key in list(self.held):
            fork = self.forks[key]
            if (fork.parent, fork.epochs) in self.ready:
                self.queue.append(self.held.pop(key))
            elif fork.parent in self.over or self.epochs.get(fork.parent, 0) >= fork.epochs:
                self.queue.append({**self.held.pop(key), "fork": None})
        if not self.queue:
            return None if self.held else FINISHED
        return self.queue.pop(0)

    def reported(self, key: str, epochs: int, fork_files: Iterable[int] = ()) -> None:
        """Trial ``key`` has done ``epochs`` epochs, and its folder holds the fork files written
        after each number of epochs in ``fork_files``."""
        self.epochs[key] = max(self.epochs.get(key, 0), epochs)
        self.ready.update((key, int(e)) for e in fork_files)

    def ended(self, key: str) -> None:
        """Trial ``key`` ended (done, failed, stopped): no fork file of its comes any more."""
        self.over.add(key)
