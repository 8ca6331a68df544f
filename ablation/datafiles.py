"""Where each dataset's files lie under a ``data_root``, and a cheap check that they are there.

No torch here: ``ablate train`` and ``ablate run`` check a trial's data before they load torch or
start Ray, and a Ray worker checks again on its own node before the trial loads the data.
``data.py`` reads the files; a test holds these names equal to torchvision's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DATASETS
from .errors import ConfigError, DataError


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
