"""The ``ablate`` command line."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import layers as layer_groups
from . import plugins
from .config import (INTERVENTIONS, MODELS, RUNTIME_FIELDS, TrialConfig, from_dict, load_trial,
                     parse_yaml)
from .cost import GPUS  # torch-free names; torch loads when a cost is computed
from .datafiles import LAYOUTS, check_data
from .errors import AblateError, ConfigError, RunFailed, quote


# SIGTERM, which SLURM, `ray job stop` and Kubernetes send to stop a job, is raised in the main
# thread as Ctrl-C's KeyboardInterrupt, so that a command stops the same way: every `with` and
# `finally` on the way out runs (Ray shut down, the driver's lock released, no trial marked). Which
# of the two it was is noted here: Ray's blocking calls raise a KeyboardInterrupt of their own in
# place of the handler's (and would drop any other exception).
_sigterm_received = False


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    global _sigterm_received
    if not _sigterm_received:  # once: a second must not cut short the cleanup the first began
        _sigterm_received = True
        raise KeyboardInterrupt


def _overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as trial fields (each value read as YAML)."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {quote(pair)}: expected KEY=VALUE")
        changes[key.strip()] = parse_yaml(value, f"--set {quote(pair)}")
    return changes


def _apply_overrides(config: TrialConfig, pairs: tuple[str, ...]) -> TrialConfig:
    changes = _overrides(pairs)
    return from_dict({**config.to_dict(), **changes}, source="--set") if changes else config


def _load_plugins(paths: tuple[Path, ...]) -> None:
    """The files of ``--plugin`` (ablate train, evaluate), run before any config is read."""
    plugins.load(plugins.read(path, str(path), "--plugin") for path in paths)


def _description(text: str, limit: int = 500) -> str:
    """A sweep's description as one line for the terminal, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + " ..."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ablation", prog_name="ablate", message="%(prog)s %(version)s")
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
@click.option("--autoattack-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="AutoAttack's batch (default: on a GPU as many images as fit in half its "
                   "free memory, on the CPU 250). Its restarts are drawn per batch, so the "
                   "number moves by a few images' worth with it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set epochs=5 --set device=cuda. Repeatable.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads for torch. 1 is what each trial of `ablate run` uses (one per "
                   "--cpus-per-trial), so a trial trained here and in a sweep gives the same "
                   "curve; more threads speed up a lone trial on the CPU but change the float "
                   "rounding. A GPU trial needs no more than 1.")
@click.option("--plugin", "plugin_files", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="A Python file that registers your own intervention or model, loaded before "
                   "the trial is read (docs/extending.md). Repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(trial: Path, out: Path | None, autoattack: int | None, autoattack_batch: int | None,
          overrides: tuple[str, ...], threads: int, plugin_files: tuple[Path, ...],
          quiet: bool) -> None:
    """Train one trial from a TRIAL.yaml config and write curves.parquet, summary.json and
    checkpoint.pt to the output folder.

    TRIAL.yaml holds trial fields (dataset, model, method, threat, intervention, layers, epochs,
    ...); fields left out take the paper's defaults for the chosen dataset and method.
    """
    _load_plugins(plugin_files)
    config = _apply_overrides(load_trial(trial), overrides)
    check_data(config.dataset, config.data_root, config.download)
    from .local import train_trial  # torch loads here, so --help, config and data errors are fast

    try:
        train_trial(config, out, autoattack, threads, quiet, autoattack_batch)
    except KeyboardInterrupt:
        if not _sigterm_received:
            raise  # Ctrl-C: click's blank line closes the terminal's ^C
        raise click.exceptions.Abort() from None  # SIGTERM: there is no ^C to close


