"""``ablate bench``: images/s of the project's training step against a Rice-style reference loop.

Both loops train the same architecture (``build_model``, normalisation inside) on random uint8
images of CIFAR-10's shape, in one process. For each intervention, repeats alternate between the
two loops, each timing the same ``batches`` batches after a warm-up; the report gives the min and
the median seconds per batch, images/s, and their ratio (project images/s / reference images/s).
The data path is the same on both sides (uint8 batches already on the device, converted and
augmented by the project's ``augment``), so the ratio measures the step alone; Rice's DataLoader
is not modelled.

The reference (``RiceStep``) is a transcription of the step in Rice et al.'s ``train_cifar.py``
(https://github.com/locuslab/robust_overfitting): PGD-K whose input gradient comes from
``loss.backward()`` (which fills every weight's ``.grad`` too), in train mode, then the forward
that compares restarts, the training forward, backward and SGD step, and the clean logging forward
in train mode with autograd on; float32 and eager whatever ``precision`` and ``compile`` the
project's step uses, in the same float32 math mode (IEEE for fp32, TF32 for tf32 and bf16: the
trainer sets it for the process). On CUDA the project's step also has the trainer's fused SGD;
the reference keeps torch's default SGD. With ``compile`` the warm-up batches include the compile (the timed ones do not).

The per-epoch split runs the real ``Trainer.fit`` for one small epoch (train, evaluation,
checkpoint) and times the clean logging forward apart; on CUDA the report adds the FLOPs of one
step (``torch.utils.flop_counter``: matmul and convolution FLOPs only) as MFU against a peak from
``PEAK_FLOPS``, the peak memory of each loop, and the images/s of several trials sharing the GPU,
one process each. Library code reports progress only through the ``echo`` it is given.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import platform
import queue as queue_module
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TrialConfig, from_dict
from .strategies import INTERVENTIONS, layer_wise
from .data import Data, augment
from .datasets import dataset_info
from .device import resolve_device, tf32_enabled
from .errors import ConfigError, TrainingDiverged
from .models import build_model
from .trainer import Reporter, Trainer

DATASET = "cifar10"  # the shapes, classes and mean/std of the benchmark's random images
DEFAULT_INTERVENTIONS = tuple(INTERVENTIONS)  # every described intervention
DEFAULT_LAYERS = (3, 4)
SPLIT_PARTS = ("train", "logging_forward", "evaluation", "checkpoint")
CIFAR_EPOCH = {"train": 50_000, "train_eval": 10_000, "test": 10_000}  # images per real epoch

# Dense peak FLOP/s by device-name substring, first match wins (NVIDIA datasheets, without
# sparsity). "fp32" is the plain (non-tensor-core) rate; "tf32" is what cuDNN's default
# allow_tf32 gives fp32 convolutions. The H200 has the H100 SXM's compute (and "GH200" matches
# "H200": its GPU is an H100 SXM-class part too).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)

Echo = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    """What ``ablate bench`` measures; the CLI's options, one field each."""

    model: str = "preact18"
    width: int = 16  # preact_small only
    blocks: int = 1  # preact_small only
    batch_size: int = 128
    device: str = "auto"
    precision: str = "fp32"  # the project's step; the reference stays float32 (same math mode)
    compile: bool = False  # torch.compile the project's model (the trial field); reference eager
    interventions: tuple[str, ...] = DEFAULT_INTERVENTIONS
    layers: tuple[int, ...] = DEFAULT_LAYERS  # for the layer-wise interventions
    train_steps: int = 10  # PGD-K of both loops
    batches: int = 20  # timed batches per repeat and loop
    repeats: int = 5
    warmup: int = 3  # untimed batches per loop before the repeats
    split: bool = True
    split_batches: int | None = None  # training batches of the split's epoch (default: batches)
    eval_images: int | None = None  # train-eval and test images of the split (default: train/5)
    test_steps: int = 20
    trials_per_gpu: tuple[int, ...] = (1, 2, 4)
    packs: tuple[int, ...] = ()  # pack sizes K to time (ablation.packed), e.g. (1, 2, 4, 8, 16)
    threads: int | None = None  # torch threads; None: 1 on the CPU, torch's choice on CUDA
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# The reference loop


