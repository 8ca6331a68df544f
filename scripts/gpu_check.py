#!/usr/bin/env python3
"""The GPU check: one unattended command that exercises ablate on one GPU and ends in one table of
PASS / FAIL / SKIP lines with numbers, in one Markdown file.

Run it from the repository root, in the environment ablate is installed in:

    python scripts/gpu_check.py                          # one GPU; results in ./gpu-check.md
    python scripts/gpu_check.py --out h100.md --skip ray # another file; leave out the Ray checks
    python scripts/gpu_check.py --only train,bench       # just these checks (names or groups)
    python scripts/gpu_check.py --cpu --out /tmp/gc.md   # the CPU rehearsal, tiny sizes

Without a GPU (and without --cpu) it says so in one line on stderr and exits with status 2. It
exits 0 only if no check FAILed. The results file starts with the environment (GPU, driver, torch,
CUDA, Python, ablate and its commit, Ray), then the table; it is rewritten (atomically) after
every check, so a run stopped half-way still leaves the checks done so far. The output of each
failed check (its last lines) follows the table.

The checks, in this order (Ray-free first, so a machine without Ray still runs them all):

  data                  tiny CIFAR-10 written in the real on-disk format (tests/conftest.py's
                        writer) into a temporary folder; every trial below reads it
  gpu-tests             `pytest -m gpu`: the project's CUDA tests; passed/failed/skipped counts
  train-<option>        one `ablate train` (a subprocess: the real CLI) per runtime option:
                        fp32, tf32, bf16, channels_last, compile, awp [3,4], fix_param [1,2],
                        trades_l2, autoattack (on 100 test images). Each must finish with a
                        summary.json and a curve of finite numbers, accuracies in [0, 1], on the
                        expected device; the numbers are each epoch's seconds (train + eval)
  resume-cpu            a GPU trial killed (SIGKILL) after its first epoch, then the same command
                        with --set device=cpu: it resumes where the checkpoint left off (device
                        is a runtime field, not part of the key), keeps the epochs already done
                        and finishes on the CPU
  resume-channels_last  the same, with --set channels_last=true for the second run (CUDA's
                        fused SGD used to refuse momentum buffers of the other layout)
  eval-memory           ablation.device.eval_bytes_per_image for preact18 and wrn34_10 against
                        the measured peak memory of one eval-mode PGD step at batch 64 and 256;
                        PASS when the estimate is within a factor 2; the eval batch it picks
  bench-<variant>       `ablate bench` (short, intervention none): fp32, tf32, bf16, compile;
                        project and reference images/s, their ratio, and tf32 / bf16 / compile
                        against fp32 eager (the data for the TF32-or-not decision)
  sigterm               `ablate train` gets SIGTERM after its first epoch: exit status 143, one
                        line on stderr, and the same command resumes and finishes
  ray-sweep             `ablate run` of 3 trials (AT, fix_lr [3,4] forking from AT, awp [4]) at
                        --gpus-per-trial 0.25; the driver's process group is SIGKILLed once 2
                        epochs are stored; the same command again must finish: every trial done,
                        each curve's epochs 0..E-1 once, the fork's first rows marked with its
                        baseline, no trial restarted before its stored epochs (attempts.log),
                        `ablate status` says all done. SKIP when Ray is not installed
  ray-no-gpu            a trial of `ablate run --gpus-per-trial 0` must train on the CPU
                        (summary.json device_name "cpu")

--cpu is for developers without a GPU: everything runs on the CPU at tiny sizes (preact_small of
width 4, 128 training images), and what needs CUDA by nature is SKIP (gpu-tests, train-compile and
bench-compile, whose Inductor build takes minutes on a CPU, ray-no-gpu). resume-cpu then resumes a
CPU checkpoint, since no GPU can write one. tests/test_gpu_check.py runs this mode.

Each check has a time limit (its subprocesses are killed at it, and the check FAILs), and the
whole run a budget (--budget, 480 s on a GPU): a check that would start past it FAILs as "not
run". A check's exception is a FAIL with its one-line reason; the next check still runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
GPU_BUDGET_S = 480  # the whole run on one GPU: 8 minutes
CPU_BUDGET_S = 1800  # the CPU rehearsal on a small shared machine

# Seconds each check may take on a GPU (twice that with --cpu); a check past it FAILs.
TIME_LIMITS_S = {
    "gpu-tests": 150,
    "train": 60,  # each train-<option> but these two:
    "train-compile": 240,  # the first torch.compile of a process is slow
    "train-autoattack": 120,
    "resume": 90,
    "eval-memory": 90,
    "bench": 90,
    "bench-compile": 240,
    "bench-packs": 150,
    "sigterm": 90,
    "ray-sweep": 300,
    "ray-no-gpu": 150,
}


class CheckFailed(Exception):
    """A check's FAIL, with its one-line reason."""


class Skipped(Exception):
    """A check that cannot run here, with its one-line reason."""


@dataclass
class Sizes:
    """What the trials are made of: real-sized models on a GPU, tiny ones with --cpu."""

    device: str  # the device of the main trials
    model: str  # the train-<option> trials
    width: int  # preact_small only
    n_train: int
    n_test: int
    batch_size: int
    train_steps: int
    test_steps: int
    train_eval_size: int
    autoattack: int  # test images AutoAttack attacks
    small_width: int  # preact_small of the resume, SIGTERM and Ray trials
    small_steps: int  # their PGD steps (training and test)
    bench: list[str]  # `ablate bench` options for the model and size


GPU_SIZES = Sizes(device="cuda", model="preact18", width=16, n_train=512, n_test=256,
                  batch_size=128, train_steps=10, test_steps=20, train_eval_size=128,
                  autoattack=100, small_width=8, small_steps=3,
                  bench=["--device", "cuda"])
