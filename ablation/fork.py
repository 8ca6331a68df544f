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

Torch-free: ``ablate run --dry-run`` plans with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from collections.abc import Iterable

from .config import TrialConfig
from .schedule import epoch_lrs, intervenes

# Fields in which a trial may differ from the baseline it forks from: what the intervention is.
# A baseline (intervention "none") ignores them all.
INTERVENTION_FIELDS = ("intervention", "layers", "awp_gamma", "awp_warmup")
# Training images per dataset, for the planner's batch count (the trainer checks again with the
# data it loaded). The first differing epoch does not depend on it: every epoch's last batch is
# trained at schedule time e + 1, so a milestone inside or at the end of epoch e changes epoch e.
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "digits": 1_437,
                "synthetic": 512}


@dataclass(frozen=True)
class Fork:
    """A trial that starts from its ``parent``'s checkpoint after ``epochs`` epochs."""

    parent: str
    epochs: int

    def to_dict(self) -> dict[str, object]:
        return {"parent": self.parent, "epochs": self.epochs}


def batches_per_epoch(config: TrialConfig, train_images: int | None = None) -> int:
    n = TRAIN_IMAGES[config.dataset] if train_images is None else train_images
    return math.ceil(n / config.batch_size)


def shared_epochs(parent: TrialConfig, child: TrialConfig, batches: int) -> int:
    """How many leading epochs ``child`` computes exactly as ``parent`` does (0 if they are not
    the same trial up to the intervention), at most ``epochs - 1``: a fork trains at least its
    last epoch, so it always ends with its own weights and summary."""
    if parent.intervention != "none" or _base(parent) != _base(child):
        return 0
    return _shared(parent, child, batches)


def _shared(parent: TrialConfig, child: TrialConfig, batches: int) -> int:
    for epoch in range(child.epochs - 1):
        if intervenes(parent, epoch) or intervenes(child, epoch):
            return epoch
        if epoch_lrs(parent, epoch, batches) != epoch_lrs(child, epoch, batches):
            return epoch
    return child.epochs - 1


def _base(config: TrialConfig) -> str:
    """The trial's identity without its intervention."""
    return json.dumps({k: v for k, v in config.identity().items()
                       if k not in INTERVENTION_FIELDS}, sort_keys=True)


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
