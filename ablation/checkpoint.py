"""What a trial keeps on disk to resume: the state after each epoch, its best weights, the fork
files it writes for the trials that start from it, and the random states. The trainer builds and
applies the state; this module names the files, writes them atomically in a resumable order and
reads them back, refusing another trial's.

Trial folder files (:mod:`ablation.files` names them): ``checkpoint.pt`` (weights, momentum by
parameter name, random states, history), ``best-<epoch>.pt`` (the best epoch's weights, written
when the best epoch changes) and a baseline's ``fork-<epochs>.pt`` (self-contained: the state
after that many epochs with its best weights).
"""

from __future__ import annotations

import math
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import files
from .config import TrialConfig, from_dict
from .errors import ConfigError
from .fork import Fork, shared_epochs
from .io import atomic_path


def save_torch(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read(path: Path, key: str | None = None) -> dict[str, Any]:
    """A checkpoint file (of trial ``key``, when given), or one line saying it is not one."""
    try:
        state = load_torch(path)
    except Exception as err:  # a torn file cannot happen (atomic writes), a foreign one can
        raise ConfigError(f"{path}: not a readable ablate checkpoint ({type(err).__name__}); "
                          "move it away or use another output folder") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not an ablate checkpoint (a {type(state).__name__}); move "
                          "it away or use another output folder")
    if key is not None and state.get("key") != key:
        raise ConfigError(f"{path}: holds trial {str(state.get('key'))[:100]!r}, not {key!r}; "
                          "move it away or use another output folder")
    return state


def set_aside(path: Path, why: str) -> Path:
    """Rename a file the project cannot use to ``<name>.unusable`` (kept for a look, never
    read again) and say so in one line."""
    aside = path.with_name(path.name + ".unusable")
    path.replace(aside)
    warnings.warn(f"{path}: {why}; set aside as {aside.name}", stacklevel=2)
    return aside


def read_fork(path: Path, fork: Fork) -> dict[str, Any] | None:
    """The state in a fork file: trial ``fork.parent`` after ``fork.epochs`` epochs with its
    best weights. None when there is no such file, or when the file is unreadable or another
    trial's or epoch's: it is set aside and the trial trains from scratch, which computes the
    same as starting from a good fork file."""
    if not path.exists():
        return None
    try:
        state = read(path, fork.parent)
        if len(state["history"]) != fork.epochs or not isinstance(state["best_model"], dict):
            raise ConfigError(f"not the state after {fork.epochs} epochs")
    except (ConfigError, KeyError, TypeError) as err:
        reason = str(err).removeprefix(f"{path}: ").split(";")[0]
        set_aside(path, f"{reason}; training from scratch instead of forking")
        return None
    return state


# --- random states ------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch generator states and, on a GPU, the generator of the trial's own
    device (not every visible GPU's: a sweep's worker sees one, a login node eight), in types
    ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device, saved_on: str = "auto") -> None:
    """Restore what :func:`rng_state` saved. A CPU trial ignores a GPU's state (a GPU checkpoint
    resumes on the CPU with the CPU's own draws, which never came from that generator). Before
    0.3 the GPU part was a list, one state per GPU visible to the writer: the trial's device
    was the one its ``device`` field (``saved_on``) named."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):
        written = torch.device(saved_on) if saved_on.startswith("cuda") else torch.device("cuda")
        index = written.index or 0
        cuda = cuda[index] if index < len(cuda) else (cuda[0] if cuda else None)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


# --- a trainer's state --------------------------------------------------------------------------


def _optimizer_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's numbering (its groups' order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def state_of(config: TrialConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
             history: list[dict[str, Any]], best_epoch: int,
             device: torch.device) -> dict[str, Any]:
    """Everything a trial resumes from after its last epoch in ``history``."""
    return {
        "key": config.key,
        "config": config.to_dict(),
        "epoch": len(history) - 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # The optimizer numbers parameters in its groups' order; a fork, whose groups differ
        # (fix-lr splits them), finds its momentum buffers by name.
        "param_names": _optimizer_order(model, optimizer),
        "rng": rng_state(device),
        "best_epoch": best_epoch,
        "history": history,
    }


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> None:
    """Load a state's weights, momentum buffers and random states into a trial's model and
    optimizer. Buffers are matched by parameter name, so a fork whose optimizer groups differ
    from its parent's (fix-lr splits them) finds its own; the optimizer keeps its groups' own
    settings (learning rates are set before every step; fused/foreach are this device's). Each
    buffer takes its parameter's memory layout: a state written with another ``channels_last``
    (a runtime field) holds buffers with the other strides, which CUDA's fused SGD refuses."""
    model.load_state_dict(state["model"])
    written = state.get("param_names") or _optimizer_order(model, optimizer)  # before 0.2's forks
    buffers = {written[i]: s for i, s in state["optimizer"]["state"].items()}
    own = optimizer.state_dict()
    own["state"] = {i: buffers[n] for i, n in enumerate(_optimizer_order(model, optimizer))
                    if n in buffers}
    optimizer.load_state_dict(own)
    for group in optimizer.param_groups:
        for p in group["params"]:
            slots = optimizer.state.get(p, {})
            for name, value in slots.items():
                if torch.is_tensor(value) and value.shape == p.shape \
                        and value.stride() != p.stride():
                    slots[name] = torch.empty_like(p).copy_(value)
    set_rng_state(state["rng"], device, state["config"].get("device", "auto"))


# --- the trial folder ---------------------------------------------------------------------------


def fork_path(workdir: Path, fork: Fork) -> Path:
    """Where a trial in ``workdir`` finds its fork's parent checkpoint: in the parent's folder,
    beside its own (trial folders are siblings in a run folder)."""
    return workdir.parent / fork.parent / files.fork_checkpoint(fork.epochs)


def load_best(workdir: Path, state: dict[str, Any]) -> dict[str, Tensor]:
    """The best weights a checkpoint refers to, from their file beside it (a checkpoint of
    version 0.2.0 holds them itself); refuses another trial's or another epoch's."""
    if "best_model" in state:
        return state["best_model"]
    epoch = state["best_epoch"]
    path = Path(workdir) / files.best_checkpoint(epoch)
    if not path.exists():
        raise ConfigError(
            f"{path}: missing, and {files.CHECKPOINT} beside it refers to it: the best epoch's "
            f"weights are lost; the curve and the last weights ({files.CHECKPOINT}) are intact. "
            f"To train the trial again, move {files.CHECKPOINT} aside (keep it) and run the "
            "same command")
    best = read(path, state["key"])
    if best.get("epoch") != epoch or not isinstance(best.get("model"), dict):
        raise ConfigError(f"{path}: does not hold epoch {epoch}'s weights; move it away and "
                          f"{files.CHECKPOINT} with it (keep both) to train the trial again")
    return best["model"]


# A temporary file of an atomic write (io.atomic_path, remote uploads): ".<name>.<hex>.tmp".
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]+\.tmp$")


