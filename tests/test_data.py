"""Dataset loading (real on-disk formats, written small), one-line data errors, and augmentation."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAKE_DATASETS, write_fake_dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ablation.config import DATASETS
from ablation.data import Data, _CifarUnpickler, augment, crop_flip, load_data, rotate
from ablation.datasets import DatasetInfo, dataset_info
from ablation.errors import ConfigError, DataError

# docs/method.md normalisation constants.
CONSTANTS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                 (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


# ------------------------------------------------------------------------------- dataset info

def test_dataset_info_constants_and_unknown_name():
    assert DATASETS == ("cifar10", "cifar100", "svhn", "digits", "synthetic")
    for name, (mean, std) in CONSTANTS.items():
        info = dataset_info(name)
        assert (info.name, info.num_classes, info.in_channels, info.image_size) == (
            name, NUM_CLASSES[name], 3, 32)
        assert info.mean == mean and info.std == std
    assert dataset_info("digits") == DatasetInfo("digits", 10, 1, 8, 1437, 360, None, None)
    assert dataset_info("synthetic") == DatasetInfo("synthetic", 10, 3, 8, 512, 256, None, None)
    # the official split sizes (docs/method.md B §1.1)
    assert [(dataset_info(n).train_images, dataset_info(n).test_images) for n in CONSTANTS] == [
        (50_000, 10_000), (50_000, 10_000), (73_257, 26_032)]
    with pytest.raises(ConfigError, match="mnist"):
        dataset_info("mnist")


# ------------------------------------------------------------------- torchvision-format datasets

def test_fake_cifar_files_use_the_official_pickle_layout(tmp_path):
    # Read with the loader's restricted unpickler, keys as bytes: Python 2 string opcodes.
    write_fake_dataset("cifar10", tmp_path, 10, 4, seed=0)
    write_fake_dataset("cifar100", tmp_path, 10, 4, seed=0)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = _CifarUnpickler(f, encoding="bytes").load()
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)
    assert isinstance(entry[b"labels"], list)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert len(_CifarUnpickler(f, encoding="bytes").load()[b"label_names"]) == 10
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        entry = _CifarUnpickler(f, encoding="bytes").load()
    assert {b"data", b"fine_labels", b"coarse_labels"} <= set(entry)
    with open(tmp_path / "cifar-100-python" / "meta", "rb") as f:
        assert len(_CifarUnpickler(f, encoding="bytes").load()[b"fine_label_names"]) == 100


@pytest.mark.parametrize("name", FAKE_DATASETS)
def test_load_returns_exactly_the_written_pixels_and_labels(tmp_path, name):
    train_x, train_y, test_x, test_y = write_fake_dataset(name, tmp_path, 37, 13, seed=3)
    data = load_data(name, tmp_path, download=False)
    assert data.info == dataset_info(name)
    assert data.train_x.shape == (37, 3, 32, 32) and data.test_x.shape == (13, 3, 32, 32)
    assert data.train_x.dtype == data.test_x.dtype == torch.uint8
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    np.testing.assert_array_equal(data.train_x.numpy(), train_x)
    np.testing.assert_array_equal(data.train_y.numpy(), train_y)
    np.testing.assert_array_equal(data.test_x.numpy(), test_x)
    np.testing.assert_array_equal(data.test_y.numpy(), test_y)


def test_svhn_label_ten_is_digit_zero(tmp_path):
    import scipy.io

    _, train_y, _, _ = write_fake_dataset("svhn", tmp_path, 30, 5, seed=1)
    stored = scipy.io.loadmat(tmp_path / "train_32x32.mat")["y"].ravel()
    assert stored.min() == 1 and stored.max() == 10 and (train_y == 0).any()
    loaded = load_data("svhn", tmp_path, download=False).train_y.numpy()
    np.testing.assert_array_equal(loaded, np.where(stored == 10, 0, stored))


@pytest.mark.parametrize("name", FAKE_DATASETS)
def test_missing_data_is_a_one_line_error_naming_the_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_data(name, "data", download=False)
    message = str(err.value)
    expected = tmp_path / "data" / (CIFAR_FOLDER.get(name) or "train_32x32.mat")
    assert str(expected) in message and "download: true" in message
    assert "\n" not in message and message.startswith(f"{name}: ")


def test_one_missing_file_is_named(tmp_path):
    write_fake_dataset("cifar10", tmp_path, 10, 4, seed=0)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_data("cifar10", tmp_path, download=False)
    write_fake_dataset("svhn", tmp_path, 10, 4, seed=0)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_data("svhn", tmp_path, download=False)


@pytest.mark.parametrize("name, bad", [("cifar10", "cifar-10-batches-py/data_batch_2"),
                                       ("cifar100", "cifar-100-python/test"),
                                       ("svhn", "test_32x32.mat")])
def test_corrupt_file_is_a_one_line_error_naming_it(tmp_path, name, bad):
    write_fake_dataset(name, tmp_path, 10, 4, seed=0)
    (tmp_path / bad).write_bytes(b"not a dataset\n" * 10)
    with pytest.raises(DataError) as err:
        load_data(name, tmp_path, download=False)
    assert str(tmp_path / bad) in str(err.value) and "\n" not in str(err.value)


class _Touch:
    """Unpickles as a call of os.system that creates ``marker``: what a crafted file can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name, bad", [("cifar10", "cifar-10-batches-py/data_batch_2"),
                                       ("cifar10", "cifar-10-batches-py/batches.meta"),
                                       ("cifar100", "cifar-100-python/test")])
