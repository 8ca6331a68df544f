"""Shared test helpers: tiny CIFAR-10/100 and SVHN datasets written in the real on-disk formats,
tiny trials and sweeps, run folders written in process, and running ``ablate`` as the user does
and reading back what it wrote (curves, attempts.log)."""

from __future__ import annotations

import os
import pickle
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
import yaml

from ablation import files
from ablation.trainer import Reporter

# One torch thread in the test process, as in a sweep's workers and `ablate train`: on 2 cores
# shared with Ray workers and subprocesses, a second intra-op thread waits on a busy core and a
# 1-second tiny trial takes 10 (measured). Results never depend on it: a test that compares two
# trainings runs both in this process, or sets one thread where it compares with a worker.
torch.set_num_threads(1)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

FAKE_DATASETS = ("cifar10", "cifar100", "svhn")


class _Py2Str(bytes):
    """Bytes pickled as a Python 2 ``str``, as in the official CIFAR pickles."""


class _Py2Pickler(pickle._Pickler):
    # The official files were written by Python 2: their keys and names are py2 strings, which
    # load as bytes (b'data') with encoding='bytes' and as str ('data') with encoding='latin1'
    # (what torchvision uses). Python 3 cannot emit that opcode for bytes, so add it.
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: _Py2Str) -> None:
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2(obj: object) -> object:
    """Turn str keys and values (recursively through dicts and lists) into py2 strings."""
    if isinstance(obj, str):
        return _Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _dump_py2(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def _images(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # every class when n allows
    return x, y


def _write_cifar_batch(path: Path, x: np.ndarray, labels: dict[str, list[int]], tag: str) -> None:
    entry = {"batch_label": tag, "data": x.reshape(len(x), -1),  # row-major C, H, W per image
             "filenames": [f"img_{i:05d}.png" for i in range(len(x))]}
    entry.update(labels)
    _dump_py2(entry, path)


def write_fake_dataset(name: str, root: str | Path, n_train: int, n_test: int,
                       seed: int = 0) -> Arrays:
    """Write a tiny ``name`` (cifar10 / cifar100 / svhn) under ``root`` in the real format; return
    (train_x, train_y, test_x, test_y) as the loader should give them (N, C, H, W uint8, int64)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    num_classes = 100 if name == "cifar100" else 10
    train_x, train_y = _images(rng, n_train, num_classes)
    test_x, test_y = _images(rng, n_test, num_classes)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _write_cifar_batch(folder / f"data_batch_{i}", train_x[part],
                               {"labels": train_y[part].tolist()}, f"training batch {i} of 5")
        _write_cifar_batch(folder / "test_batch", test_x, {"labels": test_y.tolist()},
                           "testing batch 1 of 1")
        _dump_py2({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 10000,
                   "num_vis": 3072}, folder / "batches.meta")
    elif name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            _write_cifar_batch(folder / split, x, {"fine_labels": y.tolist(),
                                                   "coarse_labels": (y // 5).tolist()}, split)
        _dump_py2({"fine_label_names": [f"fine{i}" for i in range(100)],
                   "coarse_label_names": [f"coarse{i}" for i in range(20)]}, folder / "meta")
    elif name == "svhn":
        import scipy.io

        root.mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            # The .mat layout is X (H, W, C, N) and y (N, 1) with digit 0 stored as label 10.
            scipy.io.savemat(root / f"{split}_32x32.mat",
                             {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
                              "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
    else:
        raise ValueError(f"no fake writer for dataset {name!r}")
    return train_x, train_y, test_x, test_y


@pytest.fixture
def fake_dataset(tmp_path: Path) -> Callable[..., tuple[Path, Arrays]]:
    """Factory: ``fake_dataset(name, n_train=20, n_test=10, seed=0) -> (root, arrays)`` writes a
    tiny dataset under a fresh folder in tmp_path (usable as a trial's ``data_root``)."""

    def make(name: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> tuple[Path, Arrays]:
        root = tmp_path / f"data_{name}_{seed}"
        return root, write_fake_dataset(name, root, n_train, n_test, seed)

    return make


def cifar_shaped(n: int, seed: int = 0):
    """Random uint8 images of CIFAR-10's shape in memory (no files): ``n`` training images, the
    first quarter of them as the test set."""
    from ablation.data import Data
    from ablation.datasets import dataset_info

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return Data(dataset_info("cifar10"), x, y, x[: n // 4], y[: n // 4])


def tiny_trial(**overrides: object) -> dict:
    """A trial that trains in about a second on the CPU: synthetic data, a 4-wide PreAct ResNet."""
    return {"dataset": "synthetic", "model": "preact_small", "width": 4, "blocks": 1,
            "epochs": 4, "batch_size": 64, "test_batch_size": 128, "train_steps": 2,
            "test_steps": 3, "train_eval_size": 64, "device": "cpu", **overrides}


def run_sweep_in_process(sweep: dict, root: Path | str, *, stop_after: dict | None = None,
                         fork: bool = False, log: tuple[str, ...] = ()) -> Path:
    """Write a run folder as ``ablate run`` does, minus Ray: the real grid, store and worker
    (:func:`ablation.worker.run_trial`, its messages handed straight to the driver's
    :func:`ablation.worker.receive`), one trial after another. ``root`` may be a URI; the local
    mirror's path is returned.

    ``stop_after`` maps trial index -> epochs, leaving those trials unfinished (a partial run).
    ``fork``: trials start from their baseline's fork file as in ``ablate run`` (the baselines
    first, through :class:`ablation.fork.ForkQueue`); else each trains from its first epoch.
    ``log``: ``--log`` backends (:class:`ablation.loggers.Loggers`), caught up first and given
    each message after the store, as the driver does (a backend's failure: a warning).
    """
    import warnings

    import torch

    from ablation.fork import FINISHED, ForkQueue, fork_waits, plan_forks
    from ablation.grid import sweep_from_dict
    from ablation.loggers import Loggers
    from ablation.store import RunDir, trial_params
    from ablation.worker import receive, run_trial

    sweep = sweep_from_dict(sweep, source="test-sweep")
    run = RunDir.attach(root)
    run.write_manifest(sweep)
    configs = sweep.by_key
    waits = fork_waits(plan_forks(sweep.trials) if fork else {}, configs, run.have())
    params = trial_params(run, configs, threads=1, autoattack=sweep.autoattack, waits=waits)
    limits = {p["key"]: (stop_after or {})[i] for i, p in enumerate(params)
              if i in (stop_after or {})}
    queue = ForkQueue(params, waits.waiting, waits.ready)  # without forks: the sweep's order
    threads = torch.get_num_threads()
    with Loggers(run, sweep, log, warn=warnings.warn) as loggers:
        try:
            loggers.catch_up()
            while (trial := queue.next()) is not FINISHED:
                assert trial is not None, "a fork waits for a file no trial of this run writes"

                def send(message):
                    receive(run, configs, message)
                    loggers.received(message)
                    if "row" in message:
                        epochs = message["row"]["epoch"] + 1
                        queue.reported(message["trial"], epochs, message["forks"])
                        if epochs == limits.get(message["trial"]):
                            raise StopIteration  # out of the trainer, after the checkpoint

                try:
                    run_trial(trial, send)
                except StopIteration:
                    pass
                queue.ended(trial["key"])
        finally:
            torch.set_num_threads(threads)
    return run.root


def tiny_study(epochs: int = 2) -> dict:
    """The paper's design in miniature: fix_param, fix_lr, awp on all 15 subsets, AT, AWP. Two
    epochs give each curve a Best and a Last; the 256 test images are one evaluation batch."""
    base = tiny_trial(epochs=epochs, width=2, train_steps=1, test_steps=2, train_eval_size=32,
                      test_batch_size=256)  # a runtime field: the same numbers, faster
    return {"name": "tiny_study", "base": base,
            "grid": {"intervention": ["fix_param", "fix_lr", "awp"], "layers": "all"},
            "baselines": {"AT": {"intervention": "none"}, "AWP": {"intervention": "awp_full"}}}


@pytest.fixture(scope="session")
def study_run(tmp_path_factory) -> Path:
    """A finished 47-trial run folder of tiny_study (built once per test session)."""
    return run_sweep_in_process(tiny_study(), tmp_path_factory.mktemp("study") / "tiny_study")


@pytest.fixture(scope="session")
def seeds_run(tmp_path_factory) -> Path:
    """AT and fix_lr on [3, 4] with seeds 0, 1, 2; 2 epochs (a few seconds)."""
    base = tiny_trial(epochs=2, width=2, train_steps=1, test_steps=2, train_eval_size=32)
    sweep = {"name": "seeds", "base": base,
             "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]], "seed": [0, 1, 2]},
             "baselines": {"AT": {"intervention": "none"}}}
    return run_sweep_in_process(sweep, tmp_path_factory.mktemp("seeds") / "seeds")


def write_yaml(path: Path, data: object) -> Path:
    """``data`` as a YAML file at ``path`` (a trial or sweep file); returns ``path``."""
    path.write_text(yaml.safe_dump(data))
    return path


def small_sweep(name: str = "small", layers=((3, 4),), **base: object) -> dict:
    """AT and fix_lr on each of ``layers``: the smallest sweep with a baseline, a table row and a
    figure panel; 2-wide trials of 2 epochs unless ``base`` overrides tiny_trial's fields."""
    return {"name": name,
            "base": tiny_trial(**{"epochs": 2, "width": 2, "train_steps": 1, "test_steps": 2,
                                  **base}),
            "grid": {"intervention": ["fix_lr"], "layers": [list(ls) for ls in layers]},
            "baselines": {"AT": {"intervention": "none"}}}


def write_sweep(path: Path, epochs: int = 3, layers=((3, 4),), name: str = "tiny") -> Path:
    """small_sweep as a sweep file for ``ablate run`` (seed axis 0), with tiny_trial's 4-wide
    trials of ``epochs`` epochs; returns ``path``."""
    sweep = small_sweep(name, layers, **tiny_trial(epochs=epochs))
    sweep["grid"]["seed"] = [0]
    return write_yaml(path, sweep)


# --- running `ablate` as the user does, and reading what it wrote ------------------------------

TIMING = ["train_seconds", "eval_seconds"]  # wall-clock columns: never equal between two runs


def ablate(*args: object, timeout: float = 600,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``ablate ARGS`` in a fresh interpreter (``env`` added to this process's environment)."""
    return subprocess.run([sys.executable, "-m", "ablation", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def timed(*args: object, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """:func:`ablate` and the seconds it took."""
    start = time.monotonic()
    done = ablate(*args, **kwargs)
    return done, time.monotonic() - start


def stored_rows(curve: Path) -> int:
    """The rows of a curve file that a running writer replaces (0 before it exists): read in one
    go, since pyarrow opens a path more than once and could see parts of two files."""
    import io

    import pandas as pd

    try:
        return len(pd.read_parquet(io.BytesIO(Path(curve).read_bytes())))
    except FileNotFoundError:
        return 0


def one_error_line(done: subprocess.CompletedProcess, status: int) -> str:
    """The run ended with ``status`` and one error line, last, and no traceback: that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, done.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[-1]


def stored(run: Path):
    """Every curve row a run folder's store holds (``ablate run``'s Parquet files)."""
    import pandas as pd

    return pd.read_parquet(Path(run) / "curves")


def reference_curves(config, tmp_path: Path):
    """``config`` trained alone in this process, one thread as in a sweep's workers: its curve."""
    import pandas as pd

    from ablation.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pd.DataFrame(Trainer(config, tmp_path / "ref" / config.key).fit())
    finally:
        torch.set_num_threads(threads)


class Start(NamedTuple):
    """One start of a trial, as its attempts.log records it."""

    pid: int
    node: str  # the host name
    epoch: int  # the epoch it starts at
    forked_from: str | None  # the trial whose fork file it starts from
    device: str

    @property
    def forked(self) -> bool:
        return self.forked_from is not None


# "<date> <time> pid <pid> on <host> starts at epoch <e>[ from <key>'s checkpoint]..., device <d>"
_START = re.compile(r" pid (\d+) on (\S+) starts at epoch (\d+)(?: from (\S+)'s checkpoint)?"
                    r".*, device (\S+)$", re.M)


def starts(run: Path, key: str) -> list[Start]:
    """Each start of trial ``key`` in run folder ``run``, in order (none before its first)."""
    path = Path(run) / files.trial_file(key, files.ATTEMPTS)
    text = path.read_text() if path.exists() else ""
    return [Start(int(pid), node, int(epoch), parent or None, device)
            for pid, node, epoch, parent, device in _START.findall(text)]


class StopAfter(Reporter):
    """Stops a trainer as a kill right after an epoch's checkpoint reached the disk would: raises
    KeyboardInterrupt once ``epochs`` epochs are done."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def epoch(self, row, checkpoint):
        assert checkpoint.exists()
        if row["epoch"] + 1 == self.epochs:
            raise KeyboardInterrupt


def check_latex(text: str) -> None:
    """A written .tex table: every \\begin{X} closed by \\end{X} in nesting order; booktabs
    rules; labels pdflatex can write; _ and % escaped."""
    stack: list[str] = []
    for kind, env in re.findall(r"\\(begin|end)\{([^}]*)\}", text):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, f"\\end{{{env}}} out of order"
    assert not stack, f"unclosed: {stack}"
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{"):
        assert rule in text
    for label in re.findall(r"\\label\{([^}]*)\}", text):  # a name pdflatex can write to .aux
        assert re.fullmatch(r"tab:[a-z0-9:-]+", label), label
    body = re.sub(r"\\(begin|end)\{[^}]*\}", "", text)
    body = re.sub(r"(?<!\\)\$[^$]*\$", "", body)  # math ($_\infty$) may subscript
    assert not re.search(r"(?<!\\)_", body), "unescaped underscore"
    assert not re.search(r"(?<!\\)%", body), "unescaped percent"
