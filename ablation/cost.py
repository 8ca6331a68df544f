"""What a sweep will cost before it starts: GPU-hours from each trial's FLOPs and a measured rate.

A trial's epoch is counted in forward passes of one image through its network (F, the FLOPs of
one forward as ``torch.utils.flop_counter`` counts them: convolutions and matmuls): a PGD step
with input-only gradients costs 2F (forward, backward to the input), a training step 3F (forward,
backward to inputs and weights), a plain forward 1F. The rate that turns FLOPs into seconds is
measured, never assumed: by default the H200 measurement in BENCHMARKS.md (a PreAct ResNet-18
CIFAR-10 PGD-10 AT epoch, training and evaluation, in 36 s, float32 with TF32 convolutions: what
``precision: tf32`` names), or the training step of your own ``ablate bench --json`` file. One
rate for everything: evaluation, other models and other precisions run at other efficiencies, so
the number is an estimate, to about a factor of 1.5 (IEEE fp32 on a GPU with TF32 is slower than
that: not measured yet).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrialConfig
from .errors import ConfigError
from . import strategies
from .datasets import dataset_info
from .fork import Fork, epochs_to_train
from .grid import Sweep

# BENCHMARKS.md, "GPU": ablate bench run B on an NVIDIA H200 (torch 2.11, float32 with TF32
# convolutions, which torch then did by default: `precision: tf32` now), projected to a full
# CIFAR-10 epoch: 24.6 s training + 10.8 s evaluation + 0.2 s checkpoint, for the default PreAct
# ResNet-18 PGD-10 AT trial.
REFERENCE_EPOCH_S = 36.0
REFERENCE = TrialConfig()  # the trial that epoch time was measured for
REFERENCE_NAME = ("one NVIDIA H200, tf32 (BENCHMARKS.md: 36 s per PreAct-18 CIFAR-10 AT epoch "
                  "with TF32 convolutions)")


@dataclass(frozen=True)
class Rate:
    """Counted FLOPs per second of a device, and where that number comes from."""

    flops_per_s: float
    source: str


def forward_flops(config: TrialConfig) -> float:
    """FLOPs of one image's forward pass through the trial's network (on the meta device: no
    memory, no arithmetic, just the count)."""
    return _forward_flops(config.model, config.width, config.blocks, config.dataset,
                          config.normalize)


_flops_cache: dict[tuple, float] = {}


def _forward_flops(model: str, width: int, blocks: int, dataset: str, normalize: bool) -> float:
    key = (model, width, blocks, dataset, normalize)
    if key not in _flops_cache:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from .models import build_trial_model

        info = dataset_info(dataset)
        config = TrialConfig(model=model, width=width, blocks=blocks, dataset=dataset,
                             normalize=normalize)
        with torch.device("meta"):
            net = build_trial_model(config, info).eval()
            x = torch.empty(1, info.in_channels, info.image_size, info.image_size)
        with FlopCounterMode(display=False) as counter:
            net(x)
        _flops_cache[key] = float(counter.get_total_flops())
    return _flops_cache[key]


def passes_per_epoch(config: TrialConfig) -> float:
    """One epoch of the trial in single-image forward passes (F), as the module docstring
    counts them: training, the logging forward, and the per-epoch evaluation."""
    info = dataset_info(config.dataset)
    n_train = info.train_images
    step = (strategies.method(config.method).passes(config)
            + strategies.intervention(config.intervention).extra_passes
            + 1)  # the logging forward
    n_eval = min(config.train_eval_size, n_train)
    evaluation = (n_eval * (2 * config.train_steps + 2)
                  + info.test_images * (2 * config.test_steps + 2))
    return n_train * step + evaluation


def default_rate() -> Rate:
    flops = passes_per_epoch(REFERENCE) * forward_flops(REFERENCE)
    return Rate(flops / REFERENCE_EPOCH_S, REFERENCE_NAME)


def _bench_report(path: Path) -> dict:
    """An ``ablate bench --json`` file's contents, or one line saying why not."""
    try:
        report = json.loads(Path(path).read_bytes().decode())
    except OSError as err:
        raise ConfigError(f"--bench {path}: cannot read it ({err.strerror})") from None
    except ValueError as err:  # not UTF-8 or not JSON
        raise ConfigError(f"--bench {path}: not an `ablate bench --json` file "
                          f"({type(err).__name__})") from None
    if not isinstance(report, dict):
        raise ConfigError(f"--bench {path}: not an `ablate bench --json` file (a JSON "
                          f"{type(report).__name__}, not an object)")
    return report