@cli.command()
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(dir_okay=False, path_type=Path))
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
                   "only: each still takes the memory it needs); 0 trains every trial on the "
                   "CPU. Default: 1 if the Ray cluster has GPUs, else 0.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="At most this many trials at once (default: as resources allow).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set a trial field in every trial, over the sweep file, e.g. --set "
                   "data_root=/nfs/data. Repeatable. Where and on what trials run "
                   f"({', '.join(RUNTIME_FIELDS)}) is not part of their keys: a started sweep "
                   "resumes with such a --set. Any other field "
                   "changes the keys, and a folder holding the old trials refuses it.")
@click.option("--max-failures", type=click.IntRange(min=0), default=2, show_default=True,
              help="Times Ray retries a failed trial (from its last checkpoint) in one run; "
                   "a failure a retry cannot fix (a diverged loss, a training step out of GPU "
                   "memory, a foreign checkpoint) is not retried.")
@click.option("--restart-errored", is_flag=True,
              help="Start trials that errored in an earlier run from scratch instead of "
                   "resuming them from their checkpoints.")
@click.option("--pack", type=click.IntRange(min=1), default=1, show_default=True, metavar="K",
              help="Train up to K trials at once as one batched computation on each GPU (or "
                   "CPU slot): trials that differ only in their intervention, in key order. "
                   "Each trial keeps its own curve, checkpoint and summary, and computes what "
                   "it computes alone (to float rounding). 1 trains each trial alone; more "
                   "pays off on a GPU (BENCHMARKS.md, 'Packed trials').")
@click.option("--no-fork", is_flag=True,
              help="Train every trial from its first epoch, even the epochs it shares with its "
                   "baseline (by default those are trained once and the trial starts from the "
                   "baseline's checkpoint).")
@click.option("--dry-run", is_flag=True,
              help="List the trials, their keys and the epochs to train; estimate the "
                   "GPU-hours (training, and the AutoAttack the tables need), the wall-clock on "
                   "--gpus N and the disk space; say whether each dataset is there. Start "
                   "nothing.")
@click.option("--bench", "bench_json", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="With --dry-run: estimate GPU-hours at the speed measured by `ablate bench "
                   "--json FILE` on your GPU (default: the H200 measurement in BENCHMARKS.md).")
@click.option("--gpu", "gpu_name", default=None, metavar="NAME",
              help=f"With --dry-run: price the sweep on another card ({', '.join(GPUS)}): the "
                   "H200 measurement scaled by the cards' peak TF32 throughput from their "
                   "datasheets; a scaled estimate, not a measurement (--bench measures).")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="With --dry-run: the wall-clock hours on N GPUs (forked trials after their "
                   "baselines).")
