"""The Ray driver of ``ablate run`` as the user meets it: what pending trials wait for, a full
disk, Ctrl-C and SIGTERM, a second driver, the searcher over the fork queue, and failures that a
retry cannot fix. Each failure is one line with its exit status, in seconds; each interruption
resumes. Joining Ray and a cluster too small: tests/test_cluster.py."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_trial
from test_cluster import one_error_line, timed
from test_sweep import TIMING, ablate, reference_curves, stored, write_sweep

from ablation.grid import load_sweep
from ablation.store import DriverLock, RunDir

INTERRUPTED = "interrupted; run the same command again to resume"
STOPPED = "stopped by SIGTERM; run the same command again to resume"


# --- what pending trials wait for ----------------------------------------------------------------


@pytest.mark.slow
def test_busy_resources_wait_and_status_says_for_what(tmp_path):
    """A trial that takes the whole machine: the others wait, `ablate status` says so while they
    do, and nothing waits once the sweep is done. (--no-fork: the fix_lr trial would otherwise
    wait for its AT baseline's fork checkpoint first)"""
    cpus = os.cpu_count()
    sweep = write_sweep(tmp_path / "s.yaml", epochs=10)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ablation", "run", str(sweep), "--storage",
                             str(run), "--quiet", "--cpus-per-trial", str(cpus), "--no-fork"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline and not seen:
        if (run / "sweep.json").exists():
            status = ablate("status", run).stdout
            seen = next((line for line in status.splitlines() if line.startswith("waiting:")),
                        None)
        time.sleep(1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert seen == f"waiting: 1 trial(s) wait for {{CPU: {cpus}}} (free now: {{CPU: 0}})", seen
    assert json.loads((run / "state.json").read_text())["waiting"] is None
    assert "waiting:" not in ablate("status", run).stdout


def test_status_shows_what_a_live_driver_waits_for_and_not_a_dead_ones(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_manifest(load_sweep(write_sweep(tmp_path / "s.yaml")))
    run.write_states({}, waiting="2 trial(s) wait for {CPU: 1, GPU: 1}")  # this process: alive
    assert "waiting: 2 trial(s) wait for {CPU: 1, GPU: 1}" in ablate("status", run.root).stdout
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


@pytest.mark.parametrize("group", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["driver", "group"])
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


def test_forks_wait_for_their_baselines_file_and_the_status_line_counts_them():
    """Forks waiting for their baseline are no Tune trials yet: the searcher hands out what the
    fork queue gives (tests/test_fork.py), tells it what Tune's flattened results report, and the
    waiting line counts the held forks meanwhile."""
    from ray.tune.search import Searcher

    from ablation.fork import Fork, ForkQueue
    from ablation.tune import WaitWatch, make_searcher

    watch = WaitWatch({"CPU": 1.0}, None)
    assert not watch.update([], force=True) and watch.line is None
    params = [{"key": k, "fork": None} for k in ("f1", "f2", "at")]
    watch.queue = ForkQueue(params, {"f1": Fork("at", 2), "f2": Fork("at", 2)})
    searcher = make_searcher(watch.queue)
    assert watch.update([], force=True)
    assert watch.line == "2 trial(s) wait for their baseline's fork checkpoint"
    assert searcher.suggest("t1") == {"trial": params[2]}  # the baseline first
    assert searcher.suggest("t2") is None  # the forks wait for its file
    searcher.on_trial_result("t1", {"row/epoch": 1, "forks": [2]})  # epoch 1 done: file
    assert [searcher.suggest(t)["trial"]["key"] for t in ("t3", "t4")] == ["f1", "f2"]
    assert searcher.suggest("t5") == Searcher.FINISHED
    assert watch.update([], force=True) and watch.line is None


def test_a_fork_whose_baseline_ends_is_handed_out_by_the_searcher_to_train_from_scratch():
    from ablation.fork import Fork, ForkQueue
    from ablation.tune import make_searcher

    params = [{"key": k, "fork": {"parent": "at", "epochs": 2} if k == "f" else None}
              for k in ("at", "f")]
    searcher = make_searcher(ForkQueue(params, {"f": Fork("at", 2)}))
    assert searcher.suggest("t1")["trial"]["key"] == "at" and searcher.suggest("t2") is None
    searcher.on_trial_complete("t1", error=True)
    assert searcher.suggest("t3") == {"trial": {"key": "f", "fork": None}}


# --- where a trial trains, and failures that a retry cannot fix ------------------------------


def status_states(run):
    """Trial key -> state, from `ablate status`."""
    lines = ablate("status", run).stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in lines if line.startswith("synthetic-")}


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

