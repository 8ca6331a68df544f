"""Packed trials: K trials of a sweep that differ only in their intervention, trained as one
batched computation on one device, each computing what it computes alone (docs/method.md D.3).

With the same seed, such trials draw the same data order, augmentation and attack starts (no
intervention draws a random number), so one pack draws them once for all K. Their networks are
one :class:`ablation.pack.PackedNet`; what differs per trial is data derived from each trial's
intervention description (:mod:`ablation.strategies`): a learning rate per trial and parameter
(fix-lr's groups keep lr_max), a mask of the trials whose copy of a parameter updates at all
(fix-param's frozen groups get no update, no weight decay and no momentum), and AWP's proxy step,
norms and perturbation per trial on that trial's tensors only, with its own gamma and warm-up.
Everything a user sees stays per trial: each trial's checkpoint, best and fork files are the
files it would write alone, so a trial trained in a pack resumes alone and the other way round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import strategies
from .checkpoint import TrialFolder, rng_state, set_rng_state
from .config import TrialConfig
from .curves import best_last
from .data import Data
from .device import eval_batch_size, oom_line
from .errors import ConfigError, OutOfMemory, TrainingDiverged
from .fork import Fork, batches_per_epoch, same_base
from .layers import GROUPS
from .methods import build_method
from .models import group_names
from .pack import PackedNet
from .schedule import learning_rate, schedule_time
from .trainer import Loop, Reporter


def _per_trial(t: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor shaped to broadcast over a stacked tensor ``like`` of shape (K, ...)."""
    return t.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


class PackedSGD:
    """SGD with momentum and weight decay over stacked parameters, as ``torch.optim.SGD`` steps
    each trial's copy (B §3.1): d = g + wd * w; b = momentum * b + d (b = d at a copy's first
    step); w -= lr * b, with a learning rate per trial (``lr``, set before each step) and only
    for the copies that train the parameter (``trains``)."""

    def __init__(self, params: dict[str, Tensor], momentum: float, weight_decay: float,
                 trains: dict[str, Tensor]):
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.trains = trains  # name -> (K,) bool
        self.lr: dict[str, Tensor] = {}  # name -> (K,) learning rates
        self.buffers: dict[str, Tensor] = {}  # name -> (K, ...) momentum buffers
        self.started: dict[str, Tensor] = {}  # name -> (K,) bool: the copy has a buffer

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=self.weight_decay)
            trains = _per_trial(self.trains[name], p).bool()
            if name in self.buffers:
                started = _per_trial(self.started[name], p).bool()
                buf = torch.where(started, self.buffers[name].mul(self.momentum).add_(d), d)
            else:
                buf = d
            self.buffers[name] = torch.where(trains, buf, self.buffers.get(name, 0.0))
            self.started[name] = self.trains[name] | self.started.get(name, self.trains[name])
            p.copy_(torch.where(trains, p - _per_trial(self.lr[name], p) * self.buffers[name], p))

    def state(self, k: int, names: list[str]) -> tuple[dict[str, Any], list[str]]:
        """Trial ``k``'s part as a ``torch.optim.SGD`` state dict (the momentum buffers of the
        parameters it trains, in ``names``' order) and the names of its entries, which restore
        by name (:func:`ablation.checkpoint.restore`)."""
        kept = [n for n in names if n in self.buffers and bool(self.started[n][k])]
        return ({"state": {i: {"momentum_buffer": self.buffers[n][k].detach().clone()}
                           for i, n in enumerate(kept)},
                 "param_groups": [{"params": list(range(len(kept))), "momentum": self.momentum,
                                   "weight_decay": self.weight_decay}]}, kept)

    def load(self, k: int, state: dict[str, Any]) -> None:
        """Trial ``k``'s momentum buffers from a lone trial's (or a pack's) checkpoint."""
        names = state["param_names"]
        for i, slot in state["optimizer"]["state"].items():
            name = names[i]
            if name not in self.buffers:
                self.buffers[name] = torch.zeros_like(self.params[name])
                self.started[name] = torch.zeros(len(self.params[name]), dtype=torch.bool,
                                                  device=self.params[name].device)
            self.buffers[name][k] = slot["momentum_buffer"]
            self.started[name][k] = True