@click.option("--log", "log", multiple=True, metavar="NAME",
              help="Also log each trial's curve live to tensorboard or wandb, one run per trial "
                   "named by its key (its config as hyperparameters, each epoch a step), in the "
                   "run folder (tensorboard/, wandb/); needs the extra: pip install -e '.[NAME]'. "
                   "Repeatable. W&B reads its own settings (WANDB_MODE=offline, WANDB_PROJECT, "
                   "WANDB_ENTITY).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(sweep_file: Path, storage: str | None, address: str | None, cpus_per_trial: float,
        gpus_per_trial: float | None, max_concurrent: int | None, max_failures: int,
        restart_errored: bool, pack: int, no_fork: bool, dry_run: bool, bench_json: Path | None,
        gpu_name: str | None, gpus: int, overrides: tuple[str, ...], log: tuple[str, ...],
        quiet: bool) -> None:
    """Run every trial of a SWEEP.yaml through Ray Tune; resume it if its folder exists.

    Finished trials are not rerun, interrupted ones continue from their last epoch, errored ones
    are retried, and trials added to the file since are run too.
    """
    from .fork import plan_forks
    from .grid import load_sweep
    from .store import plan_packs

    sweep = load_sweep(sweep_file, _overrides(overrides))
    forks = {} if no_fork else plan_forks(sweep.trials)
    for option, given in (("--bench", bench_json), ("--gpu", gpu_name), ("--gpus", gpus != 1)):
        if given and not dry_run:
            raise ConfigError(f"{option} estimates the cost of a sweep; use it with --dry-run")
    if pack > 1 and any(t.compile for t in sweep.trials):
        raise ConfigError(f"--pack {pack} with compile: true: a compiled trial trains alone for "
                          "now; use --pack 1 or compile: false")
    packs = plan_packs(sweep.trials, forks, pack)
    if dry_run:
        from .cost import dry_run_lines  # torch loads there, after a bad --bench is said

        for line in dry_run_lines(sweep, forks, bench_json, packs, gpu_name, gpus):
            click.echo(line)
        return
    for place in dict.fromkeys((t.dataset, t.data_root, t.download) for t in sweep.trials):
        check_data(*place)  # here, before Ray starts and every trial fails the same way
    from . import files
    from .cluster import parse_address, ray_cluster
    from .io import check_folder
    from .loggers import Loggers
    from .store import DriverLock, RunDir, plan
    from .tune import SweepProgress, run_sweep  # torch loads here

    if address:
        parse_address(address)  # a malformed --address fails before the folder is touched
    elif not os.environ.get("RAY_ADDRESS"):  # a Ray of this machine alone: said before it starts
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        if cpus_per_trial > cpus:
            raise ConfigError(f"--cpus-per-trial {cpus_per_trial:g}: a trial asks for "
                              f"{{CPU: {cpus_per_trial:g}}} but this machine has {cpus} CPUs; "
                              "lower it or join a cluster that has them (--address)")
    folder = RunDir.attach(storage or Path("runs") / sweep.name)
    if not folder.remote:
        check_folder(folder.root, "--storage")
    # an unknown --log name or a missing package is one line, before the folder is touched
    loggers = Loggers(folder, sweep, log, warn=lambda m: click.echo(f"warning: {m}", err=True))
    try:
        with DriverLock(folder), loggers:  # refuses a second driver before it changes anything
            folder.pull()
            todo = plan(folder, sweep, restart_errored)
            loggers.catch_up()  # what an earlier driver stored but did not log
            plan_line = (f"{sweep.name}: {len(sweep.trials)} trials, "
                         f"{len(sweep.trials) - len(todo)} done, {len(todo)} to run; folder "
                         f"{folder.location}")
            if not todo:
                click.echo(plan_line, err=True)
                return
            with ray_cluster(address) as cluster:  # a wrong address is one line, said first
                if sweep.description:
                    click.echo(_description(sweep.description), err=True)
                click.echo(plan_line, err=True)
                stored = {(k, int(e)) for k in sweep.by_key
                          for e in folder.curves(k).get("epoch", [])}
                progress = SweepProgress(sweep.total_epochs, stored, quiet,
                                         done=len(sweep.trials) - len(todo))
                try:
                    states = run_sweep(folder, todo, cluster=cluster,
                                       cpus_per_trial=cpus_per_trial,
                                       gpus_per_trial=gpus_per_trial,
                                       max_concurrent=max_concurrent, max_failures=max_failures,
                                       autoattack=sweep.autoattack, progress=progress,
                                       forks=forks, packs=packs, loggers=loggers,
                                       echo=lambda m: click.echo(m, err=True))
                finally:
                    progress.close()
    except KeyboardInterrupt:  # here, so that click adds no blank line; main says the rest
        raise click.exceptions.Abort() from None
    except OSError as err:
        if isinstance(err, ConnectionError) or err.errno is None:
            raise
        raise _folder_failure(folder, err) from None
    unfinished = [k for k, s in states.items() if s != "done"]
    if unfinished:
        errored = [k for k in unfinished if states[k] == "errored"]
        see = (f"see {folder.where(files.trial_file('<key>', files.ERROR))}, then "
               if errored else "")
        raise RunFailed(f"{len(unfinished)} trial(s) did not finish (e.g. "
                        f"{(errored or unfinished)[0]}); {see}run the same command again to "
                        "resume them")
    click.echo(f"{sweep.name}: all {len(sweep.trials)} trials done; curves in "
               f"{folder.where(files.CURVES_DIR)}")


