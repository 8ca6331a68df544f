"""The names of every file ablate writes: a run folder (``ablate run``) and a trial folder (each
trial of a run, and the output folder of ``ablate train``). The README's tables list the same.

Run folder ``runs/<sweep>/``::

    sweep.json              the trials this folder holds: key -> full trial config
    curves/<key>.parquet    one row per (trial, epoch), every identifying config field as columns
    summary.parquet         one row per finished trial: best / last / diff (+ AutoAttack)
    state.json              per-trial state and the driver's heartbeat, for ``ablate status``
    .driver.lock            held by the one running driver; names it (pid, host, start)
    .summary.lock           held while summary.parquet is rebuilt (a driver and ``ablate
                            evaluate`` may race)
    ray/                    Ray Tune's experiment state of each ``ablate run`` (not read back;
                            no curves: ablate turns Tune's loggers off)
    tensorboard/<key>/      ``--log tensorboard``: each trial's event files, one folder per trial
    wandb/                  ``--log wandb``: W&B's local files (offline runs, its logs)
    <backend>/logged.json   the epochs of each trial that backend has logged (``--log``)
    trials/<key>/           the trial folder of each trial

Trial folder::

    checkpoint.pt           weights, optimizer, RNG states, history (every epoch)
    best-<epoch>.pt         the best epoch's weights (written when the best epoch changes)
    fork-<epochs>.pt        a baseline's state after that many epochs, for the trials that fork
                            from it (self-contained: it holds the best weights too)
    summary.json            best / last / diff (+ AutoAttack): written when the trial is done
    autoattack.partial.json the best weights' AutoAttack number while the last weights' runs
    attempts.log            one line per start of the trial: where it resumed (sweeps)
    error.txt               why the last attempt failed (sweeps)
    .lock                   held by the worker that trains the trial (sweeps)
    config.yaml, curves.parquet   the config and curve of an ``ablate train`` folder
"""

SWEEP = "sweep.json"
CURVES_DIR = "curves"
SUMMARY_TABLE = "summary.parquet"
STATE = "state.json"
TRIALS_DIR = "trials"
DRIVER_LOCK = ".driver.lock"  # held by the running driver (store.DriverLock); never pushed
SUMMARY_LOCK = ".summary.lock"  # held while summary.parquet is rebuilt; never pushed
RAY_DIR = "ray"  # Tune's storage_path: its experiment records, which ablate never reads
TENSORBOARD_DIR = "tensorboard"  # --log tensorboard (ablation/loggers.py)
WANDB_DIR = "wandb"  # --log wandb
LOGGED = "logged.json"  # in each --log folder: its ledger; never pushed

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
AUTOATTACK_PARTIAL = "autoattack.partial.json"
ATTEMPTS = "attempts.log"
ERROR = "error.txt"
TRIAL_CONFIG = "config.yaml"
TRIAL_CURVES = "curves.parquet"
TRIAL_LOCK = ".lock"  # held by the worker training the trial; never pushed

# What `ablate status` and planning read of a trial folder (pulled with a URI's store).
TRIAL_MARKERS = (SUMMARY, ERROR)


def curves_file(key: str) -> str:
    """A trial's curve in the run folder, relative to its root."""
    return f"{CURVES_DIR}/{key}.parquet"


def trial_file(key: str, name: str = "") -> str:
    """A trial's folder (or a file in it), relative to the run folder's root."""
    return f"{TRIALS_DIR}/{key}" + (f"/{name}" if name else "")


def best_checkpoint(epoch: int | str) -> str:
    """The file of a trial's best weights, named by their 0-based epoch ("*" for a glob)."""
    return f"best-{epoch}.pt"


def fork_checkpoint(epochs: int | str) -> str:
    """The file a baseline writes after ``epochs`` epochs for the trials that fork from it
    ("*" for a glob)."""
    return f"fork-{epochs}.pt"


def fork_epochs(name: str) -> int | None:
    """The epochs of a fork file's name (``fork-99.pt`` -> 99); None for any other name."""
    head, _, tail = fork_checkpoint("*").partition("*")
    middle = name[len(head):len(name) - len(tail)]
    if name.startswith(head) and name.endswith(tail) and middle.isdigit():
        return int(middle)
    return None
