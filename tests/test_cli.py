"""``ablate train`` through a real subprocess: outputs, resume after SIGKILL, one-line errors."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import tiny_trial

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
    done = ablate("train", trial, "--out", out, "--quiet", "--threads", "1")
    assert done.returncode == 0, done.stderr
    curves = pd.read_parquet(out / "curves.parquet")
    assert CURVE_COLUMNS <= set(curves.columns)
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
