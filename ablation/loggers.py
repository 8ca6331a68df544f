"""Live curves in TensorBoard and W&B (``ablate run --log NAME``): each trial is one logged run
named by its key, with its identifying config as hyperparameters and each stored epoch as one
step (step = the 0-based epoch) holding the curve row's numbers (lr, train_*, train_eval_*,
test_*, the seconds).

The driver logs from its Parquet store, after writing it (the store stays the truth): after each
message it stores (:meth:`Loggers.received`), each backend logs the rows of that trial it has not
logged yet, in epoch order. How many epochs of each trial a backend has logged is kept in a
ledger in its folder of the run (``<backend>/logged.json``, written atomically after each log),
so that

- a fork's copied prefix (its baseline's epochs, ``forked_from``) is logged once, as the trial's
  first steps;
- a resumed sweep continues each trial's run, with no step logged twice and none missing;
- a driver killed between the store and the log catches up at the next ``ablate run``
  (:meth:`Loggers.catch_up`, before Ray starts), even when no trial is left to train;
- a trial whose store holds fewer epochs than were logged (``--restart-errored`` started it
  again from scratch) gets a new run: a fresh TensorBoard folder, a new W&B run of the same name.

A driver killed between a log and its ledger logs that message's rows again on the next run (a
TensorBoard run with no ledger entry yet starts its folder afresh; TensorBoard's reader keeps the
later copy of a repeated step; W&B, online, ignores the steps a resumed run has). For a run folder
at a URI, the logs and their ledgers stay in this machine's mirror; they are not pushed.

Ray Tune's own logger callbacks (TBX, W&B, MLflow) do not fit: a Tune trial is a pack of ablate
trials, and each ``ablate run`` is a new Tune experiment, so their runs would be per pack and
split per resume. ablate turns Tune's automatic ones off (:func:`ablation.cluster.ray_cluster`).

MLflow is left out for now: the one local store mlflow-skinny has, a folder of files, is refused
by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE=true ("maintenance mode"), and its SQLite store needs
the full mlflow (SQLAlchemy, Alembic); its runs also take no chosen id, so resuming one would
need a search by tag per trial. A third sink class here would add it.

A backend that fails while the sweep runs (a network error, a full disk) is one warning line
naming it, and logging to it stops; the sweep and its store go on.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import files
from .errors import AblateError, ConfigError, one_line, quote
from .grid import Sweep
from .io import load_json, save_json
from .store import RunDir

NOT_SCALARS = ("epoch", "forked_from")  # row columns that are no metric (the step, a key)


class TensorBoard:
    """Event files in ``tensorboard/<key>/``: one folder per trial, to which each driver adds
    an event file (``tensorboard --logdir runs/<name>/tensorboard`` shows one curve per trial).
    The hyperparameters are the HParams plugin's session-start record in that same folder (torch's
    ``add_hparams`` would put them in a timestamped sub-run); the plugin reads the metrics from the
    scalars."""

    package = "tensorboard"  # what the extra (`pip install -e '.[tensorboard]'`) brings
    folder = files.TENSORBOARD_DIR

    def __init__(self, run: RunDir, sweep: Sweep):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer_class, self.root, self.writers = SummaryWriter, run.root / self.folder, {}

    def open(self, key: str, hparams: dict[str, Any], restarts: int, new: bool) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        if new:  # nothing of this run was logged: drop what an earlier one left
            shutil.rmtree(self.root / key, ignore_errors=True)
        writer = self.writers[key] = self.writer_class(str(self.root / key), flush_secs=30)
        if new:
            _, start, _ = hparams_summaries(hparams, {})  # the experiment and end records: none
            writer.file_writer.add_summary(start)

    def log(self, key: str, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writers[key].add_scalar(name, value, global_step=step)

    def flush(self, key: str) -> None:
        self.writers[key].flush()

    def end(self, key: str, failed: bool) -> None:
        self.writers.pop(key).close()


class Wandb:
    """One W&B run per trial: project = the sweep's name (or $WANDB_PROJECT), name = the key, a
    stable id from the run folder and the key (so a resumed sweep resumes each run), files under
    ``wandb/`` in the run folder (or $WANDB_DIR). WANDB_MODE, WANDB_ENTITY and W&B's other
    settings are W&B's own; the tests use WANDB_MODE=offline."""

    package = "wandb"
    folder = files.WANDB_DIR

    def __init__(self, run: RunDir, sweep: Sweep):
        import wandb

        self.wandb, self.location, self.runs = wandb, run.location, {}
        self.project = os.environ.get("WANDB_PROJECT") or sweep.name
        self.dir = os.environ.get("WANDB_DIR") or str(run.root)  # W&B adds "wandb/"
        if os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun"):
            try:  # here, before Ray starts: W&B's own prompt on a terminal, else one line
                wandb.login(verify=False)
            except wandb.errors.UsageError as err:
                raise ConfigError(f"--log wandb: {str(err).rstrip('.')}; or set "
                                  "WANDB_MODE=offline to keep the runs in the run folder for a "
                                  "later `wandb sync`") from None

    def run_id(self, key: str, restarts: int) -> str:
        """The W&B id of a trial's run: the same for every ``ablate run`` of this folder."""
        text = f"{self.location}\n{key}" + (f"\n{restarts}" if restarts else "")
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def open(self, key: str, hparams: dict[str, Any], restarts: int, new: bool) -> None:
        os.makedirs(self.dir, exist_ok=True)  # W&B looks for a git repository from it
        self.runs[key] = self.wandb.init(
            project=self.project, name=key, id=self.run_id(key, restarts), config=hparams,
            resume="allow", dir=self.dir, reinit="create_new",  # one run per trial, at once
            # no console: the driver's output belongs to no single trial
            settings=self.wandb.Settings(silent=True, console="off"))

    def log(self, key: str, step: int, scalars: dict[str, float]) -> None:
        self.runs[key].log(scalars, step=step)

    def flush(self, key: str) -> None:
        pass  # W&B's service holds what was logged

    def end(self, key: str, failed: bool) -> None:
        self.runs.pop(key).finish(exit_code=1 if failed else 0)