class RiceStep:
    """One training step of Rice et al.'s ``train_cifar.py`` (PGD-AT, one restart), fp32, eager.

    Kept as their loop runs it, the costs the project removes included: the attack's
    ``loss.backward()`` also computes every weight gradient, the model is in train mode
    throughout (all K + 3 forwards update BatchNorm's running statistics), the restart-comparison
    forward builds a graph it never uses, the logging forward runs with autograd on, and four
    ``.item()`` calls per batch fill the running metrics.
    """

    def __init__(self, model: nn.Module, eps: float, alpha: float, steps: int, lr: float,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)
        self.sums = [0.0, 0.0, 0.0, 0.0]  # robust loss, robust acc, clean loss, clean acc

    def _into_box(self, delta: Tensor, x: Tensor) -> Tensor:
        return torch.max(torch.min(delta, 1 - x), -x)  # keep x + delta inside [0, 1]

    def attack(self, x: Tensor, y: Tensor) -> Tensor:
        """Linf PGD-K from a uniform start; returns the perturbation (``attack_pgd``)."""
        delta = self._into_box(torch.zeros_like(x).uniform_(-self.eps, self.eps), x)
        delta.requires_grad = True
        for _ in range(self.steps):
            loss = F.cross_entropy(self.model(x + delta), y)
            loss.backward()  # the gradient on delta, and on every weight as a side effect
            moved = (delta + self.alpha * delta.grad.detach().sign()).clamp(-self.eps, self.eps)
            delta.data.copy_(self._into_box(moved, x))
            delta.grad.zero_()
        # The restart comparison: keep, per image, the delta whose final loss is highest. With one
        # restart against a zero running maximum it keeps every image's delta, but the forward
        # runs (and, with delta still requiring grad, records a graph).
        max_loss = torch.zeros(len(y), device=x.device)
        best = torch.zeros_like(x)
        final_loss = F.cross_entropy(self.model(x + delta), y, reduction="none")
        keep = final_loss >= max_loss
        best[keep] = delta.detach()[keep]
        return best

    def step(self, x: Tensor, y: Tensor) -> None:
        """Attack, train on the adversarial batch, then the clean logging forward."""
        self.model.train()
        delta = self.attack(x, y)
        robust_out = self.model((x + delta).clamp(0, 1))
        robust_loss = F.cross_entropy(robust_out, y)
        self.opt.zero_grad()
        robust_loss.backward()
        self.opt.step()
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        n = len(y)
        self.sums[0] += robust_loss.item() * n
        self.sums[1] += (robust_out.max(1)[1] == y).sum().item()
        self.sums[2] += loss.item() * n
        self.sums[3] += (out.max(1)[1] == y).sum().item()


def reference_for(config: TrialConfig, device: torch.device) -> RiceStep:
    """The reference loop on the trial's architecture, attack and optimizer constants."""
    info = dataset_info(config.dataset)
    model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        mean=info.mean, std=info.std, width=config.width,
                        blocks=config.blocks).to(device)
    return RiceStep(model, config.eps, config.step, config.train_steps, config.lr_max,
                    config.momentum, config.weight_decay)


# ----------------------------------------------------------------------------------------------
# Steps, timings and their summary


