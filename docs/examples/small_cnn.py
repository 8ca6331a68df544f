"""A small CNN as an ablate plugin: four conv blocks, which are its four layer groups, and a
linear head. A walk-through of this file is in docs/extending.md.

Use it by naming this file in a sweep (``plugins: [small_cnn.py]``, relative to the sweep file)
or with ``ablate train --plugin small_cnn.py``; then ``model: small_cnn`` in any trial.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ablation.models import Normalize, register
from ablation.models.common import param_names


class SmallCNN(nn.Module):
    """Four conv3x3-BN-ReLU blocks of widths w, 2w, 2w, 4w, the second and third with stride 2
    (8x8 digits: 8, 4, 2, 2 pixels; 32x32 CIFAR: 32, 16, 8, 8), global average pooling and a
    linear head. Inputs are in [0, 1] (attacks work in pixel space); ``Normalize`` applies the
    dataset's mean and std first, or nothing when the trial asks for none."""

    def __init__(self, *, num_classes: int, in_channels: int, mean=None, std=None,
                 width: int = 8) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        blocks, channels = [], in_channels
        for out, stride in ((width, 1), (2 * width, 2), (2 * width, 2), (4 * width, 1)):
            blocks.append(nn.Sequential(
                nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out), nn.ReLU()))
            channels = out
        self.block1, self.block2, self.block3, self.block4 = blocks
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        for block in (self.block1, self.block2, self.block3, self.block4):
            out = block(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def layer_groups(self) -> dict[int, list[str]]:
        """Group k is block k (its conv and BN); the linear head is in no group, as the
        classifier of the paper's ResNets is (docs/method.md B §8)."""
        blocks = (self.block1, self.block2, self.block3, self.block4)
        return {k: param_names(self, block) for k, block in enumerate(blocks, start=1)}


# The builder is called as builder(num_classes=..., in_channels=..., mean=..., std=...).
register("small_cnn", SmallCNN)
