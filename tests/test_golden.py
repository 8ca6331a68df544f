"""Golden curves: reference numbers that hold on any x86-64 CPU and fail on a one-line change.

What is checked, in float64 (``precision: fp64``), on the CPU with one thread, against
``tests/golden/*.csv``:

* Default run (``golden_set.csv``, about 20 s on one core): ``GOLDEN_SET`` below, five short
  trials on scikit-learn's digits with an 8-wide PreAct ResNet. Together they reach PGD-Linf
  training and evaluation, the schedule's x0.1 drops inside the run (per iteration for AT: on
  the last batch of epoch 0 and in mid-epoch 1; per epoch for TRADES), fix-lr's kept LR,
  fix-param, layer-wise AWP from the first batch, TRADES-Linf with layer-wise AWP switched on
  by its 1-based warm-up in epoch 1, and TRADES-L2 (inner step, renorm) with full AWP and PGD-L2
  evaluation. A row is one epoch of the trainer's curve plus a fingerprint of the weights: per
  layer group, the dot product of the float64 parameters with a fixed random direction
  (``w_other``: stem, final BN, classifier), and the same over BN's running statistics
  (``bn_stats``), so that a changed weight shows even where no metric moves.
* ``-m slow``: the 8-epoch trial sweeps/trials/digits_tiny.yaml (``digits_tiny.csv``) and every
  curve of the demo sweep sweeps/demo_digits.yaml, run in-process (``demo_digits.csv``), both
  with the precision overridden to fp64 here (the shipped YAML files stay fp32); and one test
  per entry of ``MUTATIONS``, a one-line change to the attack, the schedule or an intervention
  (recompiled and monkeypatched in; no file is edited), which must move the golden set past its
  tolerance at least 100 times over.

An fp64 trial draws its initial weights in float64 (the trainer builds its model with float64 as
torch's default dtype): a float32 draw differs by one float32 ulp between ATen's scalar kernels
and its AVX2/AVX-512 ones (FMA contraction), and two epochs of training turn that into percents.
Drawn in float64, the difference is 1e-16 and stays small.

Tolerance: a value passes when ``|got - want| <= ATOL + RTOL * |want|``, with ``RTOL`` = 1e-8
for every numeric column (an fp64 trial computes and sums its losses in float64 too) and
``ATOL`` = 1e-12. Strings, column names and NaN positions must be equal. The largest relative
difference between any two CPU kernel paths, measured on an Intel Xeon with AVX-512 (torch
2.14.1, MKL 2024.2) with ``python tests/test_golden.py --measure`` (golden set; 11 processes:
ATEN_CPU_CAPABILITY default, avx2, avx512 crossed with MKL_ENABLE_INSTRUCTIONS SSE4_2, AVX2 and
the native AVX-512, plus MKL_CBWR=COMPATIBLE and 2 threads) and ``--measure --slow`` (the
8-epoch files; 5 of those processes: default/SSE4_2, avx2/AVX2, avx512/native, MKL_CBWR,
2 threads):

    columns                      golden set   digits_tiny   demo sweep   tolerance   margin
    losses (*_loss)                3.8e-12       2.9e-14       3.1e-14      1e-8      2600x
    weights (w_*, bn_stats)        5.4e-11       7.6e-14        -           1e-8      185x
    accuracies, lr, lr_fixed       0             0             0            1e-8

The golden set's largest weight difference comes from its 4-batch TRADES-L2 trial (an L2 step
g/||g|| amplifies rounding, about x2 per batch here); its other trials stay below 3e-13. A
one-line mutation moves the golden set by 0.2 to 24 relative, 2e7 to 2e9 times the tolerance
(``python tests/test_golden.py --mutations``). docs/method.md C.8 has the details.

Equalities between two runs on one machine stay exact (tests/test_trainer.py, test_fork.py,
test_tune.py). A refactor that must not change any number compares exact curves on one machine
before and after, in fp32 and fp64 (``--slow``: the 8-epoch files too, several minutes):

    python tests/test_golden.py --snapshot /tmp/before [--slow]   # on the old code
    python tests/test_golden.py --compare /tmp/before             # on the new code: lists the
                                                                  # columns that differ at all
                                                                  # and exits 1 if any does
A deliberate change of what the trainer computes regenerates the golden files in the same
commit (``python tests/test_golden.py`` or ``--regenerate``; ``--fast``: the golden set only),
and the README says which stored runs it affects.
"""

