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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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


def rate_from_bench(path: Path) -> Rate:
    """The rate of the project's training step (intervention "none") in an ``ablate bench
    --json`` file: its counted FLOPs per step over its median seconds per step."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--bench {path}: cannot read it ({err.strerror})") from None
    try:
        report = json.loads(text)
        (entry,) = [e for e in report["interventions"] if e["intervention"] == "none"]
        flops, seconds = entry["flops_per_step"], entry["project"]["median_s"]
        device = report["environment"]["device_name"]
        precision = report["options"]["precision"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--bench {path}: not an `ablate bench --json` file with the "
                          f"intervention 'none' ({type(err).__name__}: {err})") from None
    if not flops or not seconds:
        raise ConfigError(f"--bench {path}: its 'none' entry has no FLOP count or time")
    return Rate(flops / seconds, f"{device} {precision}, measured by ablate bench ({path})")


def dry_run_lines(sweep: Sweep, forks: dict[str, Fork], bench: Path | None = None) -> list[str]:
    """What ``ablate run --dry-run`` prints: each trial with the epochs it trains (and where a
    fork starts it), the sweep's epochs with and without forking, and the GPU-hours at the
    measured rate (``bench``: an ``ablate bench --json`` file; default the H200 measurement)."""
    rate = rate_from_bench(bench) if bench else default_rate()
    lines = []
    for i, config in enumerate(sweep.trials):
        fork = forks.get(config.key)
        starts = f", the first {fork.epochs} from {fork.parent}" if fork else ""
        lines.append(f"{i:4d}  {config.key}  ({config.epochs} epochs{starts})")
    lines.append(f"{len(sweep.trials)} trials, {sweep.total_epochs:,} epochs in total; "
                 f"{epochs_to_train(sweep.trials, forks):,} to train "
                 + (f"with {len(forks)} trials forked from their baselines (--no-fork: "
                    f"{sweep.total_epochs:,})" if forks else "(no trial forks)"))
    hours = gpu_hours(sweep.trials, forks, rate)
    amount = f"about {hours:,.0f}" if hours >= 10 else f"about {hours:.1f}" \
        if hours >= 0.1 else "under 0.1"
    lines.append(f"{amount} GPU-hours on {rate.source}; an estimate from each trial's FLOPs at "
                 "that measured speed (see docs/method.md D.2)")
    return lines


def gpu_hours(trials: Iterable[TrialConfig], forks: dict[str, Fork], rate: Rate) -> float:
    """GPU-hours to train every epoch of the sweep that is not copied from a fork."""
    seconds = 0.0
    for t in trials:
        epochs = t.epochs - (forks[t.key].epochs if t.key in forks else 0)
        seconds += epochs * passes_per_epoch(t) * forward_flops(t) / rate.flops_per_s
    return seconds / 3600
