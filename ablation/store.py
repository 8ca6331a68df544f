"""The run folder of a sweep: its Parquet curve store, written by one process (the driver), and
the decisions about it that need no Ray: which trials are done, which to run, their states.

The files are named in :mod:`ablation.files`. ``pandas.read_parquet(run / "curves")`` reads every
curve; files are replaced atomically, so a reader never sees a torn one (temporary files start
with a dot, which Parquet readers skip).

A run folder at a URI (``s3://bucket/runs/x``) is worked on in a local mirror (see
:mod:`ablation.remote`): :meth:`RunDir.open` pulls the store into it, and every file written here
is pushed back at once.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from . import files, plugins, strategies
from .config import TrialConfig, from_dict
from .curves import best_last
from .errors import AblateError, ConfigError
from .fork import Fork, ForkWaits, same_base
from .grid import Sweep
from .io import atomic_path, load_json, save_json, save_parquet
from .remote import Remote, is_uri, mirror_dir



def read_curve(path: Path, name: str) -> pd.DataFrame:
    """One trial's stored curve; a file that is not a readable Parquet table is named. The file
    is read in one go: pyarrow opens a path more than once, and a driver that replaces the file
    in between (``ablate status`` during a run) would hand it parts of two files."""
    try:
        return pd.read_parquet(io.BytesIO(path.read_bytes()))
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise AblateError(f"{name}: not a readable curve ({type(err).__name__}); move it out "
                          "of the run folder (the trial's checkpoint.pt still holds its rows)") \
            from None


class RunDir:
    """A sweep's run folder: its manifest, curve store, summary table and trial states."""

    def __init__(self, root: str | Path, remote: Remote | None = None):
        self.root = Path(root).resolve()
        self.remote = remote  # where the durable copy lives, if not here
        self.curves_dir = self.root / files.CURVES_DIR
        self.trials_dir = self.root / files.TRIALS_DIR
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
        stale = [self.manifest_path, self.state_path, self.root / files.SUMMARY_TABLE,
                 *self.curves_dir.glob("*.parquet"),
                 *(p for name in files.TRIAL_MARKERS for p in self.trials_dir.glob(f"*/{name}"))]
        for path in stale:
            path.unlink(missing_ok=True)
        for rel in self.remote.files():
            parts = rel.split("/")
            if (len(parts) == 1 or parts[0] == files.CURVES_DIR
                    or (parts[0] == files.TRIALS_DIR and parts[-1] in files.TRIAL_MARKERS)):
                self.remote.download(rel, self.root / rel)
        self._curves.clear()

    def push(self, path: Path) -> None:
        """Send a file written in the run folder by someone else (the trainer's checkpoint) to
        the URI (no-op for a local folder). The store's own writes push themselves."""
        if self.remote:
            self.remote.upload(path, path.relative_to(self.root).as_posix())

    def write_json(self, rel: str, obj: Any) -> Path:
        """Write a JSON file of the run folder atomically and push it: one call per write."""
        save_json(obj, self.root / rel)
        self.push(self.root / rel)
        return self.root / rel

    def write_parquet(self, rel: str, frame: pd.DataFrame) -> Path:
        """Write a Parquet file of the run folder atomically and push it."""
        save_parquet(frame, self.root / rel)
        self.push(self.root / rel)
        return self.root / rel

    def write_text(self, rel: str, text: str) -> Path:
        """Write a text file of the run folder atomically and push it."""
        with atomic_path(self.root / rel) as tmp:
            tmp.write_text(text)
        self.push(self.root / rel)
        return self.root / rel

    def have(self) -> Callable[[str], bool]:
        """Whether a file of the run folder (relative to its root) exists: at a URI, as one
        listing of its trial folders taken now says; here, when asked."""
        if not self.remote:
            return lambda rel: (self.root / rel).exists()
        present = set(self.remote.files(files.TRIALS_DIR))
        return lambda rel: rel in present

    def sync(self, rel: str) -> bool:
        """Make the file ``rel`` of the run folder here what the URI holds (removing a stale
        copy when it holds none); for a local folder, just say whether it exists."""
        path = self.root / rel
        if self.remote and not self.remote.download(rel, path):
            path.unlink(missing_ok=True)
        return path.exists()

    def mark_errored(self, key: str, text: str) -> None:
        self.write_text(files.trial_file(key, files.ERROR), text)

    def clear_error(self, key: str) -> None:
        (self.trial_dir(key) / files.ERROR).unlink(missing_ok=True)
        if self.remote:
            self.remote.delete(files.trial_file(key, files.ERROR))

    # --- the manifest -------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / files.SWEEP

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def trials(self) -> dict[str, TrialConfig]:
        """The trials this folder holds, by key. A trial may name an intervention or model of
        a plugin: one this process has not loaded is known from the folder's record of it, never
        by running the plugin text the folder holds (:func:`ablation.plugins.stand_ins`)."""
        if not self.exists():
            raise AblateError(f"{self.location}: not an ablate run folder (no sweep.json)")
        manifest = self.manifest()
        plugins.stand_ins(manifest.get("plugin_names"), self.where(files.SWEEP))
        return {key: from_dict(raw, source=self.where(files.SWEEP))
                for key, raw in manifest["trials"].items()}

    def plugins(self) -> list[plugins.Plugin]:
        """The plugin files of the sweep, as the last ``ablate run`` recorded them (none before
        it records its sweep)."""
        if not self.exists():
            return []
        return plugins.from_dicts(self.manifest().get("plugins", []), self.where(files.SWEEP))

    def manifest(self) -> dict[str, Any]:
        """``sweep.json``: the run's name, description and trials. The folder cannot rebuild it
        (it records what was asked), so a damaged one is named, with the way to write it again."""
        try:
            manifest = load_json(self.manifest_path)
            problem = None if isinstance(manifest, dict) and isinstance(
                manifest.get("trials"), dict) and all(
                isinstance(t, dict) for t in manifest["trials"].values()) \
                else "not the object of trials ablate writes"
        except ValueError as err:
            problem = f"not valid JSON ({err.__class__.__name__})"
        if problem:
            raise AblateError(f"{self.where(files.SWEEP)}: {problem}; move it away and run "
                              "`ablate run` with the sweep file and this --storage to write it "
                              "again (the trials' files are kept)")
        return manifest

    def write_manifest(self, sweep: Sweep) -> None:
        self.write_json(files.SWEEP, {"name": sweep.name, "description": sweep.description,
                                      "autoattack": sweep.autoattack,
                                      "plugins": [p.to_dict() for p in sweep.plugins],
                                      "plugin_names": plugins.record(sweep.trials),
                                      "trials": {k: c.to_dict() for k, c in sweep.by_key.items()}})

    def trial_dir(self, key: str) -> Path:
        return self.trials_dir / key

    # --- curves and summaries -----------------------------------------------------------------

    def curves(self, key: str) -> pd.DataFrame:
        """The stored curve of one trial (empty if none)."""
        if key not in self._curves:
            path = self.root / files.curves_file(key)
            self._curves[key] = read_curve(path, self.where(files.curves_file(key))) \
                if path.exists() else pd.DataFrame()
        return self._curves[key]

    def add_epochs(self, config: TrialConfig, rows: list[dict[str, Any]]) -> None:
        """Append epoch rows of one trial; a repeated epoch replaces the stored one."""
        ident = config.columns()
        # forked_from: the parent whose checkpoint a row was copied from ("" when trained here)
        new = pd.DataFrame([{**ident, "forked_from": "", **row} for row in rows])
        merged = pd.concat([self.curves(config.key), new], ignore_index=True) \
            if len(self.curves(config.key)) else new
        merged = (merged.drop_duplicates(subset=["key", "epoch"], keep="last")
                  .sort_values("epoch").reset_index(drop=True))
        self.write_parquet(files.curves_file(config.key), merged)
        self._curves[config.key] = merged

    def forget(self, key: str) -> None:
        """Drop everything of one trial: its folder, stored curve and summary row (for a
        restart from scratch)."""
        shutil.rmtree(self.trial_dir(key), ignore_errors=True)
        (self.root / files.curves_file(key)).unlink(missing_ok=True)
        self._curves.pop(key, None)
        if self.remote:
            self.remote.delete(files.trial_file(key))
            self.remote.delete(files.curves_file(key))
        self.rebuild_summaries()

    def summaries(self) -> pd.DataFrame:
        """``summary.parquet`` as stored (empty when absent or unreadable: it is derived, and
        :meth:`rebuild_summaries` writes it again)."""
        path = self.root / files.SUMMARY_TABLE
        try:
            return pd.read_parquet(path) if path.exists() else pd.DataFrame()
        except Exception:  # pyarrow raises several types for a damaged file
            return pd.DataFrame()

    def trial_summary(self, key: str) -> dict[str, Any] | None:
        """A trial's ``summary.json`` (None before the trial finishes); a damaged one is named."""
        rel = files.trial_file(key, files.SUMMARY)
        if not (self.root / rel).exists():
            return None
        try:
            summary = load_json(self.root / rel)
            if not isinstance(summary, dict):
                raise ValueError
        except ValueError:
            raise AblateError(f"{self.where(rel)}: not a summary ablate wrote; delete it to "
                              "have the trial's final numbers written again") from None
        return summary

    def rebuild_summaries(self, write: bool = True, fetch: bool = True) -> pd.DataFrame:
        """Make ``summary.parquet`` what the trial folders say: one row per trial whose
        ``summary.json`` exists, in the manifest's order. The trial folders are the truth; the
        table is derived, so a driver killed between a worker's summary and the table (or an
        ``ablate evaluate`` stopped there) loses nothing: the next run, report or evaluate
        rebuilds it. Written only when it changes (never with ``write=False``: readers such as
        ``ablate report`` derive it without touching the folder). At a URI each summary is fetched
        first, since another machine (a worker, ``ablate evaluate``) may have written it, unless
        ``fetch=False`` says the caller has just pulled the store."""
        # a driver and `evaluate` may race
        with open(self.root / files.SUMMARY_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows = []
            for key, config in self.trials().items():
                rel = files.trial_file(key, files.SUMMARY)
                if self.remote and fetch:
                    self.sync(rel)
                summary = self.trial_summary(key)
                if summary is not None:
                    rows.append({**config.columns(), **summary})
            table = pd.DataFrame(rows)
            stored = self.summaries()
            if write and not (len(table) == len(stored) and table.equals(stored)):
                self.write_parquet(files.SUMMARY_TABLE, table)
            return table

    # --- states -------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / files.STATE

    def states(self) -> dict[str, Any]:
        """``state.json``: what the driver last said (trial states, what pending trials wait
        for, packs, its heartbeat). Derived and rewritten by every driver, so a damaged or
        foreign one reads as absent."""
        empty = {"trials": {}, "driver": None}
        try:
            state = load_json(self.state_path) if self.state_path.exists() else empty
        except ValueError:
            return empty
        if not isinstance(state, dict):
            return empty
        fields = {"trials": dict, "packs": dict, "waiting": str, "driver": dict}
        return {**empty, **{k: v for k, v in state.items()
                            if k in fields and isinstance(v, fields[k])}}

    def write_states(self, trials: dict[str, str], waiting: str | None = None,
                     packs: dict[str, str] | None = None) -> None:
        """Per-trial states, what pending trials wait for (one line, or None), the pack each
        trial trains in (given once per run, kept for the later writes; trials alone are left
        out) and the driver's heartbeat (pid, host, time)."""
        if packs is not None:
            self._packs = packs
        self.write_json(files.STATE, {
            "trials": trials, "waiting": waiting, "packs": getattr(self, "_packs", {}),
            "driver": {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}})


def plan(run: RunDir, sweep: Sweep, restart_errored: bool) -> dict[str, TrialConfig]:
    """Check the sweep against what the folder holds, record it, and return the trials to run.

    A trial stored here but absent from the sweep means the file changed what existing trials
    compute (their keys hash the whole config): refuse rather than orphan their work.
    """
    name, autoattack, configs = sweep.name, sweep.autoattack, sweep.by_key
    if run.exists():
        stored = run.manifest()
        if stored["name"] != name:
            raise ConfigError(f"{run.location}: holds sweep {stored['name']!r}, not {name!r}; "
                              "use another --storage")
        gone = [k for k in stored["trials"] if k not in configs]
        if gone:
            raise ConfigError(
                f"the sweep file changed {len(gone)} trial(s) already in {run.location} "
                f"(e.g. {gone[0]}); undo the change (or the --set) or run it with another "
                "--storage")
    run.write_manifest(sweep)
    # A driver killed after a trial's summary.json lost only the row; the store was just pulled.
    run.rebuild_summaries(fetch=False)
    todo = {}
    for key, config in configs.items():
        folder = run.trial_dir(key)
        errored = (folder / files.ERROR).exists()
        if errored and restart_errored:
            run.forget(key)
        if not (folder / files.SUMMARY).exists() or (
                autoattack is not None and "autoattack_n" not in load_json(folder / files.SUMMARY)):
            todo[key] = config
    return todo


def trial_params(run: RunDir, todo: dict[str, TrialConfig], threads: int,
                 autoattack: int | None, waits: ForkWaits) -> list[dict[str, Any]]:
    """What each trial of ``todo`` receives where it runs (:func:`ablation.worker.run_trial`):
    its key and config (a relative data root made absolute: workers chdir), the run folder,
    torch's thread count, AutoAttack's test images, the fork it starts from and the epochs after
    which it writes fork files for others (both from ``waits``: :func:`ablation.fork.fork_waits`),
    and the sweep's plugins, which the worker loads before it builds the trial.
    """
    out = []
    shipped = [p.to_dict() for p in run.plugins()]
    for key, config in todo.items():
        root = Path(config.data_root).expanduser()
        if not root.is_absolute():
            config = config.replace(data_root=str(root.resolve()))  # not in the key: same trial
        fork = waits.waiting.get(key)
        out.append({"key": key, "config": config.to_dict(), "run": run.location,
                    "threads": threads, "autoattack": autoattack,
                    "fork": fork.to_dict() if fork else None,
                    "fork_points": list(waits.points.get(key, ())), "plugins": shipped})
    return out


def plan_packs(trials: list[TrialConfig], forks: dict[str, Fork], size: int) -> list[list[str]]:
    """The packs of a sweep's trials (keys), trained together ``size`` at a time: trials that
    differ only in their intervention and start alike (from the same baseline's fork file after
    the same epochs, or from scratch), in key order. A trial whose intervention the packed
    trainer does not carry out (its description's ``packed``) trains alone. Formed from the whole
    sweep, never from what is left to do, so a resumed sweep forms the same packs."""
    groups: dict[tuple, list[str]] = {}
    for trial in sorted(trials, key=lambda t: t.key):
        if not strategies.intervention(trial.intervention).packed:
            groups[(trial, "alone")] = [trial.key]
            continue
        fork = forks.get(trial.key)
        start = (fork.parent, fork.epochs) if fork else None
        group = next((g for g in groups if g[1] == start and same_base(g[0], trial)),
                     (trial, start))
        groups.setdefault(group, []).append(trial.key)
    return [keys[i:i + size] for keys in groups.values() for i in range(0, len(keys), size)]


def dispatch_units(params: list[dict[str, Any]], packs: list[list[str]],
                   waits: ForkWaits) -> tuple[list[dict[str, Any]], dict[str, Fork]]:
    """What the dispatcher hands out: one unit per pack with trials still to run (``params``
    of :func:`trial_params`), named by its first trial's key, and the units that wait for a
    fork file (the fork of their trials that wait for one)."""
    by_key = {p["key"]: p for p in params}
    units, waiting = [], {}
    for pack in packs:
        members = [by_key[k] for k in pack if k in by_key]
        if not members:
            continue
        unit = {"key": members[0]["key"], "trials": members}
        fork = next((waits.waiting[m["key"]] for m in members if m["key"] in waits.waiting),
                    None)
        if fork is not None:
            waiting[unit["key"]] = fork
        units.append(unit)
    return units, waiting


def _driver_alive(driver: dict[str, Any] | None) -> bool:
    if not driver:
        return False
    pid, host, when = driver.get("pid"), driver.get("host"), driver.get("time")
    if not (isinstance(pid, int) and 0 < pid < 2**31 and isinstance(host, str)
            and isinstance(when, (int, float))):
        return False  # not a heartbeat ablate wrote
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
    """One row per trial (state, epochs, best and current test robust accuracy, the pack it
    trains in: a number, 0 alone) and the estimated seconds left (None when nothing has been
    timed yet)."""
    trials = run.trials()
    recorded = run.states()
    packs = recorded.get("packs") or {}
    numbers_of = {unit: i for i, unit in enumerate(dict.fromkeys(packs.values()), start=1)}
    alive = _driver_alive(recorded["driver"])
    rows, seconds, remaining = [], [], 0
    for key, config in trials.items():
        curve = run.curves(key)
        folder = run.trial_dir(key)
        if (folder / files.SUMMARY).exists():
            state = "done"
        elif (folder / files.ERROR).exists():
            state = "errored"
        elif recorded["trials"].get(key) == "running":
            state = "running" if alive else "interrupted"
        else:
            state = "pending"
        done = len(curve)
        if done:
            seconds.extend((curve.train_seconds + curve.eval_seconds).tolist())
        remaining += 0 if state == "done" else config.epochs - done
        numbers = best_last(curve) if done else {}
        rows.append({"key": key, "state": state, "epochs": f"{done}/{config.epochs}",
                     "pack": numbers_of.get(packs.get(key), 0),
                     "best_robust": numbers.get("best_test_robust_acc", float("nan")),
                     "current_robust": numbers.get("last_test_robust_acc", float("nan"))})
    running = sum(r["state"] == "running" for r in rows)
    eta = sum(seconds) / len(seconds) * remaining / max(running, 1) \
        if seconds and alive else None  # no driver: nothing is coming
    return pd.DataFrame(rows), eta


def stopped_line(run: RunDir) -> str | None:
    """Said by ``ablate status`` when no driver runs the sweep (after Ctrl-C or a crash): when
    it was last seen, and the command that resumes; None while one runs."""
    driver = run.states()["driver"]
    if _driver_alive(driver):
        return None
    seen = f" (last seen {_clock(driver['time'])})" if isinstance(
        (driver or {}).get("time"), (int, float)) else ""
    return (f"no driver is running this sweep{seen}; run `ablate run <sweep file> --storage "
            f"{run.location}` to resume")


def _clock(seconds: float) -> str:
    """A time as HH:MM, with its date unless it is today."""
    when = time.localtime(seconds)
    return time.strftime("%H:%M" if when[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M", when)


# --- one driver per run folder (DriverLock) and what its trials wait for ------------------------


class DriverLock:
    """Held by the one driver (``ablate run``) of a run folder for its whole life.

    An exclusive ``flock`` on ``.driver.lock`` in the folder (for a folder at a URI: in this
    machine's mirror). The kernel drops it when its holder dies, however it dies, so the lock of a
    dead driver is simply taken by the next one. The file also names its holder (pid, host,
    start) for the refusal. Two drivers on two machines are refused only where the file system
    shares flock locks between machines (NFSv4 does); on one URI from two machines they are not
    detected, each having its own mirror.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.root / files.DRIVER_LOCK
        self.file = None

    def __enter__(self) -> DriverLock:
        self.run.root.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # not inherited by Ray's processes (PEP 446)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise AblateError(f"{self.run.location} is being run by {self.holder()}; stop it or "
                              "wait for it to end") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": time.time()}) + "\n")
        self.file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # releases the lock; the file stays, naming the last holder

    def holder(self) -> str:
        """The driver that holds the lock, in words (its file is written just after locking)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text())
                break
            except ValueError:
                time.sleep(0.05)
        else:
            return "another driver"
        return f"pid {info['pid']} on host {info['host']} since {_clock(info['since'])}"


def waiting_line(run: RunDir) -> str | None:
    """What the pending trials of a live driver wait for (resources, a slot), if anything."""
    recorded = run.states()
    return recorded.get("waiting") if _driver_alive(recorded["driver"]) else None