LOGGERS = {"tensorboard": TensorBoard, "wandb": Wandb}  # --log NAME -> its backend


class Loggers:
    """The driver's ``--log`` backends over a run folder: check them (:meth:`__init__`), then,
    under the driver's lock (``with loggers:``), catch up (:meth:`catch_up`) and log what each
    stored message adds (:meth:`received`); leaving the ``with`` ends every open run."""

    def __init__(self, run: RunDir, sweep: Sweep, names: Iterable[str],
                 warn: Callable[[str], None]):
        """Refuse, in one line, a name that is no backend or whose package is not installed;
        nothing is read or written yet."""
        self.run, self.configs, self.warn = run, sweep.by_key, warn
        self.sinks: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            if name not in LOGGERS:
                raise ConfigError(f"--log {quote(name)}: not a logger; choose from "
                                  f"{', '.join(LOGGERS)}")
            backend = LOGGERS[name]
            try:
                importlib.import_module(backend.package)
            except ImportError:
                raise ConfigError(f"--log {name}: the {backend.package} package is not "
                                  f"installed; install the extra: pip install -e '.[{name}]' in the "
                                  "ablation checkout") from None
            self.sinks[name] = backend(run, sweep)
        self.logged: dict[str, dict[str, dict[str, int]]] = {}  # name -> key -> ledger entry
        self.opened: dict[str, set[str]] = {name: set() for name in self.sinks}

    def __enter__(self) -> Loggers:
        """Read each backend's ledger (under the driver's lock)."""
        for name, sink in self.sinks.items():
            path = self._ledger(name)
            try:
                ledger = load_json(path) if path.exists() else {}
                if not (isinstance(ledger, dict) and all(
                        isinstance(e, dict) and all(isinstance(e.get(f), int)
                                                    for f in ("epochs", "restarts"))
                        for e in ledger.values())):
                    raise ValueError
            except ValueError:
                raise AblateError(f"{path}: not a ledger ablate wrote; delete the folder "
                                  f"{path.parent} to log every curve again") from None
            self.logged[name] = ledger
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ledger(self, name: str) -> Path:
        return self.run.root / self.sinks[name].folder / files.LOGGED

    def catch_up(self) -> None:
        """Log what the store holds beyond each ledger, for every trial of the sweep (a driver
        killed before it logged, a run without ``--log``); the runs of finished trials end, the
        others stay open for the sweep."""
        for key in self.configs:
            self.log(key)
            if (self.run.trial_dir(key) / files.SUMMARY).exists():
                self.end(key)

    def received(self, message: dict[str, Any]) -> None:
        """After the driver stored a worker's message (:func:`ablation.worker.receive`): log the
        trial's new rows; end its runs when it is done or failed."""
        key = message["trial"]
        if "row" in message:
            self.log(key)
        if "summary" in message or "failed" in message:
            self.end(key, failed="failed" in message)

    def log(self, key: str) -> None:
        """Log the stored rows of trial ``key`` that each backend has not logged yet."""
        if not self.sinks:  # no --log (or every backend failed): nothing to read
            return
        curve = self.run.curves(key)
        stored = int(curve.epoch.max()) + 1 if len(curve) else 0  # the store holds 0 .. stored-1
        identity = self.configs[key].columns()
        hparams = {k: v for k, v in identity.items() if k != "key"}
        scalars = [c for c in curve.columns if c not in identity and c not in NOT_SCALARS
                   and curve[c].dtype.kind in "biuf"]  # the row's numbers
        for name in list(self.sinks):
            entry = self.logged[name].get(key, {"epochs": 0, "restarts": 0})
            if stored < entry["epochs"]:  # the trial was started again from scratch
                self._end(name, key, failed=False)
                entry = {"epochs": 0, "restarts": entry["restarts"] + 1}
            rows = curve[curve.epoch >= entry["epochs"]].sort_values("epoch") if stored else curve
            if rows.empty:
                continue

            def write(sink):
                if key not in self.opened[name]:
                    sink.open(key, hparams, entry["restarts"], new=entry["epochs"] == 0)
                    self.opened[name].add(key)
                for row in rows.to_dict("records"):  # NaN: a column without a value in this
                    sink.log(key, int(row["epoch"]),  # trial (lr_fixed when none is fixed)
                             {c: float(row[c]) for c in scalars if row[c] == row[c]})
                sink.flush(key)  # on disk before the ledger says so

            if self._guard(name, write):
                self.logged[name][key] = {"epochs": stored, "restarts": entry["restarts"]}
                save_json(self.logged[name], self._ledger(name))

    def end(self, key: str, failed: bool = False) -> None:
        """End trial ``key``'s open runs (marked failed in W&B when ``failed``)."""
        for name in list(self.sinks):
            self._end(name, key, failed)

    def _end(self, name: str, key: str, failed: bool) -> None:
        if name in self.sinks and key in self.opened[name]:  # a failed backend has no runs
            self.opened[name].discard(key)
            self._guard(name, lambda sink: sink.end(key, failed))

    def close(self) -> None:
        """End every open run (the driver ends, also on Ctrl-C)."""
        for name in list(self.sinks):
            for key in sorted(self.opened.get(name, ())):
                self._end(name, key, failed=False)

    def _guard(self, name: str, call: Callable[[Any], None]) -> bool:
        """``call(sink)``; a failure is one warning line and stops that backend for this run."""
        try:
            call(self.sinks[name])
            return True
        except Exception as err:  # the boundary to a foreign library: any of its errors is one line
            self.sinks.pop(name)
            self.opened.pop(name)
            self.warn(f"--log {name}: {one_line(err)}; logging to {name} stops (the sweep and "
                      f"its curves in {self.run.where(files.CURVES_DIR)} go on)")
            return False