def test_a_crafted_cifar_pickle_is_refused_without_running_it(tmp_path, name, bad):
    write_fake_dataset(name, tmp_path, 10, 4, seed=0)
    marker = tmp_path / "ran"
    entry = {"data": _Touch(marker), "labels": [0], "fine_labels": [0], "label_names": []}
    (tmp_path / bad).write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError) as err:
        load_data(name, tmp_path, download=False)
    message = str(err.value)
    assert not marker.exists(), "the pickle's call ran"
    assert message.startswith(f"{name}: refusing {tmp_path / bad}: it calls 'posix.system'")
    assert "\n" not in message


def test_files_naming_numpy_1_reconstructor_load_as_the_official_ones_do(tmp_path):
    # The official pickles (Python 2, numpy 1) name numpy.core.multiarray._reconstruct; the
    # writer here, under numpy 2, names numpy._core. GLOBAL names a line of text, so swap it.
    expected = write_fake_dataset("cifar10", tmp_path, 10, 4, seed=0)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        raw = path.read_bytes()
        path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
        assert b"numpy._core" not in path.read_bytes()
    data = load_data("cifar10", tmp_path, download=False)
    for got, want in zip((data.train_x, data.train_y, data.test_x, data.test_y), expected):
        np.testing.assert_array_equal(got.numpy(), want)


def test_a_cifar_file_of_another_shape_is_named(tmp_path):
    write_fake_dataset("cifar100", tmp_path, 10, 4, seed=0)
    entry = {"data": np.zeros((4, 100), np.uint8), "fine_labels": [0, 1, 2, 3]}
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(DataError, match=r"cifar-100-python/train is not a CIFAR batch"):
        load_data("cifar100", tmp_path, download=False)


def test_out_of_range_labels_are_a_data_error(tmp_path):
    import scipy.io

    write_fake_dataset("svhn", tmp_path, 10, 4, seed=0)
    mat = scipy.io.loadmat(tmp_path / "test_32x32.mat")
    mat["y"][0, 0] = 11  # becomes label 11 after the 10 -> 0 mapping
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": mat["X"], "y": mat["y"]})
    with pytest.raises(DataError, match="labels"):
        load_data("svhn", tmp_path, download=False)


def test_download_only_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(*args, **kwargs):
        calls.append(args)
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", fake_fetch)
    monkeypatch.setattr("torchvision.datasets.utils.download_url", fake_fetch)
    # Files present (with md5s unlike the official ones): no download is attempted.
    for name in FAKE_DATASETS:
        write_fake_dataset(name, tmp_path / name, 6, 3, seed=0)
        load_data(name, tmp_path / name, download=True)
    assert calls == []
    # Files missing: the download is tried, and its failure becomes one DataError line.
    with pytest.raises(DataError) as err:
        load_data("cifar10", tmp_path / "empty", download=True)
    assert len(calls) == 1 and "network unreachable" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"svhn: cannot download http\S*train_32x32\.mat "
                                        r"\(OSError: network unreachable\); copy train_32x32\.mat "
                                        r"\(from http\S*\) into .*empty_svhn and run the same "
                                        r"command again$"):
        load_data("svhn", tmp_path / "empty_svhn", download=True)


def test_data_to_moves_all_tensors(tmp_path):
    data = load_data("synthetic", tmp_path, download=False)
    moved = data.to("meta")
    assert isinstance(moved, Data) and moved.info == data.info
    assert all(t.device.type == "meta" for t in (moved.train_x, moved.train_y, moved.test_x,
                                                 moved.test_y))
    assert data.train_x.device.type == "cpu"


# ----------------------------------------------------------------------- digits and synthetic