CPU_SIZES = Sizes(device="cpu", model="preact_small", width=4, n_train=128, n_test=64,
                  batch_size=64, train_steps=2, test_steps=3, train_eval_size=32,
                  autoattack=16, small_width=4, small_steps=2,
                  bench=["--device", "cpu", "--model", "preact_small", "--width", "4",
                         "--batch-size", "16", "--train-steps", "2"])


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    numbers: dict[str, str]
    detail: str
    log: str = ""  # the end of a failed check's output


@dataclass
class Context:
    """Everything the checks share: the mode, the sizes, the work folder and what was measured."""

    cpu: bool
    sizes: Sizes
    work: Path
    ablate: list[str]
    environment: dict[str, Any]
    deadline: float
    check: str = ""  # the check running now (for its log files and time limit)
    logs: list[Path] = field(default_factory=list)  # the running check's output files
    procs: list[subprocess.Popen] = field(default_factory=list)  # the running check's processes
    bench: dict[str, dict[str, Any]] = field(default_factory=dict)  # bench results by variant
    ray_temp: Path | None = None

    @property
    def data_root(self) -> Path:
        return self.work / "data"

    def time_limit(self) -> float:
        """Seconds the running check may still use: its own limit within the run's budget."""
        limit = TIME_LIMITS_S.get(self.check) or TIME_LIMITS_S[self.check.split("-")[0]]
        limit *= 2 if self.cpu else 1
        return min(limit, self.deadline - time.monotonic())


# ----------------------------------------------------------------------------------------------
# Subprocesses


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _log_files(ctx: Context) -> tuple[Path, Path]:
    n = len(ctx.logs) // 2
    out = ctx.work / "logs" / f"{ctx.check}-{n}.out"
    err = ctx.work / "logs" / f"{ctx.check}-{n}.err"
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx.logs += [out, err]
    return out, err


def start(ctx: Context, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``args`` in its own process group (so a kill takes its children too), its output
    going to the check's log files."""
    out, err = _log_files(ctx)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if ctx.ray_temp:
        full_env["RAY_TMPDIR"] = str(ctx.ray_temp)
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([str(a) for a in args], stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=ROOT,
                                start_new_session=True)
    proc.files = (out, err)
    proc.started = time.monotonic()
    ctx.procs.append(proc)
    return proc


def finish(ctx: Context, proc: subprocess.Popen, limit: float | None = None) -> Done:
    """Wait for ``proc`` (at most the check's time left, or ``limit``); past it, SIGKILL its
    process group and FAIL the check."""
    timeout = ctx.time_limit() if limit is None else min(limit, ctx.time_limit())
    try:
        proc.wait(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CheckFailed(f"timed out after {time.monotonic() - proc.started:.0f} s: "
                          f"{command_line(proc.args)}") from None
    out, err = proc.files
    return Done(proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
                time.monotonic() - proc.started)


def run(ctx: Context, args: list[str], env: dict[str, str] | None = None) -> Done:
    return finish(ctx, start(ctx, args, env))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def command_line(args: list[str]) -> str:
    words = [Path(a).name if a == sys.executable else a for a in map(str, args)]
    return " ".join(shlex.quote(w) for w in words)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def succeeded(done: Done, what: str) -> None:
    if done.returncode != 0:
        raise CheckFailed(f"{what} exited {done.returncode}: {last_line(done.stderr)}")


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> bool:
    """Poll ``ready()`` until it holds (True), the process ends or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if ready():
                return True
        except Exception:  # a file half-way through being replaced: look again
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def ablate_command() -> list[str]:
    """How to start the real CLI: ``python -m ablation``, else the ``ablate`` script beside this
    Python."""
    try:
        ok = subprocess.run([sys.executable, "-m", "ablation", "--help"], capture_output=True,
                            timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if ok:
        return [sys.executable, "-m", "ablation"]
    script = Path(sys.executable).parent / "ablate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ablation"]


# ----------------------------------------------------------------------------------------------
# Trials and their outputs


def trial_fields(ctx: Context, **changes: Any) -> dict[str, Any]:
    """A main trial: the check's model on the tiny CIFAR-10, 2 epochs."""
    s = ctx.sizes
    fields = {"dataset": "cifar10", "data_root": str(ctx.data_root), "model": s.model,
              "epochs": 2, "batch_size": s.batch_size, "train_steps": s.train_steps,
              "test_steps": s.test_steps, "train_eval_size": s.train_eval_size,
              "device": s.device}
    if s.model == "preact_small":
        fields.update(width=s.width, blocks=1)
    return {**fields, **changes}


def small_fields(ctx: Context, **changes: Any) -> dict[str, Any]:
    """A small trial (preact_small), cheap enough to train on the CPU too."""
    s = ctx.sizes
    return trial_fields(ctx, model="preact_small", width=s.small_width, blocks=1,
                        train_steps=s.small_steps, test_steps=s.small_steps,
                        train_eval_size=min(s.train_eval_size, 64), **changes)


def write_yaml(ctx: Context, name: str, content: dict[str, Any]) -> Path:
    path = ctx.work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def read_curve(path: Path):
    import pandas as pd

    return pd.read_parquet(path).sort_values("epoch").reset_index(drop=True)


def check_trial_folder(ctx: Context, out: Path, epochs: int, device: str) -> dict[str, Any]:
    """The folder of a finished `ablate train`: summary.json and a curve of ``epochs`` rows with
    finite numbers and accuracies in [0, 1], trained on ``device``. Returns the summary."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise CheckFailed(f"no summary.json in {out.name}")
    summary = json.loads(summary_path.read_text())
    if summary.get("epochs_done") != epochs:
        raise CheckFailed(f"summary.json says {summary.get('epochs_done')} epochs, not {epochs}")
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise CheckFailed(f"summary.json: {key} is {value}")
            low = -1 if key.startswith("diff_") else 0  # best - last may be negative
            if key.endswith("_acc") and not low <= value <= 1:
                raise CheckFailed(f"summary.json: {key} = {value} is not in [{low}, 1]")
    curve = read_curve(out / "curves.parquet")
    if curve.epoch.tolist() != list(range(epochs)):
        raise CheckFailed(f"curves.parquet holds epochs {curve.epoch.tolist()}, "
                          f"not 0..{epochs - 1}")
    for column in ("train_loss", "train_acc", "train_robust_acc", "test_loss", "test_acc",
                   "test_robust_loss", "test_robust_acc", "train_seconds", "eval_seconds"):
        values = curve[column].astype(float)
        if not values.map(math.isfinite).all():
            raise CheckFailed(f"curves.parquet: {column} is not finite: {values.tolist()}")
        if column.endswith("_acc") and not values.between(0, 1).all():
            raise CheckFailed(f"curves.parquet: {column} not in [0, 1]: {values.tolist()}")
    if summary.get("device_name") != device:
        raise CheckFailed(f"trained on {summary.get('device_name')!r}, not {device!r}")
    return summary


def device_name(ctx: Context) -> str:
    """What summary.json's device_name says for a trial of the main device."""
    return "cpu" if ctx.cpu else ctx.environment["gpu_name"]


def epoch_seconds(out: Path) -> dict[str, str]:
    curve = read_curve(out / "curves.parquet")
    seconds = curve.train_seconds + curve.eval_seconds
    return {f"epoch {e}": f"{s:.2f} s" for e, s in zip(curve.epoch, seconds)}


def train(ctx: Context, name: str, changes: dict[str, Any],
          args: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """`ablate train` of a main trial with ``changes``; checks its folder."""
    config = write_yaml(ctx, name, trial_fields(ctx, **changes))
    out = ctx.work / "train" / name
    done = run(ctx, [*ctx.ablate, "train", config, "--out", out, "--quiet", *args])
    succeeded(done, "ablate train")
    return out, check_trial_folder(ctx, out, 2, device_name(ctx))


def train_result(out: Path, summary: dict[str, Any]) -> tuple[str, dict[str, str], str]:
    numbers = epoch_seconds(out)
    numbers["test robust acc"] = f"{summary['last_test_robust_acc']:.1%}"
    return "PASS", numbers, f"{summary['key']} on {summary['device_name']}"


# ----------------------------------------------------------------------------------------------
# The checks: each returns (status, numbers, one-line detail) or raises CheckFailed / Skipped


def check_gpu_tests(ctx: Context):
    """The project's tests marked `gpu`, which skip themselves without CUDA (or Ray)."""
    if ctx.cpu:
        raise Skipped("needs CUDA (--cpu)")
    done = run(ctx, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu",
                     "-q", "-rfE", "tests"])
    counts = {word: int(n) for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", last_line(done.stdout))}
    numbers = {k: str(counts.get(k, 0)) for k in ("passed", "failed", "skipped")}
    errors = counts.get("error", 0) + counts.get("errors", 0)
    if errors:
        numbers["errors"] = str(errors)
    if done.returncode == 5:
        raise CheckFailed("no test is marked gpu (pytest -m gpu selected none)")
    if done.returncode != 0:
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED",
                                                                                "ERROR"))]
        return "FAIL", numbers, (failed[0] if failed
                                 else last_line(done.stdout + "\n" + done.stderr))[:300]
    return "PASS", numbers, last_line(done.stdout)