def _folder_failure(folder: Any, err: OSError) -> RunFailed:
    """An OSError of the driver (a full disk, a read-only mount) as one line, exit 1. The run
    folder stays consistent (every write is atomic), so the same command resumes."""
    where = str(folder.root) + (f" (the mirror of {folder.location})" if folder.remote else "")
    full = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
    if err.errno in full:
        return RunFailed(f"{where}: {full[err.errno]}; free some space there, then run the same "
                         "command again to resume")
    what = f" ({err.filename})" if err.filename else ""
    return RunFailed(f"{where}: {err.strerror or err}{what}; fix that, then run the same command "
                     "again to resume")


@cli.command()
@click.argument("run_dir")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=10.0,
              default=None, metavar="[SECONDS]",
              help="Redraw the table every SECONDS (10 when left out) until every trial is done; "
                   "Ctrl-C stops watching (the sweep is not touched).")
def status(run_dir: str, watch: float | None) -> None:
    """Per trial of a run folder: state, epochs done, best and current test robust accuracy,
    and an estimate of the time left."""
    from .store import RunDir

    if watch is None:
        click.echo("\n".join(_status_lines(RunDir.open(run_dir))[0]))
        return
    try:
        while True:
            lines, done = _status_lines(RunDir.open(run_dir))  # reopened: the files as they are
            click.clear()  # only on a terminal
            click.echo(f"{time.strftime('%H:%M:%S')}, every {watch:g} s; Ctrl-C to stop")
            click.echo("\n".join(lines))
            if done:
                return
            time.sleep(watch)
    except KeyboardInterrupt:  # only the watching stops: exit 0, nothing to resume
        return


def _status_lines(folder: Any) -> tuple[list[str], bool]:
    """``ablate status``'s table and lines for a RunDir, and whether every trial is done."""
    from .store import status_table, stopped_line, waiting_line

    table, eta = status_table(folder)
    width = max(len(k) for k in table.key)
    packed = bool(table.pack.any())  # a column only when some trials train in packs
    lines = [f"{'trial':<{width}}  {'state':<11} {'epochs':>9}  {'best':>6}  {'current':>7}"
             + ("  pack" if packed else "")]
    for row in table.itertuples():
        best = "-" if row.best_robust != row.best_robust else f"{row.best_robust:.1%}"
        current = "-" if row.current_robust != row.current_robust else f"{row.current_robust:.1%}"
        pack = f"  {row.pack or '-':>4}" if packed else ""
        lines.append(f"{row.key:<{width}}  {row.state:<11} {row.epochs:>9}  {best:>6}  "
                     f"{current:>7}{pack}")
    counts = table.state.value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in
                        ("done", "running", "interrupted", "errored", "pending") if s in counts)
    if (table.state == "done").all():
        return lines + [f"{len(table)} trials: all done"], True
    stopped = stopped_line(folder)
    if stopped:  # no time left to show: nothing runs
        return lines + [f"{len(table)} trials: {summary}", stopped], False
    left = "unknown" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta)) \
        if eta < 86400 else f"{eta / 86400:.1f} days"
    lines.append(f"{len(table)} trials: {summary}; time left about {left}")
    waiting = waiting_line(folder)
    if waiting:
        lines.append(f"pending: {waiting}")
    return lines, False


@cli.command()
@click.argument("run_dir")
@click.option("--figure", "figures", multiple=True, metavar="NAME",
              help="fix_param, fix_lr, awp (the paper's figure grids), gap, heatmap, or all. "
                   "Repeatable.")
@click.option("--table", "tables", multiple=True, metavar="NAME",
              help="best-last, awp-compare, ablation, effects, or all. Repeatable.")
@click.option("--compare", default=None, metavar="paper",
              help="Put the paper's published numbers (its Tables 1-5) and the difference "
                   "under each table row the paper has, marking those outside its spread.")
