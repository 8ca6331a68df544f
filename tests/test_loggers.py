"""``ablate run --log`` (ablation/loggers.py), read back with each tool's own reader: TensorBoard's
event files through its EventAccumulator, W&B's offline run files through its protobuf records.
Each trial must hold each stored epoch exactly once, with the stored values and its config,
across a fork's copied prefix, a resume, a driver that died before it logged and a trial started
again from scratch; a failing backend is one warning and stops alone; a missing package or an
unknown name is one line before anything starts. The sweep runs in process (tests/conftest.py);
one real ``ablate run --log`` through Ray is slow-marked at the end."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ablate, run_sweep_in_process, small_sweep, stored, write_sweep

from ablation.cli import main
from ablation.errors import ConfigError
from ablation.grid import sweep_from_dict
from ablation.loggers import Loggers
from ablation.store import RunDir

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

BOTH = ("tensorboard", "wandb")
NOT_SCALARS = {"epoch", "forked_from"}


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """W&B as the tests run it: offline, its own folders in tmp, nothing read from home."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def forking_sweep() -> dict:
    """AT and fix_lr on [3, 4], 4 epochs: fix_lr copies AT's first epoch (its fork)."""
    return small_sweep("logged", epochs=4)


def keys(sweep: dict) -> tuple[str, str]:
    """The (AT, fix_lr) keys of ``sweep``."""
    trials = sweep_from_dict(sweep, source="test").trials
    by = {t.intervention: t.key for t in trials}
    return by["none"], by["fix_lr"]


# --- reading back what was logged -------------------------------------------------------------


def tensorboard_runs(run: Path) -> dict[str, dict]:
    """Per trial folder under tensorboard/: {"scalars": tag -> [(step, value)], "hparams": ...}
    as TensorBoard's own reader loads the folder (its event files in order, as one run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = {}
    for folder in sorted(p for p in (run / "tensorboard").iterdir() if p.is_dir()):
        # every event as written: by default the reader would drop a step written again
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0},
                               purge_orphaned_data=False)
        acc.Reload()
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                   for tag in acc.Tags()["scalars"]}
        contents = acc.PluginTagToContent("hparams")
        hparams = {}
        for content in contents.values():
            data = HParamsPluginData.FromString(content)
            for name, value in data.session_start_info.hparams.items():
                hparams[name] = json.loads(_json_format(value))
        out[folder.name] = {"scalars": scalars, "hparams": hparams,
                            "starts": len(contents)}
    return out


def _json_format(value) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(value)


def wandb_records(path: Path):
    """The protobuf records of one W&B run file (run-<id>.wandb): W&B's LevelDB-log framing, a
    7-byte file header, then chunks of (crc32, length, type) in 32 KiB blocks, read here by hand
    since wandb ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:  # zero padding
            continue
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad chunk"
        pending += data
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_runs(run: Path) -> dict[str, dict]:
    """Per W&B run id: its name, project, config, and its history as [(step, {metric: value})]
    over every offline segment of the run (one per driver that logged to it), in the order they
    started (W&B names a segment's folder by its second, adding -1 when that one exists)."""
    segments = []
    for path in (run / "wandb").glob("offline-run-*/run-*.wandb"):
        info, history = None, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info = record.run
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                history.append((record.history.step.num,
                                {k: v for k, v in items.items() if not k.startswith("_")}))
        segments.append(((info.start_time.seconds, info.start_time.nanos), info, history))
    out: dict[str, dict] = {}
    for _, info, history in sorted(segments, key=lambda s: s[0]):
        entry = out.setdefault(info.run_id, {"history": [], "segments": 0})
        entry.update(name=info.display_name, project=info.project,
                     segments=entry["segments"] + 1,
                     config={u.key: json.loads(u.value_json) for u in info.config.update
                             if u.key != "_wandb"})
        entry["history"] += history
    return out