from __future__ import annotations

import __future__
import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "golden"
TIMING = ["train_seconds", "eval_seconds"]
THREADS = 1  # the thread count of a sweep's trial and of `ablate train`

# The relative tolerance of every numeric column (see the module docstring).
RTOL = 1e-8
ATOL = 1e-12  # for values near zero (a weight fingerprint that happens to cancel)


# The golden set: short trials that each reach the code a one-line bug could break. Digits
# has 1437 training images: 23 batches of 64, so AT's per-iteration schedule puts batch i of
# epoch e at e + (i+1)/23 and drops x0.1 at 1.0 (the last batch of epoch 0) and at 1.5.
BASE = {"dataset": "digits", "model": "preact_small", "width": 8, "blocks": 1, "threat": "linf",
        "eps": 0.1, "step": 0.025, "train_steps": 3, "test_steps": 5, "epochs": 2,
        "batch_size": 64, "train_eval_size": 128, "device": "cpu"}
GOLDEN_SET: dict[str, dict] = {
    # PGD-Linf AT; groups 3 and 4 keep lr_max 0.1 (lr_fixed) while the rest drops
    "at_fix_lr": {"method": "at", "intervention": "fix_lr", "layers": [3, 4]},
    # groups 1 and 2 frozen at their initial values (w_layer1, w_layer2 constant)
    "at_fix_param": {"method": "at", "intervention": "fix_param", "layers": [1, 2]},
    # layer-wise AWP on groups 3 and 4, on from the first batch (AT warm-up 0, gamma 0.01)
    "at_awp": {"method": "at", "intervention": "awp", "layers": [3, 4]},
    # TRADES Linf (beta 6) with AWP on groups 1 and 2 from the authors' epoch 2, i.e. the
    # 0-based epoch 1 (gamma 0.005, proxy lr 0.1); per-epoch LR: 0.1, then 0.01
    "trades_linf_awp": {"method": "trades", "intervention": "awp", "layers": [1, 2],
                        "awp_warmup": 2, "milestones": [0.75]},
    # TRADES L2 (eps 128/255, inner step 2*eps/3) with full AWP from the first batch, and PGD-L2
    # evaluation; only 4 batches: an L2 step g/||g|| amplifies rounding (the KL gradient starts
    # near zero), so that 46 batches of it end percents apart across kernel paths (C.8)
    "trades_l2_awp_full": {"method": "trades", "threat": "l2", "eps": None, "step": None,
                           "intervention": "awp_full", "awp_warmup": 1, "batch_size": 1024,
                           "milestones": [0.75]},
}
FINGERPRINTS = ["w_other", "w_layer1", "w_layer2", "w_layer3", "w_layer4", "bn_stats"]


# ---------------------------------------------------------------------------------------------
# Computing curves


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fingerprint(model) -> dict[str, float]:
    """Per layer group, the dot product of the float64 parameters with a fixed N(0, 1) direction;
    ``bn_stats`` the same over the floating-point buffers (BN running mean and variance)."""
    import torch

    group = {n: f"w_layer{g}" for g, names in model.layer_groups().items() for n in names}
    params = {n for n, _ in model.named_parameters()}
    out = dict.fromkeys(FINGERPRINTS, 0.0)
    direction = torch.Generator().manual_seed(0)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        r = torch.randn(tensor.shape, generator=direction, dtype=torch.float64)
        column = group.get(name, "w_other") if name in params else "bn_stats"
        out[column] += float((tensor.detach().double().cpu() * r).sum())
    return out


def trial_curve(config) -> pd.DataFrame:
    """The curve of a trial, one row per epoch with the weights' fingerprint after it, timing
    columns dropped."""
    from ablation.trainer import Reporter, Trainer

    class Record(Reporter):
        def epoch(self, row, checkpoint):
            prints.append(fingerprint(trainer.model))

    prints: list[dict[str, float]] = []
    with threads(THREADS), tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, folder)
        trainer.fit(Record())
    curve = pd.DataFrame(trainer.history).drop(columns=TIMING)
    return pd.concat([curve, pd.DataFrame(prints)], axis=1)