@click.option("--setting", "settings", multiple=True, metavar="LABEL",
              help="A setting, named as in the figures' legends (e.g. 'AT_awp_[4]', AWP) or "
                   "the tables (RAT_LR, RAT_WP): "
                   "the gap figure draws these instead of the paper's sets, and the "
                   "best-last table adds them as rows. Repeatable.")
@click.option("--metric", default="test_robust_acc", show_default=True,
              help="Curve column for the figure grids, e.g. train_eval_robust_acc (Figure 2(b): "
                   "eval-mode PGD on the fixed train subset), "
                   "test_acc, test_robust_loss.")
@click.option("--size", default="full", show_default=True, metavar="column|full",
              help="Figure width: column (3.5 in) or full (7.2 in, the text width of a "
                   "two-column paper); fonts are 8-9 pt at that size.")
@click.option("--ylim", default=None, metavar="LOW,HIGH",
              help="Y range of the figure grids in the metric's units (percent for "
                   "accuracies), e.g. 35,57.5 as the paper's Figure 3(a).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: reports/<sweep name>).")
def report(run_dir: str, figures: tuple[str, ...], tables: tuple[str, ...],
           compare: str | None, settings: tuple[str, ...], metric: str, size: str,
           ylim: str | None, out: Path | None) -> None:
    """Figures (PNG, PDF) and tables (Markdown, CSV, LaTeX) from a run folder's Parquet store.

    With neither --figure nor --table: everything, plus index.html showing it all on one page.
    Works on a partial run (unfinished trials are marked).
    """
    from .report import load_run
    from .report.figures import FIGURES, WIDTHS, metric_columns, write_figures
    from .report.index import write_index
    from .report.paper import COMPARE, unpublished
    from .report.tables import TABLES, resolve_settings, write_tables

    for option, given, known in (("--figure", figures, FIGURES), ("--table", tables, TABLES)):
        for name in given:  # the registries are the lists of names
            if name not in (*known, "all"):
                raise ConfigError(f"{option} {name!r} is unknown; choose from "
                                  f"{', '.join(known)} or all")
    if size not in WIDTHS:
        raise ConfigError(f"--size {quote(size)} is unknown; choose from {', '.join(WIDTHS)}")
    if compare is not None and compare not in COMPARE:
        raise ConfigError(f"--compare {quote(compare)} is unknown; choose from "
                          f"{', '.join(COMPARE)}")
    limits = None
    if ylim is not None:
        try:
            limits = tuple(float(v) for v in ylim.split(","))
        except ValueError:
            limits = ()
        # abs(v) <= 1e6 also refuses NaN and infinities; a wider axis has no ticks to draw
        if len(limits) != 2 or not all(abs(v) <= 1e6 for v in limits) \
                or limits[0] >= limits[1]:
            raise ConfigError(f"--ylim {quote(ylim)}: expected LOW,HIGH with LOW < HIGH, both "
                              "within +-1e6, e.g. 35,57.5 (percent for accuracies)")
    run = load_run(run_dir)  # a path or a URI
    if metric not in metric_columns(run.curves):
        raise ConfigError(f"--metric {metric!r} is not a curve column; choose from "
                          f"{', '.join(metric_columns(run.curves))}")
    settings = resolve_settings(run, settings)  # RAT_LR -> AT_fix_lr_[3, 4]
    from .io import check_folder

    out = (out or Path("reports") / run.name).resolve()
    check_folder(out, "--out")
    if run.description:  # after the checks: a bad option is one line
        click.echo(_description(run.description), err=True)
    everything = not figures and not tables
    fig_names = FIGURES if everything or "all" in figures else figures
    table_names = TABLES if everything or "all" in tables else tables
    written_figures = (write_figures(run, fig_names, out, metric, settings, size, limits)
                       if everything or figures else [])
    if compare and (everything or tables) and (line := unpublished(run)):
        click.echo(line, err=True)
    written_tables = (write_tables(run, table_names, out, settings,
                                   warn=lambda message: click.echo(message, err=True),
                                   compare=compare)
                      if everything or tables else [])
    table_files = [path for table in written_tables for path in table.paths]
    if everything:
        index = write_index(out, run, written_figures, written_tables)
        click.echo(f"wrote {len(written_figures)} figure files, {len(table_files)} table "
                   f"files and {index}")
    else:
        for path in written_figures + table_files:
            click.echo(path)
    if run.partial:
        click.echo("note: partial run; unfinished trials are marked", err=True)