def check_train_fp32(ctx: Context):
    return train_result(*train(ctx, "fp32", {"precision": "fp32"}))


def check_train_tf32(ctx: Context):
    return train_result(*train(ctx, "tf32", {"precision": "tf32"}))


def check_train_bf16(ctx: Context):
    return train_result(*train(ctx, "bf16", {"precision": "bf16"}))


def check_train_channels_last(ctx: Context):
    return train_result(*train(ctx, "channels_last", {"channels_last": True}))


def check_train_compile(ctx: Context):
    if ctx.cpu:
        raise Skipped("torch.compile on the CPU takes minutes (Inductor's C++ build) (--cpu)")
    # Evaluation in batches of the training batch's size: fewer shapes, fewer graphs to compile.
    # Inductor compiles with as many workers as the trial has threads.
    out, summary = train(ctx, "compile", {"compile": True, "test_batch_size": ctx.sizes.batch_size},
                         ("--threads", "4"))
    status, numbers, detail = train_result(out, summary)
    return status, numbers, detail + " (epoch 0 includes the compile)"


def check_train_awp(ctx: Context):
    return train_result(*train(ctx, "awp", {"intervention": "awp", "layers": [3, 4]}))


def check_train_fix_param(ctx: Context):
    return train_result(*train(ctx, "fix_param", {"intervention": "fix_param", "layers": [1, 2]}))


def check_train_trades_l2(ctx: Context):
    return train_result(*train(ctx, "trades_l2", {"method": "trades", "threat": "l2"}))


def check_train_autoattack(ctx: Context):
    if importlib.util.find_spec("pyautoattack") is None:
        raise Skipped("pyautoattack not installed")
    n = ctx.sizes.autoattack
    out, summary = train(ctx, "autoattack", {}, ("--autoattack", str(n)))
    expected = min(n, ctx.sizes.n_test)
    if summary.get("autoattack_n") != expected:
        raise CheckFailed(f"summary.json: autoattack_n is {summary.get('autoattack_n')}, "
                          f"not {expected}")
    status, numbers, detail = train_result(out, summary)
    numbers["AutoAttack acc (best, last)"] = (f"{summary['best_autoattack_acc']:.1%}, "
                                              f"{summary['last_autoattack_acc']:.1%}")
    numbers["images"] = str(expected)
    return status, numbers, detail