def golden_config(name: str, precision: str = "fp64"):
    from ablation.config import from_dict

    raw = {**BASE, **GOLDEN_SET[name], "precision": precision}
    return from_dict({k: v for k, v in raw.items() if v is not None}, source=name)


def golden_set(precision: str = "fp64", names: list[str] | None = None) -> pd.DataFrame:
    """The golden set's curves, one block of rows per trial (column ``trial``)."""
    frames = []
    for name in names or GOLDEN_SET:
        frame = trial_curve(golden_config(name, precision))
        frame.insert(0, "trial", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def digits_curve(precision: str = "fp64") -> pd.DataFrame:
    """The 8-epoch curve of sweeps/trials/digits_tiny.yaml."""
    from ablation.config import load_trial

    return trial_curve(load_trial(ROOT / "sweeps/trials/digits_tiny.yaml")
                       .replace(precision=precision))


def demo_curves(precision: str = "fp64") -> pd.DataFrame:
    """Every curve of sweeps/demo_digits.yaml, run in-process (the real grid, trainer, store)."""
    import yaml

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from conftest import run_sweep_in_process

    sweep = yaml.safe_load((ROOT / "sweeps/demo_digits.yaml").read_text())
    sweep["base"]["precision"] = precision
    with tempfile.TemporaryDirectory() as tmp, threads(THREADS):
        folder = run_sweep_in_process(sweep, Path(tmp) / "demo")
        curves = pd.read_parquet(folder / "curves").sort_values(["key", "epoch"])
    # forked_from says where a row was trained, not what
    return curves.reset_index(drop=True).drop(columns=[*TIMING, "forked_from"])


# name -> (golden file, how to compute it in a precision, slow)
CURVES: dict[str, tuple[str, Callable[[str], pd.DataFrame], bool]] = {
    "golden_set": ("golden_set.csv", golden_set, False),
    "digits_tiny": ("digits_tiny.csv", digits_curve, True),
    "demo_digits": ("demo_digits.csv", demo_curves, True),
}


# ---------------------------------------------------------------------------------------------
# Comparing curves


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, float_format="%.17g")  # %.17g: every float64 exactly


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def round_trip(frame: pd.DataFrame) -> pd.DataFrame:
    """What reading the frame back from its CSV gives (the golden files' dtypes)."""
    text = frame.to_csv(index=False, float_format="%.17g")
    return pd.read_csv(pd.io.common.StringIO(text), keep_default_na=False, na_values=[""])