class PackedAWP:
    """AWP (B §4) for the trials of a pack that perturb weights: per trial, the proxy's ascent
    step, v = ||w|| / ||d|| * d per perturbed tensor, w += gamma * v before the training step and
    w -= gamma * v after it, on that trial's copies only, from its own warm-up epoch on."""

    def __init__(self, net: PackedNet, configs: Sequence[TrialConfig],
                 perturbed: dict[str, Tensor]):
        self.net, self.configs = net, list(configs)
        self.names = [n for n, mask in perturbed.items() if bool(mask.any())]
        self.perturbed = perturbed
        device = next(iter(net.params.values())).device
        self.gamma = torch.tensor([c.awp_gamma for c in configs], dtype=torch.float64,
                                  device=device)  # cast to the weights' dtype as a float is
        self.proxy_lr = strategies.method(configs[0].method).awp_proxy_lr
        self.template = PackedNet.template_of(net)  # the proxy's own mode
        self.epoch, self.active = -1, None
        self.v: dict[str, Tensor] = {}
        self.masks: dict[str, Tensor] = {}

    def before_step(self, epoch: int, method, x: Tensor, x_adv: Tensor, y: Tensor) -> None:
        if epoch != self.epoch:  # which trials perturb in this epoch (their warm-ups may differ)
            flags = [bool(strategies.intervention(c.intervention).perturbs)
                     and strategies.awp_active(c, epoch) for c in self.configs]
            self.epoch, self.any_active = epoch, any(flags)
            self.active = torch.tensor(flags, device=self.gamma.device)
        active = self.active
        if not self.names or not self.any_active:
            return
        net = self.net
        proxy = PackedNet(self.template,
                          {n: p.detach().clone().requires_grad_(n in self.names)
                           for n, p in net.params.items()},
                          {n: b.clone() for n, b in net.buffers.items()}).train()
        wanted = [proxy.params[n] for n in self.names]
        grads = torch.autograd.grad(-method.proxy_loss(proxy, x, x_adv, y), wanted)
        with torch.no_grad():
            for name, q, g in zip(self.names, wanted, grads):
                w = net.params[name]
                d = q.detach().add(g, alpha=-self.proxy_lr) - w  # the proxy's SGD step, then q - w
                scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-20)
                self.v[name] = d * _per_trial(scale, d)
                self.masks[name] = _per_trial(self.perturbed[name] & active, w).bool()
                gamma = _per_trial(self.gamma, w)
                w.copy_(torch.where(self.masks[name], w + self.v[name] * gamma, w))

    def after_step(self) -> None:
        with torch.no_grad():
            for name, v in self.v.items():
                w = self.net.params[name]
                gamma = _per_trial(self.gamma, w)
                w.copy_(torch.where(self.masks[name], w + v * -gamma, w))
        self.v.clear()


class _Slot:
    """One trial of a pack: its config, folder, history and files."""

    def __init__(self, config: TrialConfig, workdir: Path, fork_points: Sequence[int]):
        self.config = config
        self.folder = TrialFolder(workdir, config)
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, Tensor] | None = None
        self.fork_points = sorted(set(fork_points))
        self.forked_from: str | None = None

    @property
    def best_epoch(self) -> int:
        return best_last(self.history)["best_epoch"]


