"""Shared-prefix forking: where a trial's prefix ends (hand-derived cases), that the trainer's
learning rates are the planner's, that a forked trial equals the same trial trained from its
first epoch, bit for bit, and, without Ray, a run's fork life cycle: who waits for which file and
in which order the trials start."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TIMING, ablate, tiny_trial

from ablation import files
from ablation.config import from_dict
from ablation.fork import (FINISHED, Fork, ForkQueue, ForkWaits, epochs_to_train, fork_waits,
                           plan_forks, shared_epochs)
from ablation.grid import load_sweep
from ablation.schedule import epoch_lrs
from ablation.trainer import Reporter, Trainer

ROOT = Path(__file__).resolve().parents[1]


def cfg(**fields):
    return from_dict({"dataset": "synthetic", "model": "preact_small", **fields})


# Each case by hand: the first milestone of 0.5 at E epochs drops the LR at schedule time E/2;
# batch i of epoch e trains at e + (i+1)/N (per iteration) or e + 1 (per epoch), so the first
# epoch whose last batch reaches E/2 is ceil(E/2) - 1 for every N.
@pytest.mark.parametrize("child,epochs,lr_update,expected", [
    ({"intervention": "fix_lr", "layers": [3, 4]}, 200, "iteration", 99),
    ({"intervention": "fix_lr", "layers": [3, 4]}, 200, "epoch", 99),
    ({"intervention": "fix_lr", "layers": [1]}, 15, "iteration", 7),  # drop at t = 7.5
    ({"intervention": "fix_lr", "layers": [1]}, 15, "epoch", 7),  # epoch 6 ends at t = 7 < 7.5
    ({"intervention": "awp", "layers": [2], "awp_warmup": 5}, 200, "iteration", 5),
    ({"intervention": "awp_full", "awp_warmup": 0}, 200, "iteration", 0),
    ({"intervention": "awp", "layers": [2], "awp_gamma": 0.0}, 20, "iteration", 19),  # never on
    ({"intervention": "fix_param", "layers": [4]}, 200, "iteration", 0),
])
def test_shared_epochs_by_hand(child, epochs, lr_update, expected):
    parent = cfg(epochs=epochs, lr_update=lr_update)
    for batches in (1, 7, 391):
        assert shared_epochs(parent, cfg(epochs=epochs, lr_update=lr_update, **child),
                             batches) == expected


def test_trades_awp_warmup_counts_from_its_authors_epoch_one():
    parent = cfg(method="trades", epochs=100)
    child = cfg(method="trades", epochs=100, intervention="awp", layers=[3], awp_warmup=10)
    assert shared_epochs(parent, child, 10) == 9  # warm-up 10 = 0-based epoch 9 is perturbed


@pytest.mark.parametrize("change", [{"seed": 1}, {"lr_max": 0.05}, {"milestones": [0.6]},
                                    {"epochs": 201}, {"precision": "bf16"}])
def test_trials_that_differ_in_more_than_the_intervention_share_nothing(change):
    parent = cfg(epochs=200)
    child = cfg(**{"epochs": 200, "intervention": "fix_lr", "layers": [3, 4], **change})
    assert shared_epochs(parent, child, 391) == 0
    assert shared_epochs(cfg(epochs=200, intervention="fix_lr", layers=[1]), child, 391) == 0


def test_the_papers_cifar10_sweep_trains_7915_of_its_9400_epochs():
    sweep = load_sweep(ROOT / "sweeps" / "cifar10_linf.yaml")
    forks = plan_forks(sweep.trials)
    assert sweep.total_epochs == 9400 and epochs_to_train(sweep.trials, forks) == 7915
    by_key = sweep.by_key
    assert {by_key[k].intervention for k in forks} == {"fix_lr"} and len(forks) == 15
    assert all(by_key[f.parent].intervention == "none" and f.epochs == 99
               for f in forks.values())


class LRs(Reporter):
    """Records each optimizer group's learning rate at every training batch."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def progress(self, epoch, batch, batches):
        self.seen.append((epoch, batch, batches,
                          [g["lr"] for g in self.trainer.optimizer.param_groups]))


