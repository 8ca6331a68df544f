"""``ablate train`` (ablation/local.py) through a real subprocess: the output folder, resume after
SIGKILL and after SIGTERM, AutoAttack's numbers in the summary."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import TIMING, ablate, reference_curves, stored_rows, tiny_trial, write_yaml

from ablation.config import load_trial

CURVE_COLUMNS = {"key", "dataset", "model", "method", "threat", "intervention", "layers", "seed",
                 "epoch", "lr", "train_loss", "train_acc", "train_robust_loss", "train_robust_acc",
                 "train_eval_acc", "train_eval_robust_acc", "test_loss", "test_acc",
                 "test_robust_loss", "test_robust_acc", "train_seconds", "eval_seconds"}


def test_train_writes_curves_summary_and_checkpoint_then_resumes(tmp_path):
    trial = write_yaml(tmp_path / "t.yaml", tiny_trial(epochs=3, intervention="awp", layers=[3, 4]))
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


@pytest.mark.slow  # resume in process: tests/test_trainer.py; the sweep's: test_tune.py
def test_sigkill_mid_run_then_the_same_command_gives_the_uninterrupted_curve(tmp_path):
    trial = write_yaml(tmp_path / "t.yaml", tiny_trial(epochs=6, intervention="fix_lr", layers=[3]))
    ref = ablate("train", trial, "--out", tmp_path / "ref", "--quiet", "--threads", "1")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ablation", "train", str(trial), "--out", str(out), "--quiet",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once two epochs are on disk, mid-way through the third
        curves = out / "curves.parquet"
        if stored_rows(curves) >= 2:
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


@pytest.mark.slow
def test_sigterm_mid_run_is_one_line_and_status_143_and_the_same_command_resumes(tmp_path):
    trial = write_yaml(tmp_path / "t.yaml", tiny_trial(epochs=20))
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


@pytest.mark.slow
def test_autoattack_numbers_land_in_the_summary(tmp_path):
    trial = write_yaml(tmp_path / "t.yaml", tiny_trial(epochs=1))
    out = tmp_path / "out"
    done = ablate("train", trial, "--out", out, "--quiet", "--autoattack", "16")
    assert done.returncode == 0, done.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["autoattack_n"] == 16
    assert 0 <= s["best_autoattack_acc"] <= 1 and 0 <= s["last_autoattack_acc"] <= 1
    # AutoAttack is at least as strong as PGD-3, measured here on the first 16 test images only.
    assert s["last_autoattack_acc"] <= s["last_test_robust_acc"] + 0.3
    assert "AutoAttack" in done.stdout
