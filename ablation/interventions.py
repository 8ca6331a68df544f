"""Layer-wise interventions as small strategies: none, fix-param, fix-lr, layer-wise and full AWP.

What an intervention does is its torch-free description (:mod:`ablation.strategies`); the classes
here carry the descriptions out: the chosen groups keep lr_max (``FixLR``), get no update
(``FixParam``) or are perturbed (``AWP``). Each one sees the model's declared layer groups
(``ablation.models.group_names``); parameters outside groups 1-4 (stem, final BN, classifier) are
never touched by a layer-wise intervention. An intervention whose behaviour none of these has
registers its class with :func:`register` (a plugin's, docs/extending.md).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .config import TrialConfig
from . import plugins, strategies
from .methods import Method
from .models import group_names


class Intervention:
    """Default behaviour: one optimizer group on the schedule, nothing done around the step."""

    def __init__(self, model: nn.Module, config: TrialConfig):
        self.model = model
        self.config = config
        self.names = group_names(model, config.layers) if config.layers else []

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups; a group with ``fixed_lr`` keeps its LR while the schedule runs."""
        return [{"params": list(self.model.parameters())}]

    def before_step(self, epoch: int, method: Method, x: Tensor, x_adv: Tensor, y: Tensor) -> None:
        """Called in train mode right before the training forward pass."""

    def after_step(self) -> None:
        """Called right after the optimizer step."""


class FixParam(Intervention):
    """Freeze the chosen groups at their initial values for the whole run (A.3, B §5.1).

    Frozen tensors get no gradient, so SGD applies neither weight decay nor momentum to them; their
    BatchNorm running statistics still update because the model still runs in train mode.
    """

    def __init__(self, model, config):
        super().__init__(model, config)
        chosen = set(self.names)
        for name, p in model.named_parameters():
            if name in chosen:
                p.requires_grad_(False)


class FixLR(Intervention):
    """The chosen groups get their own optimizer group whose LR stays at lr_max (A.4, B §5.2)."""

    def param_groups(self):
        chosen = set(self.names)
        named = list(self.model.named_parameters())
        return [{"params": [p for n, p in named if n not in chosen]},
                {"params": [p for n, p in named if n in chosen], "fixed_lr": True}]


