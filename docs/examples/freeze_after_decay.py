"""Freeze-after-decay as an ablate plugin: fix-param on the chosen layer groups from the first
learning-rate decay on; before it, the trial computes exactly what its AT baseline computes. A
walk-through of this file is in docs/extending.md.

Use it by naming this file in a sweep (``plugins: [freeze_after_decay.py]``, relative to the
sweep file) or with ``ablate train --plugin freeze_after_decay.py``; then
``intervention: freeze_after_decay`` with ``layers`` in any trial.
"""

from ablation import interventions, strategies
from ablation.fork import batches_per_epoch
from ablation.schedule import learning_rate, schedule_time


def first_decay_epoch(config) -> int:
    """The first 0-based epoch trained wholly after the schedule's first decay: the first whose
    first batch trains below lr_max, by the schedule functions the trainer uses. With the
    paper's AT schedule (200 epochs, per-iteration updates) that is epoch 100; with TRADES'
    per-epoch updates, epoch 99. A run whose learning rate never drops never freezes."""
    batches = batches_per_epoch(config)
    return next((e for e in range(config.epochs)
                 if learning_rate(config, schedule_time(config, e, 0, batches)) < config.lr_max),
                config.epochs)


class FreezeAfterDecay(interventions.Intervention):
    """From ``first_decay_epoch`` on, the chosen groups get no gradient, so SGD applies neither
    weight decay nor momentum to them and they keep the weights they had at the decay (fix-param,
    docs/method.md A.3, from a later start). Their BatchNorm running statistics still move, as
    fix-param's do. Nothing is drawn at random, so the trial and its baseline draw alike."""

    def __init__(self, model, config):
        super().__init__(model, config)  # self.names: the chosen groups' parameter names
        self.frozen_from = DESCRIPTION.acts_from(config)

    def before_step(self, epoch, method, x, x_adv, y):
        if epoch >= self.frozen_from:  # idempotent, so a resumed or forked trial freezes too
            chosen = set(self.names)
            for name, p in self.model.named_parameters():
                if name in chosen:
                    p.requires_grad_(False)


# What the planners read: layer-wise, frozen once it acts, and acting only from the first decay
# epoch, so the fork planner starts its trials from the AT baseline's checkpoint there. The packed
# trainer carries out descriptions, not classes: packed=False trains these trials alone.
DESCRIPTION = strategies.Intervention("freeze_after_decay", layer_wise=True, frozen=True,
                                      acts_from=first_decay_epoch, packed=False)
interventions.register(DESCRIPTION, FreezeAfterDecay)
