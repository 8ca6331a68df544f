"""Model registry. Each architecture declares its four layer groups in ``layer_groups()``; a
user's own model registers with :func:`register` (a plugin, docs/extending.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from .. import config as config_names
from ..config import TrialConfig
from ..datasets import DatasetInfo
from ..layers import GROUPS
from .common import Normalize
from .dla import dla
from .dpn import dpn26
from .preact import preact18, preact34, preact_small
from .vgg import vgg16
from .wrn import wrn34_10

__all__ = ["MODELS", "Normalize", "build_model", "build_trial_model", "group_names", "register",
           "ungrouped_names"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact18": preact18,
    "preact34": preact34,
    "wrn34_10": wrn34_10,
    "vgg16": vgg16,
    "dpn26": dpn26,
    "dla": dla,
    "preact_small": preact_small,
}


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add model ``name`` (new; a-z, 0-9 and _, as it becomes part of trial keys):
    ``builder(num_classes=, in_channels=, mean=, std=)`` returns the network, which normalises
    its input with ``Normalize(mean, std)`` and declares ``layer_groups()`` (see preact.py)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered already")
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"model name {name!r}: use only a-z, 0-9 and _")
    MODELS[name] = builder
    config_names.MODELS.append(name)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 16,
    blocks: int = 1,
) -> nn.Module:
    """Build model ``name``; ``width``/``blocks`` only shape ``preact_small``."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not one of {', '.join(sorted(MODELS))}")  # a bug
    for label, stats in (("mean", mean), ("std", std)):
        if stats is not None and len(stats) != in_channels:
            raise ValueError(f"{label} has {len(stats)} values, the input {in_channels} channels")
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if name == "preact_small":
        kwargs.update(width=width, blocks=blocks)
    return MODELS[name](**kwargs)


def build_trial_model(config: TrialConfig, info: DatasetInfo) -> nn.Module:
    """The trial's network for a dataset, normalising inside its forward unless the method's
    authors feed raw pixels (TRADES, docs/method.md B §1.2)."""
    return build_model(
        config.model, num_classes=info.num_classes, in_channels=info.in_channels,
        mean=info.mean if config.normalize else None, std=info.std if config.normalize else None,
        width=config.width, blocks=config.blocks)


def group_names(model: nn.Module, layers: Iterable[int]) -> list[str]:
    """Parameter names in the union of groups ``layers`` (ints in 1..4, checked by the config),
    in ``named_parameters()`` order."""
    layers = list(layers)
    if any(g not in GROUPS for g in layers):
        raise ValueError(f"layer groups {layers} are not within {GROUPS}")  # a caller's bug
    groups = model.layer_groups()
    wanted = {n for g in layers for n in groups[g]}
    return [n for n, _ in model.named_parameters() if n in wanted]


def ungrouped_names(model: nn.Module) -> list[str]:
    """Parameter names that belong to no layer group, in ``named_parameters()`` order."""
    grouped = {n for names in model.layer_groups().values() for n in names}
    return [n for n, _ in model.named_parameters() if n not in grouped]
