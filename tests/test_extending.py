"""Your own intervention and model in one file (ablation/plugins.py, docs/extending.md): the worked
examples in docs/examples, loaded as the user loads them, planned from their descriptions, run
with forking and reported. The real `ablate run` through Ray, with the plugins shipped to the
worker, is the slow test at the end; the default tests run the same path in process."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import (TIMING, ablate, one_error_line, reference_curves, run_sweep_in_process,
                      stored, write_yaml)

from ablation import config as config_module
from ablation import files, interventions, models, plugins, strategies
from ablation.checkpoint import read
from ablation.config import from_dict
from ablation.cost import forward_flops
from ablation.datasets import dataset_info
from ablation.errors import ConfigError
from ablation.fork import plan_forks
from ablation.grid import load_sweep, sweep_from_dict
from ablation.store import plan_packs
from ablation.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
SWEEP = EXAMPLES / "extending_sweep.yaml"
PLUGINS = [str(EXAMPLES / "freeze_after_decay.py"), str(EXAMPLES / "small_cnn.py")]


@pytest.fixture(autouse=True)
def registries():
    """What the plugins register is taken out again after each test, so that other tests see
    the built-in registries (test_models compares them)."""
    saved = (dict(strategies.INTERVENTIONS), dict(interventions.CLASSES), dict(models.MODELS),
             list(config_module.MODELS), set(plugins._loaded), set(plugins.STAND_INS))
    yield
    for live, before in zip((strategies.INTERVENTIONS, interventions.CLASSES, models.MODELS),
                            saved):
        live.clear()
        live.update(before)
    config_module.MODELS[:] = saved[3]
    plugins._loaded.clear()
    plugins._loaded.update(saved[4])
    plugins.STAND_INS.clear()
    plugins.STAND_INS.update(saved[5])


def tiny_sweep(epochs: int = 4) -> dict:
    """The example sweep cut down for a test: freeze_after_decay on [1, 2] and AT, ``epochs``
    epochs of a cheap attack, the plugins named by absolute path."""
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["plugins"] = PLUGINS
    sweep["base"].update(epochs=epochs, train_steps=1, test_steps=2, batch_size=128,
                         train_eval_size=64, test_batch_size=360)
    sweep["grid"] = {"intervention": ["freeze_after_decay"], "layers": [[1, 2]]}
    return sweep


def first_decay_epoch_by_hand(epochs: int, milestone: float, batch_size: int) -> int:
    """Rice's per-iteration schedule: batch i of epoch e trains at e + (i + 1) / N and the LR
    drops once that reaches milestone * epochs; the first epoch trained wholly after the drop is
    the first whose first batch (e + 1 / N) is there. digits: 1,437 training images."""
    n = math.ceil(1437 / batch_size)
    return next(e for e in range(epochs) if e + 1 / n >= milestone * epochs)


def test_the_example_sweep_loads_its_plugins_and_names_what_they_register():
    sweep = load_sweep(SWEEP)  # plugins relative to the sweep file, as a user writes them
    assert [p.name for p in sweep.plugins] == ["freeze_after_decay.py", "small_cnn.py"]
    assert {t.model for t in sweep.trials} == {"small_cnn"}
    assert {t.intervention for t in sweep.trials} == {"freeze_after_decay", "fix_param", "none"}
    assert load_sweep(SWEEP).by_key == sweep.by_key  # loading the same files again: harmless
    assert "freeze_after_decay" in strategies.layer_wise()


def test_the_fork_planner_forks_from_the_description_at_the_first_decay_epoch():
    sweep = load_sweep(SWEEP)
    forks = plan_forks(sweep.trials)
    (baseline,) = [t for t in sweep.trials if t.intervention == "none"]
    first = first_decay_epoch_by_hand(8, 0.5, 32)
    assert first == 4
    for trial in sweep.trials:
        if trial.intervention == "freeze_after_decay":
            assert forks[trial.key].parent == baseline.key
            assert forks[trial.key].epochs == first, trial.key
        else:
            assert trial.key not in forks  # fix_param acts from the first batch: no shared epoch
    # the same trial described without acts_from would share nothing: it is the description
    d = strategies.intervention("freeze_after_decay")
    assert [d.acts(baseline, e) for e in range(8)] == [False] * first + [True] * (8 - first)
    # the packed trainer runs descriptions, not classes: these trials train alone
    packs = plan_packs(list(sweep.trials), forks, size=4)
    for trial in sweep.trials:
        if trial.intervention == "freeze_after_decay":
            assert [trial.key] in packs


def test_the_small_cnn_declares_its_groups_and_its_flops_are_counted():
    sweep = load_sweep(SWEEP)
    net = models.build_model("small_cnn", num_classes=10, in_channels=1)
    groups = net.layer_groups()
    assert sorted(groups) == [1, 2, 3, 4]
    assert groups[1] == ["block1.0.weight", "block1.1.weight", "block1.1.bias"]
    assert models.ungrouped_names(net) == ["linear.weight", "linear.bias"]
    # 8x8x1 digits through widths 8, 16, 16, 32 (strides 1, 2, 2, 1): 2 * Cin * Cout * 9 * H * W
    # per conv on its output size, then 2 * 32 * 10 for the head
    by_hand = 2 * 9 * (1 * 8 * 64 + 8 * 16 * 16 + 16 * 16 * 4 + 16 * 32 * 4) + 2 * 32 * 10
    assert forward_flops(sweep.trials[0]) == by_hand


def test_a_sweep_of_both_forks_equals_the_trial_alone_freezes_after_the_decay_and_reports(
        tmp_path):
    sweep = tiny_sweep(epochs=4)
    first = first_decay_epoch_by_hand(4, 0.5, 128)
    assert first == 2
    run = run_sweep_in_process(sweep, tmp_path / "run", fork=True)
    trials = sweep_from_dict(sweep).by_key
    (child,) = [c for c in trials.values() if c.intervention == "freeze_after_decay"]
    (parent,) = [c for c in trials.values() if c.intervention == "none"]
    curves = stored(run)
    mine = curves[curves.key == child.key].sort_values("epoch").reset_index(drop=True)
    assert list(mine.forked_from) == [parent.key] * first + [""] * (4 - first)

    alone = Trainer(child, tmp_path / "alone")  # no fork: trains all four epochs itself
    initial = {k: v.clone() for k, v in alone.model.state_dict().items()}
    ref = pd.DataFrame(alone.fit())
    pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                  ref.drop(columns=TIMING), check_exact=True)

    at_decay = read(run / files.trial_file(parent.key, files.fork_checkpoint(first)))["model"]
    final = read(run / files.trial_file(child.key, files.CHECKPOINT), child.key)["model"]
    groups = alone.model.layer_groups()
    frozen = groups[1] + groups[2]
    trained = groups[3] + groups[4] + models.ungrouped_names(alone.model)
    for name in frozen:
        assert not torch.equal(initial[name], at_decay[name]), f"{name} did not train before"
        assert torch.equal(at_decay[name], final[name]), f"{name} moved after the decay"
    for name in trained:
        assert not torch.equal(at_decay[name], final[name]), f"{name} stopped training"

    done = ablate("report", run, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr[-3000:]
    # Table 5's layout for the new intervention: the AT row "[-]", then its subset's row
    table = (tmp_path / "report" / "ablation-freeze_after_decay.md").read_text()
    best, last = 100 * mine.test_robust_acc.max(), 100 * mine.test_robust_acc.iloc[-1]
    assert "| AT_freeze_after_decay | [1, 2] | " in table, table
    row = next(line for line in table.splitlines() if "| [1, 2] |" in line)
    assert f"| {best:.2f} | {last:.2f} | {best - last:.2f} |" in row, table

    # Readers never run the plugin text a run folder holds (a folder may come from anyone): they
    # know the plugin's names from sweep.json's record of them; evaluate must be given the file.
    marker = tmp_path / "ran"
    manifest = json.loads((run / files.SWEEP).read_text())
    for plugin in manifest["plugins"]:
        plugin["source"] = f"open({str(marker)!r}, 'w').close()\n" + plugin["source"]
    (run / files.SWEEP).write_text(json.dumps(manifest))
    for command in (("status", run), ("report", run, "--out", tmp_path / "again")):
        done = ablate(*command)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert (tmp_path / "again" / "ablation-freeze_after_decay.md").read_text() == table
    line = one_error_line(ablate("evaluate", run, "--n-examples", "8"), 2)
    assert "comes from a plugin file; pass that file with --plugin FILE" in line, line
    assert not marker.exists()


def test_a_plugin_that_fails_is_one_line_naming_its_file(tmp_path):
    base = {"name": "bad", "base": {"dataset": "digits"}, "grid": {"seed": [0]}}
    taken = write_plugin(tmp_path / "taken.py", "from ablation import strategies\n\n"
                         "strategies.register(strategies.Intervention('fix_lr', layer_wise=True))\n")
    with pytest.raises(ConfigError, match=r"^plugin .*taken.py: line 3: ValueError: intervention "
                                          r"'fix_lr' is described already$"):
        sweep_from_dict({**base, "plugins": [str(taken)]}, source=str(tmp_path / "s.yaml"))
    write_plugin(tmp_path / "broken.py", "import no_such_module\n")
    with pytest.raises(ConfigError, match=r"broken.py: line 1: ModuleNotFoundError: No module "):
        sweep_from_dict({**base, "plugins": ["broken.py"]}, source=str(tmp_path / "s.yaml"))
    with pytest.raises(ConfigError, match=r"s.yaml: plugin 'gone.py': cannot read .*gone.py "
                                          r"\(No such file or directory\)"):
        sweep_from_dict({**base, "plugins": ["gone.py"]}, source=str(tmp_path / "s.yaml"))
    trial = write_yaml(tmp_path / "t.yaml", {"dataset": "digits", "model": "small_cnn"})
    line = one_error_line(ablate("train", trial, "--plugin", tmp_path / "gone.py"), 2)
    assert line.endswith("--plugin: plugin '" + str(tmp_path / "gone.py") + "': cannot read "
                         + str(tmp_path / "gone.py") + " (No such file or directory)")
    line = one_error_line(ablate("train", trial), 2)  # without the plugin: the name is unknown
    assert "key 'model': 'small_cnn' is not one of preact18" in line


def write_plugin(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_description_with_acts_from_needs_a_class_and_trains_alone():
    later = dict(layer_wise=True, frozen=True, acts_from=lambda config: 1)
    with pytest.raises(ValueError, match="describe an intervention with acts_from as packed"):
        strategies.register(strategies.Intervention("later", **later))
    with pytest.raises(ValueError, match="the packed trainer cannot run; describe it with packed"):
        interventions.register(strategies.Intervention("later", layer_wise=True),
                               interventions.Intervention)
    strategies.register(strategies.Intervention("later", packed=False, **later))
    trial = from_dict({"intervention": "later", "layers": [4], "model": "preact_small"})
    with pytest.raises(ValueError, match="acts from a later epoch .* but has no class"):
        interventions.build_intervention(
            models.build_trial_model(trial, dataset_info("cifar10")), trial)


@pytest.mark.slow
def test_ablate_run_through_ray_ships_the_plugins_and_train_takes_them(tmp_path):
    """The real `ablate run` equals each trial trained alone: Ray's workers are fresh processes,
    which know the plugins only from the unit they are handed. Once the plugin files are gone,
    `ablate status` and `report` load them from the run folder; `train --plugin` trains the
    same curve."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    for name in ("freeze_after_decay.py", "small_cnn.py"):
        shutil.copy(EXAMPLES / name, folder / name)
    sweep = tiny_sweep(epochs=3)
    sweep["plugins"] = ["freeze_after_decay.py", "small_cnn.py"]
    path = write_yaml(folder / "s.yaml", sweep)
    dry = ablate("run", path, "--dry-run")
    assert dry.returncode == 0 and "the first 2 from" in dry.stdout, dry.stderr[-3000:]
    done = ablate("run", path, "--storage", tmp_path / "run", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.rmtree(folder)  # the run folder holds the plugins' text from here on
    status = ablate("status", tmp_path / "run")
    assert status.returncode == 0 and status.stdout.strip().endswith("2 trials: all done")
    report = ablate("report", tmp_path / "run", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr[-3000:]

    sweep["plugins"] = PLUGINS
    trials = sweep_from_dict(sweep).by_key
    curves = stored(tmp_path / "run")
    for key, config in trials.items():
        mine = curves[curves.key == key].sort_values("epoch").reset_index(drop=True)
        ref = reference_curves(config, tmp_path)
        pd.testing.assert_frame_equal(mine[ref.columns].drop(columns=TIMING),
                                      ref.drop(columns=TIMING), check_exact=True)
    (child,) = [c for c in trials.values() if c.intervention == "freeze_after_decay"]
    trial = write_yaml(tmp_path / "t.yaml", child.to_dict())
    train = ablate("train", trial, "--plugin", PLUGINS[0], "--plugin", PLUGINS[1],
                   "--out", tmp_path / "alone", "--quiet")
    assert train.returncode == 0, train.stderr[-3000:]
    alone = pd.read_parquet(tmp_path / "alone" / files.TRIAL_CURVES)
    mine = curves[curves.key == child.key].sort_values("epoch").reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[alone.columns].drop(columns=TIMING),
                                  alone.drop(columns=TIMING), check_exact=True)
