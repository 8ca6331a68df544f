"""What a trial does at each batch, as the trainer does it: the learning rate of each layer group
and whether the intervention acts (docs/method.md B §3.1, §4, §5).

Torch-free, so that ``ablate run --dry-run`` can plan shared prefixes (:mod:`ablation.fork`)
without loading torch. The trainer sets its optimizer's learning rates with :func:`learning_rate`
and :func:`schedule_time`, and AWP switches on with :func:`awp_active`: the planner and the trainer
evaluate the same functions.
"""

from __future__ import annotations

from .config import TrialConfig
from .layers import GROUPS

# The number each method's authors give their first epoch: their AT scripts count from 0, their
# TRADES scripts from 1, and AWP's warm-up is compared against that number (B §4).
FIRST_EPOCH = {"at": 0, "trades": 1}


def learning_rate(config: TrialConfig, t: float) -> float:
    """Piecewise schedule at fractional epoch t: lr_max, x0.1 at each milestone (B §3.1)."""
    drops = sum(t >= m * config.epochs for m in config.milestones)
    return config.lr_max * 0.1**drops


def schedule_time(config: TrialConfig, epoch: int, batch: int, batches: int) -> float:
    """When batch i of epoch e is trained: e + (i+1)/N per iteration (Rice), e + 1 per epoch."""
    if config.lr_update == "iteration":
        return epoch + (batch + 1) / batches
    return epoch + 1.0


def awp_active(config: TrialConfig, epoch: int) -> bool:
    """Whether AWP perturbs the weights in the 0-based ``epoch``: from the epoch its authors
    number ``awp_warmup`` (so TRADES' warm-up 10 starts in epoch 9), and never with gamma 0."""
    return config.awp_gamma > 0 and epoch >= config.awp_warmup - FIRST_EPOCH[config.method]


def epoch_lrs(config: TrialConfig, epoch: int, batches: int) -> tuple[tuple[float, ...], ...]:
    """The learning rate of every batch of an epoch, for the parameters outside the layer groups
    and then for groups 1-4: fix-lr keeps its groups at lr_max (the optimizer group the trainer
    never updates), everything else follows the schedule (B §3.1, §5.2)."""
    schedule = _batch_lrs(config, epoch, batches)
    fixed = set(config.layers) if config.intervention == "fix_lr" else set()
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


def intervenes(config: TrialConfig, epoch: int) -> bool:
    """Whether the intervention changes the epoch's computation other than through the learning
    rates: fix-param from the first batch (its groups never move), AWP once it is active."""
    if config.intervention == "fix_param":
        return True
    if config.intervention in ("awp", "awp_full"):
        return awp_active(config, epoch)
    return False
