"""Where each dataset's files lie under a ``data_root``, a cheap check that they are there, and
``ablate data``: fetching them where there is internet and verifying them by checksum.

Torch-free at import: ``ablate train`` and ``ablate run`` check a trial's data before they load
torch or start Ray, and a Ray worker checks again on its own node before the trial loads the data.
Downloads and checksums come from torchvision (its URLs and md5 tables), imported where they run.
``data.py`` reads the files; a test holds these names equal to torchvision's.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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
    node downloading to its own disk, never write one file twice at once; the lock file goes
    when the holder is done, whatever the outcome."""
    root = Path(root).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root / ".ablate-download.lock")
    except OSError as err:
        raise DataError(f"{name}: cannot write in {root} ({err.strerror}); choose another "
                        "--root") from None
    with lock:
        try:
            if missing_path(name, root) is not None:
                download_files(name, root)
            return verify_data(name, root)
        finally:
            # Removed while still held: a process waiting on it sees the name gone and retries.
            Path(lock.name).unlink(missing_ok=True)


def _lock(path: Path) -> IO[str]:
    """``path`` opened and exclusively locked, once it is the file at that name (the last
    holder removes the file, so the one a waiter locked may be gone by then)."""
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def download_files(name: str, root: Path) -> None:
    """Download the files of dataset ``name`` that ``root`` lacks (torchvision checks each
    download's md5, and takes a file already there whose md5 is right: an archive copied into
    ``root`` is extracted, a .mat file kept); DataError in one line naming the URL and the file
    to copy by hand."""
    from torchvision import datasets as tvd

    if name == "svhn":
        downloads = [tvd.SVHN.split_list[split] for split in ("train", "test")]
    else:
        source = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        downloads = [(source.url, source.filename, source.tgz_md5)]
    for url, filename, md5 in downloads:
        try:
            if name == "svhn":
                tvd.utils.download_url(url, str(root), filename, md5)
            else:
                tvd.utils.download_and_extract_archive(url, str(root), filename=filename,
                                                       md5=md5)
        except Exception as err:  # network, disk and archive errors alike: one line
            there = root / filename
            fix = (f"{there} is not the official file (md5 {md5}): replace it with the one "
                   f"from {url}" if there.is_file() and not tvd.utils.check_md5(str(there), md5)
                   else f"copy {filename} (from {url}) into {root}")
            raise DataError(f"{name}: cannot download {url} ({one_line(err)}); {fix} and run "
                            "the same command again") from err
