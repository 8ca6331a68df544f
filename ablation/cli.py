"""The ``ablate`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from .config import TrialConfig, from_dict, load_trial
from .errors import AblateError, ConfigError, TrainingDiverged

def _apply_overrides(config: TrialConfig, pairs: tuple[str, ...]) -> TrialConfig:
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        changes[key.strip()] = yaml.safe_load(value)
    return from_dict({**config.to_dict(), **changes}, source="--set") if changes else config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ablate: layer-wise interventions in adversarial training, from one trial to a sweep."""


@cli.command()
@click.argument("trial", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: runs/train/<trial key>). Running the same command "
                   "again resumes from the checkpoint there.")
@click.option("--autoattack", type=int, is_flag=False, flag_value=0, default=None, metavar="[N]",
              help="After training, run standard AutoAttack on the best and last weights, on the "
                   "first N test images (all of them when N is left out or 0).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set epochs=5 --set device=cuda. Repeatable.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(trial: Path, out: Path | None, autoattack: int | None, overrides: tuple[str, ...],
          threads: int | None, quiet: bool) -> None:
    """Train one trial from a TRIAL.yaml config and write curves.parquet, summary.json and
    checkpoint.pt to the output folder.

    TRIAL.yaml holds trial fields (dataset, model, method, threat, intervention, layers, epochs,
    ...); fields left out take the paper's defaults for the chosen dataset and method.
    """
    from .local import train_trial  # torch loads here, so --help and config errors stay fast

    train_trial(_apply_overrides(load_trial(trial), overrides), out, autoattack, threads, quiet)


@cli.command()
@click.argument("sweep", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, metavar="DIR",
              help="Run folder (default: runs/<sweep name>). A shared folder (NFS) lets a "
                   "multi-node cluster see every trial's checkpoint. Running the same command "
                   "again resumes the sweep stored there.")
@click.option("--address", default=None, metavar="ADDR",
              help="Join an existing Ray cluster ('auto', or host:port); default: start a local "
                   "Ray on this machine.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="CPUs reserved per trial (also torch's thread count).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None,
              help="GPUs per trial; fractions pack several trials on one GPU (bookkeeping "
                   "only: each still takes the memory it needs). Default: 1 if this machine "
                   "has a GPU, else 0.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="At most this many trials at once (default: as resources allow).")
@click.option("--max-failures", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times Ray retries a failed trial (from its last checkpoint) in one run.")
@click.option("--restart-errored", is_flag=True,
              help="Start trials that errored in an earlier run from scratch instead of "
                   "resuming them from their checkpoints.")
@click.option("--dry-run", is_flag=True,
              help="List the trials, their keys and the total epochs; start nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(sweep: Path, storage: str | None, address: str | None, cpus_per_trial: float,
        gpus_per_trial: float | None, max_concurrent: int | None, max_failures: int,
        restart_errored: bool, dry_run: bool, quiet: bool) -> None:
    """Run every trial of a SWEEP.yaml through Ray Tune; resume it if its folder exists.

    Finished trials are not rerun, interrupted ones continue from their last epoch, errored ones
    are retried, and trials added to the file since are run too.
    """
    from .grid import load_sweep

    spec = load_sweep(sweep)
    if dry_run:
        for i, config in enumerate(spec.trials):
            click.echo(f"{i:4d}  {config.key}  ({config.epochs} epochs)")
        click.echo(f"{len(spec.trials)} trials, {spec.total_epochs} epochs in total")
        return
    from .store import RunDir
    from .tune import SweepProgress, prepare, run_sweep

    folder = RunDir(storage or Path("runs") / spec.name)
    todo = prepare(folder, spec.name, spec.trials, spec.autoattack, restart_errored)
    if spec.description:
        click.echo(" ".join(spec.description.split()), err=True)
    click.echo(f"{spec.name}: {len(spec.trials)} trials, {len(spec.trials) - len(todo)} done, "
               f"{len(todo)} to run; folder {folder.root}", err=True)
    if not todo:
        return
    if gpus_per_trial is None:
        import torch

        gpus_per_trial = 1.0 if torch.cuda.is_available() else 0.0
    stored = {(k, int(e)) for k in spec.by_key for e in folder.curves(k).get("epoch", [])}
    progress = SweepProgress(spec.total_epochs, stored, quiet)
    try:
        states = run_sweep(folder, todo, address=address, cpus_per_trial=cpus_per_trial,
                           gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent,
                           max_failures=max_failures, autoattack=spec.autoattack,
                           progress=progress)
    finally:
        progress.close()
    errored = [k for k, s in states.items() if s != "done"]
    if errored:
        raise click.ClickException(f"{len(errored)} trial(s) did not finish (e.g. {errored[0]}); "
                                   f"see {folder.root}/trials/<key>/error.txt, then run the same "
                                   "command again to retry them")
    click.echo(f"{spec.name}: all {len(spec.trials)} trials done; curves in "
               f"{folder.curves_dir}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def status(run_dir: Path) -> None:
    """Per trial of a run folder: state, epochs done, best and current test robust accuracy,
    and an estimate of the time left."""
    from .store import RunDir, status_table

    table, eta = status_table(RunDir(run_dir))
    width = max(len(k) for k in table.key)
    click.echo(f"{'trial':<{width}}  {'state':<11} {'epochs':>9}  {'best':>6}  {'current':>7}")
    for row in table.itertuples():
        best = "-" if row.best_robust != row.best_robust else f"{row.best_robust:.1%}"
        current = "-" if row.current_robust != row.current_robust else f"{row.current_robust:.1%}"
        click.echo(f"{row.key:<{width}}  {row.state:<11} {row.epochs:>9}  {best:>6}  "
                   f"{current:>7}")
    counts = table.state.value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in
                        ("done", "running", "interrupted", "errored", "pending") if s in counts)
    left = "unknown" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta)) \
        if eta < 86400 else f"{eta / 86400:.1f} days"
    click.echo(f"{len(table)} trials: {summary}; time left about {left}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        cli.main(args=argv, prog_name="ablate", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        hint = f" (see '{err.ctx.command_path} --help')" if getattr(err, "ctx", None) else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(2)
    except AblateError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except TrainingDiverged as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
