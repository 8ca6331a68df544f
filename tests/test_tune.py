"""``ablate run`` through real Ray on the CPU (ablation/tune.py), as the user meets it: a sweep
that fills the store row by row and that kills of the driver or of a worker lose and repeat
nothing; added and changed trials; a run folder at a URI; what pending trials wait for, a full
disk, Ctrl-C and SIGTERM, a second driver, the searcher over the fork queue, and failures that a
retry cannot fix. Each failure is one line with its exit status, in seconds; each interruption
resumes. Joining Ray and a cluster too small: tests/test_cluster.py.

One sweep runs in the default suite (the first test); the others are ``slow``, each with a cheaper
test of its path in the default suite (the store, the worker and the trainer without Ray:
tests/test_store.py, test_worker.py, test_trainer.py; a kill and resume: test_local.py)."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import (TIMING, ablate, one_error_line, reference_curves, small_sweep, starts,
                      stored, stored_rows, timed, tiny_trial, write_sweep)

from ablation.grid import load_sweep
from ablation.report import load_run
from ablation.report.figures import intervention_grid
from ablation.report.tables import best_last_table as best_last
from ablation.store import DriverLock, RunDir

INTERRUPTED = "interrupted; run the same command again to resume"
STOPPED = "stopped by SIGTERM; run the same command again to resume"


# --- a sweep through Ray: the store, kills, resume ------------------------------------------------


def test_tiny_sweep_through_ray_fills_the_store_row_by_row(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml")
    run = tmp_path / "run"
    done = ablate("run", sweep, "--storage", run, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    # Tune's own loggers are off (ablation/loggers.py says why), and so is its warning that
    # their files are missing
    assert not [p for p in (run / "ray").rglob("*") if p.name.startswith("events.out")
                or p.name in ("result.json", "progress.csv")]
    assert "Failed to fetch metrics" not in done.stderr
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


@pytest.mark.slow
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
        assert epochs_started(run, key)[0] == (first, bool(first))
        assert all(s <= 6 for s, _ in epochs_started(run, key))
    assert any(s > 0 and not forked for key in load_sweep(sweep).by_key
               for s, forked in epochs_started(run, key)), "no trial resumed from a checkpoint"


def epochs_started(run, key):
    """(epoch, forked) of each start of a trial, from its attempts.log."""
    return [(s.epoch, s.forked) for s in starts(run, key)]


@pytest.mark.slow
@pytest.mark.parametrize("where,parent_epochs", [("before", 1), ("at", 2), ("after", 4)])
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
            stored_rows(curve) >= parent_epochs):
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
    assert epochs_started(run, child) == [(2, True)]  # its first 2 epochs were never trained again
    forked = curves[curves.key == child].sort_values("epoch").forked_from.tolist()
    assert forked == [parent] * 2 + [""] * 4
    assert epochs_started(run, parent)[0] == (0, False) and all(
        not f for _, f in epochs_started(run, parent))


@pytest.mark.slow
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
            if 2 <= stored_rows(curve) < 8:
                victim = (key, starts(run, key)[-1].pid)
                break
        time.sleep(0.05)
    assert victim is not None, "no trial reached its second epoch in time"
    key, pid = victim
    subprocess.run(["kill", "-9", str(pid)], check=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    begun = starts(run, key)
    assert len(begun) == 2 and begun[1].epoch >= 2, begun  # resumed, not restarted
    curves = stored(run)
    assert len(curves[curves.key == key]) == 8
    assert not curves.duplicated(["key", "epoch"]).any()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        resumed += [s for s, forked in epochs_started(remote, key)[1:] if not forked]
    assert any(s > 0 for s in resumed), "no trial resumed from a checkpoint at the URI"
    status = ablate("status", uri, env={"ABLATE_CACHE": str(tmp_path / "cache3")})
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().endswith("3 trials: all done")
    again = ablate("run", sweep, "--storage", uri, "--quiet", env=fresh)
    assert again.returncode == 0 and "0 to run" in again.stderr


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


# --- what pending trials wait for ----------------------------------------------------------------


@pytest.mark.slow
def test_busy_resources_wait_and_status_says_for_what(tmp_path):
    """A trial that takes the whole machine: the others wait, `ablate status` says so while they
    do, and nothing waits once the sweep is done. (--no-fork: the fix_lr trial would otherwise
    wait for its AT baseline's fork checkpoint first)"""
    cpus = os.cpu_count()
    # long enough that the second trial is seen pending for WAIT_CHECK_S (the first runs ~20 s)
    sweep = write_sweep(tmp_path / "s.yaml", epochs=60)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ablation", "run", str(sweep), "--storage",
                             str(run), "--quiet", "--cpus-per-trial", str(cpus), "--no-fork"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline and not seen:
        if (run / "sweep.json").exists():
            status = ablate("status", run).stdout
            seen = next((line for line in status.splitlines()
                         if line.startswith("pending:") and "wait for" in line), None)
        time.sleep(1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert seen == f"pending: 1 trial(s) wait for {{CPU: {cpus}}} (free now: {{CPU: 0}})", seen
    assert json.loads((run / "state.json").read_text())["waiting"] is None
    assert "pending:" not in ablate("status", run).stdout


def test_status_shows_what_a_live_driver_waits_for_and_not_a_dead_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_manifest(load_sweep(write_sweep(tmp_path / "s.yaml")))
    run.write_states({}, waiting="2 trial(s) wait for {CPU: 1, GPU: 1}")  # this process: alive
    assert "pending: 2 trial(s) wait for {CPU: 1, GPU: 1}" in ablate("status", run.root).stdout
    state = json.loads(run.state_path.read_text())
    state["driver"]["pid"] = dead_pid()
    run.state_path.write_text(json.dumps(state))
    assert "waiting" not in ablate("status", run.root).stdout


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- a full disk ---------------------------------------------------------------------------

FULL_DISK = """
import errno, sys
from ablation import store
from ablation.cli import main

method, after = sys.argv[1], int(sys.argv[2])  # the store's writer that fails, after N calls
calls = []
real = getattr(store.RunDir, method)

def full(self, *args, **kwargs):
    calls.append(1)
    if len(calls) > after:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *args, **kwargs)

setattr(store.RunDir, method, full)
main(sys.argv[3:])
"""


def run_with_a_full_disk(method, after, *args):
    return subprocess.run([sys.executable, "-c", FULL_DISK, method, str(after), "run", *map(
        str, args)], capture_output=True, text=True, timeout=600)


def test_a_full_disk_before_ray_is_one_line_and_status_1(tmp_path):
    run = tmp_path / "run"
    done = run_with_a_full_disk("write_json", 0, write_sweep(tmp_path / "s.yaml"), "--storage",
                                run, "--quiet")
    assert one_error_line(done, 1) == (f"error: {run}: no space left on the device; free some "
                                       "space there, then run the same command again to resume")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_full_disk_in_the_drivers_callback_is_one_line_and_the_rerun_completes(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=4)
    run = tmp_path / "run"
    done = run_with_a_full_disk("add_epochs", 3, sweep, "--storage", run, "--quiet")
    assert one_error_line(done, 1).startswith(f"error: {run}: no space left on the device")
    assert "TuneError" not in done.stderr and len(stored(run)) == 3
    assert_the_same_command_completes_the_sweep(sweep, run, tmp_path)


def assert_the_same_command_completes_the_sweep(sweep, run, tmp_path):
    again = ablate("run", sweep, "--storage", run, "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    curves = stored(run)
    for key, config in load_sweep(sweep).by_key.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_the_rerun_completes(tmp_path):
    """A 1 MiB tmpfs (root only): the workers' checkpoints and the driver's store fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        sweep = write_sweep(tmp_path / "s.yaml", epochs=6, layers=([3, 4], [1]))
        run = mount / "run"
        done = ablate("run", sweep, "--storage", run, "--quiet")
        # Tune logs a worker's failed checkpoint write (a traceback) as it happens; the driver
        # then ends with one line of its own, no traceback of its own.
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, done.stderr[-3000:]
        assert lines[-1].startswith(f"error: {run}: no space left on the device"), lines[-1]
        assert "TuneError" not in done.stderr and "During handling" not in done.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert_the_same_command_completes_the_sweep(sweep, run, tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(mount)])


# --- Ctrl-C and SIGTERM ---------------------------------------------------------------------


def interrupt(sweep, run, ready, signum=signal.SIGINT, group=True):
    """Start `ablate run`, send ``signum`` once ``ready()`` to its process group (as a terminal's
    Ctrl-C does) or to the driver alone (as `ray job stop` does where the driver joined a
    cluster), and return its exit status and what it printed after its plan line."""
    proc = subprocess.Popen([sys.executable, "-m", "ablation", "run", str(sweep), "--storage",
                             str(run), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    (os.killpg if group else os.kill)(proc.pid, signum)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30
    assert "to run; folder" in err, err[-3000:]
    return proc.returncode, err.split("to run; folder")[1].splitlines()[1:]


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_marks_no_trial(tmp_path):
    run = tmp_path / "run"
    status, printed = interrupt(write_sweep(tmp_path / "s.yaml", epochs=20), run,
                                ready=lambda: (run / "state.json").exists())  # Tune starts
    assert (status, printed) == (130, [INTERRUPTED])  # no Tuner.restore advice, no error.txt
    assert not list(run.glob("trials/*/error.txt"))


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_the_same_command_resumes_to_the_uninterrupted_curves(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=4)
    run = tmp_path / "run"
    status, printed = interrupt(sweep, run, ready=lambda: (run / "curves").exists() and any(
        (run / "curves").glob("*.parquet")) and 1 <= len(stored(run)) < 6)
    assert (status, printed) == (130, [INTERRUPTED])
    assert not list(run.glob("trials/*/error.txt"))
    assert "interrupted" in ablate("status", run).stdout
    assert len(stored(run)) < 8, "the sweep finished before the interrupt"
    assert_the_same_command_completes_the_sweep(sweep, run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["driver", "group"])
def test_sigterm_exits_143_with_one_line_then_the_same_command_resumes(tmp_path, group):
    """SIGTERM after the first stored epoch: one line and 143, no stack dump of Ray's C++ handler
    (its core worker's replaced ablate's when Ray started), no trial marked; the same command
    then finishes every trial with each epoch stored once. Sent to the process group, it also
    ends the local Ray's own processes under the driver (SLURM signals every process of a job
    step)."""
    sweep = write_sweep(tmp_path / "s.yaml", epochs=4)
    run = tmp_path / "run"
    status, printed = interrupt(sweep, run, ready=lambda: (run / "curves").exists() and any(
        (run / "curves").glob("*.parquet")) and len(stored(run)) >= 1, signum=signal.SIGTERM,
                                group=group)
    assert (status, printed) == (143, [STOPPED])  # no "*** SIGTERM received", no traceback
    assert not list(run.glob("trials/*/error.txt"))
    assert "interrupted" in ablate("status", run).stdout
    assert len(stored(run)) < 8, "the sweep finished before the SIGTERM"
    assert_the_same_command_completes_the_sweep(sweep, run, tmp_path)
    assert not stored(run).duplicated(["key", "epoch"]).any()


SIGTERM_AT_THE_PLAN = """
import os, signal, sys
from ablation import store
from ablation.cli import main

plan = store.plan

def sigterm_then_plan(*args, **kwargs):  # the driver holds the folder's lock; Ray has not started
    os.kill(os.getpid(), signal.SIGTERM)
    return plan(*args, **kwargs)

store.plan = sigterm_then_plan
main(sys.argv[1:])
"""


def test_sigterm_before_ray_starts_is_the_same_line(tmp_path):
    done = subprocess.run([sys.executable, "-c", SIGTERM_AT_THE_PLAN, "run",
                           str(write_sweep(tmp_path / "s.yaml")), "--storage",
                           str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (143, STOPPED + "\n"), done.stderr[-3000:]


# --- one driver per run folder -------------------------------------------------------------

HOLD = """
import sys, time
from ablation.store import DriverLock, RunDir
with DriverLock(RunDir(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_driver_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        done, seconds = timed("run", write_sweep(tmp_path / "s.yaml"), "--storage", run,
                              "--quiet")
        line = one_error_line(done, 2)
        assert re.fullmatch(rf"error: {re.escape(str(run))} is being run by pid {holder.pid} on "
                            rf"host {re.escape(socket.gethostname())} since \d\d:\d\d; stop it "
                            "or wait for it to end", line), line
        assert len(done.stderr.strip().splitlines()) == 1 and seconds < 30
        assert not (run / "sweep.json").exists()  # refused before it changed anything
    finally:
        holder.kill()
        holder.wait()
    with DriverLock(RunDir(run)):  # the dead holder's lock is free again
        assert json.loads((run / ".driver.lock").read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_two_real_drivers_on_one_folder_the_second_is_refused(tmp_path):
    sweep = write_sweep(tmp_path / "s.yaml", epochs=6)
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ablation", "run", str(sweep), "--storage",
                              str(run), "--quiet"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "state.json").exists():
        time.sleep(0.2)
    second = ablate("run", sweep, "--storage", run, "--quiet")
    assert f"is being run by pid {first.pid} on host" in one_error_line(second, 2)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert ablate("status", run).stdout.strip().endswith("2 trials: all done")


# --- trials that wait for their baseline's fork file -------------------------------------------


def unit(key, fork=None):
    """A pack of one trial, as store.dispatch_units hands it out."""
    return {"key": key, "trials": [{"key": key, "fork": fork}]}


def test_forks_wait_for_their_baselines_file_and_the_status_line_counts_them():
    """Forks waiting for their baseline are no Tune trials yet: the searcher hands out what the
    fork queue gives (tests/test_fork.py), tells it what Tune's flattened results report, and the
    waiting line counts the held forks meanwhile."""
    from ray.tune.search import Searcher

    from ablation.fork import Fork, ForkQueue
    from ablation.tune import WaitWatch, make_searcher

    watch = WaitWatch({"CPU": 1.0}, None)
    assert not watch.update([], force=True) and watch.line is None
    units = [unit(k) for k in ("f1", "f2", "at")]
    watch.queue = ForkQueue(units, {"f1": Fork("at", 2), "f2": Fork("at", 2)})
    searcher = make_searcher(watch.queue)
    assert watch.update([], force=True)
    assert watch.line == "2 trial(s) wait for their baseline's fork checkpoint"
    assert searcher.suggest("t1") == {"unit": units[2]}  # the baseline first
    assert searcher.suggest("t2") is None  # the forks wait for its file
    # epoch 1 done and the file written (Tune flattens the row; each result names its trial)
    searcher.on_trial_result("t1", {"trial": "at", "row/epoch": 1, "forks": [2]})
    assert [searcher.suggest(t)["unit"]["key"] for t in ("t3", "t4")] == ["f1", "f2"]
    assert searcher.suggest("t5") == Searcher.FINISHED
    assert watch.update([], force=True) and watch.line is None


@pytest.mark.parametrize("free,line", [
    ({"CPU": 1.0}, "2 trial(s) starting (Ray starts a worker process for each)"),
    ({"CPU": 0.5}, "2 trial(s) wait for {CPU: 1} (free now: {CPU: 0.5})")])
def test_trials_pending_on_free_resources_are_starting_not_waiting(monkeypatch, free, line):
    # Tune keeps a trial PENDING while Ray starts its worker, a minute or more on a busy node;
    # "wait for {CPU: 1} (free now: {CPU: 1})" read as a stuck sweep.
    import ray

    from ablation import tune

    class Pending:
        status = "PENDING"

        def __init__(self, key):
            self.config = {"unit": unit(key)}

    monkeypatch.setattr(ray, "available_resources", lambda: free)
    monkeypatch.setattr(tune, "fits_a_node", lambda request: True)
    watch = tune.WaitWatch({"CPU": 1.0}, None)
    trials = [Pending("a"), Pending("b")]
    watch.update(trials, force=True)  # first seen pending now
    watch.since = {key: t - tune.WAIT_CHECK_S for key, t in watch.since.items()}
    watch.update(trials, force=True)
    assert watch.line == line


def test_a_fork_whose_baseline_ends_is_handed_out_by_the_searcher_to_train_from_scratch():
    from ablation.fork import Fork, ForkQueue
    from ablation.tune import make_searcher

    units = [unit("at"), unit("f", {"parent": "at", "epochs": 2})]
    searcher = make_searcher(ForkQueue(units, {"f": Fork("at", 2)}))
    assert searcher.suggest("t1")["unit"]["key"] == "at" and searcher.suggest("t2") is None
    searcher.on_trial_complete("t1", error=True)
    assert searcher.suggest("t3") == {"unit": {**units[1], "fork": None}}  # from scratch


# --- where a trial trains, and failures that a retry cannot fix ------------------------------


def status_states(run):
    """Trial key -> state, from `ablate status`."""
    lines = ablate("status", run).stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in lines if line.startswith("synthetic-")}


@pytest.mark.slow
def test_failures_a_retry_cannot_fix_are_one_line_and_not_retried(tmp_path):
    """A diverging trial (TrainingDiverged) and one asking for a GPU that Ray did not give it
    (ConfigError) each fail once, with --max-failures 2, and error.txt holds one line naming
    the trial; the trial beside them, device auto, trains on the CPU (no GPU was asked for)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "fails", "base": tiny_trial(epochs=2),
        "baselines": {"AUTO": {"intervention": "none", "device": "auto"},
                      "BOOM": {"intervention": "none", "seed": 1, "lr_max": 1e12,
                               "momentum": 0.0},
                      "GPU": {"intervention": "none", "seed": 2, "device": "cuda"}}}))
    run = tmp_path / "run"
    done = ablate("run", sweep, "--storage", run, "--quiet", "--gpus-per-trial", 0)
    line = one_error_line(done, 1)
    assert re.fullmatch(r"error: 2 trial\(s\) did not finish \(e\.g\. \S+-s[12]-\w+\); see "
                        r"\S+/trials/<key>/error\.txt, then run the same command again to "
                        "resume them", line), line
    keys = {config.seed: key for key, config in load_sweep(sweep).by_key.items()}
    assert status_states(run) == {keys[0]: "done", keys[1]: "errored", keys[2]: "errored"}
    errors = {seed: (run / "trials" / keys[seed] / "error.txt").read_text() for seed in (1, 2)}
    assert re.fullmatch(rf"trial {keys[1]}: the training loss stopped being finite at epoch 0, "
                        r"batch \d+ \(lr [^)]+\); lower lr_max or check the data, then train "
                        r"it from scratch\n", errors[1]), errors[1]
    assert errors[2] == (f"trial {keys[2]}: key 'device': 'cuda' asks for a GPU, but Ray gave "
                         "this trial none; pass --gpus-per-trial (e.g. 1, or 0.5 to share one) or "
                         "set device: auto\n")
    attempts = {seed: (run / "trials" / keys[seed] / "attempts.log").read_text().splitlines()
                for seed in (0, 1)}
    assert len(attempts[1]) == 1, attempts[1]  # Tune did not retry it
    assert attempts[0][0].endswith("starts at epoch 0, device cpu"), attempts[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU: the trial would train on it")
def test_a_trial_given_a_gpu_keeps_its_device_field(tmp_path):
    """The other half of the above, through Ray: a pretend GPU (Ray counts one, there is none)
    given to the trial, which then asks torch for it (and is told CUDA is not available)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "gpu", "base": tiny_trial(epochs=1, device="cuda"),
                                     "grid": {"seed": [0]}}))
    run = tmp_path / "run"
    done = ablate("run", sweep, "--storage", run, "--quiet", "--gpus-per-trial", 1,
                  env={"RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 1})})
    assert "1 trial(s) did not finish" in one_error_line(done, 1)
    (key,) = load_sweep(sweep).by_key
    assert (run / "trials" / key / "error.txt").read_text() == (
        f"trial {key}: key 'device': 'cuda' asked for, but CUDA is not available here\n")



# --- packed trials (--pack) --------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_in_packs_survives_a_kill_and_each_trial_equals_itself_alone(tmp_path):
    """--pack 2 on AT and fix_lr and fix_param on [3, 4] and [1] over 6 epochs, in float64 so
    that a pack's rounding is checked to 1e-12: the fix_lr trials fork from AT after 2 epochs and
    form a pack of their own, the fix_param ones another (in key order), AT trains alone. The driver is SIGKILLed mid-sweep; the same
    command finishes it. Every epoch is stored once, each trial's curve equals the trial trained
    alone, `ablate status` shows the packs, and --dry-run lists them."""
    sweep_file = tmp_path / "s.yaml"
    sweep = small_sweep("packs", layers=([3, 4], [1]),
                        **tiny_trial(epochs=6, precision="fp64"))
    sweep["grid"]["intervention"] = ["fix_lr", "fix_param"]
    sweep_file.write_text(yaml.safe_dump(sweep))
    trials = load_sweep(sweep_file).by_key
    run = tmp_path / "run"
    plan = ablate("run", sweep_file, "--pack", "2", "--dry-run")
    assert plan.returncode == 0 and "4 trials in 2 packs" in plan.stdout, plan.stdout
    cmd = [sys.executable, "-m", "ablation", "run", str(sweep_file), "--storage", str(run),
           "--quiet", "--pack", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(trained(run)) < 6:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = ablate("run", sweep_file, "--storage", run, "--quiet", "--pack", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    curves = stored(run)
    assert len(curves) == 6 * len(trials) and not curves.duplicated(["key", "epoch"]).any()
    for key, config in trials.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path).drop(columns=TIMING)
        got = mine[ref.columns]
        numeric = [c for c in ref.columns if ref[c].dtype.kind == "f"]
        gap = ((got[numeric] - ref[numeric]).abs() / ref[numeric].abs().clip(lower=1e-12))
        assert gap.max().max() < 1e-12, (key, gap.max().max())
        packed = "in a pack of 2" in (run / "trials" / key / "attempts.log").read_text()
        assert packed == (config.intervention != "none"), key
    status = ablate("status", run).stdout.splitlines()
    assert status[0].rstrip().endswith("pack") and status[-1].endswith("all done")
