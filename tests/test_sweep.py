"""``ablate run`` / ``ablate status`` through real Ray on the CPU: the store, kills, resume."""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_trial

from ablation.grid import load_sweep
from ablation.report import load_run
from ablation.report.figures import intervention_grid
from ablation.report.tables import best_last_table as best_last
from ablation.trainer import Trainer

TIMING = ["train_seconds", "eval_seconds"]


def ablate(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "ablation", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_sweep(path, epochs=3, layers=([3, 4],), name="tiny"):
    base = {k: v for k, v in tiny_trial(epochs=epochs).items()}
    path.write_text(yaml.safe_dump({
        "name": name, "base": base,
        "grid": {"intervention": ["fix_lr"], "layers": [list(l) for l in layers], "seed": [0]},
        "baselines": {"AT": {"intervention": "none"}},
    }))
    return path


def reference_curves(config, tmp_path):
    """The same trial trained in this process, one thread as in the sweep's workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pd.DataFrame(Trainer(config, tmp_path / "ref" / config.key).fit())
    finally:
        torch.set_num_threads(threads)


def stored(run):
    return pd.read_parquet(run / "curves")


def test_tiny_sweep_through_ray_fills_the_store_row_by_row(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml")
    run = tmp_path / "run"
    done = ablate("run", sweep, "--storage", run, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    curves = stored(run)
    trials = load_sweep(sweep).by_key
    assert sorted(curves.key.unique()) == sorted(trials)
    assert not curves.duplicated(["key", "epoch"]).any()
    for key, config in trials.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        for field, value in config.columns().items():  # every identifying field, every row
            assert (mine[field] == value).all(), field
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)
    summary = pd.read_parquet(run / "summary.parquet")
    assert sorted(summary.key) == sorted(trials)
    status = ablate("status", run)
    assert status.returncode == 0 and status.stdout.strip().endswith("2 trials: all done")
    again = ablate("run", sweep, "--storage", run, "--quiet")
    assert again.returncode == 0 and "0 to run" in again.stderr
    check_report_of_a_ray_run(run, curves)


def check_report_of_a_ray_run(run, curves):
    """The report reads the store the Ray driver wrote: panel 3 of the fix_lr grid holds AT and
    AT_fix_lr_[3, 4] with the stored values; the table's Best/Last match the curves."""
    report = load_run(run)
    (_, fig), = intervention_grid(report, "fix_lr")
    panel = fig.axes[2]
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["AT", "AT_fix_lr_[3, 4]"]
    (drawn,) = [ln for ln in panel.get_lines() if ln.get_label() == "AT_fix_lr_[3, 4]"]
    mine = curves[curves.intervention == "fix_lr"].sort_values("epoch").test_robust_acc
    np.testing.assert_allclose(drawn.get_ydata(), 100 * mine.to_numpy())
    table = best_last(report).numbers.set_index("name")
    assert table.loc["RAT_LR", "pgd_best"] == pytest.approx(100 * mine.max())
    assert table.loc["RAT_LR", "pgd_last"] == pytest.approx(100 * mine.iloc[-1])


def trained(folder):
    """The stored epochs that a trial trained itself (not copied from its fork's parent)."""
    if not list((folder / "curves").glob("*.parquet")):
        return pd.DataFrame({"key": []})
    curves = stored(folder)
    return curves[curves.get("forked_from", pd.Series("", index=curves.index)) == ""]


def kill_mid_sweep(sweep, folder, storage, env=None):
    """Start `ablate run` on the 3-trial x 6-epoch sweep and SIGKILL the driver once ``folder``
    holds epochs that two trials trained and 4 to 9 of the 14 epochs it trains (the two fix_lr
    trials fork from AT after 2 epochs)."""
    cmd = [sys.executable, "-m", "ablation", "run", str(sweep), "--storage", storage, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 180
    while time.time() < deadline:
        own = trained(folder)
        if own.key.nunique() >= 2 and 4 <= len(own) < 10:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(stored(folder)) < 18, "the sweep finished before the kill"


def test_sigkill_of_the_driver_then_the_same_command_loses_and_repeats_nothing(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=6, layers=([3, 4], [1]))
    run = tmp_path / "run"
    kill_mid_sweep(sweep, run, str(run))
    done = ablate("run", sweep, "--storage", run, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    curves = stored(run)
    assert len(curves) == 18 and not curves.duplicated(["key", "epoch"]).any()
    for key, config in load_sweep(sweep).by_key.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)
        first = 2 if config.intervention == "fix_lr" else 0  # forks from AT after 2 epochs
        assert starts(run, key)[0] == (first, bool(first))
        assert all(s <= 6 for s, _ in starts(run, key))
    assert any(s > 0 and not forked for key in load_sweep(sweep).by_key
               for s, forked in starts(run, key)), "no trial resumed from a checkpoint"


def starts(run, key):
    """(epoch, forked) of each start of a trial, from its attempts.log."""
    return [(int(e), bool(f)) for e, f in re.findall(
        r"starts at epoch (\d+)( from \S+'s checkpoint)?",
        (run / "trials" / key / "attempts.log").read_text())]


@pytest.mark.parametrize("where,parent_epochs", [
    pytest.param("before", 1, marks=pytest.mark.slow), ("at", 2),
    pytest.param("after", 4, marks=pytest.mark.slow)])
def test_sigkill_of_the_driver_around_a_fork_point_loses_and_repeats_nothing(tmp_path, where,
                                                                              parent_epochs):
    """AT and fix_lr [3, 4] over 6 epochs share 2 (the LR drops at t = 3, in epoch 2). The
    driver is killed once AT has stored 1 (before), 2 (at) or 4 (after) epochs; one trial at a
    time, so the fork has not started. The same command then finishes both: every curve equals
    its trial trained alone from scratch, and the fork trains only its own epochs."""
    sweep = write_sweep(tmp_path / "s.yaml", epochs=6, layers=([3, 4],))
    run = tmp_path / "run"
    trials = load_sweep(sweep).by_key
    (child,) = [k for k, c in trials.items() if c.intervention == "fix_lr"]
    (parent,) = [k for k, c in trials.items() if c.intervention == "none"]
    proc = subprocess.Popen([sys.executable, "-m", "ablation", "run", str(sweep), "--storage",
                             str(run), "--quiet", "--max-concurrent", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    curve = run / "curves" / f"{parent}.parquet"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            curve.exists() and len(pd.read_parquet(curve)) >= parent_epochs):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(pd.read_parquet(curve)) < 6, "the baseline finished before the kill"
    assert not (run / "trials" / child).exists()
    done = ablate("run", sweep, "--storage", run, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    curves = stored(run)
    assert len(curves) == 12 and not curves.duplicated(["key", "epoch"]).any()
    for key, config in trials.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)
    assert starts(run, child) == [(2, True)]  # its first 2 epochs were never trained again
    forked = curves[curves.key == child].sort_values("epoch").forked_from.tolist()
    assert forked == [parent] * 2 + [""] * 4
    assert starts(run, parent)[0] == (0, False) and all(not f for _, f in starts(run, parent))


def test_a_killed_worker_is_retried_from_its_checkpoint(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=8, layers=([3, 4],))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ablation", "run", str(sweep), "--storage", str(run), "--quiet",
           "--max-concurrent", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 180
    while time.time() < deadline and victim is None:
        for log in (run / "trials").glob("*/attempts.log") if (run / "trials").exists() else []:
            key = log.parent.name
            curve = run / "curves" / f"{key}.parquet"
            if curve.exists() and 2 <= len(pd.read_parquet(curve)) < 8:
                victim = (key, int(re.findall(r"pid (\d+)", log.read_text())[-1]))
                break
        time.sleep(0.05)
    assert victim is not None, "no trial reached its second epoch in time"
    key, pid = victim
    subprocess.run(["kill", "-9", str(pid)], check=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    begun = starts(run, key)
    assert len(begun) == 2 and begun[1][0] >= 2, begun  # resumed, not restarted
    curves = stored(run)
    assert len(curves[curves.key == key]) == 8
    assert not curves.duplicated(["key", "epoch"]).any()


def test_added_trials_run_and_changed_trials_are_refused(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=2, layers=([3, 4],))
    run = tmp_path / "run"
    assert ablate("run", sweep, "--storage", run, "--quiet").returncode == 0
    first = {p.parent.name: p.read_text() for p in (run / "trials").glob("*/attempts.log")}
    write_sweep(sweep, epochs=2, layers=([3, 4], [2]))
    added = ablate("run", sweep, "--storage", run, "--quiet")
    assert added.returncode == 0 and "2 done, 1 to run" in added.stderr
    for key, text in first.items():  # finished trials were not started again
        assert (run / "trials" / key / "attempts.log").read_text() == text
    assert stored(run).key.nunique() == 3
    write_sweep(sweep, epochs=3, layers=([3, 4], [2]))
    changed = ablate("run", sweep, "--storage", run, "--quiet")
    assert changed.returncode == 2 and "changed 3 trial(s)" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_dry_run_lists_keys_and_total_epochs(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=5)
    done = ablate("run", sweep, "--dry-run")
    assert done.returncode == 0
    for key in load_sweep(sweep).by_key:
        assert key in done.stdout
    # AT and fix_lr share epochs 0 and 1 (the LR drops at t = 2.5, in epoch 2)
    assert "2 trials, 10 epochs in total; 8 to train with 1 trials forked" in done.stdout
    assert "the first 2 from synthetic-linf-preact_small-at-none" in done.stdout
    assert "GPU-hours on one NVIDIA H200" in done.stdout
    plain = ablate("run", sweep, "--dry-run", "--no-fork")
    assert "10 epochs in total; 10 to train (no trial forks)" in plain.stdout
    bad = ablate("run", sweep, "--dry-run", "--bench", sweep)
    assert bad.returncode == 2 and f"--bench {sweep}: not an `ablate bench --json` file" \
        in bad.stderr and len(bad.stderr.strip().splitlines()) == 1 and not bad.stdout
    alone = ablate("run", sweep, "--bench", sweep)
    assert alone.returncode == 2 and "use it with --dry-run" in alone.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("raw,needle", [
    ({"name": "x", "base": {}, "grid": {"seed": [0]}, "extra": 1}, "extra"),
    ({"name": "x", "grid": {"seed": []}}, "seed"),
    ({"name": "x", "grid": {"intervention": ["awp"], "layers": [[5]]}}, "5"),
    ({"name": "x", "grid": {"intervention": ["awp"], "layers": [[]]}}, "layers"),
    ({"name": "x", "grid": {"intervention": ["awp"], "layers": [[3, 4], [4, 3]]}}, "same key"),
])
def test_bad_sweep_files_fail_with_one_line_and_status_2(tmp_path, raw, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = ablate("run", path, "--dry-run")
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    done = ablate("status", tmp_path)
    assert done.returncode == 2 and "not an ablate run folder" in done.stderr


def test_an_errored_trial_does_not_stop_the_others_and_can_be_restarted(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "errs", "base": tiny_trial(epochs=2),
        "baselines": {"AT": {"intervention": "none"},
                      "BOOM": {"intervention": "none", "lr_max": 1e12, "momentum": 0.0}}}))
    run = tmp_path / "run"
    first = ablate("run", sweep, "--storage", run, "--quiet", "--max-failures", "0")
    assert first.returncode == 1 and "1 trial(s) did not finish" in first.stderr.splitlines()[-1]
    status = ablate("status", run).stdout
    assert "1 done" in status and "1 errored" in status
    (boom,) = [p.parent for p in (run / "trials").glob("*/error.txt")]
    assert "stopped being finite at epoch 0, batch" in (boom / "error.txt").read_text()
    again = ablate("run", sweep, "--storage", run, "--quiet", "--max-failures", "0",
                   "--restart-errored")
    assert again.returncode == 1 and "1 done, 1 to run" in again.stderr
    assert len((boom / "attempts.log").read_text().splitlines()) == 1  # its folder started afresh


def test_a_sweep_at_a_uri_survives_a_kill_and_the_loss_of_the_local_disk(tmp_path):
    """--storage file://...: the same code path as s3:// (a local mirror, every file pushed).
    The driver is killed mid-sweep, the machine's cache is wiped, and the same command on a
    fresh cache finishes the sweep from what the URI holds: each epoch once, the uninterrupted
    curves, and at least one trial resumed from a checkpoint it pulled from the URI."""
    sweep = write_sweep(tmp_path / "s.yaml", epochs=6, layers=([3, 4], [1]))
    remote, first_cache = tmp_path / "bucket" / "run", tmp_path / "cache1"
    uri = f"file://{remote}"
    kill_mid_sweep(sweep, remote, uri, {"ABLATE_CACHE": str(first_cache)})
    for lock in first_cache.glob("*/trials/*/.lock"):  # the old machine's workers are gone
        with open(lock) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
    shutil.rmtree(first_cache)
    fresh = {"ABLATE_CACHE": str(tmp_path / "cache2")}
    done = ablate("run", sweep, "--storage", uri, "--quiet", env=fresh)
    assert done.returncode == 0, done.stderr[-3000:]
    curves = stored(remote)
    assert len(curves) == 18 and not curves.duplicated(["key", "epoch"]).any()
    resumed = []
    for key, config in load_sweep(sweep).by_key.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)
        assert (remote / "trials" / key / "checkpoint.pt").exists()
        assert (remote / "trials" / key / "summary.json").exists()
        resumed += [s for s, forked in starts(remote, key)[1:] if not forked]
    assert any(s > 0 for s in resumed), "no trial resumed from a checkpoint at the URI"
    status = ablate("status", uri, env={"ABLATE_CACHE": str(tmp_path / "cache3")})
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().endswith("3 trials: all done")
    again = ablate("run", sweep, "--storage", uri, "--quiet", env=fresh)
    assert again.returncode == 0 and "0 to run" in again.stderr


def test_a_storage_uri_pyarrow_cannot_open_is_refused_in_one_line(tmp_path):
    done = ablate("run", write_sweep(tmp_path / "s.yaml"), "--storage", "nosuch://bucket/runs")
    assert done.returncode == 2 and "nosuch://bucket/runs" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1




KILL_AT_THE_SUMMARY_ROW = """
import os, signal, sys
from pathlib import Path
from ablation import store
from ablation.cli import main

rebuild = store.RunDir.rebuild_summaries

def killed_before_the_row(self, *args, **kwargs):
    # A worker has written a trial's summary.json: die before the driver stores its row.
    if any(Path(self.trials_dir).glob("*/summary.json")):
        os.kill(os.getpid(), signal.SIGKILL)
    return rebuild(self, *args, **kwargs)

store.RunDir.rebuild_summaries = killed_before_the_row
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_between_a_trials_summary_and_its_row_loses_nothing(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=2)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THE_SUMMARY_ROW, "run", str(sweep),
                             "--storage", str(run), "--quiet", "--max-concurrent", "1"],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = sorted(p.parent.name for p in (run / "trials").glob("*/summary.json"))
    assert finished and not (run / "summary.parquet").exists()  # the row was never stored
    again = ablate("run", sweep, "--storage", run, "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    table = pd.read_parquet(run / "summary.parquet").set_index("key")
    assert sorted(table.index) == sorted(load_sweep(sweep).by_key)
    for key in finished:  # the trial that finished before the kill kept its numbers
        saved = json.loads((run / "trials" / key / "summary.json").read_text())
        assert table.loc[key, "best_test_robust_acc"] == saved["best_test_robust_acc"]
