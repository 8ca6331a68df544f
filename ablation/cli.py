"""The ``ablate`` command line."""

from __future__ import annotations

import sys
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
