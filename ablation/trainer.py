"""The one trainer every trial runs: adversarial training with a layer-wise intervention.

``Trainer(config, workdir).fit(reporter)`` trains epoch by epoch, evaluates, checkpoints atomically
into ``workdir`` and reports each epoch to the reporter. It knows nothing of Ray: the sweep layer
passes a reporter of its own. A trainer built on a folder that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import files
from .attacks import ThreatModel, pgd, random_start
from .config import TrialConfig
from .curves import best_last
from .data import Data, DatasetInfo, augment, load_data
from .errors import ConfigError, TrainingDiverged
from .interventions import build_intervention
from .io import load_torch, save_torch
from .methods import build_method
from .models import build_model

CHECKPOINT_FORMAT = 1
DIVERGENCE_CHECK = 50  # batches between reads of the on-device divergence flag


class Reporter:
    """Receives a trial's progress. Subclass and override what you need; all methods are no-ops."""

    def start(self, config: TrialConfig, history: list[dict[str, float]]) -> None:
        """Called once before training, with the epochs already done (resumed from a checkpoint)."""

    def progress(self, epoch: int, batch: int, batches: int) -> None:
        """Called after each training batch."""

    def epoch(self, row: dict[str, float], checkpoint: Path) -> None:
        """Called after each epoch, once its checkpoint is on disk."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device': {name!r} asked for, but CUDA is not available here")
    return device


def learning_rate(config: TrialConfig, t: float) -> float:
    """Piecewise schedule at fractional epoch t: lr_max, x0.1 at each milestone (B §3.1)."""
    drops = sum(t >= m * config.epochs for m in config.milestones)
    return config.lr_max * 0.1**drops


def schedule_time(config: TrialConfig, epoch: int, batch: int, batches: int) -> float:
    """When batch i of epoch e is trained: e + (i+1)/N per iteration (Rice), e + 1 per epoch."""
    if config.lr_update == "iteration":
        return epoch + (batch + 1) / batches
    return epoch + 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_trial_model(config: TrialConfig, info: DatasetInfo) -> torch.nn.Module:
    """The trial's network for a dataset, normalising inside its forward unless the method's
    authors feed raw pixels (TRADES, B §1.2)."""
    return build_model(
        config.model, num_classes=info.num_classes, in_channels=info.in_channels,
        mean=info.mean if config.normalize else None, std=info.std if config.normalize else None,
        width=config.width, blocks=config.blocks)


class Trainer:
    """One trial: data and model on the device, the method, the intervention and the optimizer."""

    def __init__(self, config: TrialConfig, workdir: str | Path, data: Data | None = None):
        """``data`` replaces the config's dataset (the benchmark's random CIFAR-sized images)."""
        self.config = config
        self.workdir = Path(workdir).resolve()  # Ray may change the working directory
        self.checkpoint_path = self.workdir / files.CHECKPOINT
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        if data is None:
            data = load_data(config.dataset, config.data_root, config.download)
        self.data = data.to(self.device)
        self.model = build_trial_model(config, self.data.info).to(self.device)
        self.memory_format = (torch.channels_last if config.channels_last
                              else torch.contiguous_format)
        self.model.to(memory_format=self.memory_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        self.method = build_method(config)
        self.intervention = build_intervention(self.model, config)
        self.optimizer = torch.optim.SGD(self.intervention.param_groups(), lr=config.lr_max,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.eval_threat = ThreatModel(config.threat, config.eps, config.step)
        # A fixed subset of the (unaugmented) training set, attacked in eval mode each epoch (A.8).
        n_train = len(self.data.train_y)
        chooser = torch.Generator().manual_seed(config.seed)
        index = torch.randperm(n_train, generator=chooser)[:min(config.train_eval_size, n_train)]
        self.train_eval = (self.data.train_x[index.to(self.device)],
                           self.data.train_y[index.to(self.device)])
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, Tensor] | None = None
        if self.checkpoint_path.exists():
            self._load_checkpoint()
        self.finished_at_start = self.finished  # its weights are those of any summary on disk

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.config.epochs

    def fit(self, reporter: Reporter | None = None) -> list[dict[str, float]]:
        """Train the remaining epochs; returns the whole per-epoch history."""
        reporter = reporter or Reporter()
        reporter.start(self.config, list(self.history))
        for epoch in range(self.epochs_done, self.config.epochs):
            row = self.train_epoch(epoch, reporter)
            row.update(self.eval_epoch())
            self.history.append(row)
            if best_last(self.history)["best_epoch"] == epoch:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.state_dict().items()}
            self._save_checkpoint()
            reporter.epoch(dict(row), self.checkpoint_path)
        return list(self.history)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.precision == "bf16")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, x: Tensor) -> Tensor:
        return x.float().div_(255).contiguous(memory_format=self.memory_format)

    def train_epoch(self, epoch: int, reporter: Reporter) -> dict[str, float]:
        """One pass over the shuffled, augmented training set; running train metrics (A.8)."""
        cfg, opt = self.config, self.optimizer
        start = time.perf_counter()
        n = len(self.data.train_y)
        batches = math.ceil(n / cfg.batch_size)  # no drop_last: the last batch is smaller (B §1.1)
        order = torch.randperm(n, device=self.device)
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        first_bad = torch.full((), -1, device=self.device)
        for i in range(batches):
            lr = learning_rate(cfg, schedule_time(cfg, epoch, i, batches))
            for group in opt.param_groups:
                if not group.get("fixed_lr"):
                    group["lr"] = lr
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x = augment(self._batch(self.data.train_x[idx]), cfg.dataset)
            y = self.data.train_y[idx]
            loss, logits_adv, logits_nat = self.train_step(epoch, x, y)
            # The first batch whose loss is not finite, kept on the device: reading it every
            # batch would stall a GPU on a host sync; it is read every DIVERGENCE_CHECK batches.
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(bad & (first_bad < 0), i, first_bad)
            if (i + 1) % DIVERGENCE_CHECK == 0 or i + 1 == batches:
                self._stop_if_diverged(first_bad, epoch, batches)
            sums += torch.stack([
                F.cross_entropy(logits_adv.detach().float(), y, reduction="sum"),
                (logits_adv.argmax(1) == y).sum(),
                F.cross_entropy(logits_nat.float(), y, reduction="sum"),
                (logits_nat.argmax(1) == y).sum()]).double()
            reporter.progress(epoch, i, batches)
        self._sync()
        robust_loss, robust_acc, clean_loss, clean_acc = (sums / n).tolist()
        fixed = [g["lr"] for g in opt.param_groups if g.get("fixed_lr")]
        return {"epoch": epoch, "lr": lr, "lr_fixed": fixed[0] if fixed else math.nan,
                "train_loss": clean_loss, "train_acc": clean_acc,
                "train_robust_loss": robust_loss, "train_robust_acc": robust_acc,
                "train_seconds": time.perf_counter() - start}

    def _stop_if_diverged(self, first_bad: Tensor, epoch: int, batches: int) -> None:
        batch = int(first_bad)  # the one host sync of the check
        if batch >= 0:
            lr = learning_rate(self.config, schedule_time(self.config, epoch, batch, batches))
            raise TrainingDiverged(f"trial {self.config.key}: the training loss stopped being "
                                   f"finite at epoch {epoch}, batch {batch} (lr {lr:g})")

    def train_step(self, epoch: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attack, update and log one batch (B §3.2); returns (loss, logits on x_adv, logits on x).

        The optimizer's learning rates must already be set for this batch.
        """
        model, opt = self.model, self.optimizer
        # Three autocast regions, not one: autocast caches each weight's low-precision copy for
        # the life of a region, so AWP's in-place perturbation would be invisible to a training
        # forward in the attack's region (C.6).
        with self._autocast():
            x_adv = self.method.attack(model, x, y)
        model.train()
        with self._autocast():
            self.intervention.before_step(epoch, self.method, x, x_adv, y)
        with self._autocast():
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
        with torch.no_grad(), self._autocast():
            logits_nat = model(x)
        return loss.detach(), logits_adv, logits_nat

    def eval_epoch(self) -> dict[str, float]:
        """Eval-mode metrics after an epoch: PGD on the fixed train subset, clean and PGD on the
        test set (A.8). AutoAttack, on the final weights only, is ``evaluate.py``'s."""
        start = time.perf_counter()
        cfg = self.config
        out = {}
        if len(self.train_eval[1]):
            train = self.attack_metrics(*self.train_eval, cfg.train_steps)
            out.update({f"train_eval_{k}": v for k, v in train.items()})
        else:
            out.update({f"train_eval_{k}": math.nan
                        for k in ("loss", "acc", "robust_loss", "robust_acc")})
        test = self.attack_metrics(self.data.test_x, self.data.test_y, cfg.test_steps)
        out.update({f"test_{k}": v for k, v in test.items()})
        self._sync()
        out["eval_seconds"] = time.perf_counter() - start
        return out

    def attack_metrics(self, images: Tensor, labels: Tensor, steps: int) -> dict[str, float]:
        """Clean and PGD-``steps`` loss and accuracy of the model in eval mode.

        The random starts of all images are drawn at once, so each image's attack (independent
        of its batch-mates in eval mode) is the same whatever ``test_batch_size`` groups it with.
        """
        self.model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)
        bs = self.config.test_batch_size
        images = self._batch(images)
        starts = random_start(images, self.eval_threat)
        for i in range(0, len(labels), bs):
            x, y = images[i:i + bs], labels[i:i + bs]
            with self._autocast():
                x_adv = pgd(self.model, x, y, self.eval_threat, steps, delta=starts[i:i + bs])
                with torch.no_grad():
                    logits_nat, logits_adv = self.model(x).float(), self.model(x_adv).float()
            sums += torch.stack([
                F.cross_entropy(logits_nat, y, reduction="sum"), (logits_nat.argmax(1) == y).sum(),
                F.cross_entropy(logits_adv, y, reduction="sum"), (logits_adv.argmax(1) == y).sum(),
            ]).double()
        loss, acc, robust_loss, robust_acc = (sums / len(labels)).tolist()
        return {"loss": loss, "acc": acc, "robust_loss": robust_loss, "robust_acc": robust_acc}

    def _save_checkpoint(self) -> None:
        save_torch({
            "format": CHECKPOINT_FORMAT,
            "key": self.config.key,
            "config": self.config.to_dict(),
            "epoch": self.epochs_done - 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "intervention": self.intervention.state_dict(),
            "rng": rng_state(),
            "best_model": self.best_state,
            "history": self.history,
        }, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        try:
            state = load_torch(self.checkpoint_path)
        except Exception as err:  # a torn file cannot happen (atomic writes), a foreign one can
            raise ConfigError(f"{self.checkpoint_path}: not a readable ablate checkpoint "
                              f"({type(err).__name__}); move it away or use another output "
                              "folder") from None
        if state.get("key") != self.config.key:
            raise ConfigError(f"{self.checkpoint_path}: holds trial {state.get('key')!r}, not "
                              f"{self.config.key!r}; use another output folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.intervention.load_state_dict(state["intervention"])
        set_rng_state(state["rng"])
        self.best_state = state["best_model"]
        self.history = state["history"]