def kill_after_first_epoch(ctx: Context, config: Path, out: Path, args: list[str],
                           sig: int = signal.SIGKILL) -> tuple[subprocess.Popen, int]:
    """Start `ablate train`, send ``sig`` to it once its curve holds an epoch; returns the
    process (not yet waited for) and the epochs stored when the signal went."""
    proc = start(ctx, [*ctx.ablate, "train", config, "--out", out, "--quiet", *args])
    curve = out / "curves.parquet"
    if not wait_for(proc, lambda: len(read_curve(curve)) >= 1, ctx.time_limit()):
        kill_group(proc)
        if proc.returncode is not None and proc.returncode != -signal.SIGKILL:
            raise CheckFailed(f"the first run ended ({proc.returncode}) before its signal: "
                              f"{last_line(proc.files[1].read_text())}")
        raise CheckFailed("no epoch was stored in time")
    if sig == signal.SIGKILL:
        kill_group(proc)
    else:
        proc.send_signal(sig)
    stored = len(read_curve(curve))
    return proc, stored


def resume(ctx: Context, first: dict[str, Any], second: list[str], device: str,
           first_args: tuple[str, ...] = (), second_args: tuple[str, ...] = ()):
    """Train a 3-epoch small trial with ``first`` fields, SIGKILL it after its first epoch, then
    run the same command with ``second`` (--set KEY=VALUE pairs): it must resume after the
    stored epochs, keep them as they were, and finish on ``device``."""
    epochs = 3
    config = write_yaml(ctx, ctx.check, small_fields(ctx, epochs=epochs, **first))
    out = ctx.work / "train" / ctx.check
    kill_after_first_epoch(ctx, config, out, list(first_args))
    before = read_curve(out / "curves.parquet")
    if len(before) >= epochs:
        raise CheckFailed(f"the first run finished all {epochs} epochs before the kill")
    sets = [w for pair in second for w in ("--set", pair)]
    done = run(ctx, [*ctx.ablate, "train", config, "--out", out, "--quiet", *sets,
                     *second_args])
    succeeded(done, "the resumed ablate train")
    summary = check_trial_folder(ctx, out, epochs, device)
    after = read_curve(out / "curves.parquet")
    kept = before.train_seconds.tolist() == after.train_seconds[:len(before)].tolist()
    if not kept:
        raise CheckFailed(f"the {len(before)} epoch(s) done before the kill were trained again")
    numbers = {"epochs stored at the kill": str(len(before)), "epochs": str(epochs)}
    numbers.update(epoch_seconds(out))
    return "PASS", numbers, f"{' '.join(second)}: resumed after epoch {len(before) - 1}, " \
                            f"finished on {summary['device_name']}"


def check_resume_cpu(ctx: Context):
    if ctx.cpu:
        status, numbers, detail = resume(ctx, {"device": "cpu"}, ["device=cpu"], "cpu")
        return status, numbers, detail + " (--cpu: a CPU checkpoint; no GPU wrote one)"
    return resume(ctx, {"device": "cuda"}, ["device=cpu"], "cpu", second_args=("--threads", "4"))


def check_resume_channels_last(ctx: Context):
    return resume(ctx, {"channels_last": False}, ["channels_last=true"], device_name(ctx))


def check_eval_memory(ctx: Context):
    """The evaluation batch's memory estimate against a measurement (on CUDA)."""
    done = run(ctx, [sys.executable, Path(__file__).resolve(), "--probe", "memory",
                     "--device", ctx.sizes.device])
    succeeded(done, "the memory probe")
    rows = json.loads(last_line(done.stdout))
    numbers, off = {}, []
    for model, row in rows.items():
        estimate = row["estimate_bytes"] / 2**20
        text = f"estimate {estimate:.2f} MiB/image"
        if "measured_bytes" in row:
            measured = row["measured_bytes"] / 2**20
            ratio = estimate / measured if measured > 0 else math.inf
            text += f", measured {measured:.2f} MiB/image ({ratio:.2f}x)"
            if not 0.5 <= ratio <= 2:
                off.append(f"{model} {ratio:.2f}x")
        numbers[model] = f"{text}, eval batch {row['batch']}"
    if off:
        return "FAIL", numbers, f"estimate off by more than 2x: {', '.join(off)}"
    if ctx.cpu:
        return "PASS", numbers, "estimate only (--cpu: no CUDA memory to measure)"
    return "PASS", numbers, "estimate within 2x of one eval-mode PGD step at batch 64 and 256"


def bench(ctx: Context, variant: str, args: list[str]) -> tuple[str, dict[str, str], str]:
    """`ablate bench`, short: intervention none, no per-epoch split, no trials per GPU."""
    path = ctx.work / "bench" / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = run(ctx, [*ctx.ablate, "bench", *ctx.sizes.bench, "--intervention", "none",
                     "--batches", "5", "--repeats", "2", "--warmup", "2", "--no-split",
                     "--trials-per-gpu", "none", "--json", path, *args])
    succeeded(done, "ablate bench")
    result = json.loads(path.read_text())
    (row,) = result["interventions"]
    ctx.bench[variant] = row
    project, reference = row["project"]["images_per_s"], row["reference"]["images_per_s"]
    if not (math.isfinite(project) and project > 0 and math.isfinite(reference)):
        raise CheckFailed(f"images/s not positive: project {project}, reference {reference}")
    numbers = {"project": f"{project:,.0f} img/s", "reference": f"{reference:,.0f} img/s",
               "ratio": f"{row['ratio_median']:.2f}x"}
    base = ctx.bench.get("fp32")
    if variant != "fp32" and base:
        numbers[f"{variant} / fp32"] = f"{project / base['project']['images_per_s']:.2f}x"
    if row.get("peak_memory_bytes"):
        numbers["peak memory"] = f"{row['peak_memory_bytes'] / 2**30:.2f} GiB"
    env = result["environment"]
    return "PASS", numbers, f"{env['device_name']}, {' '.join(args) or 'fp32 eager'}"