def test_the_planner_reads_the_learning_rates_the_trainer_trains_with(tmp_path):
    config = from_dict(tiny_trial(epochs=4, milestones=[0.3, 0.6], intervention="fix_lr",
                                  layers=[3]))
    trainer = Trainer(config, tmp_path)
    recorder = LRs(trainer)
    trainer.fit(recorder)
    assert len(recorder.seen) == 4 * 8  # 512 images in batches of 64
    for epoch, batch, batches, (scheduled, fixed) in recorder.seen:
        rest, g1, g2, g3, g4 = (lrs[batch] for lrs in epoch_lrs(config, epoch, batches))
        assert (rest, g1, g2, g4) == (scheduled,) * 4 and g3 == fixed == config.lr_max


def train(config, folder, **kwargs):
    trainer = Trainer(config, folder, **kwargs)
    history = trainer.fit()
    return trainer, pd.DataFrame(history).drop(columns=TIMING)


@pytest.mark.parametrize("child", [{"intervention": "fix_lr", "layers": [3, 4]},
                                   {"intervention": "awp", "layers": [2, 3], "awp_warmup": 2}])
def test_a_forked_trial_is_bit_identical_to_the_same_trial_from_scratch(tmp_path, child):
    torch.set_num_threads(1)
    base = tiny_trial(epochs=4, train_eval_size=32)
    parent, config = from_dict(base), from_dict({**base, **child})
    fork = Fork(parent.key, shared_epochs(parent, config, 8))
    assert fork.epochs == (1 if child["intervention"] == "fix_lr" else 2)
    run = tmp_path / "run" / "trials"
    train(parent, run / parent.key, fork_points=[fork.epochs])
    assert (run / parent.key / files.fork_checkpoint(fork.epochs)).exists()
    forked, curve = train(config, run / config.key, fork=fork)
    scratch, reference = train(config, tmp_path / "scratch")
    assert (curve.forked_from[:fork.epochs] == parent.key).all()
    assert curve.forked_from[fork.epochs:].isna().all()
    if child["intervention"] == "fix_lr":
        assert (curve.lr_fixed == config.lr_max).all()  # its own value, not the parent's NaN
    pd.testing.assert_frame_equal(curve.drop(columns="forked_from"), reference, check_exact=True)
    for name, tensor in scratch.model.state_dict().items():
        assert torch.equal(forked.model.state_dict()[name], tensor), name
    saved = torch.load(run / config.key / files.CHECKPOINT, weights_only=True)
    assert saved["history"][0]["forked_from"] == parent.key


def test_without_its_parents_file_a_fork_trains_from_scratch(tmp_path):
    config = from_dict(tiny_trial(epochs=2, intervention="fix_lr", layers=[4]))
    trainer = Trainer(config, tmp_path / "trials" / config.key, fork=Fork("nobody", 1))
    assert trainer.epochs_done == 0 and trainer.forked_from is None
    assert "forked_from" not in trainer.fit()[0]


# --- a run's fork life cycle, without Ray ------------------------------------------------------


def test_fork_file_names_are_parsed_as_they_are_written():
    assert [files.fork_epochs(files.fork_checkpoint(e)) for e in (0, 2, 99)] == [0, 2, 99]
    for name in ("fork-.pt", "fork-2.pt.tmp", ".fork-2.pt.1a2b.upload", "fork-x.pt",
                 files.best_checkpoint(2), files.CHECKPOINT):
        assert files.fork_epochs(name) is None, name


def test_who_waits_for_which_fork_file_follows_what_the_run_folder_holds():
    forks = {"f1": Fork("at", 2), "f2": Fork("at", 3), "resumed": Fork("at", 2),
             "from_done": Fork("done", 2), "no_file": Fork("done_plain", 2),
             "finished": Fork("at", 2)}
    todo = ["at", "f1", "f2", "resumed", "from_done", "no_file"]  # the parents "done*" are done
    have = {files.trial_file("resumed", files.CHECKPOINT),
            files.trial_file("done", files.fork_checkpoint(2))}
    waits = fork_waits(forks, todo, have.__contains__)
    # "resumed" resumes its own checkpoint; "no_file"'s parent finished without the file (it ran
    # under --no-fork) and "finished" is not to run: these three start without their fork.
    assert waits == ForkWaits(waiting={"f1": Fork("at", 2), "f2": Fork("at", 3),
                                       "from_done": Fork("done", 2)},
                              ready=frozenset({("done", 2)}),
                              points={"at": (2, 3), "done": (2,)})