def check_logged(run: Path, tb: bool = True, wb: bool = True) -> None:
    """Every trial of the run folder: each stored epoch exactly once as a step, every numeric
    curve column at its stored value (float32 for TensorBoard), its identifying config as
    hyperparameters, one run named by its key."""
    folder = RunDir(run)
    curves = stored(run)
    tbs = tensorboard_runs(run) if tb else {}
    wbs = {entry["name"]: entry for entry in wandb_runs(run).values()} if wb else {}
    for key, config in folder.trials().items():
        curve = curves[curves.key == key].sort_values("epoch")
        identity = config.columns()
        metrics = [c for c in curve.columns if c not in identity and c not in NOT_SCALARS]
        assert {"lr", "train_robust_acc", "test_robust_acc", "train_eval_acc",
                "train_seconds"} <= set(metrics)
        expected_hparams = {k: v for k, v in identity.items() if k != "key"}
        if tb:
            logged = tbs[key]
            valued = [m for m in metrics if curve[m].notna().all()]  # no lr_fixed for AT: NaN
            assert sorted(logged["scalars"]) == sorted(valued), key
            for metric in valued:
                steps, values = zip(*logged["scalars"][metric])
                assert list(steps) == curve.epoch.tolist(), (key, metric)
                np.testing.assert_allclose(values, curve[metric].to_numpy(np.float32),
                                           rtol=1e-6, err_msg=f"{key} {metric}")
            # torch's hparams() writes a bool as a number (it tests int before bool)
            assert logged["hparams"] == pytest.approx(
                {k: float(v) if isinstance(v, bool) else v for k, v in expected_hparams.items()})
            assert logged["starts"] == 1, key  # the hparams of a run are written once
        if wb:
            logged = wbs[key]
            assert logged["project"] == "logged" and logged["config"] == expected_hparams
            assert [step for step, _ in logged["history"]] == curve.epoch.tolist(), key
            for (step, values), row in zip(logged["history"], curve.to_dict("records")):
                assert values == {m: row[m] for m in metrics if not np.isnan(row[m])}, key


# --- the default tests ------------------------------------------------------------------------


def test_each_epoch_is_logged_once_across_a_fork_and_a_resume(tmp_path):
    """fix_lr forks from AT after 1 epoch and is stopped after 3 (a Ctrl-C), then the sweep runs
    again: both backends hold 4 steps per trial, fix_lr's first one the copied AT epoch."""
    sweep = forking_sweep()
    at, fix = keys(sweep)
    index = list(sweep_from_dict(sweep, source="test").by_key).index(fix)
    run = run_sweep_in_process(sweep, tmp_path / "run", fork=True, log=BOTH,
                               stop_after={index: 3})
    assert len(stored(run).query("key == @fix")) == 3
    run_sweep_in_process(sweep, run, fork=True, log=BOTH)
    curves = stored(run)
    forked = curves[curves.key == fix].sort_values("epoch")
    assert forked.forked_from.tolist() == [at, "", "", ""]  # the fork's copied prefix
    check_logged(run)
    tb = tensorboard_runs(run)
    # the copied epoch is AT's epoch 0, logged once in each trial's run
    assert tb[fix]["scalars"]["test_robust_acc"][0] == tb[at]["scalars"]["test_robust_acc"][0]
    assert len(list((run / "tensorboard" / fix).glob("events.out.tfevents.*"))) == 2  # 2 drivers
    wb = wandb_runs(run)
    assert sorted(e["segments"] for e in wb.values()) == [1, 2]  # fix_lr's run resumed once
    assert json.loads((run / "tensorboard" / "logged.json").read_text()) == {
        at: {"epochs": 4, "restarts": 0}, fix: {"epochs": 4, "restarts": 0}}


def test_rows_stored_without_logging_are_logged_by_the_next_driver(tmp_path):
    """A driver that stored rows and died before logging them (here: runs without --log) leaves
    the ledger behind the store; the next driver's catch-up logs exactly the missing steps,
    even with no trial left to train (``ablate run`` on a finished sweep)."""
    sweep = small_sweep("logged", epochs=3)
    run = run_sweep_in_process(sweep, tmp_path / "run", log=BOTH, stop_after={0: 1, 1: 2})
    run_sweep_in_process(sweep, run)  # stores epochs 1 and 2 of each, logs nothing
    with Loggers(RunDir(run), sweep_from_dict(sweep, source="test"), BOTH,
                 warn=pytest.fail) as loggers:
        loggers.catch_up()
    check_logged(run)


