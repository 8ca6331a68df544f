"""``docker/ablate.sbatch`` end to end on a 2-node Ray cluster simulated on this machine: the
script's own commands start the head and a worker, its driver runs a sweep, the worker node is
killed mid-trial, and the trial resumes on the head node from its checkpoint with nothing lost or
repeated (docs/cluster.md, "SLURM").

Each simulated node is a network namespace (its own IP on a private veth pair, so port 6379 and
Ray's other ports are its own), a UTS namespace (its hostname, which attempts.log records) and a
mount namespace (its own /etc/hosts, /dev/shm and Ray temp dir). The worker node also has a PID
namespace, so killing its first process with SIGKILL kills the whole node at once, as a lost
machine would; the head node keeps this machine's PIDs, so that the stand-in ``srun``, which the
batch script runs on the head, can enter the worker's namespaces to start a job step there.
Needs root (network namespaces), Linux, ``ip``, ``unshare`` and ``nsenter``; slow (about two
minutes on 2 busy cores, half of it Ray noticing the lost node)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (TIMING, ablate, reference_curves, starts, stored, stored_rows,
                      tiny_trial, write_fake_dataset)

from ablation import files
from ablation.grid import load_sweep

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "docker" / "ablate.sbatch"
EPOCHS = 8  # about 2 s each on a loaded CPU: time to see a few epochs on the worker, then kill it
KILL_AFTER = 2  # epochs of the worker's trial stored before its node is killed
JOB_TIMEOUT_S = 400

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                       reason="simulating nodes needs network namespaces (Linux, root)"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("ip", "unshare", "nsenter", "bash")),
                       reason="needs ip (iproute2), unshare and nsenter (util-linux), bash"),
    pytest.mark.skipif(not all((Path(sys.prefix) / "bin" / t).exists() for t in ("ray", "ablate")),
                       reason="the sbatch script runs `ray` and `ablate` from the venv's bin/"),
]

# PID 1 (worker) or a plain holder (head) of a simulated node's namespaces: it names the node,
# gives it its own /etc/hosts and private tmpfs mounts, says "ready", then reaps orphans.
HOLDER = """
import os, socket, subprocess, sys, time
name, hosts, *private = sys.argv[1:]
socket.sethostname(name)
subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
for path in private:
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path], check=True)
print("ready", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""

# srun, as the sbatch script calls it: run the command once on each node it selects (--nodelist,
# or the first --nodes of the nodes not in --exclude) by entering that node's namespaces, and pass
# SIGTERM/SIGINT on to the tasks, as srun does.
SRUN = r"""#!/bin/bash
set -u
nodes=1 nodelist= exclude=
while [[ $1 == --* ]]; do
    case $1 in
        --nodes=*) nodes=${1#*=} ;;
        --nodelist=*) nodelist=${1#*=} ;;
        --exclude=*) exclude=${1#*=} ;;
    esac
    shift
done
tasks=()
for entry in $E2E_NODES; do                       # name=holder pid, in node order
    name=${entry%%=*}
    if [[ -n $nodelist && $name != "$nodelist" ]] || [[ $name == "$exclude" ]]; then
        continue
    fi
    (( ${#tasks[@]} < nodes )) || break
    nsenter -t "${entry#*=}" -n -u -m -p --wd="$PWD" -- "$@" &
    tasks+=($!)
done
trap 'for t in "${tasks[@]}"; do pkill -TERM -P "$t"; done' TERM INT
status=0
for t in "${tasks[@]}"; do
    while :; do
        wait "$t"
        rc=$?
        kill -0 "$t" 2>/dev/null || break
    done
    (( rc )) && status=$rc
done
exit "$status"
"""


def holder_child(pid: int, timeout: float = 10.0) -> int:
    """The one child of ``pid`` (unshare --fork's child: PID 1 of the new PID namespace)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"unshare {pid} started no child")


def kill_netns(ns: str) -> None:
    """SIGKILL every process in network namespace ``ns`` (all started by this test), by pid."""
    for _ in range(50):
        pids = subprocess.run(["ip", "netns", "pids", ns], check=False, capture_output=True,
                              text=True).stdout.split()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class Nodes:
    """Two simulated nodes, n1 (head, 198.18.0.1) and n2 (worker, 198.18.0.2), each a set of
    namespaces held by one process; ``private`` paths get a tmpfs of their own on each node."""

    NAMES = ("n1", "n2")

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.netns = {name: f"ablate-e2e-{tag}-{name}" for name in self.NAMES}
        self.holders: dict[str, int] = {}
        self.procs: list[subprocess.Popen] = []

    def start(self, tmp: Path, private: list[str]) -> None:
        hosts = tmp / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"198.18.0.{i} {name}\n" for i, name in enumerate(self.NAMES, start=1)))
        for name in self.NAMES:
            added = subprocess.run(["ip", "netns", "add", self.netns[name]], check=False,
                                   capture_output=True, text=True)
            if added.returncode:  # root without CAP_SYS_ADMIN, as in many CI containers
                pytest.skip(f"cannot create network namespaces here: {added.stderr.strip()}")
        n1, n2 = (self.netns[name] for name in self.NAMES)
        # A veth pair straight from n1 to n2 (created inside them: no name in this machine's
        # namespace), 198.18.0.0/24 (a benchmarking range; nothing leaves the pair). The default
        # route gives Ray's node-IP lookup (a UDP "connect" to 8.8.8.8) the veth's address.
        subprocess.run(["ip", "link", "add", "eth0", "netns", n1, "type", "veth", "peer", "name",
                        "eth0", "netns", n2], check=True)
        for i, name in enumerate(self.NAMES, start=1):
            ns = self.netns[name]
            for cmd in (["addr", "add", f"198.18.0.{i}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"],
                        ["route", "add", "default", "dev", "eth0"]):
                subprocess.run(["ip", "-n", ns, *cmd], check=True)
            pid_ns = ["--pid", "--fork", "--mount-proc", "--kill-child"] if name != "n1" else []
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount",
                                     *pid_ns, sys.executable, "-c", HOLDER, name, str(hosts),
                                     "/dev/shm", *private],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.procs.append(proc)
            ready = proc.stdout.readline()
            if ready != "ready\n":
                proc.wait()
                raise RuntimeError(f"node {name} did not start: {ready}{proc.stdout.read()}")
            self.holders[name] = holder_child(proc.pid) if pid_ns else proc.pid

    def env(self) -> str:
        """E2E_NODES for the stand-in srun: ``n1=PID n2=PID``."""
        return " ".join(f"{name}={pid}" for name, pid in self.holders.items())

    def kill(self, name: str) -> None:
        """The node is lost: SIGKILL its PID 1, which takes every process of the node with it."""
        os.kill(self.holders[name], signal.SIGKILL)

    def close(self) -> None:
        for name in self.NAMES:
            try:
                os.kill(self.holders.get(name, -1), signal.SIGKILL)
            except (ProcessLookupError, OverflowError):
                pass
            kill_netns(self.netns[name])
            subprocess.run(["ip", "netns", "del", self.netns[name]], check=False,
                           capture_output=True)
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def job(tmp_path):
    """Two simulated nodes, a stand-in srun and the environment SLURM gives a 2-node job with one
    CPU per task; every process of the job is killed at the end, whatever happened."""
    job_id = f"e2e{uuid.uuid4().hex[:8]}"
    temp = Path(f"/tmp/ray-{job_id}")  # the script's --temp-dir: one tmpfs per node
    temp.mkdir()
    nodes = Nodes()
    try:
        nodes.start(tmp_path, [str(temp)])
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text(SRUN)
        (bin_dir / "srun").chmod(0o755)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "SLURM_", "ABLATE_"))}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", E2E_NODES=nodes.env(),
                   ABLATE_VENV=sys.prefix, SLURM_SUBMIT_DIR=str(tmp_path),
                   SLURM_JOB_ID=job_id, SLURM_JOB_NAME="ablate", SLURM_JOB_NUM_NODES="2",
                   SLURM_CPUS_PER_TASK="1", SLURMD_NODENAME="n1", USER=env.get("USER", "root"))
        yield nodes, env
    finally:
        nodes.close()
        shutil.rmtree(temp, ignore_errors=True)


def write_sweep(tmp_path: Path) -> Path:
    """Two trials (fix_param on [3, 4], seeds 0 and 1) on a tiny CIFAR-10 in the real format, at
    an absolute path every node reads, as on a cluster's shared file system. No AT baseline: a
    fix_lr trial would start from its baseline's checkpoint (ablation/fork.py), not at epoch 0 on
    a node of its own."""
    data = tmp_path / "data"
    write_fake_dataset("cifar10", data, n_train=256, n_test=64)
    base = tiny_trial(dataset="cifar10", data_root=str(data), epochs=EPOCHS, train_steps=2,
                      test_steps=2, train_eval_size=64)
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump({
        "name": "e2e", "base": base,
        "grid": {"intervention": ["fix_param"], "layers": [[3, 4]], "seed": [0, 1]}}))
    return path


def attempts(run: Path, key: str) -> list[tuple[str, int]]:
    """(node, epoch) of each start of the trial, from its attempts.log."""
    return [(s.node, s.epoch) for s in starts(run, key)]


def epochs_stored(run: Path, key: str) -> int:
    return stored_rows(run / files.curves_file(key))


def test_sbatch_job_loses_a_worker_node_mid_trial_and_the_trial_resumes_on_the_head(tmp_path,
                                                                                     job):
    nodes, env = job
    sweep = write_sweep(tmp_path)
    keys = sorted(load_sweep(sweep).by_key)
    run = tmp_path / "runs" / "e2e"
    log = tmp_path / "job.out"
    with open(log, "w") as out:  # the batch script runs on the job's first node, n1
        script = subprocess.Popen(
            ["nsenter", "-t", str(nodes.holders["n1"]), "-n", "-u", "-m", f"--wd={tmp_path}",
             "--", "bash", str(SBATCH), str(sweep), str(run)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    start = time.monotonic()
    victim, killed_at = None, None
    try:
        while script.poll() is None and time.monotonic() - start < JOB_TIMEOUT_S:
            if victim is None:
                victim = next((k for k in keys if ("n2", 0) in attempts(run, k)), None)
            elif killed_at is None and epochs_stored(run, victim) >= KILL_AFTER:
                nodes.kill("n2")
                killed_at = epochs_stored(run, victim)
            time.sleep(0.1)
        status = script.wait(timeout=max(1, JOB_TIMEOUT_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        status = None
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    seconds = time.monotonic() - start
    text = log.read_text()
    assert status == 0, f"job status {status} after {seconds:.0f} s:\n{text[-6000:]}"
    assert "2 of 2 Ray nodes up" in text, text[-6000:]
    assert victim is not None, "no trial started on the worker node n2:\n" + text[-6000:]
    assert killed_at is not None and killed_at < EPOCHS, (
        f"the trial on n2 finished before its node was killed ({killed_at})")

    # The lost trial started on n2 at epoch 0 and resumed once, on n1, from the checkpoint of
    # an epoch at least as late as the last one the driver had stored; the other never moved.
    lost = attempts(run, victim)
    assert len(lost) == 2 and lost[0] == ("n2", 0) and lost[1][0] == "n1", lost
    assert killed_at <= lost[1][1] < EPOCHS, (lost, killed_at)
    (other,) = set(keys) - {victim}
    assert attempts(run, other) == [("n1", 0)], attempts(run, other)

    # Every epoch once, and the lost trial's curve equals an uninterrupted run's, bit for bit.
    curves = stored(run)
    for key in keys:
        assert sorted(curves[curves.key == key].epoch) == list(range(EPOCHS)), key
    config = load_sweep(sweep).by_key[victim]
    mine = curves[curves.key == victim].sort_values("epoch").reset_index(drop=True)
    ref = reference_curves(config, tmp_path)
    pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                  ref.drop(columns=TIMING), check_exact=True)
    assert sorted(pd.read_parquet(run / files.SUMMARY_TABLE).key) == keys
    assert ablate("status", run).stdout.strip().endswith("2 trials: all done")
