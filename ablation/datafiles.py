"""Where each dataset's files lie under a ``data_root``, a cheap check that they are there, and
``ablate data``: fetching them where there is internet and verifying them by checksum.

Torch-free at import: ``ablate train`` and ``ablate run`` check a trial's data before they load
torch or start Ray, and a Ray worker checks again on its own node before the trial loads the data.
Downloads and checksums come from torchvision (its URLs and md5 tables), imported where they run.
``data.py`` reads the files; a test holds these names equal to torchvision's.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path

from .config import DATASETS
from .errors import ConfigError, DataError, one_line


@dataclass(frozen=True)
class Layout:
    """A dataset's files: ``folder`` under the data root ("" for the root itself), then names."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: tuple[str, ...] = ()  # CIFAR's class names: unused, but part of a complete copy


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), ("batches.meta",)),
    "cifar100": Layout("cifar-100-python", ("train",), ("test",), ("meta",)),
    # Only 'train' (73,257) and 'test' (26,032); never 'extra' (docs/method.md).
    "svhn": Layout("", ("train_32x32.mat",), ("test_32x32.mat",)),
}


def expected_files(name: str, root: Path) -> list[Path]:
    """Every file of dataset ``name`` under ``root``: train, test, then meta."""
    layout = LAYOUTS[name]
    return [root / layout.folder / f for f in (*layout.train, *layout.test, *layout.meta)]


def missing_path(name: str, root: Path) -> Path | None:
    """The first expected path that is absent (the dataset's folder itself when that is)."""
    folder = LAYOUTS[name].folder
    if folder and not (root / folder).is_dir():
        return root / folder
    return next((p for p in expected_files(name, root) if not p.is_file()), None)


def check_data(name: str, root: str | Path, download: bool) -> None:
    """DataError, one line naming the path and the fix, unless dataset ``name``'s files are
    under ``root`` (resolved against the working directory, as ``load_data`` does) or, with
    ``download``, can be fetched there. Cheap: it looks at names and sizes and reads nothing,
    so a bad file is still only found when it is loaded."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (choose one of {', '.join(DATASETS)})")
    if name not in LAYOUTS:  # digits, synthetic: no files
        return
    root = Path(root).expanduser().resolve()
    missing = missing_path(name, root)
    if missing is not None and download:
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise DataError(f"{name}: cannot download into {root}: {existing} is a file "
                            "(set data_root to a folder)")
        return
    if missing is not None:
        what = "the .mat files" if name == "svhn" else "the extracted dataset"
        raise DataError(f"{name}: no data at {missing} (put {what} there, or run "
                        f"`ablate data {name} --root {root}`, or set download: true)")
    empty = next((p for p in expected_files(name, root) if p.stat().st_size == 0), None)
    if empty is not None:
        raise DataError(f"{name}: {empty} is empty (put the official file there)")


# --- `ablate data`: fetch a dataset where the machine has internet, verify it by checksum -------


def official_md5(name: str) -> dict[str, str]:
    """File name (relative to the data root) -> md5 of the official release, from torchvision's
    tables (the same sums its downloads check)."""
    from torchvision import datasets as tvd

    if name == "svhn":
        return {tvd.SVHN.split_list[s][1]: tvd.SVHN.split_list[s][2] for s in ("train", "test")}
    source = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    files = [*source.train_list, *source.test_list, (source.meta["filename"], source.meta["md5"])]
    return {f"{source.base_folder}/{f}": md5 for f, md5 in files}


def verify_data(name: str, root: str | Path) -> list[Path]:
    """Every file of dataset ``name`` under ``root``, checked against the official md5 sums;
    DataError naming the first file that is missing or differs."""
    from torchvision import datasets as tvd

    root = Path(root).expanduser().resolve()
    checked = []
    for rel, md5 in official_md5(name).items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"{name}: {path} is missing (run `ablate data {name} --root {root}` "
                            "where there is internet, or copy the dataset there)")
        if not tvd.utils.check_md5(str(path), md5):
            raise DataError(f"{name}: {path} is not the official file (its md5 differs from "
                            f"{md5}); delete it and run `ablate data {name} --root {root}` again")
        checked.append(path)
    return checked


def fetch_data(name: str, root: str | Path) -> list[Path]:
    """Download dataset ``name`` into ``root`` unless it is there, then verify every file.

    Held under a lock file in ``root``, so the nodes of a cluster that share the folder, or each
    node downloading to its own disk, never write one file twice at once."""
    root = Path(root).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".ablate-download.lock", "w")
    except OSError as err:
        raise DataError(f"{name}: cannot write in {root} ({err.strerror}); choose another "
                        "--root") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if missing_path(name, root) is not None:
            download_files(name, root)
        return verify_data(name, root)


def download_files(name: str, root: Path) -> None:
    """Download the files of dataset ``name`` that ``root`` lacks (torchvision checks each
    download's md5); DataError in one line, naming where to put the files by hand."""
    from torchvision import datasets as tvd

    try:
        if name == "svhn":
            for split in ("train", "test"):
                url, filename, md5 = tvd.SVHN.split_list[split]
                if not (root / filename).is_file():
                    tvd.utils.download_url(url, str(root), filename, md5)
        else:
            source = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            tvd.utils.download_and_extract_archive(source.url, str(root),
                                                   filename=source.filename, md5=source.tgz_md5)
    except Exception as err:  # network, disk and archive errors alike: one line
        raise DataError(f"{name}: download into {root} failed ({one_line(err)}); put "
                        f"{'the .mat files' if name == 'svhn' else 'the extracted dataset'} at "
                        f"{missing_path(name, root)} instead") from err
