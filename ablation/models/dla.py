"""Deep Layer Aggregation (Yu et al. 2018), small CIFAR variant with hierarchical trees."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, param_names


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Root(nn.Module):
    """Aggregation node: concatenate inputs, 1x1 conv, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.bn(self.conv(torch.cat(xs, dim=1))))


class Tree(nn.Module):
    """Hierarchical aggregation tree of ``level`` levels.

    Level 1 is two chained blocks joined by a root. Level L > 1 also keeps a ``prev_root``
    block on the input and the sub-trees ``level_{L-1} .. level_1``; the root aggregates the
    prev_root output, every sub-tree output and both leaf blocks ((L + 2) inputs).
    """

    def __init__(self, in_channels: int, out_channels: int, level: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.level = level
        if level == 1:
            self.root = Root(2 * out_channels, out_channels)
            self.left_node = BasicBlock(in_channels, out_channels, stride)
            self.right_node = BasicBlock(out_channels, out_channels, 1)
        else:
            self.root = Root((level + 2) * out_channels, out_channels)
            cin, s = in_channels, stride
            for i in reversed(range(1, level)):
                # The first sub-tree takes the tree input and stride; later ones chain on its output.
                self.add_module(f"level_{i}", Tree(cin, out_channels, level=i, stride=s))
                cin, s = out_channels, 1
            self.prev_root = BasicBlock(in_channels, out_channels, stride)
            self.left_node = BasicBlock(out_channels, out_channels, 1)
            self.right_node = BasicBlock(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.prev_root(x)] if self.level > 1 else []
        for i in reversed(range(1, self.level)):
            x = getattr(self, f"level_{i}")(x)
            xs.append(x)
        x = self.left_node(x)
        xs.append(x)
        x = self.right_node(x)
        xs.append(x)
        return self.root(xs)


class DLA(nn.Module):
    """Three conv stems (``base``, ``layer1``, ``layer2``), trees ``layer3``..``layer6``, GAP, linear."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.base = _conv_bn_relu(in_channels, 16)
        self.layer1 = _conv_bn_relu(16, 16)
        self.layer2 = _conv_bn_relu(16, 32)
        self.layer3 = Tree(32, 64, level=1, stride=1)
        self.layer4 = Tree(64, 128, level=2, stride=2)
        self.layer5 = Tree(128, 256, level=2, stride=2)
        self.layer6 = Tree(256, 512, level=1, stride=2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = self.layer2(self.layer1(self.base(x)))
        out = self.layer6(self.layer5(self.layer4(self.layer3(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)

    def layer_groups(self) -> dict[int, list[str]]:
        """Groups 1-4 are the trees ``layer3``..``layer6``; stems and linear are ungrouped."""
        trees = (self.layer3, self.layer4, self.layer5, self.layer6)
        return {k: param_names(self, tree) for k, tree in enumerate(trees, start=1)}


def dla(**kwargs) -> DLA:
    """The CIFAR DLA (about 16M parameters)."""
    return DLA(**kwargs)
