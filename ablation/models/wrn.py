"""Wide ResNet (Zagoruyko & Komodakis 2016) in the layout used by Rice et al.; WRN-34-10."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, param_names


class BasicBlock(nn.Module):
    """Pre-activation block; with a width change the 1x1 ``convShortcut`` sees the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        skip = x if self.convShortcut is None else self.convShortcut(act)
        return out + skip


class NetworkBlock(nn.Module):
    """One stage: ``layer`` is a Sequential of BasicBlocks, the first one striding."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(num_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv1, three NetworkBlocks (strides 1,2,2), BN-ReLU-GAP-fc."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_per_block = n

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)

    def layer_groups(self) -> dict[int, list[str]]:
        """Four contiguous slices of the network, cut inside blocks as in docs/method.md B §8.

        Defined for depth 34 (five blocks per stage), where the cuts balance the groups.
        """
        if self.n_per_block != 5:
            raise ValueError("WRN layer groups are defined for WRN-34 only")
        b1, b2, b3 = self.block1.layer, self.block2.layer, self.block3.layer

        def except_conv2(block: nn.Module) -> list[nn.Module]:
            return [block.bn1, block.conv1, block.bn2]

        g1 = [self.conv1, b1[0], b1[1], b1[2], *except_conv2(b1[3])]
        g2 = [b1[3].conv2, b1[4], b2[0], b2[1], *except_conv2(b2[2])]
        g3 = [b2[2].conv2, b2[3], b2[4], b3[0], b3[1].bn1]
        g4 = [b3[1].conv1, b3[1].bn2, b3[1].conv2, b3[2], b3[3], b3[4], self.bn1, self.fc]
        return {k: param_names(self, *mods) for k, mods in enumerate((g1, g2, g3, g4), start=1)}


def wrn34_10(**kwargs) -> WideResNet:
    """WRN-34-10 (about 46M parameters)."""
    return WideResNet(34, 10, **kwargs)
