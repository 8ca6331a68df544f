"""The run folder of a sweep and its Parquet curve store, written by one process (the driver).

Layout of ``runs/<sweep>/``::

    sweep.json           the trials this folder holds: key -> full trial config
    curves/<key>.parquet one row per (trial, epoch), every identifying config field as columns
    summary.parquet      one row per finished trial: best / last / diff (+ AutoAttack)
    state.json           per-trial state (pending, running, done, errored) and the driver's heartbeat
    trials/<key>/        each trial's own folder: checkpoint.pt, summary.json, error.txt

``pandas.read_parquet(run / "curves")`` reads every curve; files are replaced atomically, so a
reader never sees a torn one (temporary files start with a dot, which Parquet readers skip).

A run folder at a URI (``s3://bucket/runs/x``) is worked on in a local mirror (see
:mod:`ablation.remote`): :meth:`RunDir.open` pulls the store into it, and every file written here
is pushed back at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .config import TrialConfig, from_dict
from .errors import AblateError
from .grid import Sweep
from .io import save_json, save_parquet
from .remote import Remote, is_uri, mirror_dir

STATES = ("pending", "running", "done", "errored")
TRIAL_MARKERS = ("summary.json", "error.txt")  # what `status` and resuming need of a trial folder


class RunDir:
    """A sweep's run folder: its manifest, curve store, summary table and trial states."""

    def __init__(self, root: str | Path, remote: Remote | None = None):
        self.root = Path(root).resolve()
        self.remote = remote  # where the durable copy lives, if not here
        self.curves_dir = self.root / "curves"
        self.trials_dir = self.root / "trials"
        self._curves: dict[str, pd.DataFrame] = {}

    @classmethod
    def attach(cls, location: str | Path) -> "RunDir":
        """A run folder by path or URI (for a URI: its local mirror, nothing pulled yet)."""
        if not is_uri(location):
            return cls(location)
        return cls(mirror_dir(str(location)), Remote(str(location)))

    @classmethod
    def open(cls, location: str | Path) -> "RunDir":
        """A run folder by path or URI, with the store of a URI pulled into its mirror."""
        run = cls.attach(location)
        run.pull()
        return run

    @property
    def location(self) -> str:
        """Where the run folder lives, as the user named it (path or URI)."""
        return self.remote.uri if self.remote else str(self.root)

    def where(self, rel: str) -> str:
        """How to name a file or folder of the run to the user (a URI keeps its query last)."""
        if not self.remote:
            return str(self.root / rel)
        base, _, query = self.remote.uri.partition("?")
        return f"{base.rstrip('/')}/{rel}" + (f"?{query}" if query else "")

    def pull(self) -> None:
        """Make the mirror's store (not the checkpoints) what the URI holds now."""
        if not self.remote:
            return
        stale = [self.manifest_path, self.state_path, self.root / "summary.parquet",
                 *self.curves_dir.glob("*.parquet"),
                 *(p for name in TRIAL_MARKERS for p in self.trials_dir.glob(f"*/{name}"))]
        for path in stale:
            path.unlink(missing_ok=True)
        for rel in self.remote.files():
            parts = rel.split("/")
            if (len(parts) == 1 or parts[0] == "curves"
                    or (parts[0] == "trials" and parts[-1] in TRIAL_MARKERS)):
                self.remote.download(rel, self.root / rel)
        self._curves.clear()

    def push(self, path: Path) -> None:
        """Send a file just written in the run folder to the URI (no-op for a local folder)."""
        if self.remote:
            self.remote.upload(path, path.relative_to(self.root).as_posix())

    def sync(self, rel: str) -> bool:
        """Make the file ``rel`` of the run folder here what the URI holds (removing a stale
        copy when it holds none); for a local folder, just say whether it exists."""
        path = self.root / rel
        if self.remote and not self.remote.download(rel, path):
            path.unlink(missing_ok=True)
        return path.exists()

    def mark_errored(self, key: str, text: str) -> None:
        path = self.trial_dir(key) / "error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.push(path)

    def clear_error(self, key: str) -> None:
        (self.trial_dir(key) / "error.txt").unlink(missing_ok=True)
        if self.remote:
            self.remote.delete(f"trials/{key}/error.txt")

    # --- the manifest -------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / "sweep.json"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def trials(self) -> dict[str, TrialConfig]:
        """The trials this folder holds, by key."""
        if not self.exists():
            raise AblateError(f"{self.location}: not an ablate run folder (no sweep.json)")
        manifest = json.loads(self.manifest_path.read_text())
        return {key: from_dict(raw, source=str(self.manifest_path))
                for key, raw in manifest["trials"].items()}

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, spec: Sweep) -> None:
        save_json({"name": spec.name, "description": spec.description,
                   "autoattack": spec.autoattack,
                   "trials": {k: c.to_dict() for k, c in spec.by_key.items()}},
                  self.manifest_path)
        self.push(self.manifest_path)

    def trial_dir(self, key: str) -> Path:
        return self.trials_dir / key

    # --- curves and summaries -----------------------------------------------------------------

    def curves(self, key: str) -> pd.DataFrame:
        """The stored curve of one trial (empty if none)."""
        if key not in self._curves:
            path = self.curves_dir / f"{key}.parquet"
            self._curves[key] = pd.read_parquet(path) if path.exists() else pd.DataFrame()
        return self._curves[key]

    def add_epochs(self, config: TrialConfig, rows: list[dict[str, Any]]) -> None:
        """Append epoch rows of one trial; a repeated epoch replaces the stored one."""
        ident = config.columns()
        new = pd.DataFrame([{**ident, **row} for row in rows])
        merged = pd.concat([self.curves(config.key), new], ignore_index=True) \
            if len(self.curves(config.key)) else new
        merged = (merged.drop_duplicates(subset=["key", "epoch"], keep="last")
                  .sort_values("epoch").reset_index(drop=True))
        save_parquet(merged, self.curves_dir / f"{config.key}.parquet")
        self.push(self.curves_dir / f"{config.key}.parquet")
        self._curves[config.key] = merged

    def forget(self, key: str) -> None:
        """Drop everything of one trial: its folder, stored curve and summary row (for a
        restart from scratch)."""
        shutil.rmtree(self.trial_dir(key), ignore_errors=True)
        (self.curves_dir / f"{key}.parquet").unlink(missing_ok=True)
        self._curves.pop(key, None)
        if self.remote:
            self.remote.delete(f"trials/{key}")
            self.remote.delete(f"curves/{key}.parquet")
        table = self.summaries()
        if len(table) and key in set(table.key):
            save_parquet(table[table.key != key], self.root / "summary.parquet")
            self.push(self.root / "summary.parquet")

    def summaries(self) -> pd.DataFrame:
        path = self.root / "summary.parquet"
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    def add_summary(self, config: TrialConfig, summary: dict[str, Any]) -> None:
        """Put one trial's summary row in the table (replacing its old row). Held under a lock
        file, because `ablate evaluate` may add rows while a sweep's driver does too; at a URI
        the table is fetched again just before, which narrows that race to the upload time."""
        with open(self.root / ".summary.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.sync("summary.parquet")
            table = self.summaries()
            row = pd.DataFrame([{**config.columns(), **summary}])
            table = pd.concat([table[table.key != config.key], row], ignore_index=True) \
                if len(table) else row
            save_parquet(table, self.root / "summary.parquet")
            self.push(self.root / "summary.parquet")

    # --- states -------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def states(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"trials": {}, "driver": None}
        return json.loads(self.state_path.read_text())

    def write_states(self, trials: dict[str, str]) -> None:
        """Per-trial states plus the driver's heartbeat (pid, host, time)."""
        save_json({"trials": trials, "driver": {"pid": os.getpid(), "host": socket.gethostname(),
                                                "time": time.time()}}, self.state_path)
        self.push(self.state_path)


def _driver_alive(driver: dict[str, Any] | None) -> bool:
    if not driver:
        return False
    if driver["host"] != socket.gethostname():  # another machine: trust a recent heartbeat
        return time.time() - driver["time"] < 3600
    try:
        os.kill(driver["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def status_table(run: RunDir) -> tuple[pd.DataFrame, float | None]:
    """One row per trial (state, epochs, best and current test robust accuracy) and the
    estimated seconds left (None when nothing has been timed yet)."""
    trials = run.trials()
    recorded = run.states()
    alive = _driver_alive(recorded["driver"])
    rows, seconds, remaining = [], [], 0
    for key, config in trials.items():
        curve = run.curves(key)
        folder = run.trial_dir(key)
        if (folder / "summary.json").exists():
            state = "done"
        elif (folder / "error.txt").exists():
            state = "errored"
        elif recorded["trials"].get(key) == "running":
            state = "running" if alive else "interrupted"
        else:
            state = "pending"
        done = len(curve)
        if done:
            seconds.extend((curve.train_seconds + curve.eval_seconds).tolist())
        remaining += 0 if state == "done" else config.epochs - done
        rows.append({"key": key, "state": state, "epochs": f"{done}/{config.epochs}",
                     "best_robust": curve.test_robust_acc.max() if done else float("nan"),
                     "current_robust": curve.test_robust_acc.iloc[-1] if done else float("nan")})
    running = sum(r["state"] == "running" for r in rows)
    eta = sum(seconds) / len(seconds) * remaining / max(running, 1) if seconds else None
    return pd.DataFrame(rows), eta
