"""Datasets held whole on the device as uint8 tensors, and batch-wise augmentation on the device.

Batches are sliced from the tensors and augmented as whole batches (airbench-style); there is no
DataLoader. CIFAR-10/100 are read from their python-version pickles by an unpickler that admits
only what those files hold, SVHN through torchvision's class (scipy's loadmat); ``datafiles.py``
names the files. ``digits`` and ``synthetic`` need no files and exist for CPU demos and tests.
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

from .datafiles import LAYOUTS, check_data, download_files, expected_files, missing_path
from .datasets import DatasetInfo, dataset_info
from .errors import DataError, one_line, quote


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


# --------------------------------------------------------------------------------------------
# CIFAR: the python-version pickles, read with an unpickler that admits only what they hold.
#
# A pickle can call any function it names, so torchvision's plain pickle.load runs whatever a
# crafted batch file asks. The official files (written by Python 2 and numpy 1) hold dicts, lists,
# strings and ints, and one uint8 array each, rebuilt by numpy's three globals below.

# numpy's array reconstructor, under the module name of whichever numpy wrote the file.
_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How Python 3 pickles bytes at protocol 2 (``_codecs.encode(text, 'latin1')``): that call
    and no other encoding."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {quote(encoding)}")
    return text.encode("latin1")


_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the official files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the same, pickled by numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,  # bytes pickled by Python 3 (the tests' files)
}


class _Refused(pickle.UnpicklingError):
    """A pickle naming a global that no CIFAR file holds."""


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return _CIFAR_GLOBALS[module, name]


def _unpickle_cifar(name: str, path: Path) -> dict:
    """One CIFAR pickle as a dict with str keys (latin1, as torchvision reads them)."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as err:
        raise DataError(f"{name}: refusing {path}: it calls {quote(str(err))}, which no CIFAR "
                        "file does (put the official file there)") from None
    except Exception as err:  # a foreign file fails in any of pickle's many ways: one line
        raise DataError(f"{name}: cannot read {path} ({one_line(err)})") from err
    if not isinstance(entry, dict):
        raise DataError(f"{name}: {path} holds a {type(entry).__name__}, not a CIFAR dict "
                        "(put the official file there)")
    return entry


# The label list of a batch file and the class-name list of the meta file, per dataset.
_CIFAR_KEYS = {"cifar10": ("labels", "label_names"),
               "cifar100": ("fine_labels", "fine_label_names")}


def _read_cifar_batch(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file."""
    entry = _unpickle_cifar(name, path)
    label_key = _CIFAR_KEYS[name][0]
    data, labels = entry.get("data"), entry.get(label_key)
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list)
            or len(labels) != len(data) or not all(type(v) is int for v in labels)):
        raise DataError(f"{name}: {path} is not a CIFAR batch (expected 'data', uint8 of shape "
                        f"(N, 3072), and N integer '{label_key}'; put the official file there)")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)  # rows are C, H, W


def _load_cifar(name: str, root: Path, download: bool) -> tuple[np.ndarray, ...]:
    if download and missing_path(name, root) is not None:
        download_files(name, root)
    check_data(name, root, download=False)
    layout = LAYOUTS[name]
    folder = root / layout.folder
    for meta in layout.meta:  # the class names are unused; a complete copy has them
        if not isinstance(_unpickle_cifar(name, folder / meta).get(_CIFAR_KEYS[name][1]), list):
            raise DataError(f"{name}: {folder / meta} has no '{_CIFAR_KEYS[name][1]}' list "
                            "(put the official file there)")
    arrays = []
    for split in (layout.train, layout.test):
        batches = [_read_cifar_batch(name, folder / f) for f in split]
        arrays += [np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])]
    return tuple(arrays)


# --------------------------------------------------------------------------------------------
# SVHN: torchvision's class (scipy's loadmat, not pickle) with an existence-only integrity check.
#
# torchvision compares md5 sums of the files before every load, which refuses any file that is
# not byte-identical to the official release (our small test files included). Downloads keep
# their md5 check: download_url verifies the file itself.


class _SVHN(tvd.SVHN):
    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


def _svhn_culprit(root: Path) -> Path:
    """Which file made a load fail: the first that does not read as the format expects."""
    import scipy.io

    for path in expected_files("svhn", root):
        try:
            mat = scipy.io.loadmat(path)
            if mat["X"].ndim != 4 or mat["X"].shape[:3] != (32, 32, 3):
                return path
            if mat["y"].size != mat["X"].shape[3]:
                return path
        except Exception:  # any reading failure names this file
            return path
    return root


def _load_svhn(root: Path, download: bool) -> tuple[np.ndarray, ...]:
    if download and missing_path("svhn", root) is not None:
        download_files("svhn", root)
    check_data("svhn", root, download=False)
    try:
        splits = [_SVHN(str(root), split=s) for s in ("train", "test")]
    except Exception as err:  # scipy's and torchvision's errors alike: one line
        raise DataError(f"svhn: cannot read {_svhn_culprit(root)} ({one_line(err)})") from err
    (train_x, train_y), (test_x, test_y) = [(s.data, s.labels) for s in splits]  # N, C, H, W
    return (np.ascontiguousarray(train_x), np.asarray(train_y, dtype=np.int64),  # 10 -> 0 done
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
    elif name == "svhn":
        arrays = _load_svhn(Path(root).expanduser().resolve(), download)
    else:
        arrays = _load_cifar(name, Path(root).expanduser().resolve(), download)
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
