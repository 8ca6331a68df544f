"""The ``ablate`` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from .config import TrialConfig, from_dict, load_trial
from .errors import AblateError, ConfigError, RunFailed


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
@click.option("--storage", default=None, metavar="DIR|URI",
              help="Run folder (default: runs/<sweep name>): a local or shared (NFS) folder, "
                   "or a URI such as s3://bucket/runs/name (worked on through a local mirror "
                   "in $ABLATE_CACHE, every file pushed to the URI as it is written). Running "
                   "the same command again resumes the sweep stored there.")
@click.option("--address", default=None, metavar="ADDR",
              help="Join an existing Ray cluster ('auto', or host:port); default: start a local "
                   "Ray on this machine.")
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="CPUs reserved per trial (also torch's thread count).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None,
              help="GPUs per trial; fractions pack several trials on one GPU (bookkeeping "
                   "only: each still takes the memory it needs). Default: 1 if the Ray "
                   "cluster has GPUs, else 0.")
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

    folder = RunDir.open(storage or Path("runs") / spec.name)
    todo = prepare(folder, spec, restart_errored)
    if spec.description:
        click.echo(" ".join(spec.description.split()), err=True)
    click.echo(f"{spec.name}: {len(spec.trials)} trials, {len(spec.trials) - len(todo)} done, "
               f"{len(todo)} to run; folder {folder.location}", err=True)
    if not todo:
        return
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
        raise RunFailed(f"{len(errored)} trial(s) did not finish (e.g. {errored[0]}); see "
                        f"{folder.where('trials/<key>/error.txt')}, then run the same command "
                        "again to retry them")
    click.echo(f"{spec.name}: all {len(spec.trials)} trials done; curves in "
               f"{folder.where('curves')}")


@cli.command()
@click.argument("run_dir")
def status(run_dir: str) -> None:
    """Per trial of a run folder: state, epochs done, best and current test robust accuracy,
    and an estimate of the time left."""
    from .store import RunDir, status_table

    table, eta = status_table(RunDir.open(run_dir))
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


@cli.command()
@click.argument("run_dir")
@click.option("--figure", "figures", multiple=True, metavar="NAME",
              help="fix_param, fix_lr, awp (the paper's figure grids), gap, heatmap, or all. "
                   "Repeatable.")
@click.option("--table", "tables", multiple=True, metavar="NAME",
              help="best-last, awp-compare, ablation, effects, or all. Repeatable.")
@click.option("--setting", "settings", multiple=True, metavar="LABEL",
              help="A setting, named as in the figures' legends (e.g. 'AT_awp_[4]', AWP): "
                   "the gap figure draws these instead of the paper's sets, and the "
                   "best-last table adds them as rows. Repeatable.")
@click.option("--metric", default="test_robust_acc", show_default=True,
              help="Curve column for the figure grids, e.g. train_robust_acc (Figure 2(b)), "
                   "test_acc, test_robust_loss.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: reports/<sweep name>).")
def report(run_dir: str, figures: tuple[str, ...], tables: tuple[str, ...],
           settings: tuple[str, ...], metric: str, out: Path | None) -> None:
    """Figures (PNG, PDF) and tables (Markdown, CSV, LaTeX) from a run folder's Parquet store.

    With neither --figure nor --table: everything, plus index.html showing it all on one page.
    Works on a partial run (unfinished trials are marked).
    """
    from .report import load_run
    from .report.figures import FIGURES, metric_columns, write_figures
    from .report.index import write_index
    from .report.tables import TABLES, write_tables

    for option, given, known in (("--figure", figures, FIGURES), ("--table", tables, TABLES)):
        for name in given:
            if name not in (*known, "all"):
                raise ConfigError(f"{option} {name!r} is unknown; choose from "
                                  f"{', '.join(known)} or all")
    run = load_run(run_dir)  # a path or a URI
    if run.description:
        click.echo(" ".join(run.description.split()), err=True)
    if metric not in metric_columns(run.curves):
        raise ConfigError(f"--metric {metric!r} is not a curve column; choose from "
                          f"{', '.join(metric_columns(run.curves))}")
    unknown = sorted(set(settings) - set(run.curves.label))
    if unknown:
        raise ConfigError(f"--setting {unknown[0]!r} is not in this run; its settings are named "
                          f"like {sorted(set(run.curves.label))[0]!r}")
    out = (out or Path("reports") / run.name).resolve()
    everything = not figures and not tables
    fig_names = FIGURES if everything or "all" in figures else figures
    table_names = TABLES if everything or "all" in tables else tables
    written_figures = (write_figures(run, fig_names, out, metric, settings)
                       if everything or figures else [])
    written_tables = (write_tables(run, table_names, out, settings,
                                   warn=lambda message: click.echo(message, err=True))
                      if everything or tables else [])
    if everything:
        index = write_index(out, run.name, run.description, written_figures, written_tables,
                            run.partial)
        click.echo(f"wrote {len(written_figures)} figure files, {len(written_tables)} table "
                   f"files and {index}")
    else:
        for path in written_figures + written_tables:
            click.echo(path)
    if run.partial:
        click.echo("note: partial run; unfinished trials are marked", err=True)


@cli.command()
@click.argument("run_dir")
@click.option("--n-examples", type=click.IntRange(min=0), default=None,
              help="Attack the first N test images (default or 0: all of them).")
@click.option("--device", default=None, help="Where to run, e.g. cuda or cpu (default: each "
                                             "trial's own device setting).")
def evaluate(run_dir: str, n_examples: int | None, device: str | None) -> None:
    """AutoAttack (standard) the best and last weights of every finished trial that lacks it,
    and add the numbers to the run's summary table. Resumable: run it again after a stop."""
    from .evaluate import evaluate_run

    done = evaluate_run(run_dir, n_examples or None, device, echo=lambda m: click.echo(m, err=True))
    click.echo(f"AutoAttack added for {len(done)} trial(s)")


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
    except RunFailed as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