class AWP(Intervention):
    """Adversarial weight perturbation (Wu et al. 2020) on the chosen tensors (A.5, B §4).

    A proxy copy takes one SGD step up the method's loss (lr: the method description's
    ``awp_proxy_lr``); for
    every perturbed weight w the step's direction d is rescaled to v = ||w|| / ||d|| * d and
    w += gamma*v before the training step, w -= gamma*v after it. Only weights with more than one
    dimension are perturbed. Layer-wise AWP perturbs the chosen groups; ``full=True`` perturbs
    every such weight, stem and classifier too. AWP is on from the epoch the method's authors
    number ``awp_warmup`` (their AT scripts count from 0, their TRADES scripts from 1).
    """

    def __init__(self, model, config):
        super().__init__(model, config)
        params = dict(model.named_parameters())
        full = strategies.intervention(config.intervention).perturbs == "all"
        chosen = params if full else self.names
        self.perturbed = [n for n in chosen if params[n].dim() > 1]
        self.gamma = config.awp_gamma
        proxy_lr = strategies.method(config.method).awp_proxy_lr
        self.proxy = copy.deepcopy(model)
        proxy_params = dict(self.proxy.named_parameters())
        keep = set(self.perturbed)
        for name, p in proxy_params.items():
            p.requires_grad_(name in keep)  # the other weights' gradients would be thrown away
        self.proxy_params = [proxy_params[n] for n in self.perturbed]
        self.params = [params[n] for n in self.perturbed]
        self.proxy_opt = torch.optim.SGD(self.proxy_params, lr=proxy_lr)
        self.v: list[Tensor] | None = None

    def active(self, epoch: int) -> bool:
        """Whether the 0-based ``epoch`` trains with the perturbation (the schedule's rule, which
        the sweep planner reads too)."""
        return strategies.awp_active(self.config, epoch)

    def perturbation(self, method: Method, x: Tensor, x_adv: Tensor, y: Tensor) -> list[Tensor]:
        """v = ||w|| / ||d|| * d for each perturbed tensor, from one ascent step of the proxy.

        The operations run in the authors' order (``diff_in_weights`` of their utils_awp.py), so
        the result matches theirs bit for bit, not only to rounding. The ``torch._foreach_*``
        calls replace their per-tensor loop (fewer launches on a GPU); on the CPU they run the
        same per-tensor kernels, bit for bit (``test_interventions.py``). On CUDA the multi-tensor
        norm may sum in another order than ``w.norm()``: equal up to float rounding.
        """
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        self.proxy_opt.zero_grad(set_to_none=True)
        (-method.proxy_loss(self.proxy, x, x_adv, y)).backward()
        self.proxy_opt.step()
        with torch.no_grad():  # per tensor: d = q - w; v = ||w|| / (||d|| + 1e-20) * d
            diffs = torch._foreach_sub(self.proxy_params, self.params)
            scales = torch._foreach_div(torch._foreach_norm(self.params),
                                        torch._foreach_add(torch._foreach_norm(diffs), 1e-20))
            return torch._foreach_mul(diffs, scales)

    def before_step(self, epoch, method, x, x_adv, y):
        if not self.active(epoch):
            return
        self.v = self.perturbation(method, x, x_adv, y)
        with torch.no_grad():  # w += gamma * v, as the authors' add_into_weights(coeff=gamma)
            torch._foreach_add_(self.params, torch._foreach_mul(self.v, self.gamma))

    def after_step(self):
        if self.v is None:
            return
        with torch.no_grad():  # w += -gamma * v, their restore (add_into_weights(coeff=-gamma))
            torch._foreach_add_(self.params, torch._foreach_mul(self.v, -self.gamma))
        self.v = None

    # No state to checkpoint: the proxy is reloaded from the model before every use and its SGD
    # has no momentum, so a resumed trial rebuilds it exactly (checkpoints written before 0.2
    # carry a "proxy" entry, which is ignored).


# Interventions with a class of their own, by name; the others are carried out by the class their
# description calls for (see build_intervention).
CLASSES: dict[str, type[Intervention]] = {}


def register(description: strategies.Intervention, cls: type[Intervention]) -> None:
    """Add an intervention: its description (:func:`ablation.strategies.register`, with
    ``packed=False``: the packed trainer cannot run a class) and the class that carries it out
    (a subclass of :class:`Intervention`)."""
    if description.packed:
        raise ValueError(f"intervention {description.name!r} has a class of its own, which the "
                         "packed trainer cannot run; describe it with packed=False")
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        raise ValueError(f"intervention {description.name!r}: {cls!r} is not a subclass of "
                         "ablation.interventions.Intervention")
    strategies.register(description)
    CLASSES[description.name] = cls


def build_intervention(model: nn.Module, config: TrialConfig) -> Intervention:
    """The strategy object of the trial's intervention: its registered class, else the class
    its description calls for (which acts from the first epoch)."""
    d = strategies.intervention(config.intervention)
    if d.name in plugins.STAND_INS:  # a bug: callers check plugins.missing first
        raise ValueError(f"intervention {d.name!r} is known from a run folder's record only")
    if d.name not in CLASSES and d.acts_from is not None:
        raise ValueError(f"intervention {d.name!r} acts from a later epoch (acts_from) but has "
                         "no class to do so; register one with ablation.interventions.register")
    cls = CLASSES.get(d.name) or (AWP if d.perturbs else FixParam if d.frozen
                                  else FixLR if d.keeps_lr_max else Intervention)
    return cls(model, config)
