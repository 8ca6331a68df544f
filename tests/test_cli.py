"""``ablate train`` through a real subprocess: outputs, resume after SIGKILL, one-line errors."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import tiny_trial
from test_sweep import TIMING, reference_curves

from ablation.config import load_trial

CURVE_COLUMNS = {"key", "dataset", "model", "method", "threat", "intervention", "layers", "seed",
                 "epoch", "lr", "train_loss", "train_acc", "train_robust_loss", "train_robust_acc",
                 "train_eval_acc", "train_eval_robust_acc", "test_loss", "test_acc",
                 "test_robust_loss", "test_robust_acc", "train_seconds", "eval_seconds"}


def ablate(*args, check=None):
    return subprocess.run([sys.executable, "-m", "ablation", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def write(path, trial):
    path.write_text(yaml.safe_dump(trial))
    return path


def test_train_writes_curves_summary_and_checkpoint_then_resumes(tmp_path):
    trial = write(tmp_path / "t.yaml", tiny_trial(epochs=3, intervention="awp", layers=[3, 4]))
    out = tmp_path / "out"
    done = ablate("train", trial, "--out", out, "--quiet")  # 1 thread, as a sweep's trial
    assert done.returncode == 0, done.stderr
    curves = pd.read_parquet(out / "curves.parquet")
    assert CURVE_COLUMNS <= set(curves.columns)
    ref = reference_curves(load_trial(trial), tmp_path)  # what `ablate run` stores for it
    pd.testing.assert_frame_equal(curves[ref.columns].drop(columns=TIMING),
                                  ref.drop(columns=TIMING), check_exact=True)
    assert list(curves.epoch) == [0, 1, 2] and curves.key.nunique() == 1
    assert (curves.layers == "3,4").all() and (curves.intervention == "awp").all()
    summary = json.loads((out / "summary.json").read_text())
    best = curves.test_robust_acc.idxmax()
    assert summary["best_epoch"] == best and summary["key"] == curves.key[0]
    assert summary["diff_test_robust_acc"] == pytest.approx(
        curves.test_robust_acc.max() - curves.test_robust_acc.iloc[-1])
    assert (out / "checkpoint.pt").exists() and (out / "config.yaml").exists()
    again = ablate("train", trial, "--out", out, "--quiet")
    assert again.returncode == 0 and "already done" in again.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "curves.parquet"), curves)


def test_sigkill_mid_run_then_the_same_command_gives_the_uninterrupted_curve(tmp_path):
    trial = write(tmp_path / "t.yaml", tiny_trial(epochs=6, intervention="fix_lr", layers=[3]))
    ref = ablate("train", trial, "--out", tmp_path / "ref", "--quiet", "--threads", "1")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ablation", "train", str(trial), "--out", str(out), "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two epochs are on disk, mid-way through the third
        curves = out / "curves.parquet"
        if curves.exists() and len(pd.read_parquet(curves)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(pd.read_parquet(out / "curves.parquet")) < 6, "killed too late to test anything"
    resumed = ablate("train", trial, "--out", out, "--quiet", "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr
    drop = ["train_seconds", "eval_seconds"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "curves.parquet").drop(columns=drop),
                                  pd.read_parquet(tmp_path / "ref/curves.parquet").drop(columns=drop),
                                  check_exact=True)
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_sigterm_mid_run_is_one_line_and_status_143_and_the_same_command_resumes(tmp_path):
    trial = write(tmp_path / "t.yaml", tiny_trial(epochs=20))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ablation", "train", str(trial), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    curves = out / "curves.parquet"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not curves.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (143, "stopped by SIGTERM; run the same command again to "
                                           "resume\n"), err[-3000:]
    before = pd.read_parquet(curves)
    assert 1 <= len(before) < 20, "stopped too late to test anything"
    again = ablate("train", trial, "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr
    after = pd.read_parquet(curves)
    assert list(after.epoch) == list(range(20))
    pd.testing.assert_frame_equal(after.iloc[:len(before)], before)  # resumed, not redone


def test_autoattack_numbers_land_in_the_summary(tmp_path):
    trial = write(tmp_path / "t.yaml", tiny_trial(epochs=1))
    out = tmp_path / "out"
    done = ablate("train", trial, "--out", out, "--quiet", "--autoattack", "16")
    assert done.returncode == 0, done.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["autoattack_n"] == 16
    assert 0 <= s["best_autoattack_acc"] <= 1 and 0 <= s["last_autoattack_acc"] <= 1
    # AutoAttack is at least as strong as PGD-3, measured here on the first 16 test images only.
    assert s["last_autoattack_acc"] <= s["last_test_robust_acc"] + 0.3
    assert "AutoAttack" in done.stdout


@pytest.mark.parametrize("trial,needle", [
    ({"dataset": "synthetic", "colour": 1}, "unknown key 'colour'"),
    ({"intervention": "fix_lr", "layers": [5]}, "key 'layers': [5]"),
    ({"intervention": "awp", "layers": []}, "key 'layers'"),
    ({"eps": -0.1}, "key 'eps'"),
    ({"epochs": "many"}, "key 'epochs'"),
    ({"model": "resnet9"}, "key 'model': 'resnet9'"),
    ({"dataset": "cifar10", "data_root": "/nonexistent/data"}, "/nonexistent/data"),
])
def test_bad_trials_fail_with_one_line_and_status_2(tmp_path, trial, needle):
    path = write(tmp_path / "bad.yaml", trial)
    done = ablate("train", path, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "missing.yaml"], "missing.yaml"),
    (["train", "{trial}", "--set", "epochs"], "KEY=VALUE"),
    (["train", "{trial}", "--set", "layers=[0]", "--set", "intervention=awp"], "key 'layers'"),
    (["train", "{trial}", "--threads", "0"], "--threads"),
    (["train", "{trial}", "--bogus"], "--bogus"),
])
def test_bad_command_lines_fail_with_one_line_and_status_2(tmp_path, args, needle):
    trial = write(tmp_path / "t.yaml", tiny_trial())
    done = ablate(*[a.format(trial=trial) for a in args])
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_explains_every_option():
    done = ablate("train", "--help")
    assert done.returncode == 0
    for option in ("--out", "--autoattack", "--set", "--threads", "--quiet"):
        assert option in done.stdout


# ------------------------------------------------------------ malformed input, as the user meets it

BOMB = ("[" + ", ".join(['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                        + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
                        + ["[" + ", ".join(["*a7"] * 9) + "]"]) + "]")  # 9^9 strings in 473 bytes


def _file(tmp, name, data):
    (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return tmp / name


def _trial(tmp, text="", **fields):
    return _file(tmp, "t.yaml", yaml.safe_dump(tiny_trial(**fields)) + text)


def _checkpoint_of(key):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"format": 1, "key": key}, buffer)
    return buffer.getvalue()


class _Call:
    """Unpickles as ``function(*args)``: what a crafted pickle can make any loader run."""

    def __init__(self, function, *args):
        self.reduced = function, args

    def __reduce__(self):
        return self.reduced


def _crafted_cifar(tmp):
    """A CIFAR-10 folder whose first batch runs ``touch <tmp>/ran`` when unpickled."""
    from conftest import write_fake_dataset

    write_fake_dataset("cifar10", tmp / "data", 10, 4)
    crafted = {"data": _Call(os.system, f"touch {tmp / 'ran'}"), "labels": []}
    _file(tmp, "data/cifar-10-batches-py/data_batch_1", pickle.dumps(crafted, protocol=2))
    return tmp / "data"


def _sweep(tmp, **base):
    return _file(tmp, "s.yaml", yaml.safe_dump({"name": "s", "base": tiny_trial(**base),
                                                "grid": {"seed": [0, 1]}}))


def _train(tmp, trial, *args, out=None):
    """``ablate train`` arguments with ``--out tmp/out`` (none would write under the cwd); with
    ``out`` (file name -> bytes), that folder first holds a tiny trial's config.yaml and those."""
    if out is not None:
        (tmp / "out").mkdir()
        for name, data in {"config.yaml": yaml.safe_dump(tiny_trial()), **out}.items():
            _file(tmp / "out", name, data)
    return ["train", trial, "--out", tmp / "out", *args]


