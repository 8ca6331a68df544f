"""Pieces shared by every architecture: input normalization and layer-group naming helpers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the identity when ``mean`` is None.

    Models take inputs in [0, 1] so attacks work in pixel space; this is their first operation.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.enabled = mean is not None
        if mean is None:
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = (
            torch.ones_like(mean_t)
            if std is None
            else torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        )
        if std_t.shape != mean_t.shape:
            raise ValueError(f"mean has {mean_t.shape[1]} channels but std has {std_t.shape[1]}")
        # Non-persistent: statistics come from the dataset config, so checkpoints stay
        # interchangeable between normalized and unnormalized builds of the same net.
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return "identity" if not self.enabled else f"channels={self.mean.shape[1]}"


def param_names(root: nn.Module, *modules: nn.Module) -> list[str]:
    """Names (as in ``root.named_parameters()``) of the parameters owned by ``modules``, in root order."""
    wanted = {id(p) for m in modules for p in m.parameters()}
    return [name for name, p in root.named_parameters() if id(p) in wanted]