def random_data(n_train: int, n_test: int, seed: int, device: torch.device) -> Data:
    """Random uint8 images and labels with CIFAR-10's shape, classes and mean/std, on ``device``."""
    info = dataset_info(DATASET)
    gen = torch.Generator().manual_seed(seed)
    shape = (info.in_channels, info.image_size, info.image_size)

    def split(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
        return x, torch.randint(0, info.num_classes, (n,), generator=gen)

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    return Data(info, train_x, train_y, test_x, test_y).to(device)


def trial_config(opts: BenchOptions, intervention: str, device: torch.device,
                 **changes: Any) -> TrialConfig:
    """The trial whose step is timed: CIFAR-10 PGD-AT with the bench's model and sizes."""
    return from_dict({
        "dataset": DATASET, "model": opts.model, "width": opts.width, "blocks": opts.blocks,
        "intervention": intervention,
        "layers": list(opts.layers) if intervention in layer_wise() else [],
        "batch_size": opts.batch_size, "train_steps": opts.train_steps,
        "test_steps": opts.test_steps, "precision": opts.precision, "compile": opts.compile,
        "device": str(device), "seed": opts.seed, "train_eval_size": 0, **changes},
        source="bench")


def project_step(trainer: Trainer) -> Callable[[Tensor, Tensor], None]:
    """The project's per-batch work as ``train_epoch`` does it, on a uint8 batch.

    The optimizer starts at lr_max in every group, the schedule's value at epoch 0, so no LR needs
    setting. The finite-loss check is ``train_epoch``'s, with its one synchronisation per batch.
    """
    def step(images: Tensor, labels: Tensor) -> None:
        x = trainer.batch(images, augmented=True)
        loss, _, _ = trainer.train_step(0, x, labels)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"bench: the project's training loss became {loss.item()}")
    return step