def check_bench_fp32(ctx: Context):
    return bench(ctx, "fp32", ["--precision", "fp32"])


def check_bench_tf32(ctx: Context):
    """The TF32-or-IEEE decision's data: tf32 images/s against fp32's (bench-fp32)."""
    status, numbers, detail = bench(ctx, "tf32", ["--precision", "tf32"])
    if "fp32" in ctx.bench:
        gain = (ctx.bench["tf32"]["project"]["images_per_s"]
                / ctx.bench["fp32"]["project"]["images_per_s"])
        detail += f"; TF32 is {gain:.2f}x IEEE fp32's speed here" + (
            " (--cpu: a CPU has no TF32, so this is noise)" if ctx.cpu else "")
    return status, numbers, detail


def check_bench_bf16(ctx: Context):
    return bench(ctx, "bf16", ["--precision", "bf16"])


def check_bench_compile(ctx: Context):
    if ctx.cpu:
        raise Skipped("torch.compile on the CPU takes minutes (Inductor's C++ build) (--cpu)")
    return bench(ctx, "compile", ["--precision", "fp32", "--compile"])


def check_bench_packs(ctx: Context):
    """Packed trials (ablate run --pack): images/s of packs of K against K separate steps."""
    path = ctx.work / "bench" / "packs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = "1,2,4" if ctx.cpu else "1,2,4,8,16"
    done = run(ctx, [*ctx.ablate, "bench", *ctx.sizes.bench, "--intervention", "none",
                     "--intervention", "fix_lr", "--intervention", "awp", "--batches", "5",
                     "--repeats", "2", "--warmup", "2", "--no-split", "--trials-per-gpu",
                     "none", "--pack", sizes, "--json", path])
    succeeded(done, "ablate bench --pack")
    rows = json.loads(path.read_text())["packs"]
    failed = [f"K={r['k']}: {r['error']}" for r in rows if "error" in r]
    numbers = {f"K={r['k']}": f"{r['images_per_s']:,.0f} img/s, {r['ratio_vs_separate']:.2f}x"
               for r in rows if "error" not in r}
    best = max((r for r in rows if "error" not in r), key=lambda r: r["images_per_s"])
    detail = (f"best K = {best['k']} ({best['ratio_vs_separate']:.2f}x separate steps, "
              f"{best['ratio_vs_reference']:.2f}x the reference loop)")
    if failed:
        detail += "; " + ", ".join(failed)
    return "PASS", numbers, detail


def check_sigterm(ctx: Context):
    """SIGTERM after the first epoch: status 143 and one line; the same command resumes."""
    epochs = 10
    config = write_yaml(ctx, "sigterm", small_fields(ctx, epochs=epochs))
    out = ctx.work / "train" / "sigterm"
    proc, _ = kill_after_first_epoch(ctx, config, out, [], sig=signal.SIGTERM)
    sent = time.monotonic()
    stopped = finish(ctx, proc, limit=60)
    stop_seconds = time.monotonic() - sent
    before = read_curve(out / "curves.parquet")
    if len(before) >= epochs:
        raise CheckFailed(f"the trial finished all {epochs} epochs before SIGTERM reached it")
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    numbers = {"exit status": str(stopped.returncode), "stderr lines": str(len(lines)),
               "exit after SIGTERM": f"{stop_seconds:.1f} s", "epochs at stop": str(len(before))}
    problems = []
    if stopped.returncode != 143:
        problems.append(f"exit status {stopped.returncode}, not 143" + (
            " (killed by the signal: no handler)" if stopped.returncode == -signal.SIGTERM else ""))
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, not 1" + (
            f" (last: {lines[-1][:120]})" if lines else ""))
    done = run(ctx, [*ctx.ablate, "train", config, "--out", out, "--quiet"])
    if done.returncode != 0:
        problems.append(f"the same command exited {done.returncode}: {last_line(done.stderr)}")
    else:
        check_trial_folder(ctx, out, epochs, device_name(ctx))
        after = read_curve(out / "curves.parquet")
        if before.train_seconds.tolist() != after.train_seconds[:len(before)].tolist():
            problems.append("the epochs done before SIGTERM were trained again")
    if problems:
        return "FAIL", numbers, "; ".join(problems)
    return "PASS", numbers, f"stopped with: {lines[0][:200]}; the same command resumed"