@cli.command()
@click.argument("run_dir")
@click.option("--n-examples", type=click.IntRange(min=0), default=None,
              help="Attack the first N test images (default or 0: all of them).")
@click.option("--device", default=None, help="Where to run, e.g. cuda or cpu (default: each "
                                             "trial's own device setting).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="AutoAttack's batch (default: on a GPU as many images as fit in half its "
                   "free memory, on the CPU 250).")
@click.option("--plugin", "plugin_files", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="A plugin file the run's trials use (their own model or intervention; "
                   "docs/extending.md): the run folder's copy is never run. Repeatable.")
def evaluate(run_dir: str, n_examples: int | None, device: str | None,
             batch_size: int | None, plugin_files: tuple[Path, ...]) -> None:
    """AutoAttack (standard) the best and last weights of every finished trial that lacks it,
    and add the numbers to the run's summary table. Resumable: run it again after a stop."""
    _load_plugins(plugin_files)
    from .evaluate import evaluate_run

    done = evaluate_run(run_dir, n_examples or None, device,
                        echo=lambda m: click.echo(m, err=True), batch_size=batch_size)
    click.echo(f"AutoAttack added for {len(done)} trial(s)")


@cli.command()
@click.argument("dataset", type=click.Choice(list(LAYOUTS)))
@click.option("--root", default="data", show_default=True, metavar="DIR",
              help="The data_root the trials will read (CIFAR lands in DIR/cifar-10-batches-py "
                   "etc., SVHN's .mat files in DIR).")
@click.option("--verify-only", is_flag=True,
              help="Download nothing; only check the files there against the official md5 sums.")
def data(dataset: str, root: str, verify_only: bool) -> None:
    """Download DATASET (where the machine has internet) and verify every file by its md5.

    Safe to run on every node at once, on a shared or a local folder: a lock file makes one
    process download while the others wait, then each verifies.
    """
    from .datafiles import fetch_data, verify_data  # torchvision loads here

    files = verify_data(dataset, root) if verify_only else fetch_data(dataset, root)
    click.echo(f"{dataset}: {len(files)} files verified in {Path(root).expanduser().resolve()}")


@cli.command()
@click.option("--model", type=click.Choice(MODELS), default="preact18", show_default=True,
              help="Architecture, as in a trial config (preact_small for a quick CPU run).")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True,
              help="preact_small only: width of the first stage.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32",
              show_default=True,
              help="The project's step; the reference loop stays float32, in the same math mode "
                   "(IEEE for fp32, TF32 for tf32 and bf16).")
@click.option("--intervention", "interventions", multiple=True, type=click.Choice(INTERVENTIONS),
              help="Repeatable (default: every one).")
@click.option("--layers", default="3,4", show_default=True,
              help="Layer groups of the layer-wise interventions.")
@click.option("--train-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="PGD steps of the training attack, in both loops.")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed batches per repeat and loop.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved repeats (min and median are over these).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed batches per loop first.")
@click.option("--split/--no-split", default=True, show_default=True,
              help="Also time one small epoch: train, logging forward, evaluation, checkpoint.")
@click.option("--split-batches", type=click.IntRange(min=1), default=None,
              help="Training batches of the split's epoch (default: --batches).")
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Train-eval and test images of the split's evaluation (default: a fifth of "
                   "its training images, CIFAR-10's proportion).")