def test_a_trial_started_again_from_scratch_gets_a_new_run(tmp_path):
    """`--restart-errored` forgets a trial (its curve too); its next rows start a new run: a fresh
    TensorBoard folder and a new W&B id, each with every epoch once."""
    sweep = small_sweep("logged")
    at, fix = keys(sweep)
    run = run_sweep_in_process(sweep, tmp_path / "run", log=BOTH)
    RunDir(run).forget(fix)
    run_sweep_in_process(sweep, run, log=BOTH)
    check_logged(run, wb=False)
    by_name: dict[str, list] = {}
    for entry in wandb_runs(run).values():
        by_name.setdefault(entry["name"], []).append(entry)
    assert len(by_name[at]) == 1 and len(by_name[fix]) == 2
    assert all([s for s, _ in e["history"]] == [0, 1] for e in by_name[fix])
    assert json.loads((run / "wandb" / "logged.json").read_text())[fix] == {
        "epochs": 2, "restarts": 1}


def test_a_failing_backend_is_one_warning_and_the_others_go_on(tmp_path, monkeypatch):
    from ablation.loggers import TensorBoard

    def full_disk(self, key, step, scalars):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoard, "log", full_disk)
    sweep = small_sweep("logged")
    with pytest.warns(UserWarning) as caught:
        run = run_sweep_in_process(sweep, tmp_path / "run", log=BOTH)
    lines = [str(w.message) for w in caught if "--log" in str(w.message)]
    assert len(lines) == 1 and lines[0].startswith(
        "--log tensorboard: OSError: [Errno 28] No space left on device; logging to tensorboard "
        "stops"), lines
    assert len(stored(run)) == 4 and len(RunDir(run).summaries()) == 2  # the sweep went on
    check_logged(run, tb=False)
    assert not (run / "tensorboard" / "logged.json").exists()


def test_a_missing_package_or_an_unknown_name_is_one_line(tmp_path, monkeypatch):
    sweep = sweep_from_dict(small_sweep("logged"), source="test")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^--log wandb: the wandb package is not installed; "
                                          r"install the extra: pip install -e '\.\[wandb\]' in "
                                          r"the ablation checkout$"):
        Loggers(RunDir(tmp_path / "run"), sweep, ["tensorboard", "wandb"], warn=pytest.fail)
    with pytest.raises(ConfigError, match=r"^--log 'tb': not a logger; choose from "
                                          r"tensorboard, wandb$"):
        Loggers(RunDir(tmp_path / "run"), sweep, ["tb"], warn=pytest.fail)
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_a_login_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # the offline settings an earlier test left in W&B's process-wide session
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no key there either
    sweep = sweep_from_dict(small_sweep("logged"), source="test")
    with pytest.raises(ConfigError, match=r"^--log wandb: No API key configured.*; or set "
                                          r"WANDB_MODE=offline to keep the runs in the run "
                                          r"folder for a later `wandb sync`$"):
        Loggers(RunDir(tmp_path / "run"), sweep, ["wandb"], warn=pytest.fail)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, line", [
    ("wandb", "error: --log wandb: the wandb package is not installed; "
              "install the extra: pip install -e '.[wandb]' in the ablation checkout"),
    ("mlflow", "error: --log 'mlflow': not a logger; choose from tensorboard, wandb")])
def test_ablate_run_refuses_a_logger_it_cannot_use_before_anything_starts(
        tmp_path, monkeypatch, capsys, name, line):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    sweep = write_sweep(tmp_path / "s.yaml")
    with pytest.raises(SystemExit) as done:
        main(["run", str(sweep), "--storage", str(tmp_path / "run"), "--log", name])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "run").exists()


# --- through Ray ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablate_run_logs_through_ray_and_tune_writes_no_curves_of_its_own(tmp_path):
    """The real driver: `ablate run --log tensorboard --log wandb` on a forking sweep, run twice
    (the second run has nothing to train); each trial logged once per epoch, and ray/ holds
    none of Tune's own loggers' files (event files, result.json, progress.csv)."""
    sweep = write_sweep(tmp_path / "s.yaml", name="logged")
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    for _ in range(2):
        done = ablate("run", sweep, "--storage", run, "--quiet", "--log", "tensorboard",
                      "--log", "wandb", env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    # neither W&B's console lines nor Tune's warning that its own loggers wrote nothing
    assert "wandb:" not in done.stderr and "Failed to fetch" not in done.stderr, done.stderr
    check_logged(run)
    tune_files = [p.name for p in (run / "ray").rglob("*") if p.is_file()]
    assert not [n for n in tune_files if n.startswith("events.out.tfevents")
                or n in ("result.json", "progress.csv", "params.json")], tune_files
    frame = pd.read_parquet(run / "curves")
    assert (frame.forked_from != "").any()  # the sweep forked