def reference_step(reference: RiceStep) -> Callable[[Tensor, Tensor], None]:
    """The reference's per-batch work on a uint8 batch, with the same data path as the project's."""
    def step(images: Tensor, labels: Tensor) -> None:
        reference.step(augment(images.float().div_(255), DATASET), labels)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(data: Data, batch_size: int, n: int) -> list[tuple[Tensor, Tensor]]:
    return [(data.train_x[i * batch_size:(i + 1) * batch_size],
             data.train_y[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def _run(step: Callable[[Tensor, Tensor], None], batches: Sequence[tuple[Tensor, Tensor]],
         count: int) -> None:
    for i in range(count):
        step(*batches[i % len(batches)])


def time_per_batch(step: Callable[[Tensor, Tensor], None],
                   batches: Sequence[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Seconds per batch over ``batches``, the device synchronised at both ends."""
    _sync(device)
    start = time.perf_counter()
    _run(step, batches, len(batches))
    _sync(device)
    return (time.perf_counter() - start) / len(batches)


def timing_stats(seconds: Sequence[float], batch_size: int) -> dict[str, Any]:
    """Min and median of per-batch seconds over the repeats, and the images/s they give."""
    best, median = min(seconds), statistics.median(seconds)
    return {"seconds_per_batch": list(seconds), "min_s": best, "median_s": median,
            "images_per_s": batch_size / median, "images_per_s_best": batch_size / best}


def compare(project_s: Sequence[float], reference_s: Sequence[float],
            batch_size: int) -> dict[str, Any]:
    """Both loops' statistics and the speed-ups: project images/s over reference images/s, of
    the medians and of the minima (so a ratio above 1 means the project's step is faster)."""
    project, reference = timing_stats(project_s, batch_size), timing_stats(reference_s, batch_size)
    return {"project": project, "reference": reference,
            "ratio_median": reference["median_s"] / project["median_s"],
            "ratio_min": reference["min_s"] / project["min_s"]}


def count_flops(step: Callable[[Tensor, Tensor], None], images: Tensor, labels: Tensor) -> int:
    """FLOPs of one step as ``FlopCounterMode`` counts them (matmuls and convolutions, forward
    and backward); the step really runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    return int(counter.get_total_flops())


def peak_flops(device_name: str, kind: str) -> float | None:
    """Dense peak FLOP/s of ``kind`` (bf16, tf32, fp32) on the named device; None if unknown."""
    for fragment, peaks in PEAK_FLOPS:
        if fragment in device_name:
            return peaks.get(kind)
    return None


def _peak_memory(step: Callable[[Tensor, Tensor], None], images: Tensor, labels: Tensor,
                 device: torch.device) -> int | None:
    """Peak bytes allocated on the GPU during one step (what is already resident included)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(images, labels)
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The measurements


def bench_reference(opts: BenchOptions, device: torch.device, data: Data) -> dict[str, Any]:
    """FLOPs and peak memory of the reference step alone (the same for every intervention)."""
    config = trial_config(opts, "none", device)
    torch.manual_seed(opts.seed)
    step = reference_step(reference_for(config, device))
    batches = _batches(data, opts.batch_size, 1)
    _run(step, batches, max(1, opts.warmup))
    out = {"peak_memory_bytes": _peak_memory(step, *batches[0], device),
           "flops_per_step": count_flops(step, *batches[0])}
    _release(device)
    return out


def bench_intervention(opts: BenchOptions, intervention: str, device: torch.device, data: Data,
                       workdir: Path, echo: Echo) -> dict[str, Any]:
    """The project's step with ``intervention`` against the reference, interleaved."""
    config = trial_config(opts, intervention, device)
    batches = _batches(data, opts.batch_size, opts.batches)
    trainer = Trainer(config, workdir / intervention, data=data)
    project = project_step(trainer)
    _run(project, batches, opts.warmup)
    peak = _peak_memory(project, *batches[0], device)  # before the reference exists
    # The math's FLOPs, the same compiled or not, counted eagerly: under the counter's dispatch
    # mode a compiled model would be traced again.
    with torch.compiler.set_stance("force_eager"):
        flops = count_flops(project, *batches[0])
    reference = reference_step(reference_for(config, device))
    _run(reference, batches, opts.warmup)
    project_s, reference_s = [], []
    for r in range(opts.repeats):
        # Alternate which loop goes first, so neither always follows the other.
        order = ((project, project_s), (reference, reference_s))
        for step, times in order if r % 2 == 0 else order[::-1]:
            times.append(time_per_batch(step, batches, device))
    del trainer, project, reference
    _release(device)
    out = {"intervention": intervention, "layers": list(config.layers),
           **compare(project_s, reference_s, opts.batch_size),
           "flops_per_step": flops, "peak_memory_bytes": peak}
    echo(f"  {intervention}: project {out['project']['images_per_s']:.1f} img/s, reference "
         f"{out['reference']['images_per_s']:.1f} img/s, ratio {out['ratio_median']:.2f}")
    return out


class _EpochClock(Reporter):
    """Wall-clock time at the start of ``fit`` and after each epoch's checkpoint."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def start(self, config, history):
        self.marks.append(time.perf_counter())

    def epoch(self, row, checkpoint):
        _sync(self.device)
        self.marks.append(time.perf_counter())


def bench_split(opts: BenchOptions, intervention: str, device: torch.device,
                workdir: Path, k: int = 1) -> dict[str, Any]:
    """Small epochs of the real ``Trainer.fit`` (of ``PackTrainer.fit`` for a pack of ``k``
    trials, :func:`pack_configs`): training, evaluation and checkpoint seconds, and the clean
    logging forward timed alone over the same number of batches.

    ``train_seconds`` and ``eval_seconds`` are the trainer's own timers; the checkpoint part is
    the rest of the epoch (the checkpoint writes, plus the copy of the best weights when the
    epoch is the best so far). On CUDA a first epoch warms up and each part is the median of the
    next three; on the CPU one epoch is measured. A pack's seconds are the whole pack's.
    """
    from .packed import PackTrainer

    n_batches = opts.split_batches or opts.batches
    n_train = n_batches * opts.batch_size
    n_eval = opts.eval_images if opts.eval_images is not None else max(1, n_train // 5)
    warm, measured = (1, 3) if device.type == "cuda" else (0, 1)
    data = random_data(n_train, n_eval, opts.seed + 1, device)
    split = {"train_eval_size": n_eval, "epochs": warm + measured}
    clock = _EpochClock(device)
    if k == 1:
        config = trial_config(opts, intervention, device, **split)
        trainer = Trainer(config, workdir / "split", data=data)
        history = trainer.fit(clock)
    else:
        configs = [c.replace(**split) for c in pack_configs(opts, k, device)]
        config = configs[0]
        trainer = PackTrainer(configs, [workdir / f"split{k}-{i}" for i in range(k)], data=data)
        # the last trial's reporter marks the epoch's end: after every checkpoint of the pack
        histories, _ = trainer.fit([Reporter()] * (k - 1) + [clock])
        history = histories[config.key]
    runs: dict[str, list[float]] = {part: [] for part in (*SPLIT_PARTS, "epoch")}
    for e in range(warm, warm + measured):
        epoch = clock.marks[e + 1] - clock.marks[e]
        train, evaluation = history[e]["train_seconds"], history[e]["eval_seconds"]
        runs["epoch"].append(epoch)
        runs["train"].append(train)
        runs["evaluation"].append(evaluation)
        runs["checkpoint"].append(max(0.0, epoch - train - evaluation))
    # The clean logging forward alone, as train_step runs it, on augmented batches.
    model = trainer.model
    xs = [trainer.expand(trainer.batch(x, augmented=True))
          for x, _ in _batches(data, opts.batch_size, n_batches)]
    model.train(config.log_pass_mode == "train")
    for _ in range(measured):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), trainer.autocast():
            for x in xs:
                model(x)
        _sync(device)
        runs["logging_forward"].append(time.perf_counter() - start)
    del trainer, model, xs
    _release(device)
    parts = {part: statistics.median(runs[part]) for part in SPLIT_PARTS}
    epoch = statistics.median(runs["epoch"])
    per_image = {"train": n_train, "logging_forward": n_train, "evaluation": 2 * n_eval}
    scale = {"train": CIFAR_EPOCH["train"] / n_train,
             "logging_forward": CIFAR_EPOCH["train"] / n_train,
             "evaluation": (CIFAR_EPOCH["train_eval"] + CIFAR_EPOCH["test"]) / (2 * n_eval),
             "checkpoint": 1.0}
    return {"intervention": intervention, "k": k, "train_images": n_train,
            "train_eval_images": n_eval,
            "test_images": n_eval, "test_steps": opts.test_steps, "epochs_measured": measured,
            "per_epoch_seconds": runs, "epoch_seconds": epoch, "seconds": parts,
            "share_of_epoch": {k: v / epoch for k, v in parts.items()},
            "images_per_s": {k: per_image[k] / parts[k] for k in per_image},
            "cifar10_epoch_seconds": {k: v * scale[k] for k, v in parts.items()}}


def pack_configs(opts: BenchOptions, k: int, device: torch.device) -> list[TrialConfig]:
    """K distinct trials as a sweep packs them: the options' interventions in turn, the
    layer-wise ones on successive subsets of the paper's 15 (ConfigError when the options
    describe fewer than K trials)."""
    from .layers import ALL_SUBSETS

    choices = [[{"layers": list(s)} for s in ALL_SUBSETS] if i in layer_wise() else [{}]
               for i in opts.interventions]
    trials = [trial_config(opts, i, device, **changes[n])
              for n in range(len(ALL_SUBSETS))
              for i, changes in zip(opts.interventions, choices) if n < len(changes)]
    if len(trials) < k:
        raise ConfigError(f"--pack {k}: the chosen interventions make {len(trials)} distinct "
                          "trials; add a layer-wise --intervention (fix_lr, fix_param, awp)")
    return trials[:k]


def bench_packs(opts: BenchOptions, device: torch.device, workdir: Path,
                rows: list[dict[str, Any]], echo: Echo) -> list[dict[str, Any]]:
    """For each pack size K: the seconds per batch of one packed step of K trials (all K
    attacked, updated and logged), images/s in all and per trial, against K separate steps of
    the project (the sum of the lone steps' medians in ``rows`` for the same interventions,
    measured above) and K steps of the Rice-style reference, and the peak memory. K = 1 is the
    lone trainer."""
    from .packed import PackTrainer

    lone = {row["intervention"]: row["project"]["median_s"] for row in rows}
    reference = statistics.median(row["reference"]["median_s"] for row in rows)
    data = random_data(opts.batches * opts.batch_size, opts.batch_size, opts.seed, device)
    batches = _batches(data, opts.batch_size, opts.batches)
    out = []
    for k in opts.packs:
        configs = pack_configs(opts, k, device)
        folders = [workdir / f"pack{k}-{i}" for i in range(k)]
        try:
            if k == 1:
                step = project_step(Trainer(configs[0], folders[0], data=data))
            else:
                pack = PackTrainer(configs, folders, data=data)
                pack.optimizer.lr = {n: torch.full((k,), configs[0].lr_max, dtype=torch.float64,
                                                   device=device) for n in pack.names}

                def step(images: Tensor, labels: Tensor, pack=pack) -> None:
                    pack.train_step(0, pack.batch(images, augmented=True), labels)
            _run(step, batches, opts.warmup)
            peak = _peak_memory(step, *batches[0], device)
            seconds = [time_per_batch(step, batches, device) for _ in range(opts.repeats)]
        except torch.cuda.OutOfMemoryError:
            out.append({"k": k, "error": "out of GPU memory"})
            echo(f"  pack of {k}: out of GPU memory")
            _release(device)
            continue
        median = statistics.median(seconds)
        separate = sum(lone.get(c.intervention, math.nan) for c in configs)
        out.append({"k": k, "interventions": [c.intervention for c in configs],
                    "seconds_per_batch": seconds, "median_s": median,
                    "images_per_s": k * opts.batch_size / median,
                    "images_per_s_per_trial": opts.batch_size / median,
                    "ratio_vs_separate": separate / median,
                    "ratio_vs_reference": k * reference / median,
                    "peak_memory_bytes": peak})
        echo(f"  pack of {k}: {out[-1]['images_per_s']:.1f} img/s in all, "
             f"{out[-1]['ratio_vs_separate']:.2f}x {k} separate steps")
        _release(device)
    return out


def _trial_worker(opts: BenchOptions, intervention: str, barrier: Any, results: Any) -> None:
    """One of several trials sharing the GPU: warm up, wait for the others, time the step."""
    try:
        device = resolve_device(opts.device, "--device")
        if opts.threads:
            torch.set_num_threads(opts.threads)
        n = opts.batches * opts.repeats
        data = random_data(opts.batches * opts.batch_size, opts.batch_size, opts.seed, device)
        with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
            trainer = Trainer(trial_config(opts, intervention, device), tmp, data=data)
            step = project_step(trainer)
            batches = _batches(data, opts.batch_size, opts.batches)
            # A fresh process runs its first batches slowly (allocator growth, kernel choice):
            # at least one full pass over the batches before the clock starts.
            _run(step, batches, max(opts.warmup, len(batches)))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            barrier.wait(timeout=900)
            _sync(device)
            start = time.time()  # wall clock: comparable across processes
            _run(step, batches, n)
            _sync(device)
            end = time.time()
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            results.put({"start": start, "end": end, "images": n * opts.batch_size,
                         "peak_memory_bytes": peak})
    except BaseException as err:  # a worker's failure goes back to the parent as one line
        barrier.abort()
        results.put({"error": f"{type(err).__name__}: {' '.join(str(err).split())}"})


def bench_trials_per_gpu(opts: BenchOptions, intervention: str, echo: Echo) -> list[dict[str, Any]]:
    """For each count k, k spawned processes train the project's step on the same GPU at once."""
    ctx = multiprocessing.get_context("spawn")
    out = []
    for k in opts.trials_per_gpu:
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_trial_worker, args=(opts, intervention, barrier, results),
                             daemon=True) for _ in range(k)]
        for p in procs:
            p.start()
        got: list[dict[str, Any]] = []
        while len(got) < k:
            try:
                got.append(results.get(timeout=5))
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs):  # one died without a word (killed)
                    got.append({"error": "a worker process died (exit codes "
                                         f"{[p.exitcode for p in procs]})"})
                    break
        for p in procs:
            p.join(timeout=60)
        errors = [g["error"] for g in got if "error" in g]
        if errors:
            row = {"trials": k, "error": errors[0]}
            echo(f"  {k} trial(s) per GPU: failed ({errors[0]})")
        else:
            window = max(g["end"] for g in got) - min(g["start"] for g in got)
            per_trial = [g["images"] / (g["end"] - g["start"]) for g in got]
            row = {"trials": k, "images_per_s": sum(g["images"] for g in got) / window,
                   "per_trial_images_per_s": per_trial,
                   "peak_memory_bytes": max((g["peak_memory_bytes"] or 0) for g in got) or None}
            echo(f"  {k} trial(s) per GPU: {row['images_per_s']:.1f} img/s together")
        out.append(row)
    base = next((r for r in out if r["trials"] == 1 and "images_per_s" in r), None)
    for row in out:
        if base and "images_per_s" in row:
            row["scaling_vs_one"] = row["images_per_s"] / base["images_per_s"]
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers were taken: device, torch, threads and the TF32 switches."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "tf32": tf32_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_precision": torch.get_float32_matmul_precision()}


def _add_mfu(row: dict[str, Any], env: dict[str, Any], precision: str) -> None:
    """MFU of the project's median step against the datasheet peak of its precision (fp32,
    tf32 or bf16); None where the peak is unknown."""
    if not env["device"].startswith("cuda"):
        return
    achieved = row["flops_per_step"] / row["project"]["median_s"]
    peak = peak_flops(env["device_name"], precision)
    row[f"mfu_{precision}"] = achieved / peak if peak else None
    row["achieved_flops_per_s"] = achieved


def run_bench(opts: BenchOptions, echo: Echo = lambda message: None) -> dict[str, Any]:
    """Every measurement of ``opts``; returns them as one JSON-ready dict."""
    device = resolve_device(opts.device, "--device")
    threads_before = torch.get_num_threads()
    threads = opts.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    for k in opts.packs:  # a pack the options cannot fill is said before anything runs
        pack_configs(opts, k, device)
    try:
        env = environment(device)
        echo(f"bench: {opts.model}, batch {opts.batch_size}, {env['device_name']}, "
             f"torch {env['torch']}, {opts.precision}{', compiled' if opts.compile else ''}, "
             f"{env['threads']} thread(s)")
        data = random_data(opts.batches * opts.batch_size, opts.batch_size, opts.seed, device)
        result: dict[str, Any] = {"environment": env, "options": asdict(opts),
                                  "dataset_shape": DATASET, "notes": []}
        with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
            echo("reference step (FLOPs, memory)")
            result["reference"] = bench_reference(opts, device, data)
            rows = []
            for intervention in opts.interventions:
                rows.append(bench_intervention(opts, intervention, device, data, Path(tmp), echo))
                _add_mfu(rows[-1], env, opts.precision)
            result["interventions"] = rows
            del data
            _release(device)
            result["split"] = None
            if opts.split:
                echo(f"per-epoch split ({opts.interventions[0]})")
                result["split"] = bench_split(opts, opts.interventions[0], device, Path(tmp))
            result["packs"] = None
            if opts.packs:
                echo(f"packs of {', '.join(map(str, opts.packs))} trials")
                result["packs"] = bench_packs(opts, device, Path(tmp), rows, echo)
                if opts.split:
                    result["pack_splits"] = [bench_split(opts, opts.interventions[0], device,
                                                         Path(tmp), k)
                                             for k in opts.packs if k > 1]
        result["trials_per_gpu"] = None
        if device.type != "cuda":
            result["notes"].append("trials per GPU: skipped (not a CUDA run)")
        elif opts.trials_per_gpu:
            echo(f"trials per GPU ({opts.interventions[0]})")
            result["trials_per_gpu"] = bench_trials_per_gpu(opts, opts.interventions[0], echo)
        result["notes"].append("FLOPs are torch.utils.flop_counter's count: matmul and "
                               "convolution FLOPs only (forward and backward).")
        if device.type == "cuda":
            result["notes"].append("the reference loop runs float32 in the project's math mode: "
                                   "IEEE for fp32, TF32 tensor cores for tf32 and bf16.")
        return result
    finally:
        torch.set_num_threads(threads_before)