class PackTrainer(Loop):
    """K >= 2 trials that differ only in their intervention fields, at the same epoch, trained as
    one batched computation. ``fit`` returns each trial's history and the trials that failed
    (a loss that stopped being finite): they leave the pack, the others go on."""

    def __init__(self, configs: Sequence[TrialConfig], workdirs: Sequence[str | Path],
                 data: Data | None = None, forks: Sequence[Fork | None] | None = None,
                 fork_points: Sequence[Sequence[int]] | None = None):
        configs = list(configs)
        if len(configs) < 2 or any(not same_base(configs[0], c) for c in configs[1:]):
            raise ValueError("a pack holds two or more trials that differ only in their "
                             "intervention")  # the caller forms packs; a bug otherwise
        if any(not strategies.intervention(c.intervention).packed for c in configs):
            raise ValueError("a pack holds only interventions its fields describe (packed)")
        super().__init__(configs[0], data)
        self.k = len(configs)
        config = configs[0]
        model = self.build_model(config)  # the initial weights: the draws a lone trial makes
        self.eval_batch = config.test_batch_size or eval_batch_size(
            model, self.batch(self.data.test_x[:1])[0], self.device, copies=self.k)
        self.names = [n for n, _ in model.named_parameters()]
        self.slots = [_Slot(c, Path(w).resolve(), p) for c, w, p in
                      zip(configs, workdirs, fork_points or [()] * self.k)]
        self.method = build_method(config)
        groups = {n: g for g in GROUPS for n in group_names(model, [g])}
        keeps, trains, perturbed = {}, {}, {}
        for name, p in model.named_parameters():
            per_trial = []
            for c in configs:
                d = strategies.intervention(c.intervention)
                chosen = groups.get(name) in c.layers
                per_trial.append((d.keeps_lr_max and chosen, not (d.frozen and chosen),
                                  p.dim() > 1 and (d.perturbs == "all"
                                                   or (d.perturbs == "groups" and chosen))))
            keeps[name], trains[name], perturbed[name] = (
                torch.tensor(v, device=self.device) for v in zip(*per_trial))
        self.keeps = {n: tuple(t.tolist()) for n, t in keeps.items()}  # by pattern, on the host
        self.model = PackedNet.stack([model] * self.k)
        if config.compile:
            raise ConfigError("compile: true runs one trial at a time for now; train this "
                              "sweep with --pack 1")
        self.optimizer = PackedSGD(self.model.params, config.momentum, config.weight_decay,
                                   trains)
        self.awp = PackedAWP(self.model, configs, perturbed)
        batches = batches_per_epoch(config, len(self.data.train_y))
        for k, (slot, fork) in enumerate(zip(self.slots, forks or [None] * self.k)):
            loaded = slot.folder.resume()
            if loaded is None and fork is not None:
                loaded = slot.folder.start_from_fork(fork, batches)
                if loaded is not None:
                    slot.forked_from = fork.parent
                    for row in loaded[0]["history"]:
                        row["lr_fixed"] = self._fixed_lr(k)
            if loaded is not None:
                state, slot.best_state = loaded
                self.model.load_state_dict(k, state["model"])
                self.optimizer.load(k, state)
                set_rng_state(state["rng"], self.device, state["config"].get("device", "auto"))
                slot.history = state["history"]
        if len({len(s.history) for s in self.slots}) != 1:
            raise ValueError("the trials of a pack start at one epoch")  # the caller's bug
        self.finished_at_start = [len(s.history) >= s.config.epochs for s in self.slots]

    @property
    def configs(self) -> list[TrialConfig]:
        return [s.config for s in self.slots]

    def _fixed_lr(self, k: int) -> float:
        config = self.slots[k].config
        return config.lr_max if strategies.intervention(config.intervention).keeps_lr_max \
            else math.nan

    def fit(self, reporters: Sequence[Reporter] | None = None
            ) -> tuple[dict[str, list[dict[str, float]]], dict[str, TrainingDiverged]]:
        """Train the remaining epochs of every trial; returns each trial's whole history and
        the trials that stopped (by key)."""
        reporters = list(reporters or [Reporter() for _ in self.slots])
        by_key = {s.config.key: r for s, r in zip(self.slots, reporters)}
        histories = {s.config.key: s.history for s in self.slots}
        failed: dict[str, TrainingDiverged] = {}
        for slot in self.slots:
            by_key[slot.config.key].start(slot.config, list(slot.history))
        config = self.slots[0].config
        for epoch in range(len(self.slots[0].history), config.epochs):
            rows, bad = self.train_epoch(epoch, [by_key[s.config.key] for s in self.slots])
            for k in sorted(bad, reverse=True):  # they stop as they would alone: nothing saved
                failed[self.slots[k].config.key] = bad[k]
                self._drop(k)
                del rows[k]
            if not self.slots:
                break
            evals = self.eval_rows(f"pack of {self.k} ({self.slots[0].config.key}, ...)",
                                   (config.train_steps, config.test_steps))
            rng = rng_state(self.device)
            for k, (slot, row, ev) in enumerate(zip(self.slots, rows, evals)):
                row.update(ev)
                slot.history.append(row)
                weights = self.model.state_dict(k)
                if slot.best_epoch == epoch:
                    slot.best_state = {n: v.to("cpu", copy=True) for n, v in weights.items()}
                optimizer, names = self.optimizer.state(k, self.names)
                state = {"key": slot.config.key, "config": slot.config.to_dict(),
                         "epoch": epoch, "model": weights, "optimizer": optimizer,
                         "param_names": names, "rng": rng, "best_epoch": slot.best_epoch,
                         "history": slot.history}
                reporter = by_key[slot.config.key]
                reporter.written(*slot.folder.save(state, slot.best_state, slot.fork_points))
                reporter.epoch(dict(row), slot.folder.checkpoint)
        return histories, failed

    def _drop(self, k: int) -> None:
        """Take trial ``k`` out of the pack (its last checkpoint stays as it was)."""
        keep = [i for i in range(self.k) if i != k]
        index = torch.tensor(keep, device=self.device)
        net = self.model
        params = {n: p.detach()[index].clone().requires_grad_(True) for n, p in net.params.items()}
        buffers = {n: b[index].clone() for n, b in net.buffers.items()}
        self.model = PackedNet(net.template, params, buffers)
        opt = self.optimizer
        self.optimizer = PackedSGD(self.model.params, opt.momentum, opt.weight_decay,
                                   {n: t[index] for n, t in opt.trains.items()})
        self.optimizer.buffers = {n: b[index].clone() for n, b in opt.buffers.items()}
        self.optimizer.started = {n: s[index] for n, s in opt.started.items()}
        self.keeps = {n: tuple(t[i] for i in keep) for n, t in self.keeps.items()}
        awp = self.awp
        self.awp = PackedAWP(self.model, [awp.configs[i] for i in keep],
                             {n: t[index] for n, t in awp.perturbed.items()})
        del self.slots[k]
        self.k -= 1

    def train_epoch(self, epoch: int, reporters: Sequence[Reporter]
                    ) -> tuple[list[dict[str, float]], dict[int, TrainingDiverged]]:
        """One pass over the shuffled, augmented training set for every trial; per trial the
        running train metrics (A.8), and the trials whose loss stopped being finite."""
        cfg = self.slots[0].config
        start = time.perf_counter()
        sums = torch.zeros(self.k, 4, device=self.device, dtype=torch.float64)
        first_bad = torch.full((self.k,), -1, device=self.device)
        for i, batches, lr, x, y in self.epoch_batches(cfg, epoch):
            lrs = {keeps: torch.tensor([cfg.lr_max if kept else lr for kept in keeps],
                                       dtype=torch.float64, device=self.device)
                   for keeps in set(self.keeps.values())}  # a few patterns: per group
            self.optimizer.lr = {name: lrs[keeps] for name, keeps in self.keeps.items()}
            try:
                bad, logits_adv, logits_nat = self.train_step(epoch, x, y)
            except torch.cuda.OutOfMemoryError as err:
                raise OutOfMemory(
                    f"a pack of {self.k} trials ({cfg.key}, ...): out of GPU memory in a "
                    f"training step ({cfg.model}, batch {cfg.batch_size}, {cfg.precision}): "
                    f"{oom_line(err)}; lower --pack or batch_size") from None
            # A trial whose loss stops being finite goes on to the end of the epoch: its NaNs stay
            # in its own copy (each trial's gradient is its own mean's), and it leaves the pack
            # then with the message it would stop with alone.
            first_bad = torch.where(bad & (first_bad < 0), i, first_bad)
            sums += torch.cat([self.sums(logits_adv, y), self.sums(logits_nat, y)], 1)
            for reporter in reporters:
                reporter.progress(epoch, i, batches)
        self._sync()
        stopped = {}
        for k, batch in enumerate(first_bad.tolist()):
            if batch >= 0:
                key = self.slots[k].config.key
                at = learning_rate(cfg, schedule_time(cfg, epoch, batch, batches))
                stopped[k] = TrainingDiverged(
                    f"trial {key}: the training loss stopped being finite at epoch {epoch}, "
                    f"batch {batch} (lr {at:g}); lower lr_max or check the data, then train it "
                    "from scratch")
        seconds = time.perf_counter() - start
        rows = []
        for k, (robust_loss, robust_acc, clean_loss, clean_acc) in enumerate(
                (sums / len(self.data.train_y)).tolist()):
            rows.append({"epoch": epoch, "lr": lr, "lr_fixed": self._fixed_lr(k),
                         "train_loss": clean_loss, "train_acc": clean_acc,
                         "train_robust_loss": robust_loss, "train_robust_acc": robust_acc,
                         "train_seconds": seconds})
        return rows, stopped

    def train_step(self, epoch: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attack, update and log one batch for every trial (B §3.2), as Trainer.train_step
        does for one; returns (per-trial flags of a loss that is not finite, logits on x_adv,
        logits on x), the logits of all trials concatenated."""
        start = self.method.draw_start(x)  # the one draw a lone trial's attack makes
        x, y, start = self.expand(x), self.expand(y), self.expand(start)
        model, opt = self.model, self.optimizer
        with self.autocast(), self._input_gradients_only():
            x_adv = self.method.attack(model, x, y, start)
        model.train()
        with self.autocast():
            self.awp.before_step(epoch, self.method, x, x_adv, y)
        with self.autocast():
            loss, logits_adv = self.method.loss(model, x, x_adv, y)
        opt.zero_grad()
        loss.backward()
        finite = torch.ones(self.k, dtype=torch.bool, device=self.device)
        for p in model.parameters():
            if p.grad is not None:
                finite &= torch.isfinite(p.grad.flatten(1)).all(1)
        opt.step()
        self.awp.after_step()
        model.train(self.slots[0].config.log_pass_mode == "train")
        with torch.no_grad(), self.autocast():
            logits_nat = model(x)
        losses = torch.nn.functional.cross_entropy(
            logits_adv.detach().float(), y, reduction="none").view(self.k, -1).mean(1)
        return ~(finite & torch.isfinite(losses)), logits_adv, logits_nat

    def release(self) -> None:
        """Free the pack's device memory for what runs after training (AutoAttack)."""
        for name in ("model", "optimizer", "awp", "method", "train_eval"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