class TrialFolder:
    """The checkpoint files of one trial's folder, for the trainer that trains it."""

    def __init__(self, workdir: Path, config: TrialConfig):
        """The trial starts here: a temporary file that a kill left in its folder (up to a
        checkpoint's size) is never needed again, and goes."""
        self.workdir, self.config = workdir, config
        self.checkpoint = workdir / files.CHECKPOINT
        self.best_saved: int | None = None  # the epoch whose weights this folder's best file holds
        if workdir.is_dir():
            for path in workdir.iterdir():
                if TEMPORARY.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], best_weights: dict[str, Tensor] | None,
             fork_points: list[int]) -> tuple[list[Path], list[Path]]:
        """Write the epoch's files, each atomically, in an order that a kill between any two
        leaves resumable: a fork file (self-contained: it holds the best weights), the best
        weights when they changed (``best-<epoch>.pt``: a new name, so the checkpoint on disk
        still finds its own), the checkpoint naming them, then the older best file goes.
        Returns (written, removed)."""
        written, removed = [], []
        epochs, best = state["epoch"] + 1, state["best_epoch"]
        if epochs in fork_points:
            path = self.workdir / files.fork_checkpoint(epochs)
            save_torch({**state, "best_model": best_weights}, path)
            written.append(path)
        if best != self.best_saved:
            path = self.workdir / files.best_checkpoint(best)
            save_torch({"key": self.config.key, "epoch": best, "model": best_weights}, path)
            written.append(path)
        save_torch(state, self.checkpoint)
        written.append(self.checkpoint)
        if best != self.best_saved:
            if self.best_saved is not None:
                old = self.workdir / files.best_checkpoint(self.best_saved)
                old.unlink(missing_ok=True)
                removed.append(old)
            self.best_saved = best
        return written, removed

    def resume(self) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """The folder's checkpoint and the best weights it names (None without a checkpoint);
        refuses another trial's. A best file that a kill left behind is removed."""
        if not self.checkpoint.exists():
            return None
        state = read(self.checkpoint, self.config.key)
        best = load_best(self.workdir, state)
        self.best_saved = state.get("best_epoch")  # None in 0.2.0's, which held the weights
        for path in self.workdir.glob(files.best_checkpoint("*")):  # one a kill left behind
            if path.name != files.best_checkpoint(self.best_saved):
                path.unlink()
        return state, best

    def start_from_fork(self, fork: Fork, batches: int
                        ) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """The parent's state after ``fork.epochs`` epochs (None when its file is not there or
        not usable: :func:`read_fork`), when the two trials compute the same thing until then
        (else the file is set aside and None returned), checked again here with the
        loaded data's ``batches`` per epoch. The prefix's rows are the parent's, marked with its
        key; ``lr_fixed`` is filled in by the caller (the parent has none)."""
        path = fork_path(self.workdir, fork)
        state = read_fork(path, fork)
        if state is None:
            return None
        try:
            parent = from_dict(state["config"], source=str(path))
        except (ConfigError, KeyError, TypeError):
            parent = None
        if parent is None or shared_epochs(parent, self.config, batches) < fork.epochs:
            set_aside(path, f"not a state that {self.config.key} shares with {fork.parent}; "
                            "training from scratch instead of forking")
            return None
        state["history"] = [{**row, "lr_fixed": math.nan, "forked_from": fork.parent}
                            for row in state["history"]]
        return state, state["best_model"]
