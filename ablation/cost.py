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
that: not measured yet). ``--gpu NAME`` scales the H200 rate by another card's datasheet peak:
an estimate from spec sheets, not a measurement.

The same rate prices AutoAttack from its attacks' passes per image, and a list schedule turns
the trials' hours into wall-clock on N GPUs; the disk space is counted from each network's
parameters (docs/method.md D.2 has every formula).
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrialConfig
from .errors import ConfigError, DataError, quote
from . import layers, strategies
from .datafiles import LAYOUTS, check_data, missing_path
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


@dataclass(frozen=True)
class Network:
    """What the cost model needs of a trial's network: the FLOPs of one image's forward, and
    the values its weight files hold (parameters; state: parameters and buffers)."""

    flops: float
    parameters: int
    state: int


def forward_flops(config: TrialConfig) -> float:
    """FLOPs of one image's forward pass through the trial's network (on the meta device: no
    memory, no arithmetic, just the count)."""
    return network(config).flops


_network_cache: dict[tuple, Network] = {}


def network(config: TrialConfig) -> Network:
    """The trial's network, counted on the meta device (once per architecture)."""
    key = (config.model, config.width, config.blocks, config.dataset, config.normalize)
    if key not in _network_cache:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from .models import build_trial_model

        info = dataset_info(config.dataset)
        bare = TrialConfig(model=config.model, width=config.width, blocks=config.blocks,
                           dataset=config.dataset, normalize=config.normalize)
        with torch.device("meta"):
            net = build_trial_model(bare, info).eval()
            x = torch.empty(1, info.in_channels, info.image_size, info.image_size)
        with FlopCounterMode(display=False) as counter:
            net(x)
        _network_cache[key] = Network(float(counter.get_total_flops()),
                                      sum(p.numel() for p in net.parameters()),
                                      sum(v.numel() for v in net.state_dict().values()))
    return _network_cache[key]


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
                  packs: list[list[str]] | None = None, gpu: str | None = None,
                  gpus: int = 1) -> list[str]:
    """What ``ablate run --dry-run`` prints: each trial with the epochs it trains (and where a
    fork starts it, and its pack), the sweep's epochs with and without forking, the GPU-hours at
    the measured rate (``bench``: an ``ablate bench --json`` file; default the H200 measurement,
    or scaled to ``gpu``), a pack of K trials at the measured speed of K (``ablate bench
    --pack``); then AutoAttack's GPU-hours, the wall-clock on ``gpus`` GPUs, the disk space, the
    seeds the paper averages, and whether each dataset's files are there."""
    if bench and gpu:
        raise ConfigError("--gpu scales the H200 measurement to another card; --bench is a "
                          "measurement of your own: give one of them")
    rate = rate_from_bench(bench) if bench else scaled_rate(gpu) if gpu else default_rate()
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
    job_hours, unmeasured = [], set()
    for pack in packs:
        speedup = speedups.get(len(pack), 1.0)
        if len(pack) > 1 and len(pack) not in speedups:
            unmeasured.add(len(pack))
        job_hours.append(gpu_hours([by_key[k] for k in pack], forks, rate) / speedup)
    hours = sum(job_hours)
    lines.append(f"{_hours(hours)} GPU-hours on {rate.source}; an estimate from each trial's "
                 "FLOPs at that speed (see docs/method.md D.2)")
    if len(pack_of):
        lines.append(f"{len(pack_of)} trials in {len(set(pack_of.values()))} packs" + (
            f"; packs of {', '.join(map(str, sorted(unmeasured)))} priced as separate trials: "
            "their speed is not measured (pass --bench with a file of `ablate bench --pack "
            "1,2,4,... --json`)" if unmeasured else ", at the speeds --bench measured"))
    attacked = sweep.trials if sweep.autoattack is not None else \
        [t for t in sweep.trials if _table_row(t)]
    aa = {t.key: autoattack_hours(t, sweep.autoattack, rate) for t in attacked}
    lines.append(_autoattack_line(sweep, aa))
    if sweep.autoattack is not None:  # each trial runs it when it has trained
        job_hours = [h + sum(aa[k] for k in pack) for h, pack in zip(job_hours, packs)]
    lines.append(f"{_hours(makespan(packs, by_key, forks, job_hours, gpus))} h on "
                 f"{gpus} GPU{'s' if gpus > 1 else ''} (wall-clock: longest trial first, a "
                 "forked one after its baseline's fork epoch; --gpus N)")
    lines.append(_disk_line(sweep, forks))
    seeds = Counter(json.dumps({k: v for k, v in t.identity().items() if k != "seed"},
                               sort_keys=True, default=str) for t in sweep.trials)
    if max(seeds.values()) == 1:
        total = hours + sum(aa.values())
        lines.append(f"seeds: 1 per setting; the paper's Tables 1-5 average 5 runs: seed: [0, "
                     f"1, 2, 3, 4] would cost 5 times as much, {_hours(5 * total)} GPU-hours "
                     "(training and AutoAttack above)")
    lines.extend(data_lines(sweep))
    return lines