def ray_available() -> str | None:
    """Ray's version, or None when it is not installed."""
    if importlib.util.find_spec("ray") is None:
        return None
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def stored_curves(folder: Path):
    import pandas as pd

    parts = [pd.read_parquet(p) for p in sorted((folder / "curves").glob("*.parquet"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"key": [], "epoch": []})


def sweep_fields(ctx: Context, epochs: int) -> dict[str, Any]:
    # device auto on a GPU machine: a trial uses the GPU Ray gives it (and none when given none)
    return small_fields(ctx, epochs=epochs, device="cpu" if ctx.cpu else "auto")


def check_ray_sweep(ctx: Context):
    """3 trials; SIGKILL of the driver's process group mid-sweep; the same command finishes."""
    if ray_available() is None:
        raise Skipped("ray not installed")
    epochs = 6  # fix_lr [3, 4] and AT share their first 2 epochs (the LR drops in epoch 2)
    sweep = write_yaml(ctx, "sweep", {
        "name": "gpu_check", "base": sweep_fields(ctx, epochs),
        "grid": {"intervention": ["fix_lr"], "layers": [[3, 4]]},
        "baselines": {"AT": {"intervention": "none"},
                      "AWP_4": {"intervention": "awp", "layers": [4]}}})
    folder = ctx.work / "runs" / "gpu_check"
    gpus = "0" if ctx.cpu else "0.25"
    command = [*ctx.ablate, "run", sweep, "--storage", folder, "--gpus-per-trial", gpus,
               "--quiet"]
    plan = run(ctx, [*ctx.ablate, "run", sweep, "--storage", folder, "--dry-run"])
    succeeded(plan, "ablate run --dry-run")
    forks = {child: (int(n), parent) for child, n, parent in re.findall(
        r"^\s*\d+\s+(\S+)\s+\(\d+ epochs, the first (\d+) from (\S+)\)", plan.stdout, re.M)}
    keys = re.findall(r"^\s*\d+\s+(\S+)\s+\(", plan.stdout, re.M)
    if len(keys) != 3 or len(forks) != 1:
        raise CheckFailed(f"the plan has {len(keys)} trials and {len(forks)} fork(s), not 3 and 1")

    driver = start(ctx, command)
    if not wait_for(driver, lambda: len(stored_curves(folder)) >= 2, ctx.time_limit()):
        kill_group(driver)
        raise CheckFailed(f"the sweep ended ({driver.returncode}) before 2 epochs were stored: "
                          f"{last_line(driver.files[1].read_text())}")
    kill_group(driver)  # SIGKILL to the driver's process group
    at_kill = stored_curves(folder).groupby("key").size().to_dict()
    done_at_kill = {k for k in keys if (folder / "trials" / k / "summary.json").exists()}
    if len(done_at_kill) == len(keys):
        raise CheckFailed("every trial finished before the kill")

    again = run(ctx, command)
    succeeded(again, "the same ablate run")
    curves = stored_curves(folder)
    problems = []
    for key in keys:
        summary = folder / "trials" / key / "summary.json"
        if not summary.exists():
            problems.append(f"{key} not done")
            continue
        mine = curves[curves.key == key].sort_values("epoch")
        if mine.epoch.tolist() != list(range(epochs)):
            problems.append(f"{key} stored epochs {mine.epoch.tolist()}")
        name = json.loads(summary.read_text()).get("device_name")
        if ctx.cpu and name != "cpu":
            problems.append(f"{key} trained on {name}, not cpu")
        if not ctx.cpu and name != ctx.environment["gpu_name"]:
            problems.append(f"{key} trained on {name}, not the GPU")
    starts = {}
    for key in keys:
        log = folder / "trials" / key / "attempts.log"
        found = re.findall(r"starts at epoch (\d+)( from \S+'s checkpoint)?",
                           log.read_text() if log.exists() else "")
        starts[key] = [int(e) for e, _ in found]
        if not found:
            problems.append(f"{key}: no start in attempts.log")
        elif key in at_kill and key not in done_at_kill and max(starts[key]) < at_kill[key]:
            problems.append(f"{key} restarted at epoch {max(starts[key])} with {at_kill[key]} "
                            "stored (epochs repeated)")
    for child, (shared, parent) in forks.items():
        mine = curves[curves.key == child].sort_values("epoch")
        marked = mine.get("forked_from")
        marked = marked.fillna("").tolist() if marked is not None else []
        if marked[:shared] != [parent] * shared or any(marked[shared:]):
            problems.append(f"fork rows marked {marked}, not {shared} x {parent}")
        if starts.get(child) and starts[child][0] != shared:
            problems.append(f"the fork first started at epoch {starts[child][0]}, not {shared}")
    status = run(ctx, [*ctx.ablate, "status", folder])
    all_done = f"{len(keys)} trials: all done"
    if status.returncode != 0 or not status.stdout.strip().endswith(all_done):
        problems.append(f"ablate status: {last_line(status.stdout + status.stderr)}")
    short = {k: "-".join(k.split("-")[4:-2]) for k in keys}  # the intervention and layers
    numbers = {"stored at kill": ", ".join(f"{short[k]} {at_kill.get(k, 0)}" for k in keys),
               "starts": ", ".join(f"{short[k]} {'/'.join(map(str, starts[k]))}" for k in keys),
               "second run": f"{again.seconds:.0f} s", "gpus per trial": gpus}
    if problems:
        return "FAIL", numbers, "; ".join(problems)[:400]
    return "PASS", numbers, (f"all {len(keys)} done, every epoch stored once, the fork started "
                             f"at epoch {next(iter(forks.values()))[0]}, status: all done")


def check_ray_no_gpu(ctx: Context):
    """A trial given no GPU (--gpus-per-trial 0) trains on the CPU, even where a GPU is."""
    if ctx.cpu:
        raise Skipped("needs a GPU to withhold (--cpu)")
    if ray_available() is None:
        raise Skipped("ray not installed")
    sweep = write_yaml(ctx, "sweep_no_gpu", {
        "name": "gpu_check_no_gpu", "base": sweep_fields(ctx, 1),
        "baselines": {"AT": {"intervention": "none"}}})
    folder = ctx.work / "runs" / "gpu_check_no_gpu"
    done = run(ctx, [*ctx.ablate, "run", sweep, "--storage", folder, "--gpus-per-trial", "0",
                     "--quiet"])
    succeeded(done, "ablate run --gpus-per-trial 0")
    (summary,) = list((folder / "trials").glob("*/summary.json"))
    name = json.loads(summary.read_text()).get("device_name")
    numbers = {"device_name": name, "run": f"{done.seconds:.0f} s"}
    if name != "cpu":
        return "FAIL", numbers, f"a trial given no GPU trained on {name!r}, not 'cpu'"
    return "PASS", numbers, "the trial trained on the CPU"


CHECKS: list[tuple[str, Callable[[Context], tuple[str, dict[str, str], str]]]] = [
    ("gpu-tests", check_gpu_tests),
    ("train-fp32", check_train_fp32),
    ("train-tf32", check_train_tf32),
    ("train-bf16", check_train_bf16),
    ("train-channels_last", check_train_channels_last),
    ("train-compile", check_train_compile),
    ("train-awp", check_train_awp),
    ("train-fix_param", check_train_fix_param),
    ("train-trades_l2", check_train_trades_l2),
    ("train-autoattack", check_train_autoattack),
    ("resume-cpu", check_resume_cpu),
    ("resume-channels_last", check_resume_channels_last),
    ("eval-memory", check_eval_memory),
    ("bench-fp32", check_bench_fp32),
    ("bench-tf32", check_bench_tf32),
    ("bench-bf16", check_bench_bf16),
    ("bench-compile", check_bench_compile),
    ("bench-packs", check_bench_packs),
    ("sigterm", check_sigterm),
    ("ray-sweep", check_ray_sweep),
    ("ray-no-gpu", check_ray_no_gpu),
]
NAMES = [name for name, _ in CHECKS]
GROUPS = sorted({name.split("-")[0] for name in NAMES})


# ----------------------------------------------------------------------------------------------
# Probes: run in a subprocess of this script (python scripts/gpu_check.py --probe NAME)


def probe_environment() -> dict[str, Any]:
    """What the results file's header says about the machine, and whether CUDA is there."""
    import torch

    import ablation

    env: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(), "ablate": ablation.__version__,
        "cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count()}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0),
                   capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=props.total_memory / 2**30)
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def probe_memory(device_name: str) -> dict[str, Any]:
    """Per model: the estimate of eval_bytes_per_image, the eval batch eval_batch_size picks,
    and on CUDA the measured extra peak memory per image of one eval-mode PGD step (batch 256
    against batch 64, weights frozen as in the trainer's attack)."""
    import torch

    from ablation.attacks import ThreatModel, pgd
    from ablation.config import TrialConfig
    from ablation.datasets import dataset_info
    from ablation.device import eval_batch_size, eval_bytes_per_image
    from ablation.models import build_trial_model

    torch.set_num_threads(1)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer has it
    info = dataset_info("cifar10")
    threat = ThreatModel("linf", 8 / 255, 2 / 255)
    rows = {}
    for name in ("preact18", "wrn34_10"):
        model = build_trial_model(TrialConfig(model=name, device=device_name), info).to(device)
        image = torch.rand(3, 32, 32, device=device)
        row = {"estimate_bytes": eval_bytes_per_image(model, image),
               "batch": eval_batch_size(model, image, device)}
        if cuda:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            peaks = {}
            for batch in (64, 256):
                x = torch.rand(batch, 3, 32, 32, device=device)
                y = torch.randint(0, info.num_classes, (batch,), device=device)
                pgd(model, x, y, threat, 1)  # warm-up: cuDNN's autotuning allocates its own
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                pgd(model, x, y, threat, 1)
                torch.cuda.synchronize(device)
                peaks[batch] = torch.cuda.max_memory_allocated(device) - base
                del x, y
            row["measured_bytes"] = (peaks[256] - peaks[64]) / (256 - 64)
            row["peak_bytes"] = peaks
        rows[name] = row
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# The results file


