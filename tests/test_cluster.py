"""Joining Ray and a node's room for a trial (ablation/cluster.py) as the user of ``ablate run``
meets them: a wrong address, one where nothing listens, a refused token, a cluster or machine too
small, and what a local Ray listens on. Each failure is one line with its exit status, in
seconds."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import one_error_line, timed, write_sweep

from ablation.cluster import parse_address
from ablation.errors import ConfigError

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
TOKEN = "0123456789abcdef0123456789abcdef"  # the test cluster's token (RAY_AUTH_TOKEN)


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def kill_tree(marker):
    """End the processes whose command line holds ``marker`` (a folder this test made), by pid:
    `ray stop` would end every Ray on the machine."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


@pytest.fixture(scope="module")
def cluster():
    """A `ray start --head` with token auth and no CPU (nothing can run on it), in a private
    temp dir (short: Ray's socket paths must fit 107 characters): its address."""
    temp = tempfile.mkdtemp(prefix="ablray", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    started = subprocess.run([*RAY, "start", "--head", f"--port={port}", "--num-cpus=0",
                              f"--temp-dir={temp}", "--include-dashboard=false",
                              "--disable-usage-stats"],
                             capture_output=True, text=True, env=env, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        kill_tree(temp)
        shutil.rmtree(temp, ignore_errors=True)



# --- a wrong or unreachable address, a cluster or machine too small ----------------------------


@pytest.mark.parametrize("address", ["auto", "head:6379", "10.0.0.1:1", "[::1]:6379"])
def test_addresses_that_parse(address):
    assert parse_address(address) in (None, ("head", 6379), ("10.0.0.1", 1), ("::1", 6379))


@pytest.mark.parametrize("address", ["host:port:x", ":abc", "head", "head:0", "head:70000",
                                     "::1:6379", "ray://head:10001", "http://head:8265"])
def test_malformed_addresses_are_a_config_error_naming_them(address):
    with pytest.raises(ConfigError, match=re.escape(repr(address))):
        parse_address(address)


def test_a_malformed_address_is_one_line_and_status_2(tmp_path, address="host:port:x"):
    done, seconds = timed("run", write_sweep(tmp_path / "s.yaml"), "--storage", tmp_path / "run",
                          "--address", address, "--quiet")
    assert one_error_line(done, 2).startswith(f"error: --address {address!r}: expected")
    assert len(done.stderr.strip().splitlines()) == 1 and seconds < 30
    assert not (tmp_path / "run" / "sweep.json").exists()  # refused before the folder


def test_an_address_where_nothing_listens_is_one_line_in_seconds(tmp_path):
    # Ray itself retries such an address for many minutes (measured: over 5).
    done, seconds = timed("run", write_sweep(tmp_path / "s.yaml"), "--storage", tmp_path / "run",
                          "--address", f"127.0.0.1:{free_port()}", "--quiet")
    assert "nothing listens there" in one_error_line(done, 2), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and seconds < 30


def test_more_cpus_per_trial_than_the_machine_has_is_one_line_at_once(tmp_path):
    # Tune would wait forever (it only warns, every minute, that the cluster may be autoscaling).
    done, seconds = timed("run", write_sweep(tmp_path / "s.yaml"), "--storage", tmp_path / "run",
                          "--cpus-per-trial", 1000, "--quiet")
    line = one_error_line(done, 2)
    assert line.startswith("error: --cpus-per-trial 1000: a trial asks for {CPU: 1000} but this "
                           "machine has "), line
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # before Ray starts
    assert seconds < 60 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_gpus_per_trial_on_a_cluster_without_any_is_one_line_within_a_minute(tmp_path, cluster):
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    done, seconds = timed("run", write_sweep(tmp_path / "s.yaml"), "--storage", tmp_path / "run",
                          "--address", cluster, "--gpus-per-trial", 1, "--quiet", env=env)
    line = one_error_line(done, 2)
    assert f"no node of the Ray cluster at {cluster} can hold a trial's {{CPU: 1, GPU: 1}}" \
        in line and "the most one has: {CPU: 0, GPU: 0}" in line, line
    assert seconds < 60



# --- a cluster that wants a token ---------------------------------------------------------------


@pytest.mark.slow
def test_joining_a_token_cluster_without_the_token_says_which_variables_to_set(tmp_path,
                                                                               cluster):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    cmd = [sys.executable, "-m", "ablation", "run", str(write_sweep(tmp_path / "s.yaml")),
           "--storage", str(tmp_path / "run"), "--address", cluster, "--quiet"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    line = one_error_line(done, 2)
    assert "requires token authentication; set RAY_AUTH_MODE=token and its token in " \
           "RAY_AUTH_TOKEN or ~/.ray/auth_token" in line, line
    assert len(done.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 30
    wrong = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32})
    assert "refused this machine's token; set RAY_AUTH_TOKEN" in one_error_line(wrong, 2)



# --- what a local Ray listens on ----------------------------------------------------------------

LISTENERS = """
import json, os, subprocess, sys
from ablation.cluster import ray_cluster

with ray_cluster(None):
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])  # a worker or two listen too
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    links = [tuple(map(int, line.split())) for line in table.splitlines()]
    mine, grown = {os.getpid()}, True
    while grown:
        new = {p for p, pp in links if pp in mine} - mine
        mine |= new
        grown = bool(new)
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    from ray.tune.utils.util import warn_if_slow  # as run_sweep imports Tune: inside

    print(json.dumps([[line.split()[3] for line in ss.splitlines()
                       if any(f"pid={p}," in line for p in mine)],
                      warn_if_slow.DEFAULT_THRESHOLD]))
"""


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
def test_a_local_ray_listens_on_the_loopback_interface_only_and_its_token_is_private(tmp_path):
    """... and it starts quietly: no warning that token authentication is on (it is: a token is
    written), and Tune's 0.5 s "performance bottleneck" warnings raised to a minute."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (
        "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "TUNE_WARN_THRESHOLD_S")}
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True,
                          timeout=120, env={**env, "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    listening, slow = json.loads(done.stdout.strip().splitlines()[-1])
    assert "WARNING" not in done.stderr and "Token authentication" not in done.stderr, done.stderr
    assert slow == 60
    assert len(listening) >= 3, listening  # GCS, raylet, this driver, workers...
    for address in listening:
        assert address.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), \
            listening
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600

