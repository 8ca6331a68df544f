"""scripts/gpu_check.py, the GPU check, proven on the CPU: without a GPU it is one line and a
non-zero exit; --cpu runs every check at tiny sizes and leaves the whole table in one file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU, even on a GPU machine

sys.path.insert(0, str(SCRIPT.parent))
from gpu_check import NAMES  # noqa: E402  (the check names, in table order)


def gpu_check(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def table(path):
    """{check: (status, seconds, numbers, detail)} from a results file's table."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[1] in ("PASS", "FAIL", "SKIP"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_without_a_gpu_it_says_so_in_one_line_and_exits_non_zero(tmp_path):
    out = tmp_path / "gc.md"
    done = gpu_check("--out", out, env=NO_GPU, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no CUDA GPU" in lines[0] and "--cpu" in lines[0]
    assert done.stdout == "" and not out.exists()


def test_an_unknown_check_name_is_one_line(tmp_path):
    done = gpu_check("--cpu", "--only", "nonsense", "--out", tmp_path / "gc.md", timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "unknown check 'nonsense'" in done.stderr


@pytest.mark.slow  # a training run in a subprocess; the script's entry: the two tests above
def test_one_check_leaves_the_whole_table_with_the_others_not_selected(tmp_path):
    out = tmp_path / "gc.md"
    done = gpu_check("--cpu", "--only", "train-fp32", "--out", out, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table(out)
    assert list(rows) == ["data", *NAMES]
    assert rows["data"][0] == rows["train-fp32"][0] == "PASS"
    assert "epoch 1:" in rows["train-fp32"][2] and " s" in rows["train-fp32"][2]
    assert all(rows[n][0] == "SKIP" and "not selected" in rows[n][3]
               for n in NAMES if n != "train-fp32")
    text = out.read_text()
    for label in ("| GPU |", "| torch |", "| Python |", "| ablate |", "| Ray |"):
        assert label in text
    assert "| check | status | seconds | numbers | detail |" in done.stdout


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_check_and_passes(tmp_path):
    """About 4 minutes on 2 cores: every check, tiny sizes, CUDA-only ones SKIP."""
    out = tmp_path / "gc.md"
    done = gpu_check("--cpu", "--out", out, env=NO_GPU, timeout=1800)
    assert done.returncode == 0, out.read_text() if out.exists() else done.stderr[-3000:]
    rows = table(out)
    assert list(rows) == ["data", *NAMES]
    statuses = {name: row[0] for name, row in rows.items()}
    cuda_only = {"gpu-tests", "train-compile", "bench-compile", "ray-no-gpu"}
    assert {n for n, s in statuses.items() if s == "SKIP"} <= cuda_only | {
        "train-autoattack", "ray-sweep"}  # these two also SKIP without pyautoattack / Ray
    assert all(statuses[n] == "SKIP" for n in cuda_only)
    assert "FAIL" not in statuses.values()
    assert "0 FAIL" in done.stdout
