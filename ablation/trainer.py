"""The one trainer every trial runs: adversarial training with a layer-wise intervention.

``Trainer(config, workdir).fit(reporter)`` trains epoch by epoch, evaluates, checkpoints atomically
into ``workdir`` and reports each epoch to the reporter. It knows nothing of Ray: the sweep layer
passes a reporter of its own. A trainer built on a folder that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attacks import pgd, random_start
from .checkpoint import TrialFolder, restore, state_of
from .config import TrialConfig
from .curves import best_last
from .data import Data, augment, load_data
from .device import check_precision, dtype_of, eval_batch_size, oom_line, resolve_device, set_tf32
from .errors import OutOfMemory, TrainingDiverged
from .fork import Fork, batches_per_epoch
from .interventions import build_intervention
from .methods import build_method
from .models import build_trial_model
from .schedule import learning_rate, schedule_time

DIVERGENCE_CHECK = 50  # batches between reads of the on-device divergence flag


class Reporter:
    """Receives a trial's progress. Subclass and override what you need; all methods are no-ops."""

    def start(self, config: TrialConfig, history: list[dict[str, float]]) -> None:
        """Called once before training, with the epochs already done (resumed from a checkpoint)."""

    def progress(self, epoch: int, batch: int, batches: int) -> None:
        """Called after each training batch."""

    def written(self, paths: list[Path], removed: list[Path]) -> None:
        """Called after each epoch with the files of the trial folder written (in the order a
        copy elsewhere must receive them: the checkpoint last) and removed in that epoch."""

    def epoch(self, row: dict[str, float], checkpoint: Path) -> None:
        """Called after each epoch, once its checkpoint is on disk."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


class Loop:
    """What the trainer of one trial and the trainer of a pack of ``k`` trials share: the device
    and precision, the data on the device, the model's input format, and the per-epoch evaluation
    (``self.model`` is the network, or the pack's K networks as one, :mod:`ablation.pack`)."""

    k = 1  # trials trained at once

    def __init__(self, config: TrialConfig, data: Data | None):
        self.device = resolve_device(config.device)
        check_precision(config.precision, self.device)
        self.dtype = dtype_of(config.precision)
        if self.device.type == "cuda":
            # fp32 means IEEE float32; bf16's float32 leftovers run as PyTorch runs them by
            # default (docs/method.md C.6)
            set_tf32(config.precision in ("tf32", "bf16"))
        seed_everything(config.seed)
        if data is None:
            data = load_data(config.dataset, config.data_root, config.download)
        self.data = data.to(self.device)
        self.memory_format = (torch.channels_last if config.channels_last
                              else torch.contiguous_format)
        self.dataset, self.precision = config.dataset, config.precision
        self.eval_threat = config.threat_model
        # A fixed subset of the (unaugmented) training set, attacked in eval mode each epoch (A.8).
        n_train = len(self.data.train_y)
        chooser = torch.Generator().manual_seed(config.seed)
        index = torch.randperm(n_train, generator=chooser)[:min(config.train_eval_size, n_train)]
        self.train_eval = (self.data.train_x[index.to(self.device)],
                           self.data.train_y[index.to(self.device)])

    def build_model(self, config: TrialConfig) -> torch.nn.Module:
        """The trial's network on the device, in its dtype and memory layout (its initial
        weights are the next draws of torch's generator, in that dtype: an fp64 trial's are
        drawn in float64, not drawn in float32 and cast, whose last bit differs between CPU
        kernel paths, docs/method.md C.8)."""
        before = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            model = build_trial_model(config, self.data.info)
        finally:
            torch.set_default_dtype(before)
        model = model.to(self.device, self.dtype)
        model.to(memory_format=self.memory_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        return model

    def autocast(self):
        """The trial's autocast region (bf16; a no-op in the other precisions)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def epoch_batches(self, cfg: TrialConfig, epoch: int
                      ) -> Iterator[tuple[int, int, float, Tensor, Tensor]]:
        """(index, batches, scheduled LR, images, labels) of each batch of an epoch of ``cfg``:
        the training set shuffled (no drop_last: the last batch is smaller, B §1.1), augmented."""
        n = len(self.data.train_y)
        batches = math.ceil(n / cfg.batch_size)
        order = torch.randperm(n, device=self.device)
        for i in range(batches):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            yield (i, batches, learning_rate(cfg, schedule_time(cfg, epoch, i, batches)),
                   self.batch(self.data.train_x[idx], augmented=True), self.data.train_y[idx])

    def batch(self, x: Tensor, augmented: bool = False) -> Tensor:
        """uint8 images as model inputs in [0, 1], augmented for training, in the model's dtype
        and memory layout (augmentation's gather returns NCHW whatever it was given)."""
        x = x.to(self.dtype).div_(255)
        if augmented:
            x = augment(x, self.dataset)
        return x.contiguous(memory_format=self.memory_format)

    def expand(self, t: Tensor) -> Tensor:
        """One batch for each of the ``k`` trials, concatenated (the pack's input)."""
        if self.k == 1:
            return t
        return t.repeat(self.k, *[1] * (t.dim() - 1)).contiguous(
            memory_format=self.memory_format if t.dim() == 4 else torch.contiguous_format)

    @contextmanager
    def _input_gradients_only(self) -> Iterator[None]:
        """Weights stop requiring gradients for an attack, which needs d loss / d x alone. Eager
        autograd then records no weight-gradient nodes; a compiled graph (AOTAutograd's joint
        graph) would otherwise compute every weight gradient too, ~40% more FLOPs per PGD
        step. The values are the same. Frozen weights (fix-param) stay frozen."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def sums(self, logits: Tensor, y: Tensor) -> Tensor:
        """Each trial's summed cross-entropy and correct count of a batch, (k, 2), float64 (the
        loss in float32, or float64 for an fp64 trial; bf16 logits are widened first)."""
        logits = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
        if self.k == 1:
            return torch.stack([F.cross_entropy(logits, y, reduction="sum"),
                                (logits.argmax(1) == y).sum()]).double()[None]
        losses = F.cross_entropy(logits, self.expand(y), reduction="none").view(self.k, -1)
        correct = (logits.argmax(1) == self.expand(y)).view(self.k, -1)
        return torch.stack([losses.sum(1), correct.sum(1)], 1).double()

    def eval_rows(self, name: str, steps: tuple[int, int]) -> list[dict[str, float]]:
        """Eval-mode metrics after an epoch, per trial: PGD on the fixed train subset, clean and
        PGD on the test set (A.8). AutoAttack, on the final weights only, is ``evaluate.py``'s.
        ``name`` names the trials in a message; ``steps`` are (train_steps, test_steps)."""
        start = time.perf_counter()
        rows: list[dict[str, float]] = [{} for _ in range(self.k)]
        keys = ("loss", "acc", "robust_loss", "robust_acc")
        if len(self.train_eval[1]):
            train = self.attack_sums(*self.train_eval, steps[0], name)
        else:
            train = torch.full((self.k, 4), math.nan)
        test = self.attack_sums(self.data.test_x, self.data.test_y, steps[1], name)
        self._sync()
        seconds = time.perf_counter() - start
        for row, tr, te in zip(rows, train.tolist(), test.tolist()):
            row.update({f"train_eval_{k}": v for k, v in zip(keys, tr)})
            row.update({f"test_{k}": v for k, v in zip(keys, te)})
            row["eval_seconds"] = seconds
        return rows

    def attack_sums(self, images: Tensor, labels: Tensor, steps: int, name: str) -> Tensor:
        """Each trial's clean and PGD-``steps`` loss and accuracy in eval mode, (k, 4): loss,
        acc, robust_loss, robust_acc.

        The random starts of all images are drawn at once, so each image's attack (independent
        of its batch-mates in eval mode) is the same whatever batch groups it (Linf exactly; L2
        to about 1e-8, as its step divides the batch mean's gradient by its norm + 1e-10, see
        docs/method.md D.3): a batch that runs out of GPU memory is halved and the evaluation
        goes on from that batch. The trials of a pack share the draws, as each would alone.
        """
        self.model.eval()
        sums = torch.zeros(self.k, 4, device=self.device, dtype=torch.float64)
        images = self.batch(images)
        starts = random_start(images, self.eval_threat)
        i = 0
        while i < len(labels):
            bs = self.eval_batch
            try:
                sums += self._attack_batch(images[i:i + bs], labels[i:i + bs], steps,
                                           starts[i:i + bs])
            except torch.cuda.OutOfMemoryError as err:
                if bs == 1:
                    raise OutOfMemory(f"{name}: out of GPU memory evaluating one image: "
                                      f"{oom_line(err)}") from None
                self.eval_batch = bs // 2
                torch.cuda.empty_cache()
                warnings.warn(f"{name}: evaluation batch {bs} ran out of GPU memory; going on "
                              f"with {self.eval_batch}", stacklevel=2)
                continue
            i += bs
        return sums / len(labels)

    def _attack_batch(self, x: Tensor, y: Tensor, steps: int, start: Tensor) -> Tensor:
        """Each trial's summed clean loss, clean correct, PGD loss and PGD correct of one
        evaluation batch, (k, 4)."""
        x, y, start = self.expand(x), self.expand(y), self.expand(start)
        with self.autocast():
            with self._input_gradients_only():
                x_adv = pgd(self.model, x, y, self.eval_threat, steps, delta=start)
            with torch.no_grad():
                logits_nat, logits_adv = self.model(x), self.model(x_adv)
        y = y[:len(y) // self.k]
        return torch.cat([self.sums(logits_nat, y), self.sums(logits_adv, y)], 1)


class Trainer(Loop):
    """One trial: data and model on the device, the method, the intervention and the optimizer."""

    def __init__(self, config: TrialConfig, workdir: str | Path, data: Data | None = None,
                 fork: Fork | None = None, fork_points: Iterable[int] = ()):
        """``data`` replaces the config's dataset (the benchmark's random CIFAR-sized images).

        A folder without a checkpoint starts from ``fork``'s parent checkpoint when that file
        is given and exists (see :func:`fork_path`); ``fork_points`` are the epoch counts after
        which this trial writes such a file for the trials that fork from it.
        """
        super().__init__(config, data)
        self.config = config
        self.workdir = Path(workdir).resolve()  # Ray may change the working directory
        self.model = self.build_model(config)
        self.eval_batch = config.test_batch_size or eval_batch_size(
            self.model, self.batch(self.data.test_x[:1])[0], self.device)
        self.method = build_method(config)
        self.intervention = build_intervention(self.model, config)  # AWP's proxy: an eager copy
        if config.compile:
            # In place (nn.Module.compile): self.model keeps its parameter names, so checkpoints
            # are the same compiled or not and each resumes the other; attack, training, logging
            # pass and evaluation all run compiled. Static shapes (dynamic=False): Inductor picks
            # channels-last layouts only for static graphs; the short last batches and the eval
            # batch add a graph each per train/eval mode x input grad / weight grad / no grad,
            # hence a recompile limit above dynamo's 8 (past it, a graph runs eagerly). No CUDA
            # graphs ("reduce-overhead"): a replay overwrites the previous replay's outputs, and
            # the trainer keeps some (logits_adv past the logging pass). AWP's proxy stays eager:
            # 1 of the 13 forwards of a PGD-10 batch. Graphs are per process: Tune (reuse_actors
            # off) starts each trial in a new process, which traces again and takes Inductor's
            # kernels from its on-disk cache. Inductor compiles with as many workers as the
            # trial has threads (its default is up to 32 per process, whatever
            # --cpus-per-trial says).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            torch._inductor.config.compile_threads = torch.get_num_threads()
            self.model.compile(dynamic=False)
        # On CUDA one fused kernel does the whole SGD update (the same formula, equal up to
        # float rounding); elsewhere torch's default. A checkpoint's param groups carry the
        # fused/foreach flags of the device that wrote it; a resume keeps this device's.
        self.optimizer = torch.optim.SGD(self.intervention.param_groups(), lr=config.lr_max,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay,
                                         fused=self.device.type == "cuda" or None)
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, Tensor] | None = None
        self.fork_points = sorted(set(fork_points))
        self.forked_from: str | None = None
        self.folder = TrialFolder(self.workdir, config)
        loaded = self.folder.resume()
        if loaded is None and fork is not None:
            loaded = self.folder.start_from_fork(
                fork, batches_per_epoch(config, len(self.data.train_y)))
            if loaded is not None:
                self.forked_from = fork.parent
                for row in loaded[0]["history"]:  # the fork's own fix-lr value, not the parent's
                    row["lr_fixed"] = self._fixed_lr()
        if loaded is not None:
            state, self.best_state = loaded
            restore(state, self.model, self.optimizer, self.device)
            self.history = state["history"]
        self.finished_at_start = self.finished  # its weights are those of any summary on disk

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.config.epochs

    def fit(self, reporter: Reporter | None = None, until: int | None = None
            ) -> list[dict[str, float]]:
        """Train the remaining epochs (up to ``until`` epochs done, if given); returns the whole
        per-epoch history."""
        reporter = reporter or Reporter()
        reporter.start(self.config, list(self.history))
        for epoch in range(self.epochs_done, min(until or self.config.epochs,
                                                 self.config.epochs)):
            row = self.train_epoch(epoch, reporter)
            row.update(self.eval_epoch())
            self.history.append(row)
            if self.best_epoch == epoch:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.state_dict().items()}
            state = state_of(self.config, self.model, self.optimizer, self.history,
                             self.best_epoch, self.device)
            reporter.written(*self.folder.save(state, self.best_state, self.fork_points))
            reporter.epoch(dict(row), self.folder.checkpoint)
        return list(self.history)

    @property
    def best_epoch(self) -> int:
        return best_last(self.history)["best_epoch"]

    def train_epoch(self, epoch: int, reporter: Reporter) -> dict[str, float]:
        """One pass over the shuffled, augmented training set; running train metrics (A.8)."""
        cfg, opt = self.config, self.optimizer
        start = time.perf_counter()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        first_bad = torch.full((), -1, device=self.device)
        for i, batches, lr, x, y in self.epoch_batches(cfg, epoch):
            for group in opt.param_groups:
                if not group.get("fixed_lr"):
                    group["lr"] = lr
            try:
                loss, logits_adv, logits_nat = self.train_step(epoch, x, y)
            except torch.cuda.OutOfMemoryError as err:
                raise OutOfMemory(
                    f"trial {cfg.key}: out of GPU memory in a training step ({cfg.model}, batch "
                    f"{cfg.batch_size}, {cfg.precision}): {oom_line(err)}; lower batch_size, or "
                    "give each trial more of a GPU (--gpus-per-trial)") from None
            # The first batch whose loss is not finite, kept on the device: reading it every
            # batch would stall a GPU on a host sync; it is read every DIVERGENCE_CHECK batches.
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(bad & (first_bad < 0), i, first_bad)
            if (i + 1) % DIVERGENCE_CHECK == 0 or i + 1 == batches:
                self._stop_if_diverged(first_bad, epoch, batches)
            sums += torch.cat([self.sums(logits_adv, y), self.sums(logits_nat, y)], 1)[0]
            reporter.progress(epoch, i, batches)
        self._sync()
        robust_loss, robust_acc, clean_loss, clean_acc = (sums / len(self.data.train_y)).tolist()
        return {"epoch": epoch, "lr": lr, "lr_fixed": self._fixed_lr(),
                "train_loss": clean_loss, "train_acc": clean_acc,
                "train_robust_loss": robust_loss, "train_robust_acc": robust_acc,
                "train_seconds": time.perf_counter() - start}

    def _fixed_lr(self) -> float:
        """The learning rate of fix-lr's groups (NaN without them)."""
        fixed = [g["lr"] for g in self.optimizer.param_groups if g.get("fixed_lr")]
        return fixed[0] if fixed else math.nan

    def _stop_if_diverged(self, first_bad: Tensor, epoch: int, batches: int) -> None:
        batch = int(first_bad)  # the one host sync of the check
        if batch >= 0:
            lr = learning_rate(self.config, schedule_time(self.config, epoch, batch, batches))
            raise TrainingDiverged(f"trial {self.config.key}: the training loss stopped being "
                                   f"finite at epoch {epoch}, batch {batch} (lr {lr:g}); lower "
                                   "lr_max or check the data, then train it from scratch")

    def train_step(self, epoch: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attack, update and log one batch (B §3.2); returns (loss, logits on x_adv, logits on x).

        The optimizer's learning rates must already be set for this batch.
        """
        model, opt = self.model, self.optimizer
        # Three autocast regions, not one: autocast caches each weight's low-precision copy for
        # the life of a region, so AWP's in-place perturbation would be invisible to a training
        # forward in the attack's region (C.6).
        with self.autocast(), self._input_gradients_only():
            x_adv = self.method.attack(model, x, y)
        model.train()
        with self.autocast():
            self.intervention.before_step(epoch, self.method, x, x_adv, y)
        with self.autocast():
            loss, logits_adv = self.method.loss(model, x, x_adv, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.intervention.after_step()
        # Clean running metrics from a forward after the step. Rice's loop (and the fix-lr and
        # fix-param code) runs it in train mode, so BN's running statistics see the clean batch
        # too; the layer-wise AWP and TRADES code has no such pass, which eval mode reproduces
        # (B §3.2 step 5, C.2).
        model.train(self.config.log_pass_mode == "train")
        with torch.no_grad(), self.autocast():
            logits_nat = model(x)
        return loss.detach(), logits_adv, logits_nat

    def eval_epoch(self) -> dict[str, float]:
        """Eval-mode metrics after an epoch (:meth:`Loop.eval_rows`)."""
        cfg = self.config
        return self.eval_rows(f"trial {cfg.key}", (cfg.train_steps, cfg.test_steps))[0]

    def attack_metrics(self, images: Tensor, labels: Tensor, steps: int) -> dict[str, float]:
        """Clean and PGD-``steps`` loss and accuracy of the model in eval mode."""
        sums = self.attack_sums(images, labels, steps, f"trial {self.config.key}")[0].tolist()
        return dict(zip(("loss", "acc", "robust_loss", "robust_acc"), sums))

    def release(self) -> None:
        """Free the trainer's device memory (model, optimizer, AWP's proxy) for what runs after
        training in the same process (AutoAttack); ``data`` stays for it."""
        for name in ("model", "optimizer", "intervention", "method", "train_eval"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
