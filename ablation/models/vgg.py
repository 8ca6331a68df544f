"""VGG-16 with batch norm for 32x32 inputs (conv bias kept, single linear head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import Normalize, param_names

# 'M' is a 2x2 max pool; numbers are conv widths (each conv adds Conv-BN-ReLU, three modules).
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)

# Indices into ``features`` per group. The split follows docs/method.md B §8 and deliberately cuts
# across stages (e.g. conv 30 is in group 3 while its BN, index 31, is in group 4).
VGG16_GROUPS: dict[int, tuple[int, ...]] = {
    1: (0, 1, 3, 4, 7, 8),
    2: (10, 11, 14, 15, 17, 18),
    3: (20, 21, 24, 25, 27, 28, 30),
    4: (31, 34, 35, 37, 38, 40, 41),
}


class VGG(nn.Module):
    """VGG with BN: ``features`` (Sequential, ending in a 1x1 avg pool) then ``linear``."""

    def __init__(
        self,
        cfg: Sequence[int | str] = VGG16_CFG,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        groups: dict[int, tuple[int, ...]] = VGG16_GROUPS,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=True),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(channels, num_classes)
        self._groups = {k: tuple(v) for k, v in groups.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = self.features(x)
        return self.linear(torch.flatten(out, 1))

    def layer_groups(self) -> dict[int, list[str]]:
        """Groups are fixed sets of ``features`` indices; ``linear`` is ungrouped."""
        return {
            k: param_names(self, *(self.features[i] for i in idx)) for k, idx in self._groups.items()
        }


def vgg16(**kwargs) -> VGG:
    """VGG-16-BN for 32x32 inputs."""
    return VGG(VGG16_CFG, **kwargs)
