"""What each training method and each intervention does, as data: one torch-free description per
name, read by everything that must know it without running it: the config's checks, the schedule
and the fork planner, the cost model, the benchmark, the reports, and the trainer's strategy
classes (:mod:`ablation.methods`, :mod:`ablation.interventions`), which carry it out.

A name without a description raises (:func:`intervention`, :func:`method`): it never means "no
effect", which would let the planner fork a trial whose intervention changes training. Adding an
intervention is one description here (or :func:`register`) and, if no existing class carries it
out, one class registered with it by :func:`ablation.interventions.register`; a user keeps both
in a plugin file of their own (docs/extending.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError, quote

if TYPE_CHECKING:
    from .config import TrialConfig


@dataclass(frozen=True)
class Method:
    """A training objective (docs/method.md B §2-§6)."""

    name: str
    display: str  # how figures and tables name it: AT, TRADES
    # The number the method's authors give their first epoch: their AT scripts count from 0, their
    # TRADES scripts from 1; AWP's warm-up is compared against it (B §4).
    first_epoch: int
    awp_proxy_lr: float  # the learning rate of AWP's proxy step in the authors' script (B §4)
    # A training step in forward passes of one image (F), besides the attack's 2F per step: AT's
    # forward, backward (3F) and, when it attacks in train mode, Rice's restart forward (1F);
    # TRADES' clean KL target (1F) and three training passes with their backward (9F).
    step_passes: float
    restart_pass_in_train_mode: bool = False

    def passes(self, config: TrialConfig) -> float:
        """Forward-equivalents of one training step, attack included (docs/method.md D.2)."""
        restart = self.restart_pass_in_train_mode and config.train_attack_mode == "train"
        return 2 * config.train_steps + self.step_passes + restart


@dataclass(frozen=True)
class Intervention:
    """What an intervention does to the chosen layer groups (docs/method.md A.3-A.5).

    ``layer_wise`` interventions act on a chosen subset of groups 1-4 (the trial's ``layers``);
    the others take none. The remaining fields say how, and are all a planner, a cost model or a
    batched trainer needs: the chosen groups keep ``lr_max`` while the rest follows the schedule
    (fix-lr), or never move (fix-param: no gradient, weight decay or momentum), or their weights
    are perturbed by AWP from the method's warm-up epoch on (``perturbs``: "groups" for the
    chosen groups, "all" for every weight of more than one dimension).

    An intervention with a class of its own (a plugin's, docs/extending.md) says two more
    things: ``acts_from(config)``, the first 0-based epoch in which it acts, if that is not the
    first (before it the trial computes what its baseline computes, so the fork planner shares
    those epochs); and ``packed=False``: the packed trainer carries out these fields, never a
    class, so its trials train alone.
    """

    name: str
    layer_wise: bool
    keeps_lr_max: bool = False
    frozen: bool = False
    perturbs: str = ""  # "", "groups" or "all"
    grid_baseline: str = "none"  # the trial each subset's curve is drawn against (Figures 2-4)
    extra_passes: float = 0.0  # forward-equivalents per training image added to a step
    acts_from: Callable[[TrialConfig], int] | None = None  # None: from the first epoch
    packed: bool = True  # the packed trainer carries it out from these fields (--pack)

    def acts(self, config: TrialConfig, epoch: int) -> bool:
        """Whether the intervention changes the 0-based ``epoch``'s computation other than
        through the learning rates: a frozen group from the first batch on, a perturbation once
        AWP is on (:func:`awp_active`), neither before ``acts_from``."""
        if self.acts_from is not None and epoch < self.acts_from(config):
            return False
        if self.frozen:
            return True
        if self.perturbs:
            return awp_active(config, epoch)
        return False


def awp_active(config: TrialConfig, epoch: int) -> bool:
    """Whether AWP perturbs the weights in the 0-based ``epoch``: from the epoch its authors
    number ``awp_warmup`` (so TRADES' warm-up 10 starts in epoch 9), and never with gamma 0."""
    return config.awp_gamma > 0 and epoch >= config.awp_warmup - method(config.method).first_epoch


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("at", "AT", first_epoch=0, awp_proxy_lr=0.01, step_passes=3,
           restart_pass_in_train_mode=True),
    Method("trades", "TRADES", first_epoch=1, awp_proxy_lr=0.1, step_passes=1 + 3 * 3),
)}

INTERVENTIONS: dict[str, Intervention] = {}

# The trial fields that say what the intervention is: a trial and its baseline may differ in
# these alone to share a prefix (the fork planner), and a baseline ignores them.
INTERVENTION_FIELDS = ("intervention", "layers", "awp_gamma", "awp_warmup")


def register(description: Intervention) -> Intervention:
    """Add an intervention's description (its name must be new); returns it. A plugin's mistakes
    raise here, and the plugin loader names its file (:mod:`ablation.plugins`)."""
    if description.name in INTERVENTIONS:
        raise ValueError(f"intervention {description.name!r} is described already")
    if not re.fullmatch(r"[a-z0-9_]+", description.name):  # it is part of trial keys and paths
        raise ValueError(f"intervention name {description.name!r}: use only a-z, 0-9 and _")
    if description.perturbs not in ("", "groups", "all"):
        raise ValueError(f"perturbs must be '', 'groups' or 'all', got {description.perturbs!r}")
    if description.acts_from is not None and description.packed:
        raise ValueError(f"intervention {description.name!r}: the packed trainer acts from the "
                         "first epoch; describe an intervention with acts_from as packed=False")
    INTERVENTIONS[description.name] = description
    return description


# AWP's proxy step: the proxy's forward and backward, 3F per image (active for all but the
# warm-up, which the estimate ignores).
for _description in (
    Intervention("none", layer_wise=False),
    Intervention("fix_param", layer_wise=True, frozen=True),
    Intervention("fix_lr", layer_wise=True, keeps_lr_max=True),
    # Figure 4(a) draws layer-wise AWP against AWP on all layers, not against plain AT
    Intervention("awp", layer_wise=True, perturbs="groups", grid_baseline="awp_full",
                 extra_passes=3),
    Intervention("awp_full", layer_wise=False, perturbs="all", extra_passes=3),
):
    register(_description)
BUILT_IN = frozenset(INTERVENTIONS)  # the rest come from plugins (ablation.plugins)


def intervention(name: str) -> Intervention:
    """The description of intervention ``name``; ConfigError for a name that has none."""
    if name not in INTERVENTIONS:
        raise ConfigError(f"intervention {quote(name)} is not one of {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name]


def method(name: str) -> Method:
    """The description of method ``name``; ConfigError for a name that has none."""
    if name not in METHODS:
        raise ConfigError(f"method {quote(name)} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def layer_wise() -> tuple[str, ...]:
    """The interventions that act on a chosen subset of the layer groups, in registry order."""
    return tuple(name for name, d in INTERVENTIONS.items() if d.layer_wise)


def method_label(name: str) -> str:
    """How figures and tables name a method (a method without a description: upper case)."""
    return METHODS[name].display if name in METHODS else name.upper()