def git_description() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if commit.returncode != 0:
        return "not a git checkout"
    return commit.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() \
        else "unknown"


def environment_lines(env: dict[str, Any], cpu: bool) -> list[str]:
    if env.get("cuda_available"):
        gpu = (f"{env['gpu_name']}, compute capability {env['capability']}, "
               f"{env['gpu_memory_gib']:.1f} GiB, driver {env['driver']}"
               + (f" ({env['gpu_count']} visible; the checks use the first)"
                  if env["gpu_count"] > 1 else ""))
    else:
        gpu = "none"
    if cpu:
        gpu += " (--cpu: every check on the CPU)"
    autoattack = importlib.util.find_spec("pyautoattack") is not None
    return [
        "| | |", "| --- | --- |",
        f"| GPU | {gpu} |",
        f"| CPU | {env['cpu']}, {env['cpu_count']} cores |",
        f"| torch | {env['torch']}, CUDA {env['cuda'] or 'none'}, cuDNN {env['cudnn'] or 'none'} |",
        f"| Python | {env['python']} ({sys.executable}) |",
        f"| ablate | {env['ablate']}, commit {env['git']} |",
        f"| Ray | {ray_available() or 'not installed'} |",
        f"| pyautoattack | {'installed' if autoattack else 'not installed'} |",
    ]


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_lines(results: list[Result]) -> list[str]:
    lines = ["| check | status | seconds | numbers | detail |",
             "| --- | --- | ---: | --- | --- |"]
    for r in results:
        numbers = "; ".join(f"{k}: {v}" for k, v in r.numbers.items())
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {cell(numbers)} | "
                     f"{cell(r.detail)} |")
    return lines