MALFORMED = {  # case -> (the arguments, given tmp_path; what the error line must hold)
    "binary yaml": (lambda t: _train(t, _file(t, "t.yaml", b"epochs: 3\n\xff\xfe\x00")),
                    "t.yaml: not UTF-8 text"),
    "alias bomb": (lambda t: _train(t, _trial(t, f"milestones: {BOMB}\n")),
                   "t.yaml: its aliases (*name) expand to more than"),
    "alias bomb in --set": (lambda t: _train(t, _trial(t), "--set", f"milestones={BOMB}"),
                            "its aliases (*name) expand"),
    "--set not yaml": (lambda t: _train(t, _trial(t), "--set", "epochs=[1,"),
                       "--set 'epochs=[1,': line 1 not valid YAML"),
    "seed of 2^32": (lambda t: _train(t, _trial(t, seed=2**32)), "key 'seed'"),
    "lr_max 1e300": (lambda t: _train(t, _trial(t, lr_max=1e300)), "key 'lr_max'"),
    "l2 eps inf": (lambda t: _train(t, _trial(t, threat="l2", eps=float("inf"))), "key 'eps'"),
    "eps 1/0": (lambda t: _train(t, _trial(t, eps="1/0")), "key 'eps': '1/0'"),
    "no cifar data": (lambda t: _train(t, _trial(t, dataset="cifar10", data_root=str(t / "no"))),
                      "cifar10: no data at"),
    "--out under a file": (lambda t: ["train", _trial(t), "--out", _file(t, "f", "") / "out"],
                           "f is a file"),
    "corrupt summary.json": (lambda t: _train(t, _trial(t), out={"summary.json": b"{"}),
                             "out/summary.json: not a summary ablate wrote"),
    "corrupt config.yaml": (lambda t: _train(t, _trial(t), out={"config.yaml": b"\xff: ["}),
                            "out/config.yaml: not UTF-8 text"),
    "another trial's config.yaml": (lambda t: _train(t, _trial(t, seed=1), out={}),
                                    "out/config.yaml: holds trial"),
    "another trial's checkpoint": (
        lambda t: _train(t, _trial(t), out={"checkpoint.pt": _checkpoint_of("other")}),
        "out/checkpoint.pt: holds trial 'other'"),
    "corrupt checkpoint": (lambda t: _train(t, _trial(t), out={"checkpoint.pt": b"x"}),
                           "out/checkpoint.pt: not a readable ablate checkpoint"),
    "crafted cifar pickle": (
        lambda t: _train(t, _trial(t, dataset="cifar10", data_root=str(_crafted_cifar(t)))),
        "data_batch_1: it calls 'posix.system'"),
    "sweep alias bomb": (lambda t: ["run", _file(t, "s.yaml", f"name: s\nbase: {BOMB}\n")],
                         "s.yaml: its aliases"),
    "sweep without its data": (lambda t: ["run", _sweep(t, dataset="svhn", data_root=str(t)),
                                          "--storage", t / "runs"], "svhn: no data at"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_one_error_line_and_changes_nothing(tmp_path, case):
    make_args, needle = MALFORMED[case]
    args = make_args(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    start = time.perf_counter()
    done = ablate(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert needle in lines[0], lines[0]
    assert time.perf_counter() - start < 60
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "the command changed or wrote files"


@pytest.mark.parametrize("case", ["seed of 2^32", "no cifar data", "sweep without its data"])
def test_config_and_data_errors_come_before_torch_and_ray_load(tmp_path, case):
    make_args, needle = MALFORMED[case]
    code = ("import sys\nfrom ablation.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n"
            "    print(exit.code, [m for m in ('torch', 'ray') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, make_args(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []" and needle in done.stderr, done.stdout + done.stderr


def test_version_is_the_packages():
    from importlib.metadata import version

    done = ablate("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ablate {version('ablation')}"


@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_never_load_torch_or_ray(study_run, tmp_path, command):
    # On a login node torch costs ~2 s and 1 GB of address space; neither command needs it.
    args = [command, str(study_run)] + (["--table", "best-last", "--out", str(tmp_path)]
                                        if command == "report" else [])
    code = ("import sys\nfrom ablation.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n    print('exit', exit.code)\n"
            "print([m for m in ('torch', 'ray') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("[]"), done.stdout + done.stderr