def _positive(value: Any, path: Path, what: str) -> float:
    """A measured quantity: a finite number above zero, or one line naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--bench {path}: {what} is {value!r}; a measurement is a finite "
                          "number above zero")
    return float(value)


def rate_from_bench(path: Path) -> Rate:
    """The rate of the project's training step (intervention "none") in an ``ablate bench
    --json`` file: its counted FLOPs per step over its median seconds per step."""
    report = _bench_report(path)
    try:
        (entry,) = [e for e in report["interventions"] if e["intervention"] == "none"]
        flops, seconds = entry["flops_per_step"], entry["project"]["median_s"]
        device = report["environment"]["device_name"]
        precision = report["options"]["precision"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--bench {path}: not an `ablate bench --json` file with the "
                          f"intervention 'none' ({type(err).__name__}: {err})") from None
    flops = _positive(flops, path, "the 'none' entry's flops_per_step")
    seconds = _positive(seconds, path, "the 'none' entry's median seconds per step")
    return Rate(flops / seconds, f"{device} {precision}, measured by ablate bench ({path})")


def pack_speedups(path: Path | None) -> dict[int, float]:
    """Images/s of a pack of K trials over K separate steps' (the K = 1 step's images/s), from
    the ``packs`` part of an ``ablate bench --pack ... --json`` file (empty without one)."""
    if path is None:
        return {}
    rows = _bench_report(path).get("packs")
    if not isinstance(rows, list):
        return {}  # no pack measurement in it: packs are priced as separate trials
    speeds = {}
    for row in rows:
        if isinstance(row, dict) and "error" not in row and isinstance(row.get("k"), int):
            speeds[row["k"]] = _positive(row.get("images_per_s"), path,
                                         f"the images/s of the pack of {row['k']}")
    if 1 not in speeds:
        return {}
    return {k: v / speeds[1] for k, v in speeds.items()}


def dry_run_lines(sweep: Sweep, forks: dict[str, Fork], bench: Path | None = None,
                  packs: list[list[str]] | None = None) -> list[str]:
    """What ``ablate run --dry-run`` prints: each trial with the epochs it trains (and where a
    fork starts it, and its pack), the sweep's epochs with and without forking, and the
    GPU-hours at the measured rate (``bench``: an ``ablate bench --json`` file; default the H200
    measurement), a pack of K trials at the measured speed of K (``ablate bench --pack``)."""
    rate = rate_from_bench(bench) if bench else default_rate()
    packs = packs or [[t.key] for t in sweep.trials]
    pack_of = {key: i for i, pack in enumerate(packs, start=1) for key in pack if len(pack) > 1}
    lines = []
    for i, config in enumerate(sweep.trials):
        fork = forks.get(config.key)
        starts = f", the first {fork.epochs} from {fork.parent}" if fork else ""
        pack = f", pack {pack_of[config.key]}" if config.key in pack_of else ""
        lines.append(f"{i:4d}  {config.key}  ({config.epochs} epochs{starts}{pack})")
    lines.append(f"{len(sweep.trials)} trials, {sweep.total_epochs:,} epochs in total; "
                 f"{epochs_to_train(sweep.trials, forks):,} to train "
                 + (f"with {len(forks)} trials forked from their baselines (--no-fork: "
                    f"{sweep.total_epochs:,})" if forks else "(no trial forks)"))
    by_key = sweep.by_key
    speedups = pack_speedups(bench)
    hours, unmeasured = 0.0, set()
    for pack in packs:
        alone = gpu_hours([by_key[k] for k in pack], forks, rate)
        speedup = speedups.get(len(pack), 1.0)
        if len(pack) > 1 and len(pack) not in speedups:
            unmeasured.add(len(pack))
        hours += alone / speedup
    amount = f"about {hours:,.0f}" if hours >= 10 else f"about {hours:.1f}" \
        if hours >= 0.1 else "under 0.1"
    lines.append(f"{amount} GPU-hours on {rate.source}; an estimate from each trial's FLOPs at "
                 "that measured speed (see docs/method.md D.2)")
    if len(pack_of):
        lines.append(f"{len(pack_of)} trials in {len(set(pack_of.values()))} packs" + (
            f"; packs of {', '.join(map(str, sorted(unmeasured)))} priced as separate trials: "
            "their speed is not measured (pass --bench with a file of `ablate bench --pack "
            "1,2,4,... --json`)" if unmeasured else ", at the speeds --bench measured"))
    return lines


def gpu_hours(trials: Iterable[TrialConfig], forks: dict[str, Fork], rate: Rate) -> float:
    """GPU-hours to train every epoch of the sweep that is not copied from a fork."""
    seconds = 0.0
    for t in trials:
        epochs = t.epochs - (forks[t.key].epochs if t.key in forks else 0)
        seconds += epochs * passes_per_epoch(t) * forward_flops(t) / rate.flops_per_s
    return seconds / 3600
