"""Pre-activation ResNets (He et al. 2016): PreAct-18, PreAct-34 and a tiny CPU variant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, param_names


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 with identity or 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input; the identity path keeps the raw input.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv3x3, four stages of PreActBlocks (strides 1,2,2,2), then BN-ReLU-GAP-linear."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError("PreActResNet needs four stages")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        stages = []
        for n, width, stride in zip(num_blocks, widths, (1, 2, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PreActBlock(in_planes, width, s))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # Adaptive pooling equals avg_pool(4) at 32x32 and still works for 8x8 inputs.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

    def layer_groups(self) -> dict[int, list[str]]:
        """Group k is stage ``layer{k}``; stem conv, final BN and linear are ungrouped."""
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        return {k: param_names(self, stage) for k, stage in enumerate(stages, start=1)}


def preact18(**kwargs) -> PreActResNet:
    """PreAct ResNet-18: blocks [2,2,2,2], widths 64/128/256/512."""
    return PreActResNet([2, 2, 2, 2], (64, 128, 256, 512), **kwargs)


def preact34(**kwargs) -> PreActResNet:
    """PreAct ResNet-34: blocks [3,4,6,3], widths 64/128/256/512."""
    return PreActResNet([3, 4, 6, 3], (64, 128, 256, 512), **kwargs)


def preact_small(width: int = 16, blocks: int = 1, **kwargs) -> PreActResNet:
    """Small PreAct ResNet for CPU runs: ``blocks`` per stage, widths w/2w/4w/8w."""
    return PreActResNet([blocks] * 4, (width, 2 * width, 4 * width, 8 * width), **kwargs)