@click.option("--trials-per-gpu", default="1,2,4", show_default=True, metavar="K,K,...",
              help="CUDA only: run K processes training at once on the GPU, for each K "
                   "('none' to skip).")
@click.option("--pack", "packs", default="none", show_default=True, metavar="K,K,...",
              help="Also time packs of K trials trained as one batched step (ablate run "
                   "--pack), e.g. 1,2,4,8,16, against K separate steps ('none' to skip).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads (default: 1 on the CPU, for repeatable numbers).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the project's model (the runtime field `compile`); the "
                   "reference loop stays eager.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write every measurement to this JSON file.")
def bench(model: str, width: int, batch_size: int, device: str, precision: str,
          interventions: tuple[str, ...], layers: str, train_steps: int, batches: int,
          repeats: int, warmup: int, split: bool, split_batches: int | None,
          eval_images: int | None, trials_per_gpu: str, packs: str, threads: int | None,
          compile_: bool, json_path: Path | None) -> None:
    """Images/s of the project's training step against a Rice-style reference loop (PGD-AT as
    in Rice et al.'s train_cifar.py, fp32, eager), per intervention, on random CIFAR-10-shaped
    images; plus a per-epoch time split and, on CUDA, MFU, peak memory and trials per GPU."""
    try:  # the groups are checked by layers.parse, as a config's are
        layer_set = layer_groups.parse(layer_groups.from_column(layers.replace(" ", "")),
                                       f"--layers {quote(layers)}")
    except ValueError:
        raise ConfigError(f"--layers {quote(layers)}: expected layer groups such as 3,4") from None
    counts, pack_sizes = (_counts(option, value) for option, value in (
        ("--trials-per-gpu", trials_per_gpu), ("--pack", packs)))
    if pack_sizes and compile_:
        raise ConfigError("--pack with --compile: a compiled trial trains alone for now")
    from .bench import DEFAULT_INTERVENTIONS, BenchOptions, run_bench
    from .bench_report import format_report
    from .io import save_json  # torch loads here, so --help and option errors stay fast

    opts = BenchOptions(
        model=model, width=width, batch_size=batch_size, device=device, precision=precision,
        interventions=tuple(dict.fromkeys(interventions)) or DEFAULT_INTERVENTIONS,
        layers=layer_set, train_steps=train_steps,
        batches=batches, repeats=repeats, warmup=warmup, split=split,
        split_batches=split_batches, eval_images=eval_images,
        trials_per_gpu=counts, packs=pack_sizes, threads=threads, compile=compile_)
    result = run_bench(opts, echo=lambda message: click.echo(message, err=True))
    for line in format_report(result):
        click.echo(line)
    if json_path is not None:
        save_json(result, json_path)
        click.echo(f"wrote {json_path}", err=True)


def _counts(option: str, value: str) -> tuple[int, ...]:
    """A comma-separated list of counts >= 1 (or none); one line naming ``option`` if not."""
    try:
        counts = (() if value.strip().lower() in ("", "none", "0")
                  else tuple(int(v) for v in value.split(",")))
    except ValueError:
        counts = (0,)
    if any(k < 1 for k in counts):
        raise ConfigError(f"{option} {quote(value)}: expected comma-separated counts >= 1, e.g. "
                          "1,2,4, or none")
    return counts


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2; Ctrl-C and SIGTERM
    one line each (every command resumes where it stopped)."""
    global _sigterm_received
    _sigterm_received = False
    # For the whole command; cluster.ray_cluster puts it back after ray.init, which replaces it.
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        cli.main(args=argv, prog_name="ablate", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C, or SIGTERM raised as one
        if _sigterm_received:
            click.echo("stopped by SIGTERM; run the same command again to resume", err=True)
            sys.exit(128 + signal.SIGTERM)  # 143, as a shell reports a process SIGTERM ended
        click.echo("interrupted; run the same command again to resume", err=True)
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
    finally:
        if previous is not None:  # None: C code installed it, and Python cannot put it back
            signal.signal(signal.SIGTERM, previous)