def _hours(hours: float) -> str:
    return (f"about {hours:,.0f}" if hours >= 10 else f"about {hours:.1f}" if hours >= 0.1
            else "under 0.1")


# --- other cards: the H200 measurement scaled by peak throughput ----------------------------------

@dataclass(frozen=True)
class Gpu:
    """A card's peak dense throughput for the arithmetic of the H200 measurement: TF32 tensor
    cores (``precision: tf32``), or plain FP32 on a card without TF32; and where it is from."""

    name: str
    tflops: float
    source: str


# From NVIDIA's datasheets (read December 2026). They print TF32 "with sparsity"; dense is half.
GPUS = {
    "h200": Gpu("NVIDIA H200 SXM", 494.5, "H200 datasheet: TF32 tensor 989 with sparsity"),
    "h100": Gpu("NVIDIA H100 SXM", 494.5, "H100 datasheet: TF32 tensor 989 with sparsity "
                                          "(the PCIe card: 756)"),
    "a100": Gpu("NVIDIA A100", 156.0, "A100 datasheet: TF32 tensor 156 (312 with sparsity)"),
    # AWS's g5 card; NVIDIA publishes no A10G datasheet, so this is the A10's (same GA102 chip).
    "a10g": Gpu("NVIDIA A10G", 62.5, "A10 datasheet: TF32 tensor 62.5 (125 with sparsity); "
                                     "none is published for the A10G"),
    "l4": Gpu("NVIDIA L4", 60.0, "L4 datasheet: TF32 tensor 120 with sparsity"),
    "v100": Gpu("NVIDIA V100 SXM2", 15.7, "V100 datasheet: FP32 15.7 (no TF32)"),
}


def scaled_rate(name: str) -> Rate:
    """The H200 rate times a card's peak over the H200's (``--gpu NAME``): an estimate from
    spec sheets, not a measurement (``--bench`` is the measured route)."""
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise ConfigError(f"--gpu {quote(name)} is unknown; choose from {', '.join(GPUS)} "
                          "(or measure yours: ablate bench --json FILE, then --bench FILE)")
    ratio = gpu.tflops / GPUS["h200"].tflops
    return Rate(default_rate().flops_per_s * ratio,
                f"one {gpu.name}, scaled from the H200 measurement by peak TF32 throughput "
                f"({gpu.tflops:g} / {GPUS['h200'].tflops:g} TFLOPS): an estimate, not a "
                "measurement (--bench measures)")


# --- AutoAttack -----------------------------------------------------------------------------------

