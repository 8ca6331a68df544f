"""What a trial does at each batch, as the trainer does it: the learning rate of each layer group
and whether the intervention acts (docs/method.md B §3.1, §4, §5).

Torch-free, so that ``ablate run --dry-run`` can plan shared prefixes (:mod:`ablation.fork`)
without loading torch. The trainer sets its optimizer's learning rates with :func:`learning_rate`
and :func:`schedule_time`: the planner and the trainer evaluate the same functions. Whether an
intervention acts in an epoch is its description's (:mod:`ablation.strategies`).
"""

from __future__ import annotations

from . import strategies
from .config import TrialConfig
from .layers import GROUPS

def learning_rate(config: TrialConfig, t: float) -> float:
    """Piecewise schedule at fractional epoch t: lr_max, x0.1 at each milestone (B §3.1)."""
    drops = sum(t >= m * config.epochs for m in config.milestones)
    return config.lr_max * 0.1**drops


def schedule_time(config: TrialConfig, epoch: int, batch: int, batches: int) -> float:
    """When batch i of epoch e is trained: e + (i+1)/N per iteration (Rice), e + 1 per epoch."""
    if config.lr_update == "iteration":
        return epoch + (batch + 1) / batches
    return epoch + 1.0


def epoch_lrs(config: TrialConfig, epoch: int, batches: int) -> tuple[tuple[float, ...], ...]:
    """The learning rate of every batch of an epoch, for the parameters outside the layer groups
    and then for groups 1-4: fix-lr keeps its groups at lr_max (the optimizer group the trainer
    never updates), everything else follows the schedule (B §3.1, §5.2)."""
    schedule = _batch_lrs(config, epoch, batches)
    keeps = strategies.intervention(config.intervention).keeps_lr_max
    fixed = set(config.layers) if keeps else set()
    flat = (config.lr_max,) * batches
    return (schedule, *(flat if g in fixed else schedule for g in GROUPS))


_SCHEDULE_FIELDS = ("lr_max", "epochs", "milestones", "lr_update")
_batch_cache: dict[tuple, tuple[float, ...]] = {}


def _batch_lrs(config: TrialConfig, epoch: int, batches: int) -> tuple[float, ...]:
    """The schedule's learning rate of each batch of an epoch, cached per schedule (a sweep's
    trials share one, and the planner asks for every batch of ~100 epochs per trial)."""
    key = (*(getattr(config, f) for f in _SCHEDULE_FIELDS), epoch, batches)
    if key not in _batch_cache:
        if len(_batch_cache) > 100_000:
            _batch_cache.clear()
        _batch_cache[key] = tuple(learning_rate(config, schedule_time(config, epoch, i, batches))
                                  for i in range(batches))
    return _batch_cache[key]