def fork_params(*keys, forks):
    """Params as store.trial_params gives them (the fields the queue reads)."""
    return [{"key": k, "fork": forks[k].to_dict() if k in forks else None} for k in keys]


def test_the_queue_hands_out_parents_first_and_holds_each_fork_until_its_file_exists():
    forks = {"f1": Fork("at", 2), "f2": Fork("at", 2)}
    params = fork_params("f1", "other", "f2", "at", forks=forks)
    queue = ForkQueue(params, forks)
    assert queue.waiting == ["f1", "f2"]
    assert [queue.next()["key"] for _ in range(2)] == ["at", "other"]  # the parent first
    assert queue.next() is None  # only forks are left, and they wait
    queue.reported("at", 1)
    queue.reported("other", 2)
    assert queue.next() is None and queue.waiting == ["f1", "f2"]
    queue.reported("at", 2, fork_files=[2])  # the epoch after which the file was written
    assert [queue.next() for _ in range(2)] == [params[0], params[2]]  # with their fork
    assert queue.waiting == [] and queue.next() is FINISHED


@pytest.mark.parametrize("news", ["passed the point", "ended before it", "wrote another file"])
def test_a_fork_whose_file_cannot_come_is_released_to_train_from_scratch(news):
    forks = {"f": Fork("at", 2)}
    queue = ForkQueue(fork_params("at", "f", forks=forks), forks)
    assert queue.next()["key"] == "at" and queue.next() is None
    if news == "passed the point":  # it ran under --no-fork before: no file after epoch 2
        queue.reported("at", 2)
    elif news == "ended before it":  # failed, or stopped
        queue.reported("at", 1)
        queue.ended("at")
    else:
        queue.reported("at", 3, fork_files=[3])
    assert queue.next() == {"key": "f", "fork": None} and queue.waiting == []
    assert queue.next() is FINISHED


def test_a_fork_whose_file_exists_already_is_handed_out_with_it():
    forks = {"f": Fork("done", 2), "g": Fork("at", 1)}
    params = fork_params("f", "g", "at", forks=forks)
    queue = ForkQueue(params, forks, ready={("done", 2)})
    assert queue.waiting == ["f", "g"]
    assert [queue.next()["key"] for _ in range(2)] == ["at", "f"]
    assert params[0]["fork"] == {"parent": "done", "epochs": 2} and queue.waiting == ["g"]
    assert queue.next() is None


@pytest.mark.slow
def test_the_demo_sweep_forked_and_not_gives_the_same_curves(tmp_path):
    """sweeps/demo_digits.yaml through Ray twice: with forking (its fix_lr and AWP trials start
    from AT's checkpoint) and with --no-fork; every stored number is the same."""
    curves = {}
    for name, extra in (("forked", ()), ("plain", ("--no-fork",))):
        done = ablate("run", ROOT / "sweeps" / "demo_digits.yaml", "--storage", tmp_path / name,
                      "--quiet", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        frame = pd.read_parquet(tmp_path / name / "curves").sort_values(["key", "epoch"])
        curves[name] = frame.reset_index(drop=True)
    forked, plain = curves["forked"], curves["plain"]
    assert (forked.forked_from != "").sum() == sum(f.epochs for f in plan_forks(
        load_sweep(ROOT / "sweeps" / "demo_digits.yaml").trials).values())
    assert (plain.forked_from == "").all()
    pd.testing.assert_frame_equal(forked.drop(columns=[*TIMING, "forked_from"]),
                                  plain.drop(columns=[*TIMING, "forked_from"]), check_exact=True)
