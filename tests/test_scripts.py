"""The one-command scripts: scripts/demo.sh (the digits demo and its report) and scripts/test.sh
(the tests), with the venv they share (scripts/venv.sh). They run here with this test's own
environment as their venv (ABLATE_VENV), so nothing is installed; shellcheck checks them in
tests/test_cluster_files.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the environment running these tests: ablate and pytest are in it
needs_venv = pytest.mark.skipif(not (VENV / "bin" / "ablate").exists(),
                                reason="the tests do not run in a venv holding ablate")


def script(path: Path, *args: str, timeout: float = 120, **env: str
           ) -> subprocess.CompletedProcess:
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


@pytest.mark.parametrize("name", ["demo.sh", "test.sh"])
def test_a_python_older_than_3_10_is_one_line_before_anything_is_made(tmp_path, name):
    old = tmp_path / "bin" / "python3"  # answers as Python 3.8 does
    old.parent.mkdir()
    old.write_text('#!/bin/sh\nif [ "$1" = -V ]; then echo "Python 3.8.10"; else exit 1; fi\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = script(REPO / "scripts" / name, ABLATE_VENV=str(venv),
                  PATH=f"{old.parent}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"{REPO / 'scripts' / name}: ablate needs Python 3.10 or newer; python3 is Python "
        f"3.8.10 (install one, or name it: PYTHON=python3.11 {REPO / 'scripts' / name})"]
    assert not venv.exists()


@needs_venv
def test_test_sh_runs_pytest_then_the_slow_tests_and_keeps_the_failure():
    # A path that does not exist fails the default run; --slow still runs the slow tests after,
    # with the same arguments, and the script's status is the failure's. (--noconftest: the
    # conftest loads torch, seconds per run that tell nothing about the script.)
    done = script(REPO / "scripts" / "test.sh", "--slow", "-p", "no:cacheprovider",
                  "--noconftest", "tests/test_no_such_file.py", ABLATE_VENV=str(VENV))
    assert done.returncode == 4  # pytest's "usage error", from the first run and the second
    assert done.stderr.count("file or directory not found: tests/test_no_such_file.py") == 2


@pytest.mark.slow
@needs_venv
def test_demo_sh_runs_the_demo_and_prints_where_its_report_is(tmp_path):
    """The demo end to end (a few minutes on 2 cores) in a copy of the files it reads, then a
    second call, which reuses the finished run."""
    for rel in ("scripts/demo.sh", "scripts/venv.sh", "sweeps/demo_digits.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    index = tmp_path / "reports" / "demo_digits" / "index.html"
    for call in ("first", "second"):
        done = script(tmp_path / "scripts" / "demo.sh", timeout=1800, ABLATE_VENV=str(VENV))
        assert done.returncode == 0, f"{call} call:\n{done.stderr[-3000:]}"
        assert done.stdout.splitlines()[-1] == f"report: {index}"
        assert index.exists() and "demo_digits" in index.read_text()
    assert " 0 to run;" in done.stderr, "the second call ran trials again"
