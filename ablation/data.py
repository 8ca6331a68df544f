"""Datasets held whole on the device as uint8 tensors, and batch-wise augmentation on the device.

Batches are sliced from the tensors and augmented as whole batches (airbench-style); there is no
DataLoader. CIFAR-10/100 and SVHN are read through torchvision's own classes (pickle / loadmat);
``digits`` and ``synthetic`` need no files and exist for CPU demos and tests.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets as tvd

from .config import DATASETS
from .errors import ConfigError, DataError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``mean``/``std`` are per channel in [0, 1] pixel units."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


@dataclass
class Data:
    """A whole dataset as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> Data:
        """A copy with the four tensors on ``device``."""
        return replace(self, train_x=self.train_x.to(device), train_y=self.train_y.to(device),
                       test_x=self.test_x.to(device), test_y=self.test_y.to(device))


# Normalisation constants from docs/method.md B §1.2; digits and synthetic get theirs from the
# training images in load_data, so dataset_info (which does no I/O) leaves them None.
_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465),
                           (0.2471, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32,
                            (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                            (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "digits": DatasetInfo("digits", 10, 1, 8, None, None),
    "synthetic": DatasetInfo("synthetic", 10, 3, 8, None, None),
}


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about dataset ``name`` (no I/O); ConfigError for an unknown name."""
    if name not in _INFO:
        raise ConfigError(f"unknown dataset {name!r} (choose one of {', '.join(DATASETS)})")
    return _INFO[name]


# --------------------------------------------------------------------------------------------
# torchvision classes with an existence-only integrity check.
#
# torchvision compares md5 sums of the extracted files before every load, which refuses any file
# that is not byte-identical to the official release (our small test files included). Downloads
# keep their md5 check: download_and_extract_archive / download_url verify the archive itself.


def _exists(path: str) -> bool:
    return os.path.isfile(path)


class _CIFAR10(tvd.CIFAR10):
    def _check_integrity(self) -> bool:
        return all(_exists(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        # The base class md5-checks the meta file here, outside _check_integrity; keep reading
        # it (the class names are unused) so that a missing or corrupt meta file still fails.
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR100(_CIFAR10, tvd.CIFAR100):
    pass


class _SVHN(tvd.SVHN):
    def _check_integrity(self) -> bool:
        return _exists(os.path.join(self.root, self.filename))

    def download(self) -> None:
        # The base class re-downloads whenever the md5 differs; like CIFAR, keep files present.
        if not self._check_integrity():
            super().download()


_CIFAR_CLASSES = {"cifar10": _CIFAR10, "cifar100": _CIFAR100}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"


def _expected_files(name: str, root: Path) -> list[Path]:
    if name == "svhn":
        return [root / _SVHN.split_list[s][1] for s in ("train", "test")]
    cls = _CIFAR_CLASSES[name]
    folder = root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [folder / n for n in names]


def _missing_path(name: str, root: Path) -> Path | None:
    """The first expected path that is absent (the CIFAR folder itself when it is missing)."""
    if name != "svhn":
        folder = root / _CIFAR_CLASSES[name].base_folder
        if not folder.is_dir():
            return folder
    return next((p for p in _expected_files(name, root) if not p.is_file()), None)


def _culprit(name: str, root: Path) -> Path:
    """Which file made a load fail: the first that does not read as the format expects."""
    files = _expected_files(name, root)
    if name == "svhn":
        import scipy.io

        for path in files:
            try:
                mat = scipy.io.loadmat(path)
                if mat["X"].ndim != 4 or mat["X"].shape[:3] != (32, 32, 3):
                    return path
                if mat["y"].size != mat["X"].shape[3]:
                    return path
            except Exception:
                return path
        return root
    label_key = "labels" if name == "cifar10" else "fine_labels"
    for path in files:
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            if path.name == _CIFAR_CLASSES[name].meta["filename"]:
                entry[_CIFAR_CLASSES[name].meta["key"]]
                continue
            data = np.asarray(entry["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                return path
            if len(entry[label_key]) != len(data):
                return path
        except Exception:
            return path
    return root / _CIFAR_CLASSES[name].base_folder


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    missing = _missing_path(name, root)
    if missing is not None and not download:
        what = "the .mat files" if name == "svhn" else "the extracted dataset"
        raise DataError(f"{name}: no data at {missing} (put {what} there or set download: true)")
    try:
        if name == "svhn":
            # Only 'train' (73,257) and 'test' (26,032); never 'extra' (docs/method.md).
            splits = [_SVHN(str(root), split=s, download=download) for s in ("train", "test")]
            arrays = [(s.data, s.labels) for s in splits]  # data already N, C, H, W; 10 -> 0
        else:
            cls = _CIFAR_CLASSES[name]
            splits = [cls(str(root), train=t, download=download) for t in (True, False)]
            arrays = [(s.data.transpose(0, 3, 1, 2), s.targets) for s in splits]  # NHWC -> NCHW
    except Exception as err:
        missing = _missing_path(name, root)
        if missing is not None:  # the download itself failed
            raise DataError(f"{name}: download into {root} failed ({_one_line(err)}); "
                            f"put the extracted dataset at {missing} instead") from err
        raise DataError(f"{name}: cannot read {_culprit(name, root)} ({_one_line(err)})") from err
    (train_x, train_y), (test_x, test_y) = arrays
    return (np.ascontiguousarray(train_x), np.asarray(train_y, dtype=np.int64),
            np.ascontiguousarray(test_x), np.asarray(test_y, dtype=np.int64))


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are integers 0..16; round(v * 255 / 16) is injective, so the map is lossless.
    # (Only v = 8 lands on a .5, and every rounding rule in use gives 128 there.)
    x = np.floor(bunch.images * 255.0 / 16.0 + 0.5).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(y))
    train, test = perm[:1437], perm[1437:]
    return x[train], y[train], x[test], y[test]


_SYNTHETIC_SEED = 20240607


def _make_synthetic() -> tuple[np.ndarray, ...]:
    # A private generator, so the set is the same whatever the caller has seeded.
    rng = np.random.default_rng(_SYNTHETIC_SEED)
    templates = rng.uniform(32.0, 224.0, size=(10, 3, 8, 8))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % 10).astype(np.int64)
        noisy = templates[y] + rng.normal(0.0, 40.0, size=(n, 3, 8, 8))
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), y

    train_x, train_y = split(512)
    test_x, test_y = split(256)
    return train_x, train_y, test_x, test_y


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units."""
    v = x.astype(np.float64) / 255.0
    return (tuple(float(m) for m in v.mean(axis=(0, 2, 3))),
            tuple(float(s) for s in v.std(axis=(0, 2, 3))))


def load_data(name: str, root: str | Path, download: bool) -> Data:
    """Load dataset ``name`` on the CPU; DataError (one line) when its files are missing or bad."""
    info = dataset_info(name)
    if name == "digits":
        arrays = _load_digits()
    elif name == "synthetic":
        arrays = _make_synthetic()
    else:
        arrays = _load_torchvision(name, Path(root).expanduser().resolve(), download)
    train_x, train_y, test_x, test_y = arrays
    if info.mean is None:
        mean, std = _channel_stats(train_x)
        info = replace(info, mean=mean, std=std)
    shape = (info.in_channels, info.image_size, info.image_size)
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) != len(y):
            raise DataError(f"{name}: {split} images have shape {x.shape} and dtype {x.dtype} "
                            f"with {len(y)} labels (expected uint8 (N, {', '.join(map(str, shape))}))")
        if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
            raise DataError(f"{name}: {split} labels span {y.min()}..{y.max()} "
                            f"(expected 0..{info.num_classes - 1})")
    return Data(info, torch.from_numpy(train_x), torch.from_numpy(train_y),
                torch.from_numpy(test_x), torch.from_numpy(test_y))


# --------------------------------------------------------------------------------------------
# Augmentation. All randomness comes from torch's global generator for x's device, so the
# trainer's seeding and RNG checkpoints cover it. Draw order per call: y offsets, x offsets,
# flips, then (cifar100) angles.

_PAD = 4


def crop_flip(x: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Pad 4 pixels (``'reflect'`` or ``'constant'`` zeros), take a random crop of the original
    size per image, and flip it horizontally with probability 0.5 per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (_PAD,) * 4, mode=pad_mode)
    oy = torch.randint(0, 2 * _PAD + 1, (b,), device=x.device)
    ox = torch.randint(0, 2 * _PAD + 1, (b,), device=x.device)
    flip = torch.rand(b, device=x.device) < 0.5
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    # The flip is folded into the column index, so crop and flip are one gather.
    cols = ox[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def rotate(x: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle (degrees) about the image centre,
    nearest interpolation, fill 0 (torchvision ``rotate`` semantics)."""
    b, _, h, w = x.shape
    a = angles_deg.to(device=x.device, dtype=torch.float32) * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # Output pixel p (pixel units, y down, relative to the centre) samples input R^-1 p; the
    # h/w factors convert to grid_sample's per-axis normalised coordinates.
    theta = torch.stack([torch.stack([c, -s * (h / w), zero], 1),
                         torch.stack([s * (w / h), c, zero], 1)], 1)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="nearest", padding_mode="zeros",
                         align_corners=False)


_ROTATION_DEG = 15.0


def augment(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Augment a float batch (B, C, H, W) in [0, 1] on its own device, per docs/method.md:
    cifar10 reflect-pad crop + flip; cifar100 zero-pad crop + flip + rotation; others none."""
    dataset_info(dataset)  # ConfigError for an unknown name
    if x.dim() != 4:
        raise ValueError(f"augment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if dataset == "cifar10":
        return crop_flip(x, "reflect")
    if dataset == "cifar100":
        x = crop_flip(x, "constant")
        angles = (torch.rand(x.shape[0], device=x.device) * 2.0 - 1.0) * _ROTATION_DEG
        return rotate(x, angles)
    return x
