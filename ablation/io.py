"""Atomic file writes: write a temporary file beside the target, flush it to disk, then rename.

A reader (or a resumed run) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from .errors import ConfigError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with mode 0o666 less the umask, as any file the user writes (mkstemp's 0o600 would
    # hide a run on a shared folder from teammates and web servers).
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_parquet(frame: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def load_json(path: str | Path) -> Any:
    """A JSON file's contents. Text that is not UTF-8, not JSON or nested too deep for Python's
    parser raises ValueError (the caller names the file and what to do)."""
    try:
        return json.loads(Path(path).read_bytes().decode())
    except RecursionError:
        raise ValueError("nested too deeply") from None


def check_folder(path: Path, what: str) -> None:
    """Refuse, before anything is written, a folder to create or write that lies under a file
    (or is one) or under a folder this user cannot write; ``what`` names it ("--out")."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file; pass another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: cannot write into {existing}; pass another {what}")
