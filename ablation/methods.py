"""Training methods: how a batch is attacked and which loss the weights descend (AT, TRADES)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import ThreatModel, pgd, trades_attack, trades_kl
from .config import TrialConfig


class Method:
    """A training objective: ``attack`` makes the training batch, ``loss`` is minimised, and
    ``proxy_loss`` is the objective AWP ascends on its proxy network (METHOD B §4.1, §4.2)."""

    def __init__(self, config: TrialConfig):
        self.threat = ThreatModel(config.threat, config.eps, config.step)
        self.steps = config.train_steps
        self.attack_in_train_mode = config.train_attack_mode == "train"
        self.beta = config.trades_beta

    def attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The adversarial training batch; leaves the model in the mode the attack ran in."""
        model.train(self.attack_in_train_mode)
        return self._attack(model, x, y)

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(training loss, logits on x_adv); the model is in train mode."""
        raise NotImplementedError

    def proxy_loss(self, proxy: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """The loss whose increase AWP's weight perturbation seeks."""
        raise NotImplementedError


class AT(Method):
    """PGD adversarial training (Madry et al., as run by Rice et al.): CE on PGD examples."""

    def _attack(self, model, x, y):
        return pgd(model, x, y, self.threat, self.steps)

    def loss(self, model, x, x_adv, y):
        logits_adv = model(x_adv)
        return F.cross_entropy(logits_adv, y), logits_adv

    def proxy_loss(self, proxy, x, x_adv, y):
        return F.cross_entropy(proxy(x_adv), y)


class TRADES(Method):
    """TRADES: CE on clean inputs + beta * KL(clean || adversarial) (METHOD B §6)."""

    def _attack(self, model, x, y):
        return trades_attack(model, x, self.threat, self.steps)

    def loss(self, model, x, x_adv, y):
        # The authors' code runs model(x) twice (once for CE, once as the KL target); one pass gives
        # the same gradient and differs only in how often BN's running statistics see the batch.
        logits_nat = model(x)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_nat, y) + self.beta * trades_kl(logits_adv, logits_nat)
        return loss, logits_adv

    def proxy_loss(self, proxy, x, x_adv, y):
        logits_nat = proxy(x)
        return F.cross_entropy(logits_nat, y) + self.beta * trades_kl(proxy(x_adv), logits_nat)


METHODS: dict[str, type[Method]] = {"at": AT, "trades": TRADES}


def build_method(config: TrialConfig) -> Method:
    return METHODS[config.method](config)
