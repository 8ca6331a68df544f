"""Training methods: how a batch is attacked and which loss the weights descend (AT, TRADES)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attacks import mean_ce, pgd, random_start, trades_attack, trades_kl, trades_start
from .config import TrialConfig


class Method:
    """A training objective: ``attack`` makes the training batch, ``loss`` is minimised, and
    ``proxy_loss`` is the objective AWP ascends on its proxy network (docs/method.md B §4.1, §4.2).

    What the method is, as data (its name, the number its authors give their first epoch,
    AWP's proxy learning rate, its passes), is its description in :mod:`ablation.strategies`.
    """

    def __init__(self, config: TrialConfig):
        self.threat = config.threat_model
        self.steps = config.train_steps
        self.attack_in_train_mode = config.train_attack_mode == "train"
        self.beta = config.trades_beta

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, start: Tensor | None = None
               ) -> Tensor:
        """The adversarial training batch from ``start`` (drawn here by :meth:`draw_start` when
        None); leaves the model in the mode the attack ran in."""
        model.train(self.attack_in_train_mode)
        return self._attack(model, x, y, start)

    def draw_start(self, x: Tensor) -> Tensor:
        """The attack's random start for the batch ``x``: the only random numbers it draws, so
        a pack of trials that share ``x`` draws it once, as each trial alone would."""
        raise NotImplementedError

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, start: Tensor | None) -> Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(training loss, logits on x_adv); the model is in train mode."""
        raise NotImplementedError

    def proxy_loss(self, proxy: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The loss whose increase AWP's weight perturbation seeks."""
        raise NotImplementedError


class AT(Method):
    """PGD adversarial training (Madry et al., as run by Rice et al.): CE on PGD examples.

    The AT-AWP scripts count epochs from 0 and give the proxy SGD lr 0.01 (B §4.1;
    ``strategies.METHODS["at"]``).
    """

    def draw_start(self, x):
        return random_start(x, self.threat)

    def _attack(self, model, x, y, start):
        x_adv = pgd(model, x, y, self.threat, self.steps, delta=start)
        if model.training:
            # Rice's attack_pgd ends with one more forward at the final point to pick the best
            # restart; with one restart the pick is moot, but in train mode that pass moves BN's
            # running statistics, so it runs here too (B §2).
            with torch.no_grad():
                model(x_adv)
        return x_adv

    def loss(self, model, x, x_adv, y):
        logits_adv = model(x_adv)
        return mean_ce(logits_adv, y, model), logits_adv

    def proxy_loss(self, proxy, x, x_adv, y):
        return mean_ce(proxy(x_adv), y, proxy)


class TRADES(Method):
    """TRADES: CE on clean inputs + beta * KL(clean || adversarial) (docs/method.md B §6).

    The TRADES-AWP scripts count epochs from 1 (so a warm-up of 10 turns AWP on in the 0-based
    epoch 9) and give the proxy SGD their training lr, 0.1 (B §4.2; ``strategies.METHODS``).
    """

    def draw_start(self, x):
        return trades_start(x)

    def _attack(self, model, x, y, start):
        return trades_attack(model, x, self.threat, self.steps, start=start)

    def loss(self, model, x, x_adv, y):
        # The authors' three train-mode passes, in their order: x_adv, x as the KL target, x again
        # for the CE. One clean pass would give the same gradient, but BN's running statistics
        # would see the clean batch once instead of twice, and the next batch's eval-mode attack
        # reads those statistics (B §6).
        logits_adv = model(x_adv)
        kl = trades_kl(logits_adv, model(x), model)
        return mean_ce(model(x), y, model) + self.beta * kl, logits_adv

    def proxy_loss(self, proxy, x, x_adv, y):
        # The TRADES-AWP proxy's passes in the authors' order: x for the CE, x_adv, x as KL target.
        ce = mean_ce(proxy(x), y, proxy)
        return ce + self.beta * trades_kl(proxy(x_adv), proxy(x), proxy)


METHODS: dict[str, type[Method]] = {"at": AT, "trades": TRADES}


def build_method(config: TrialConfig) -> Method:
    return METHODS[config.method](config)
