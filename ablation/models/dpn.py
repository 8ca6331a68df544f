"""Dual Path Networks (Chen et al. 2017), CIFAR layout with a 3x3 stem; DPN-26."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, param_names


class DualPathBlock(nn.Module):
    """1x1 -> grouped 3x3 (32 groups) -> 1x1 bottleneck; the first ``out_planes`` output channels
    are added to the input (residual path), the last ``dense_depth`` are concatenated (dense path)."""

    def __init__(
        self,
        last_planes: int,
        in_planes: int,
        out_planes: int,
        dense_depth: int,
        stride: int,
        first_layer: bool,
    ) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.conv1 = nn.Conv2d(last_planes, in_planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, in_planes, 3, stride=stride, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(in_planes)
        self.conv3 = nn.Conv2d(in_planes, out_planes + dense_depth, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes + dense_depth)
        # Only the first block of a stage projects its input; later blocks pass it through.
        self.shortcut = nn.Sequential()
        if first_layer:
            self.shortcut = nn.Sequential(
                nn.Conv2d(last_planes, out_planes + dense_depth, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes + dense_depth),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_planes
        out = torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], dim=1)
        return F.relu(out)


class DPN(nn.Module):
    """Stem conv3x3 + BN, four stages of dual-path blocks (strides 1,2,2,2), GAP, linear."""

    def __init__(
        self,
        in_planes: Sequence[int],
        out_planes: Sequence[int],
        num_blocks: Sequence[int],
        dense_depth: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        last_planes = 64
        stages = []
        for i, stride in enumerate((1, 2, 2, 2)):
            blocks = []
            for j in range(num_blocks[i]):
                blocks.append(
                    DualPathBlock(
                        last_planes, in_planes[i], out_planes[i], dense_depth[i],
                        stride if j == 0 else 1, first_layer=j == 0,
                    )
                )
                # Residual width stays out_planes; each block (and the projection) adds dense_depth.
                last_planes = out_planes[i] + (j + 2) * dense_depth[i]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(last_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

    def layer_groups(self) -> dict[int, list[str]]:
        """Group k is stage ``layer{k}``; stem (conv1, bn1) and linear are ungrouped."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return {k: param_names(self, stage) for k, stage in enumerate(stages, start=1)}


def dpn26(**kwargs) -> DPN:
    """DPN-26: two blocks per stage."""
    return DPN(
        in_planes=(96, 192, 384, 768),
        out_planes=(256, 512, 1024, 2048),
        num_blocks=(2, 2, 2, 2),
        dense_depth=(16, 32, 24, 128),
        **kwargs,
    )
