"""What each dataset is: classes, image shape, split sizes and normalisation constants, in one
table. Torch-free: the config's checks, the fork planner's batch count and the cost model read
it without loading torch; :mod:`ablation.data` loads the images and checks them against it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``mean``/``std`` are per channel in [0, 1] pixel units
    (None where they are computed from the training images when loaded)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_images: int
    test_images: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


# Normalisation constants from docs/method.md B §1.2; split sizes from B §1.1 (SVHN: 'train' and
# 'test' only, never 'extra'). digits is scikit-learn's 1,797 images split 1,437 / 360 (data.py);
# synthetic is the tests' 512 / 256 random-template images.
DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("cifar10", 10, 3, 32, 50_000, 10_000, (0.4914, 0.4822, 0.4465),
                (0.2471, 0.2435, 0.2616)),
    DatasetInfo("cifar100", 100, 3, 32, 50_000, 10_000,
                (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
    DatasetInfo("svhn", 10, 3, 32, 73_257, 26_032, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    DatasetInfo("digits", 10, 1, 8, 1_437, 360, None, None),
    DatasetInfo("synthetic", 10, 3, 8, 512, 256, None, None),
)}


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about dataset ``name`` (no I/O); ConfigError for an unknown name."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (choose one of {', '.join(DATASETS)})")
    return DATASETS[name]