# AutoAttack standard (docs/method.md B §7.1) in forward passes per image, a gradient step 2F and
# a Square query 1F: the clean forward and APGD-CE's 100 steps on every image, then on the images
# still robust APGD-T and FAB-T (9 target classes x 100 steps each) and Square (5,000 queries).
AA_FIRST = 1 + 100 * 2
AA_LATER = 9 * 100 * 2 + 9 * 100 * 2 + 5_000
# The share of images still robust after APGD-CE: about the robust accuracy of a PGD-trained
# CIFAR-10 Linf network (the paper's Table 1: around 50%); an assumption, said with the estimate.
ROBUST_FRACTION = 0.5


def autoattack_hours(config: TrialConfig, n: int | None, rate: Rate) -> float:
    """GPU-hours of AutoAttack on a trial's best and last weights, on ``n`` test images (0 or
    None: all of them, as ``ablate evaluate`` does)."""
    images = dataset_info(config.dataset).test_images
    images = min(n, images) if n else images
    passes = AA_FIRST + ROBUST_FRACTION * AA_LATER
    return 2 * images * passes * forward_flops(config) / rate.flops_per_s / 3600


def _table_row(config: TrialConfig) -> bool:
    """A trial that is a row of the paper's Tables 1-4 (report/tables.py): AT, AWP, and RAT_LR,
    RAT_WP (fix_lr, awp on ``layers.RAT``)."""
    return config.intervention in ("none", "awp_full") or (
        config.intervention in ("fix_lr", "awp") and tuple(config.layers) == layers.RAT)


def _autoattack_line(sweep: Sweep, hours: dict[str, float]) -> str:
    more = (f"{_hours(sum(hours.values()))} GPU-hours (an estimate, assuming "
            f"{ROBUST_FRACTION:.0%} of the images still robust after APGD-CE; docs/method.md D.2)")
    if sweep.autoattack is not None:
        images = f"{sweep.autoattack:,} test images" if sweep.autoattack else "all test images"
        return (f"AutoAttack (autoattack: {sweep.autoattack}) on every trial's best and last "
                f"weights, {images}: {more}")
    if not hours:
        return ("AutoAttack: not in this sweep (autoattack: null); no trial is a row of the "
                "paper's tables (AT, RAT_LR, RAT_WP, AWP)")
    return (f"AutoAttack: not in this sweep (autoattack: null); `ablate evaluate` on the tables' "
            f"{len(hours)} rows (AT, RAT_LR, RAT_WP, AWP; best and last weights, all test images) "
            f"would add {more}")


# --- wall-clock on N GPUs -------------------------------------------------------------------------

def makespan(packs: list[list[str]], by_key: dict[str, TrialConfig], forks: dict[str, Fork],
             hours: list[float], gpus: int) -> float:
    """Hours until the last pack ends when ``gpus`` GPUs take the packs (``hours`` each) by a
    list schedule: whenever a GPU is free it takes the longest pack that may start, and a pack
    with a forked trial may start once that trial's baseline has trained to the fork epoch (its
    pack's epochs taken as evenly long). One GPU: the sum of the hours."""
    job_of = {key: i for i, pack in enumerate(packs) for key in pack}
    first = [min(forks[k].epochs if k in forks else 0 for k in pack) for pack in packs]
    last = [max(by_key[k].epochs for k in pack) for pack in packs]
    needs = [[(job_of[forks[k].parent], forks[k].epochs) for k in pack
              if k in forks and job_of[forks[k].parent] != i] for i, pack in enumerate(packs)]
    start: dict[int, float] = {}

    def reached(job: int, epoch: int) -> float:
        return start[job] + hours[job] * (epoch - first[job]) / max(last[job] - first[job], 1)

    free = [0.0] * gpus
    waiting = set(range(len(packs)))
    while waiting:
        now = heapq.heappop(free)
        ready = {i: max([now] + [reached(p, e) for p, e in needs[i]]) for i in waiting
                 if all(p in start for p, _ in needs[i])}
        startable = [i for i, at in ready.items() if at <= now]
        job = (max(startable, key=lambda i: (hours[i], -i)) if startable
               else min(ready, key=lambda i: (ready[i], -hours[i], i)))
        start[job] = ready[job]
        waiting.remove(job)
        heapq.heappush(free, start[job] + hours[job])
    return max((start[i] + hours[i] for i in start), default=0.0)


