"""The ``ablate`` command line (ablation/cli.py) through a real subprocess, as the user meets it:
bad trials, sweeps, options and malformed input are one error line with status 2, changing
nothing, before torch and Ray load; --help and --version; ``status`` and ``report`` never load
torch. What ``ablate train`` writes: tests/test_local.py; ``ablate run``: tests/test_tune.py."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ablate, tiny_trial, write_fake_dataset, write_sweep, write_yaml

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
    path = write_yaml(tmp_path / "bad.yaml", trial)
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
    trial = write_yaml(tmp_path / "t.yaml", tiny_trial())
    done = ablate(*[a.format(trial=trial) for a in args])
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


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


_FINISHED: list[Path] = []  # one finished run per test session, copied for each case


def _finished_run(tmp, swap: str | None = None, damage=None):
    """A copy of a finished two-trial run folder (``small_sweep``); with ``swap`` (a file name,
    or "best"), the first trial's copy of that file replaced by the second trial's (a foreign
    file); ``damage(root)`` damages it further."""
    import shutil
    import tempfile

    from conftest import run_sweep_in_process, small_sweep

    if not _FINISHED:
        _FINISHED.append(run_sweep_in_process(small_sweep(), Path(tempfile.mkdtemp()) / "run"))
    root = Path(shutil.copytree(_FINISHED[0], tmp / "run"))
    first, second = sorted((root / "trials").iterdir())
    if swap:
        name = swap if swap != "best" else next(first.glob("best-*.pt")).name
        source = next(second.glob("best-*.pt")) if swap == "best" else second / swap
        (first / name).write_bytes(source.read_bytes())
    if damage:
        damage(root)
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


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
    "evaluate: another trial's checkpoint": (
        lambda t: ["evaluate", _finished_run(t, "checkpoint.pt"), "--n-examples", "4"],
        "checkpoint.pt: holds trial 'synthetic-linf-preact_small-at-none"),
    "evaluate: another trial's best weights": (
        lambda t: ["evaluate", _finished_run(t, "best"), "--n-examples", "4"],
        ".pt: holds trial 'synthetic-linf-preact_small-at-none"),
    "status: corrupt sweep.json": (
        lambda t: ["status", _finished_run(t, damage=lambda r: _file(r, "sweep.json", "{"))],
        "run/sweep.json: not valid JSON (JSONDecodeError); move it away and run `ablate run`"),
    "status: a list for sweep.json": (
        lambda t: ["status", _finished_run(t, damage=lambda r: _file(r, "sweep.json", "[1]"))],
        "run/sweep.json: not the object of trials ablate writes"),
    "status: truncated curve": (
        lambda t: ["status", _finished_run(
            t, damage=lambda r: _truncate(_first(r, "curves/*.parquet")))],
        ".parquet: not a readable curve (ArrowInvalid); move it out"),
    "report: truncated curve": (
        lambda t: ["report", _finished_run(
            t, damage=lambda r: _truncate(_first(r, "curves/*.parquet"))), "--out", t / "rep"],
        ".parquet: not a readable curve"),
    "report --out under a file": (
        lambda t: ["report", _finished_run(t), "--out", _file(t, "f", "") / "rep"],
        "--out " + "{t}/f/rep: {t}/f is a file; pass another --out"),
    "report --ylim beyond any axis": (
        lambda t: ["report", _finished_run(t), "--out", t / "rep", "--ylim=-1e308,1e308"],
        "--ylim '-1e308,1e308': expected LOW,HIGH with LOW < HIGH, both within +-1e6"),
    "run --storage under a file": (
        lambda t: ["run", write_sweep(t / "s.yaml"), "--storage", _file(t, "f", "") / "run"],
        "--storage " + "{t}/f/run: {t}/f is a file; pass another --storage"),
    "evaluate: corrupt summary.json": (
        lambda t: ["evaluate", _finished_run(
            t, damage=lambda r: _file(_first(r, "trials/*none*"), "summary.json", "[")),
            "--n-examples", "4"], "summary.json: not a summary ablate wrote; delete it"),
    "evaluate: truncated best weights": (
        lambda t: ["evaluate", _finished_run(
            t, damage=lambda r: _truncate(_first(r, "trials/*none*/best-*.pt"))),
            "--n-examples", "4"], ".pt: not a readable ablate checkpoint"),
    "dry-run with a NaN time in --bench": (
        lambda t: ["run", write_sweep(t / "s.yaml"), "--dry-run", "--bench", _file(
            t, "b.json", '{"environment": {"device_name": "x"}, "options": {"precision": '
            '"fp32"}, "interventions": [{"intervention": "none", "flops_per_step": 1e12, '
            '"project": {"median_s": NaN}}]}')],
        "b.json: the 'none' entry's median seconds per step is nan"),
    "sweep alias bomb": (lambda t: ["run", _file(t, "s.yaml", f"name: s\nbase: {BOMB}\n")],
                         "s.yaml: its aliases"),
    "sweep without its data": (lambda t: ["run", _sweep(t, dataset="svhn", data_root=str(t)),
                                          "--storage", t / "runs"], "svhn: no data at"),
}


# These load torch before they fail (3-4 s each): "corrupt checkpoint" (the same check of the
# output folder), "crafted cifar pickle", "evaluate: another trial's checkpoint" (the checks of
# a run folder's files) and "report --out under a file" stand for them in the default run.
SLOW_CASES = {"--out under a file", "corrupt summary.json", "corrupt config.yaml",
              "another trial's config.yaml", "another trial's checkpoint",
              "evaluate: another trial's best weights", "evaluate: truncated best weights",
              "status: a list for sweep.json", "report: truncated curve",
              "evaluate: corrupt summary.json", "run --storage under a file"}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow)
                                  if case in SLOW_CASES else case for case in MALFORMED])
def test_malformed_input_is_one_error_line_and_changes_nothing(tmp_path, case):
    make_args, needle = MALFORMED[case]
    args = make_args(tmp_path)
    needle = needle.replace("{t}", str(tmp_path))
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


@pytest.mark.parametrize("command", ["status", "status --watch", "report"])
def test_status_and_report_never_load_torch_or_ray(study_run, tmp_path, command):
    # On a login node torch costs ~2 s and 1 GB of address space; neither command needs it.
    command, *options = command.split()
    args = [command, str(study_run), *options] + (
        ["--table", "best-last", "--out", str(tmp_path)] if command == "report" else [])
    code = ("import sys\nfrom ablation.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as exit:\n    print('exit', exit.code)\n"
            "print([m for m in ('torch', 'ray') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("[]"), done.stdout + done.stderr


@pytest.mark.slow
def test_report_single_figure_and_table_and_bad_input(study_run, tmp_path):
    out = tmp_path / "one"
    done = ablate("report", study_run, "--figure", "fix_lr", "--figure", "gap", "--table",
                  "best-last", "--out", out, "--metric", "train_robust_acc",
                  "--setting", "AT_awp_[4]", "--setting", "RAT_LR")  # a table's name
    assert done.returncode == 0, done.stderr[-3000:]
    written = [Path(p).name for p in done.stdout.split()]
    assert any(n.startswith("fix_lr") and n.endswith(".png") for n in written)
    assert [n for n in written if n.startswith("gap")] == [  # the chosen setting only
        "gap-synthetic-linf-preact_small-at.png", "gap-synthetic-linf-preact_small-at.pdf"]
    assert any(n.startswith("best-last") and n.endswith(".md") for n in written)
    assert not (out / "index.html").exists()
    methods = pd.read_csv(out / "best-last.csv").name.tolist()
    assert methods == ["AT", "RAT_LR", "RAT_WP", "AT_awp_[4]"]
    for args, needle in [((tmp_path,), "not an ablate run folder"),
                         ((study_run, "--figure", "bogus"), "bogus"),
                         ((study_run, "--metric", "colour"), "colour"),
                         ((study_run, "--metric", "dataset"), "dataset"),
                         ((study_run, "--setting", "AT_awp_[5]"), "AT_awp_[5]"),
                         ((study_run, "--setting", "RAT_XX"), "RAT_XX")]:
        bad = ablate("report", *args, "--out", tmp_path / "x")
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_huge_description_is_shown_as_one_short_line(tmp_path):
    def describe(root):
        manifest = json.loads((root / "sweep.json").read_text())
        manifest["description"] = "robust overfitting\n" * 2_600_000  # ~50 MB
        (root / "sweep.json").write_text(json.dumps(manifest))

    done = ablate("report", _finished_run(tmp_path, damage=describe), "--out", tmp_path / "rep",
                  "--table", "best-last")
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stderr.splitlines()[0]
    assert first.startswith("robust overfitting robust") and len(first) <= 504


def _stopped_mid_sweep(tmp: Path, driver_pid: int) -> tuple[Path, str]:
    """A finished two-trial run with its fix_lr trial made unfinished (no summary.json) and
    recorded running by a driver of pid ``driver_pid``; returns the folder and that trial."""
    from ablation.store import RunDir

    root = _finished_run(tmp)
    key = next(k for k in json.loads((root / "sweep.json").read_text())["trials"] if "fix_lr" in k)
    (root / "trials" / key / "summary.json").rename(tmp / "summary.json")
    RunDir(root).write_states({key: "running"})  # this process's heartbeat
    state = json.loads((root / "state.json").read_text())
    state["driver"]["pid"] = driver_pid
    (root / "state.json").write_text(json.dumps(state))
    return root, key


def test_status_after_the_driver_stopped_shows_no_time_left_but_how_to_resume(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()  # its pid is free now: the driver of a Ctrl-C'd or crashed run
    root, key = _stopped_mid_sweep(tmp_path, ended.pid)
    seen = time.localtime(json.loads((root / "state.json").read_text())["driver"]["time"])
    lines = ablate("status", root).stdout.strip().splitlines()
    assert lines[-2:] == ["2 trials: 1 done, 1 interrupted",
                          f"no driver is running this sweep (last seen "
                          f"{time.strftime('%H:%M', seen)}); run `ablate run <sweep file> "
                          f"--storage {root.resolve()}` to resume"], lines
    assert f"{key}  interrupted" in "\n".join(lines) and "time left" not in lines[-2]
    alive, _ = _stopped_mid_sweep(tmp_path / "alive", os.getpid())  # a driver that runs
    lines = ablate("status", alive).stdout.strip().splitlines()
    assert "running" in lines[-1] and "time left about" in lines[-1], lines
    assert "no driver" not in "\n".join(lines)


def _watch(root: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ablation", "status", str(root), "--watch",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_status_watch_redraws_until_every_trial_is_done(tmp_path):
    root, key = _stopped_mid_sweep(tmp_path, os.getpid())
    watching = _watch(root, "0.2")
    time.sleep(2.5)  # several redraws of an unfinished run (the interpreter starts in ~1 s)
    (tmp_path / "summary.json").rename(root / "trials" / key / "summary.json")  # it finishes
    out, err = watching.communicate(timeout=60)
    assert watching.returncode == 0, err
    draws = out.split("every 0.2 s; Ctrl-C to stop\n")[1:]
    assert len(draws) >= 3, out
    assert all("1 running" in d for d in draws[:-1]) and "all done" in draws[-1]
    assert "2 trials: all done" == out.strip().splitlines()[-1]


def test_status_watch_stops_on_ctrl_c_with_status_0_and_no_resume_line(tmp_path):
    root, _ = _stopped_mid_sweep(tmp_path, os.getpid())
    watching = _watch(root)  # every 10 s
    time.sleep(2.0)
    watching.send_signal(signal.SIGINT)
    out, err = watching.communicate(timeout=30)
    assert watching.returncode == 0 and err == "", err
    assert "every 10 s; Ctrl-C to stop" in out and "1 running" in out
    bad = ablate("status", root, "--watch", "0")
    assert bad.returncode == 2 and "--watch" in bad.stderr