def test_digits_split_and_lossless_pixels(tmp_path):
    from sklearn.datasets import load_digits

    data = load_data("digits", tmp_path / "ignored", download=False)
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    bunch = load_digits()
    perm = np.random.RandomState(0).permutation(1797)
    expected = np.vectorize(lambda v: round(v * 255 / 16))(bunch.images).astype(np.uint8)
    np.testing.assert_array_equal(data.train_x.numpy()[:, 0], expected[perm[:1437]])
    np.testing.assert_array_equal(data.test_x.numpy()[:, 0], expected[perm[1437:]])
    np.testing.assert_array_equal(data.test_y.numpy(), bunch.target[perm[1437:]])
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))
    train = data.train_x.double() / 255
    assert data.info.mean == pytest.approx((train.mean().item(),))
    assert data.info.std == pytest.approx((train.std(unbiased=False).item(),))
    again = load_data("digits", tmp_path, download=True)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    a = load_data("synthetic", tmp_path, download=False)
    torch.manual_seed(2)
    np.random.seed(2)
    b = load_data("synthetic", tmp_path / "elsewhere", download=True)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.info == b.info and len(a.info.mean) == len(a.info.std) == 3
    assert a.train_x.shape == (512, 3, 8, 8) and a.test_x.shape == (256, 3, 8, 8)
    assert a.train_x.dtype == torch.uint8 and set(a.train_y.tolist()) == set(range(10))
    # Nearest class mean (fit on train) is far above chance on test.
    x_tr, x_te = a.train_x.flatten(1).double(), a.test_x.flatten(1).double()
    means = torch.stack([x_tr[a.train_y == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_te, means).argmin(1) == a.test_y).double().mean().item()
    assert accuracy > 0.5


# ------------------------------------------------------------------------------ augmentation

def _batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _find_window(out: np.ndarray, padded: np.ndarray) -> tuple[int, int, bool] | None:
    """The (dy, dx, flipped) whose window of ``padded`` equals ``out``, if any."""
    h, w = out.shape[-2:]
    for dy in range(9):
        for dx in range(9):
            window = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if np.array_equal(out, window[..., ::-1] if flipped else window):
                    return dy, dx, flipped
    return None


def test_cifar10_crop_is_a_flipped_or_plain_window_of_the_reflect_padded_image():
    x = _batch(64)
    torch.manual_seed(0)
    out = augment(x, "cifar10")
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    found = [_find_window(out[i].numpy(), padded[i]) for i in range(len(x))]
    assert None not in found
    assert len({(dy, dx) for dy, dx, _ in found}) > 10
    assert {f for _, _, f in found} == {False, True}


def test_zero_padded_crop_flip_matches_numpy():
    x = _batch(64, seed=1)
    torch.manual_seed(0)
    out = crop_flip(x, "constant")
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    found = [_find_window(out[i].numpy(), padded[i]) for i in range(len(x))]
    assert None not in found and {f for _, _, f in found} == {False, True}


def test_rotate_quarter_turns_identity_and_torchvision():
    x = _batch(6, size=9)
    quarter = torch.full((6,), 90.0)
    assert torch.equal(rotate(x, quarter), torch.rot90(x, 1, dims=(-2, -1)))  # counter-clockwise
    assert torch.equal(rotate(x, -quarter), torch.rot90(x, -1, dims=(-2, -1)))
    assert torch.equal(rotate(x, torch.zeros(6)), x)
    # Per-image angles against torchvision's rotate (nearest, fill 0, about the centre).
    x = _batch(5)
    angles = torch.tensor([-15.0, -7.5, 3.0, 11.0, 15.0])
    out = rotate(x, angles)
    for i, angle in enumerate(angles.tolist()):
        ref = TF.rotate(x[i:i + 1], angle, interpolation=InterpolationMode.NEAREST, fill=0.0)
        assert (out[i:i + 1] == ref).double().mean() > 0.999


def test_cifar100_is_zero_pad_crop_flip_then_rotation_replayed_from_the_rng():
    x = _batch(16, seed=2)
    torch.manual_seed(5)
    out = augment(x, "cifar100")
    # Replay the documented draw order: y offsets, x offsets, flips, angles.
    torch.manual_seed(5)
    oy, ox = torch.randint(0, 9, (16,)), torch.randint(0, 9, (16,))
    flip = torch.rand(16) < 0.5
    angles = (torch.rand(16) * 2 - 1) * 15
    assert angles.abs().max() <= 15 and flip.any() and not flip.all()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(16):
        crop = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        crop = torch.from_numpy(np.ascontiguousarray(crop[..., ::-1] if flip[i] else crop))
        ref = TF.rotate(crop[None], angles[i].item(), interpolation=InterpolationMode.NEAREST,
                        fill=0.0)
        assert (out[i:i + 1] == ref).double().mean() > 0.999


@pytest.mark.parametrize("name", ["svhn", "digits", "synthetic"])
def test_no_augmentation(name):
    x = _batch(8)
    assert torch.equal(augment(x, name), x)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_augment_keeps_range_shape_dtype_and_is_reproducible(name):
    x = _batch(32, seed=4)
    torch.manual_seed(7)
    a = augment(x, name)
    torch.manual_seed(7)
    b = augment(x, name)
    torch.manual_seed(8)
    c = augment(x, name)
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_unknown_dataset():
    with pytest.raises(ConfigError):
        augment(_batch(2), "imagenet")


# --------------------------------------------------------------------------------------------
# `ablate data`: fetch and verify by md5


def test_ablate_data_refuses_unofficial_files_in_one_line(tmp_path):
    root = tmp_path / "d"
    write_fake_dataset("cifar10", root, n_train=20, n_test=10)
    done = subprocess.run([sys.executable, "-m", "ablation", "data", "cifar10", "--root",
                           str(root), "--verify-only"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: cifar10: ") and "data_batch_1" in done.stderr


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_the_table_holds_the_split_sizes_the_loader_gives(name):
    data = load_data(name, "unused", download=False)
    info = dataset_info(name)
    assert (len(data.train_y), len(data.test_y)) == (info.train_images, info.test_images)