def relative(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| / |want| (0 where both are 0, inf where only want is 0; NaN pairs: 0)."""
    diff = np.abs(got - want)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(want))
    return np.where(np.isnan(got) & np.isnan(want), 0.0, rel)


def differences(got: pd.DataFrame, want: pd.DataFrame, exact: bool = False) -> list[str]:
    """One line per column where ``got`` departs from ``want`` beyond the column's tolerance
    (``exact``: any difference), naming the worst row (trial or key, epoch) and by how much."""
    got = round_trip(got)
    if list(got.columns) != list(want.columns) or len(got) != len(want):
        return [f"columns or rows differ: got {len(got)} rows of {list(got.columns)}, "
                f"want {len(want)} rows of {list(want.columns)}"]
    label = next((c for c in ("trial", "key") if c in want.columns), None)

    def where(i: int) -> str:
        row = want.iloc[i]
        return (f"{row[label]} " if label else "") + f"epoch {row['epoch']}"

    lines = []
    for column in want.columns:
        g, w = got[column].to_numpy(), want[column].to_numpy()
        numeric = all(pd.api.types.is_numeric_dtype(f[column])
                      and not pd.api.types.is_bool_dtype(f[column]) for f in (got, want))
        if not numeric:
            bad = np.flatnonzero((g != w) & ~(pd.isna(g) & pd.isna(w)))
            if len(bad):
                i = bad[0]
                lines.append(f"{column}: {len(bad)} rows differ; first {where(i)}: got {g[i]!r}, "
                             f"want {w[i]!r}")
            continue
        g, w = g.astype(float), w.astype(float)
        rtol, atol = (0.0, 0.0) if exact else (RTOL, ATOL)
        nan_mismatch = np.isnan(g) != np.isnan(w)
        excess = np.abs(g - w) - (atol + rtol * np.abs(w))
        excess = np.where(np.isnan(g) & np.isnan(w), -1.0, excess)
        bad = np.flatnonzero(nan_mismatch | (excess > 0))
        if len(bad):
            rel = relative(g, w)
            i = bad[np.argmax(np.where(np.isnan(rel[bad]), np.inf, rel[bad]))]
            lines.append(f"{column}: {len(bad)} of {len(w)} values differ; worst {where(i)}: "
                         f"got {g[i]:.17g}, want {w[i]:.17g} (|diff| {abs(g[i] - w[i]):.3g}, "
                         f"relative {rel[i]:.3g}; " + ("exact comparison)" if exact else
                                                       f"tolerance {rtol:g} relative + {atol:g})"))
    return lines


def worst(got: pd.DataFrame, want: pd.DataFrame) -> tuple[float, float, str]:
    """Over the numeric columns: the largest relative difference, the largest ratio of a
    difference to its tolerance, and where that ratio is largest (column, row)."""
    got = round_trip(got)
    worst_rel, worst_ratio, at = 0.0, 0.0, "nowhere"
    for column in want.columns:
        if not all(pd.api.types.is_numeric_dtype(f[column]) for f in (got, want)):
            continue
        g, w = got[column].to_numpy(float), want[column].to_numpy(float)
        rtol, atol = RTOL, ATOL
        rel = np.nan_to_num(relative(g, w), nan=np.inf)
        ratio = np.nan_to_num(np.abs(g - w) / (atol + rtol * np.abs(w)), nan=0.0)
        ratio = np.where(np.isnan(g) != np.isnan(w), np.inf, ratio)
        worst_rel = max(worst_rel, float(rel.max()))
        i = int(np.argmax(ratio))
        if ratio[i] > worst_ratio:
            row = want.iloc[i]
            name = row["trial"] if "trial" in want.columns else row.get("key", "")
            worst_ratio, at = float(ratio[i]), f"{column} ({name} epoch {row['epoch']})"
    return worst_rel, worst_ratio, at


def assert_matches(got: pd.DataFrame, name: str, rows=None) -> None:
    want = read_csv(GOLDEN / name)
    if rows is not None:
        want = want[rows(want)].reset_index(drop=True)
    lines = differences(got, want)
    assert not lines, f"{name} differs beyond the tolerance:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", list(GOLDEN_SET))
def test_the_golden_set_is_unchanged(name):
    assert_matches(golden_set(names=[name]), "golden_set.csv", rows=lambda w: w.trial == name)


@pytest.mark.slow
def test_the_digits_trial_is_unchanged():
    assert_matches(digits_curve(), "digits_tiny.csv")


@pytest.mark.slow
def test_the_demo_sweep_is_unchanged():
    assert_matches(demo_curves(), "demo_digits.csv")


# One-line bugs, each a (function or method, the line's text, the mutated text). The function's
# source is recompiled with the one replacement and put in place of the original wherever the
# package refers to it; the source files are not touched. "a|b": the first place that exists
# (awp_active moves from schedule to strategies). `python tests/test_golden.py --mutations`
# prints what each one does to the golden set.
MUTATIONS: dict[str, tuple[str, str, str]] = {
    # the attack
    "pgd_linf_step_without_sign": (
        "ablation.attacks:pgd",
        "delta = delta + threat.step * grad.sign()", "delta = delta + threat.step * grad"),
    "projection_onto_2eps": (
        "ablation.attacks:project",
        "delta.clamp(-threat.eps, threat.eps)", "delta.clamp(-2 * threat.eps, 2 * threat.eps)"),
    "trades_l2_renorm_to_2eps": (
        "ablation.attacks:trades_attack",
        "maxnorm=threat.eps)", "maxnorm=2 * threat.eps)"),
    "trades_loss_without_beta": (
        "ablation.methods:TRADES.loss",
        "+ self.beta * kl,", "+ kl,"),
    # the schedule
    "lr_drop_one_batch_later": (
        "ablation.schedule:learning_rate",
        "t >= m * config.epochs", "t > m * config.epochs"),
    "lr_drop_by_0.2": (
        "ablation.schedule:learning_rate",
        "config.lr_max * 0.1**drops", "config.lr_max * 0.2**drops"),
    "schedule_time_off_by_one_batch": (
        "ablation.schedule:schedule_time",
        "epoch + (batch + 1) / batches", "epoch + batch / batches"),
    "awp_warmup_one_epoch_later": (
        "ablation.strategies:awp_active|ablation.schedule:awp_active",
        "epoch >= config.awp_warmup", "epoch > config.awp_warmup"),
    # the interventions
    "fix_lr_one_group_fewer": (
        "ablation.interventions:FixLR.param_groups",
        "chosen = set(self.names)",
        "chosen = set(group_names(self.model, self.config.layers[1:]))"),
    "fix_param_one_tensor_fewer": (
        "ablation.interventions:FixParam.__init__",
        "chosen = set(self.names)", "chosen = set(self.names[:-1])"),
    "awp_restore_with_plus_gamma": (
        "ablation.interventions:AWP.after_step",
        "torch._foreach_mul(self.v, -self.gamma)", "torch._foreach_mul(self.v, self.gamma)"),
    "awp_full_perturbs_1d_tensors_too": (
        "ablation.interventions:AWP.__init__",
        "if params[n].dim() > 1]", "if params[n].dim() >= 1]"),
    "awp_gamma_times_1.01": (
        "ablation.interventions:AWP.__init__",
        "self.gamma = config.awp_gamma", "self.gamma = config.awp_gamma * 1.01"),
}


def apply_mutation(monkeypatch: pytest.MonkeyPatch, target: str, old: str, new: str) -> None:
    """Recompile ``target`` ("module:function" or "module:Class.method"; "|" between places it
    may live) with ``old`` replaced by ``new`` (which must occur exactly once) and monkeypatch it
    in, in every ablation module that holds the original."""
    import importlib

    # Everything a trial runs imported first: a module imported under the mutation would keep
    # the mutated function (``from .attacks import pgd``) after monkeypatch undoes it.
    importlib.import_module("ablation.trainer")
    for place in target.split("|"):
        module_name, qualname = place.split(":")
        module = importlib.import_module(module_name)
        owner, _, name = qualname.rpartition(".")
        holder = getattr(module, owner) if owner else module
        if hasattr(holder, name):
            break
    else:
        raise AssertionError(f"{target} not found; update the mutation to the code")
    original = inspect.unwrap(getattr(holder, name))
    source = loaded_source(original, owner)
    assert source.count(old) == 1, (f"{place}: {old!r} occurs {source.count(old)} times in its "
                                    "source; update the mutation to the code")
    source = source.replace(old, new)
    if owner:  # zero-argument super() needs the class cell, which a recompiled method lacks
        source = source.replace("super()", f"super({owner}, self)")
    namespace = dict(module.__dict__)
    exec(compile(source, f"<mutated {place}>", "exec", flags=ANNOTATIONS, dont_inherit=True),
         namespace)
    mutated = namespace[name]
    monkeypatch.setattr(holder, name, mutated)
    if not owner:
        for other in list(sys.modules.values()):
            if (getattr(other, "__name__", "").startswith("ablation") and other is not module
                    and getattr(other, name, None) is original):
                monkeypatch.setattr(other, name, mutated)


ANNOTATIONS = __future__.annotations.compiler_flag  # every ablation module has the import


def loaded_source(function, owner: str) -> str:
    """The dedented source of ``function`` (a method of class ``owner`` if given), checked
    against the code that runs (its names, variables and constants): a file edited since it was
    imported gives other lines."""
    source = textwrap.dedent(inspect.getsource(function))
    wrapped = f"class {owner}:\n" + textwrap.indent(source, "    ") if owner else source
    code = compile(wrapped, "<check>", "exec", flags=ANNOTATIONS, dont_inherit=True)
    if owner:
        code = next(c for c in code.co_consts if inspect.iscode(c) and c.co_name == owner)
    compiled = [c for c in code.co_consts if inspect.iscode(c) and c.co_name == function.__name__]

    def shape(c):
        return (set(c.co_names), c.co_varnames,
                [repr(k) for k in c.co_consts if not inspect.iscode(k)])

    assert compiled and shape(compiled[0]) == shape(function.__code__), (
        f"{inspect.getsourcefile(function)} changed since it was imported: the source of "
        f"{function.__qualname__} is not the code that runs; run the tests again")
    return source


def mutation_effect(name: str) -> tuple[list[str], float, float, str]:
    """Differences beyond the tolerance of the golden set with mutation ``name`` applied, with
    :func:`worst`'s largest relative difference and largest multiple of the tolerance."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        apply_mutation(monkeypatch, *MUTATIONS[name])
        got = golden_set()
    want = read_csv(GOLDEN / "golden_set.csv")
    return (differences(got, want), *worst(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_one_line_mutation_fails_the_golden_set(name):
    lines, rel, ratio, at = mutation_effect(name)
    assert lines, f"mutation {name} left the golden set within the tolerance"
    assert ratio > 100, (f"mutation {name} exceeds the tolerance only {ratio:.3g} times "
                         f"(largest relative difference {rel:.3g}, at {at})")


def test_the_mutations_apply_to_the_current_code():
    """Each mutation's line still exists (cheap; the slow test shows that each one fails)."""
    for target, old, new in MUTATIONS.values():
        with pytest.MonkeyPatch.context() as monkeypatch:
            apply_mutation(monkeypatch, target, old, new)


# ---------------------------------------------------------------------------------------------
# The command line: regenerate, snapshot/compare, measure, mutations


def machine() -> dict:
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": THREADS,
            "env": {k: os.environ[k] for k in sorted(os.environ)
                    if k.startswith(("ATEN_", "MKL_", "OMP_", "ONEDNN_", "DNNL_"))}}


def selected(slow: bool) -> list[str]:
    return [name for name, (_, _, is_slow) in CURVES.items() if slow or not is_slow]


def regenerate(slow: bool = True) -> None:
    for name in selected(slow):
        file, compute, _ = CURVES[name]
        print(f"writing {GOLDEN / file}", flush=True)
        write_csv(compute("fp64"), GOLDEN / file)


def snapshot(folder: Path, slow: bool, precisions=("fp32", "fp64")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in selected(slow):
        _, compute, _ = CURVES[name]
        for precision in precisions:
            print(f"{name} {precision} ...", flush=True)
            write_csv(compute(precision), folder / f"{name}_{precision}.csv")
    (folder / "machine.json").write_text(json.dumps(machine(), indent=1) + "\n")


def compare(folder: Path) -> int:
    """Recompute every curve stored in ``folder`` and compare it exactly; 1 if any differs."""
    saved = json.loads((folder / "machine.json").read_text())
    if saved != machine():
        print(f"warning: the snapshot was taken with {saved}, this is {machine()}: "
              "exact equality is expected only on one machine and torch, same settings")
    failed = 0
    for path in sorted(folder.glob("*_fp*.csv")):
        name, precision = path.stem.rsplit("_", 1)
        got = CURVES[name][1](precision)
        lines = differences(got, read_csv(path), exact=True)
        print(f"{path.name}: " + ("bit-identical" if not lines else
                                  "DIFFERS\n  " + "\n  ".join(lines)), flush=True)
        failed |= bool(lines)
    return failed


def kernel_paths(slow: bool) -> list[tuple[str, dict[str, str], int]]:
    """(label, environment, threads) of every process --measure runs: ATen's three kernel
    paths crossed with MKL's three, MKL's conditional-reproducibility path and 2 threads; with
    --slow (minutes per process) each ATen and each MKL path once."""
    if slow:
        combos = [("default", "SSE4_2"), ("avx2", "AVX2"), ("avx512", None)]
    else:
        combos = [(a, m) for a in ("default", "avx2", "avx512") for m in ("SSE4_2", "AVX2", None)]
    paths = [(f"aten {aten}, mkl {mkl or 'native'}",
              {"ATEN_CPU_CAPABILITY": aten, **({"MKL_ENABLE_INSTRUCTIONS": mkl} if mkl else {})}, 1)
             for aten, mkl in combos]
    paths.append(("aten avx512, MKL_CBWR=COMPATIBLE", {"ATEN_CPU_CAPABILITY": "avx512",
                                                        "MKL_CBWR": "COMPATIBLE"}, 1))
    paths.append(("aten avx512, mkl native, 2 threads", {"ATEN_CPU_CAPABILITY": "avx512"}, 2))
    return paths


def measure(slow: bool, jobs: int, keep: Path | None = None) -> None:
    """Recompute the fp64 curves under every kernel path (one process each) and print, per
    column, the largest absolute and relative difference between any two of them."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        running, outputs = [], []
        for i, (label, env, n) in enumerate(kernel_paths(slow)):
            out = folder / str(i)
            command = [sys.executable, __file__, "--curves", str(out), "--threads", str(n)]
            running.append((label, out, subprocess.Popen(command + ["--slow"] * slow,
                                                         env={**clean, **env})))
            while len([p for *_, p in running if p.poll() is None]) >= jobs:
                time.sleep(1)
        for label, out, process in running:
            if process.wait():
                raise SystemExit(f"{label}: exit {process.returncode}")
            info = json.loads((out / "machine.json").read_text())
            print(f"{label}: ATen {info['cpu_capability']}, {info['threads']} thread(s)")
            outputs.append(out)
        print_spread(outputs, selected(slow))


def print_spread(outputs: list[Path], names: list[str]) -> None:
    """Per column of each curve, the largest difference between any two of ``outputs``."""
    print(f"\nlargest difference between any two of {len(outputs)} kernel paths: absolute, "
          "relative, this column's relative tolerance, where")
    for name in names:
        frames = [read_csv(out / f"{name}.csv") for out in outputs]
        print(f"\n{CURVES[name][0]}:")
        for column in frames[0].columns:
            if not pd.api.types.is_numeric_dtype(frames[0][column]):
                continue
            values = np.stack([f[column].to_numpy(float) for f in frames])
            spread = np.nan_to_num(values.max(0) - values.min(0))
            rel = np.nan_to_num(relative(values.max(0), values.min(0)))
            label = next((c for c in ("trial", "key") if c in frames[0].columns), None)
            at = frames[0][label][int(np.argmax(rel))] if label and rel.max() > 0 else ""
            print(f"  {column:24s} {spread.max():9.2g} {rel.max():9.2g}   "
                  f"{RTOL:<8g} {at}")


def print_mutations() -> None:
    print(f"tolerance: relative {RTOL:g} + {ATOL:g}")
    for name in MUTATIONS:
        lines, rel, ratio, at = mutation_effect(name)
        print(f"{name:32s} {'FAILS' if lines else 'passes (!)'} in {len(lines):2d} columns; "
              f"largest relative difference {rel:.3g}; {ratio:.3g} x the tolerance at {at}",
              flush=True)


def main(argv: list[str]) -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--regenerate", action="store_true",
                      help="rewrite tests/golden/*.csv (fp64; the default mode)")
    mode.add_argument("--snapshot", metavar="DIR", type=Path,
                      help="write this machine's exact fp32 and fp64 curves to DIR")
    mode.add_argument("--compare", metavar="DIR", type=Path,
                      help="recompute the curves of a --snapshot DIR; exit 1 if any value differs")
    mode.add_argument("--measure", action="store_true",
                      help="print the largest fp64 differences across CPU kernel paths")
    mode.add_argument("--mutations", action="store_true",
                      help="print each mutation's largest difference from the golden set")
    mode.add_argument("--curves", metavar="DIR", type=Path, help=argparse.SUPPRESS)  # --measure
    parser.add_argument("--slow", action="store_true",
                        help="--snapshot, --measure: the slow curves too (8-epoch digits, demo)")
    parser.add_argument("--fast", action="store_true",
                        help="--regenerate: the golden set only")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help="--measure: processes at a time")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="--measure: keep each process's curves in DIR")
    args = parser.parse_args(argv)
    THREADS = args.threads
    if args.snapshot:
        snapshot(args.snapshot, args.slow)
    elif args.compare:
        return compare(args.compare)
    elif args.measure:
        measure(args.slow, args.jobs, args.keep)
    elif args.mutations:
        print_mutations()
    elif args.curves:
        args.curves.mkdir(parents=True, exist_ok=True)
        for name in selected(args.slow):
            write_csv(CURVES[name][1]("fp64"), args.curves / f"{name}.csv")
        (args.curves / "machine.json").write_text(json.dumps(machine()))
    else:
        regenerate(slow=not args.fast)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