def write_results(path: Path, header: list[str], results: list[Result], finished: bool) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    lines = [*header, "", *table_lines(results), "",
             f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"
             + ("" if finished else " so far (the run is not finished)")]
    failed = [r for r in results if r.status == "FAIL" and r.log]
    if failed:
        lines += ["", "## Output of the failed checks (last lines)"]
        for r in failed:
            lines += ["", f"### {r.name}", "", "```", r.log.rstrip(), "```"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def tail_of_logs(logs: list[Path], lines: int = 25) -> str:
    parts = []
    for path in logs:
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        if text:
            parts.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Main


def selected(names: str | None) -> set[str]:
    """Check names from a comma-separated list of names and groups (train, bench, ray, ...)."""
    out = set()
    for given in filter(None, (n.strip() for n in (names or "").split(","))):
        matches = [n for n in NAMES if n == given or n.split("-")[0] == given]
        if not matches:
            raise SystemExit(f"gpu-check: unknown check {given!r}; checks: {', '.join(NAMES)}; "
                             f"groups: {', '.join(GROUPS)}")
        out.update(matches)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description="The GPU check of ablate: PASS/FAIL table in one file "
        "(see the module docstring and BENCHMARKS.md).")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"),
                        help="results file (Markdown; default: gpu-check.md here)")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearsal without a GPU: tiny sizes on the CPU, CUDA-only "
                             "checks SKIP")
    parser.add_argument("--only", metavar="NAME,...", help="run just these checks or groups")
    parser.add_argument("--skip", metavar="NAME,...", help="leave out these checks or groups")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help=f"the whole run's time (default {GPU_BUDGET_S} s; "
                             f"{CPU_BUDGET_S} s with --cpu)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (data, trial folders, logs) and print its path")
    parser.add_argument("--probe", choices=["environment", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:  # a subprocess of the check: one JSON line on stdout
        rows = probe_environment() if args.probe == "environment" else probe_memory(args.device)
        print(json.dumps(rows))
        return 0
    wanted = set(NAMES) if not args.only else selected(args.only)
    wanted -= selected(args.skip)

    started = time.monotonic()
    probe = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe",
                            "environment"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        print(f"gpu-check: cannot import torch and ablation with {sys.executable}: "
              f"{last_line(probe.stderr)}", file=sys.stderr)
        return 2
    env = json.loads(last_line(probe.stdout))
    if not env["cuda_available"] and not args.cpu:
        print(f"gpu-check: no CUDA GPU here (torch {env['torch']} sees none); run it on a GPU "
              "machine, or pass --cpu for the CPU rehearsal", file=sys.stderr)
        return 2
    env["driver"] = driver_version() if env["cuda_available"] else "none"
    env["git"] = git_description()
    budget = args.budget or (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(cpu=args.cpu, sizes=CPU_SIZES if args.cpu else GPU_SIZES, work=work,
                  ablate=ablate_command(), environment=env, deadline=started + budget,
                  ray_temp=Path(tempfile.mkdtemp(prefix="gcray", dir="/tmp")))
    out = args.out.resolve()
    header = ["# GPU check", "",
              f"`{command_line([sys.executable, 'scripts/gpu_check.py', *(argv or sys.argv[1:])])}`"
              f" on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, budget "
              f"{budget:.0f} s ({'--cpu: tiny sizes on the CPU' if args.cpu else 'one GPU'})",
              "", *environment_lines(env, args.cpu)]
    results: list[Result] = []
    try:
        results.append(make_data(ctx))
        write_results(out, header, results, finished=False)
        for name, function in CHECKS:
            ctx.check, ctx.logs, ctx.procs = name, [], []
            if name not in wanted:
                result = Result(name, "SKIP", 0.0, {}, "not selected (--only / --skip)")
            elif results[0].status == "FAIL":
                result = Result(name, "FAIL", 0.0, {}, "not run: the data could not be written")
            elif ctx.deadline - time.monotonic() < 5:
                result = Result(name, "FAIL", 0.0, {}, f"not run: the {budget:.0f} s budget "
                                                       "is spent")
            else:
                print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
                result = run_check(ctx, function)
            results.append(result)
            write_results(out, header, results, finished=False)
        header[2] += f"; took {time.monotonic() - started:.0f} s"
        write_results(out, header, results, finished=True)
    except KeyboardInterrupt:
        print(f"gpu-check: interrupted; the checks done so far are in {out}", file=sys.stderr)
        return 130
    finally:
        end_processes(ctx)
        end_ray_leftovers(ctx)
        if args.keep:
            print(f"gpu-check: work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ctx.ray_temp, ignore_errors=True)
    print("\n".join(table_lines(results)))
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"gpu-check: {len(failed)} FAIL{': ' + ', '.join(failed) if failed else ''}; "
          f"results in {out} ({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


def run_check(ctx: Context, function: Callable[[Context], tuple[str, dict[str, str], str]]
              ) -> Result:
    """One check, timed; its exception is a FAIL with a one-line reason (and the end of its
    output for the results file), never the end of the run."""
    begin = time.monotonic()
    try:
        status, numbers, detail = function(ctx)
        result = Result(ctx.check, status, 0.0, numbers, detail)
    except Skipped as why:
        result = Result(ctx.check, "SKIP", 0.0, {}, str(why))
    except CheckFailed as why:
        result = Result(ctx.check, "FAIL", 0.0, {}, str(why))
    except Exception as err:  # a bug or a surprise: this check fails, the run goes on
        result = Result(ctx.check, "FAIL", 0.0, {}, f"{type(err).__name__}: {last_line(str(err))}")
    finally:
        end_processes(ctx)  # whatever a failed check left running
    if result.status == "FAIL":
        result.log = tail_of_logs(ctx.logs)
    result.seconds = time.monotonic() - begin
    return result


def make_data(ctx: Context) -> Result:
    """The tiny CIFAR-10 in the official format (the writer the tests use)."""
    begin = time.monotonic()
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_fake_dataset

        s = ctx.sizes
        write_fake_dataset("cifar10", ctx.data_root, s.n_train, s.n_test, seed=0)
        size = sum(p.stat().st_size for p in ctx.data_root.rglob("*") if p.is_file())
        return Result("data", "PASS", time.monotonic() - begin,
                      {"images": f"{s.n_train} train + {s.n_test} test",
                       "size": f"{size / 2**20:.1f} MiB"},
                      "CIFAR-10 python pickles (cifar-10-batches-py) in the work folder")
    except Exception as err:
        return Result("data", "FAIL", time.monotonic() - begin, {},
                      f"{type(err).__name__}: {last_line(str(err))}")


def end_processes(ctx: Context) -> None:
    """SIGKILL the process groups of the running check that are still alive."""
    for proc in ctx.procs:
        if proc.poll() is None:
            kill_group(proc)


def end_ray_leftovers(ctx: Context) -> None:
    """SIGKILL what is left of the Ray this run started (its processes name its private temp
    folder on their command lines), by pid: no other Ray on the machine is touched."""
    if ctx.ray_temp is None:
        return
    marker = str(ctx.ray_temp).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
