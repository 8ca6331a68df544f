"""Run folders in object storage (``s3://``, ``gs://``, any URI pyarrow.fs opens).

A run folder at a URI is worked on through a local mirror: the driver and each worker node read
and write files in a folder under the cache (``$ABLATE_CACHE``, default ``~/.cache/ablate``) and
push every file they finish to the URI, which stays the one durable copy. A new machine, or the
same one after its disk was wiped, pulls what it needs from the URI and goes on.

Objects are written whole (an S3 PUT is atomic: a reader sees the old object or the new one), so
a crash never leaves a torn file at the URI.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import secrets
import shutil
import threading
from pathlib import Path

from .errors import AblateError, ConfigError, RunFailed
from .io import atomic_path

CHUNK = 8 << 20


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def mirror_dir(uri: str) -> Path:
    """This machine's working copy of the run folder at ``uri``."""
    cache = Path(os.environ.get("ABLATE_CACHE", "~/.cache/ablate")).expanduser()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("?")[0].split("://", 1)[1]).strip("_")
    return cache / f"{slug[-60:]}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


class Remote:
    """The files of one run folder at a URI, addressed by paths relative to the folder."""

    def __init__(self, uri: str):
        from pyarrow import fs

        self.uri = uri
        try:
            self.fs, self.base = fs.FileSystem.from_uri(uri)
        except Exception as err:  # pyarrow raises several types for a bad URI
            raise ConfigError(f"storage {uri!r}: {str(err).splitlines()[0]}") from None
        self.base = self.base.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _fail(self, what: str, rel: str, err: Exception) -> Exception:
        """One line naming the URI: a full target (pyarrow keeps the errno only in its text)
        is work to resume (RunFailed, exit 1), anything else a location to fix."""
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        number = getattr(err, "errno", None)
        if number not in FULL:
            number = next((n for n in FULL if f"errno {n}]" in text.lower()), None)
        if number in FULL:
            return RunFailed(f"{self.uri}: {FULL[number]} (writing {rel}); free some space "
                             "there, then run the same command again to resume")
        return AblateError(f"{self.uri}: cannot {what} {rel or '.'}: {text}")

    def upload(self, local: Path, rel: str) -> None:
        """Copy a local file to ``rel``, replacing the object there in one step: an object
        store's PUT is atomic; elsewhere (file://, mounted folders) a temporary file beside the
        target is renamed over it."""
        whole = self.fs.type_name in ("s3", "gcs")
        target = self._path(rel)
        folder, name = target.rsplit("/", 1)
        written = target if whole else f"{folder}/.{name}.{os.getpid()}.tmp"
        try:
            if not whole:
                self.fs.create_dir(folder, recursive=True)
            with open(local, "rb") as src, self.fs.open_output_stream(written) as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
            if not whole:
                self.fs.move(written, target)
        except OSError as err:
            if not whole:  # a full disk, say: leave nothing half-written at the target
                with contextlib.suppress(OSError):
                    self.fs.delete_file(written)
            raise self._fail("write", rel, err) from None

    def download(self, rel: str, local: Path) -> bool:
        """Copy ``rel`` to a local file (atomically); False if there is no such object."""
        from pyarrow import fs

        try:
            if self.fs.get_file_info(self._path(rel)).type != fs.FileType.File:
                return False
            with atomic_path(local) as tmp, open(tmp, "wb") as dst, \
                    self.fs.open_input_stream(self._path(rel)) as src:
                while block := src.read(CHUNK):
                    dst.write(block)
        except OSError as err:
            raise self._fail("read", rel, err) from None
        return True

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (but temporary dot-files), relative to the run folder."""
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(self._path(rel), allow_not_found=True,
                                                          recursive=True))
        except OSError as err:
            raise self._fail("list", rel, err) from None
        return [i.path[len(self.base) + 1:] for i in infos
                if i.type == fs.FileType.File and not i.base_name.startswith(".")]

    def delete(self, rel: str) -> None:
        """Remove the file or folder ``rel``, if there is one."""
        from pyarrow import fs

        try:
            kind = self.fs.get_file_info(self._path(rel)).type
            if kind == fs.FileType.Directory:
                self.fs.delete_dir(self._path(rel))
            elif kind == fs.FileType.File:
                self.fs.delete_file(self._path(rel))
        except OSError as err:
            raise self._fail("delete", rel, err) from None


class BackgroundUploads:
    """A trial's files sent to the URI by a thread of their own, in the order handed over, so
    that training goes on while a checkpoint travels.

    Each file is hard-linked (copied where links fail) when it is handed over, so the atomic
    replacement or removal of the file that follows does not change what is sent. At most one
    batch waits behind the one in flight: a store slower than an epoch slows training instead of
    piling up copies. An upload's failure is raised by the next ``submit`` or ``flush``.
    """

    def __init__(self, remote: Remote, root: Path):
        self.remote, self.root = remote, root
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        threading.Thread(target=self._work, name="ablate-uploads", daemon=True).start()

    def submit(self, written: list[Path], removed: list[Path] = ()) -> None:
        """Send ``written`` (in order), then delete ``removed`` at the URI."""
        self._raise()
        staged = []
        for path in written:
            stage = path.with_name(f".{path.name}.{secrets.token_hex(4)}.upload")
            try:
                os.link(path, stage)
            except OSError:
                shutil.copyfile(path, stage)
            staged.append((stage, self._rel(path)))
        self.queue.put((staged, [self._rel(p) for p in removed]))

    def flush(self) -> None:
        """Return once everything handed over is at the URI."""
        self.queue.join()
        self._raise()

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            staged, removed = self.queue.get()
            try:
                if self.error is None:
                    for stage, rel in staged:
                        self.remote.upload(stage, rel)
                    for rel in removed:
                        self.remote.delete(rel)
            except BaseException as err:  # raised in the training thread, at its next call
                self.error = err
            finally:
                for stage, _ in staged:
                    stage.unlink(missing_ok=True)
                self.queue.task_done()