# --- disk -----------------------------------------------------------------------------------------

# A curve file: Parquet's schema and per-column statistics (27 KB measured for 4 rows), then per
# row about 60 values (the key, the identifying fields, the metrics) of 8 bytes before Parquet
# compresses the repeated ones. An upper bound.
CURVE_FILE_BYTES = 32_000
CURVE_ROW_BYTES = 64 * 8


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"


def disk_bytes(sweep: Sweep, forks: dict[str, Fork]) -> dict[str, float]:
    """The run folder's files when the sweep is done, by kind: each trial's checkpoint (weights
    and buffers, SGD momentum per parameter), best weights and curve, and one fork file (a
    checkpoint plus the best weights) per baseline and fork epoch."""
    by_key = sweep.by_key
    width = {t.key: 8 if t.precision == "fp64" else 4 for t in sweep.trials}  # bytes per value
    weights = {t.key: network(t).state * width[t.key] for t in sweep.trials}
    checkpoint = {t.key: weights[t.key] + network(t).parameters * width[t.key]
                  for t in sweep.trials}
    fork_files = {(f.parent, f.epochs) for f in forks.values()}
    return {"checkpoints": sum(checkpoint.values()), "best": sum(weights.values()),
            "forks": sum(checkpoint[p] + weights[p] for p, _ in fork_files if p in by_key),
            "fork_files": len(fork_files),
            "curves": sum(CURVE_FILE_BYTES + t.epochs * CURVE_ROW_BYTES for t in sweep.trials)}


def _disk_line(sweep: Sweep, forks: dict[str, Fork]) -> str:
    size = disk_bytes(sweep, forks)
    total = size["checkpoints"] + size["best"] + size["forks"] + size["curves"]
    n = size["fork_files"]
    forked = f", {n} fork file{'s' if n > 1 else ''} {_size(size['forks'])}" if n else ""
    return (f"disk: about {_size(total)} in the run folder or bucket: checkpoints with momentum "
            f"{_size(size['checkpoints'])}, best weights {_size(size['best'])}{forked}, curves "
            f"under {_size(size['curves'])}")


# --- data -----------------------------------------------------------------------------------------

def data_lines(sweep: Sweep) -> list[str]:
    """For each dataset and data root of the sweep, whether ``ablate run`` finds the files
    (its own check, ``datafiles.check_data``): one line each, with the fix when it would stop."""
    lines = []
    for name, root, download in dict.fromkeys((t.dataset, t.data_root, t.download)
                                              for t in sweep.trials):
        if name not in LAYOUTS:  # digits, synthetic: no files
            continue
        where = Path(root).expanduser().resolve()
        try:
            check_data(name, root, download)
        except DataError as err:
            if missing_path(name, where) is None:  # there, but a file is empty
                lines.append(f"data: {err} (ablate run would stop)")
            else:
                lines.append(f"data: {name} is not in {where} (ablate run would stop); fetch it "
                             f"with `ablate data {name} --root {root}` or set data_root "
                             "(--set data_root=DIR)")
            continue
        lines.append(f"data: {name} will be downloaded into {where} (download: true)"
                     if missing_path(name, where) is not None else f"data: {name} in {where}")
    return lines


def gpu_hours(trials: Iterable[TrialConfig], forks: dict[str, Fork], rate: Rate) -> float:
    """GPU-hours to train every epoch of the sweep that is not copied from a fork."""
    seconds = 0.0
    for t in trials:
        epochs = t.epochs - (forks[t.key].epochs if t.key in forks else 0)
        seconds += epochs * passes_per_epoch(t) * forward_flops(t) / rate.flops_per_s
    return seconds / 3600
