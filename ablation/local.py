"""Running one trial on this machine: a progress bar and the output folder of ``ablate train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pandas as pd
import torch

from . import files
from .config import TrialConfig, load_trial
from .curves import best_last
from .errors import ConfigError, quote
from .evaluate import write_summary
from .io import atomic_path, check_folder, load_json, save_parquet
from .trainer import Reporter, Trainer


def curves_frame(config: TrialConfig, history: list[dict[str, float]]) -> pd.DataFrame:
    """One row per epoch, each carrying the trial key and every identifying config field."""
    ident = config.columns()
    return pd.DataFrame([{**ident, **row} for row in history])


class LocalReporter(Reporter):
    """Progress bar on the terminal, ``curves.parquet`` rewritten (atomically) after every epoch."""

    def __init__(self, out: Path, quiet: bool):
        self.out = out
        self.quiet = quiet
        self.bar = None

    def start(self, config, history):
        from tqdm import tqdm

        self.config, self.rows = config, list(history)
        self.bar = tqdm(total=config.epochs, initial=len(history), disable=self.quiet,
                        unit="epoch", desc=config.key, dynamic_ncols=True, mininterval=0.5,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} epochs "
                                   "[{elapsed}<{remaining}{postfix}]")

    def progress(self, epoch, batch, batches):
        self.bar.update(epoch + (batch + 1) / batches - self.bar.n)  # throttled by mininterval

    def epoch(self, row, checkpoint):
        self.rows.append(row)
        save_parquet(curves_frame(self.config, self.rows), self.out / files.TRIAL_CURVES)
        best = best_last(self.rows)
        self.bar.set_postfix_str(f"test robust {row['test_robust_acc']:.1%}, "
                                 f"best {best['best_test_robust_acc']:.1%} @ {best['best_epoch']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_out_folder(config: TrialConfig, out: Path) -> None:
    """Refuse, before anything is written, an output folder that cannot be written or whose
    config.yaml or summary.json is another trial's or unreadable; the trainer refuses another
    trial's checkpoint the same way."""
    check_folder(out, "--out")
    path = out / files.TRIAL_CONFIG
    if path.exists():
        try:
            key = load_trial(path).key
        except ConfigError as err:
            raise ConfigError(f"{err} (delete that file or pass another --out)") from None
        if key != config.key:
            raise ConfigError(f"{path}: holds trial {key!r}, not {config.key!r}; use another "
                              "output folder")
    path = out / files.SUMMARY
    if path.exists():
        try:
            key = load_json(path)["key"]
        except (OSError, ValueError, TypeError, KeyError):  # unreadable, not JSON, no key
            raise ConfigError(f"{path}: not a summary ablate wrote; delete it (training writes it "
                              "again) or pass another --out") from None
        if key != config.key:
            raise ConfigError(f"{path}: holds trial {quote(key)}, not {config.key!r}; use another "
                              "output folder")


def train_trial(config: TrialConfig, out: Path | None, autoattack: int | None,
                threads: int, quiet: bool, autoattack_batch: int | None = None) -> None:
    """Train (or resume) one trial into ``out`` with ``threads`` CPU threads; optionally
    AutoAttack its best and last weights (``autoattack_batch`` images at a time)."""
    out = (out or Path("runs") / "train" / config.key).resolve()
    torch.set_num_threads(threads)
    check_out_folder(config, out)
    trainer = Trainer(config, out)  # refuses another trial's checkpoint; writes nothing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{out}: cannot create the output folder ({err.strerror}); pass "
                          "another --out") from None
    with atomic_path(out / files.TRIAL_CONFIG) as tmp:
        tmp.write_text(config.to_yaml())
    reporter = LocalReporter(out, quiet)
    if trainer.finished:
        click.echo(f"{config.key}: all {config.epochs} epochs already done in {out}", err=True)
    try:
        history = trainer.fit(reporter)
    finally:
        reporter.close()
    if autoattack is not None:
        click.echo(f"{config.key}: AutoAttack on best and last weights (unless done)", err=True)
    trainer.release()  # AutoAttack gets the GPU's memory
    summary = write_summary(config, out, history, autoattack=autoattack, data=trainer.data,
                            weights_changed=not trainer.finished_at_start,
                            batch_size=autoattack_batch)
    save_parquet(curves_frame(config, history), out / files.TRIAL_CURVES)
    _print_summary(summary, out)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    n = summary["epochs_done"]
    lines = [f"{summary['key']}  ({n} epoch{'s' * (n != 1)}, best epoch "
             f"{summary['best_epoch']})"]
    rows = [("PGD robust", "test_robust_acc"), ("clean", "test_acc"),
            ("AutoAttack", "autoattack_acc")]
    for label, metric in rows:
        if f"best_{metric}" in summary:
            lines.append(f"  {label:<11} best {summary[f'best_{metric}']:7.2%}  last "
                         f"{summary[f'last_{metric}']:7.2%}  diff "
                         f"{summary[f'diff_{metric}'] * 100:+6.2f}")
    lines.append(f"  written to {out}")
    click.echo("\n".join(lines))


