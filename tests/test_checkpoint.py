"""What a trial keeps on disk to resume (ablation/checkpoint.py): the best weights written before
the checkpoint that names them, checkpoints of older versions and of another trial, the random
states, and optimizer buffers that take their parameter's memory layout on a resume or a fork."""

import pytest
import torch
from conftest import StopAfter, tiny_trial

from ablation.config import from_dict
from ablation.curves import best_last
from ablation.errors import ConfigError
from ablation.trainer import Trainer

FIX_LR = {"intervention": "fix_lr", "layers": [3, 4]}  # two param groups, one at a fixed LR


def test_a_kill_between_the_best_weights_and_the_checkpoint_resumes_exactly(tmp_path):
    """The best weights of a new best epoch are written before the checkpoint that names them:
    a kill in between leaves the old checkpoint and its own best file, plus a newer best file,
    which the resumed trial discards (it rewrites it when it gets there)."""
    cfg = from_dict(tiny_trial())
    straight = Trainer(cfg, tmp_path / "a")
    history = straight.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b").fit(StopAfter(2))
    best = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["best_epoch"]
    torch.save({"model": {}}, tmp_path / "b" / "best-2.pt")  # as a kill would leave it
    resumed = Trainer(cfg, tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").glob("best-*.pt")] == [f"best-{best}.pt"]
    resumed.fit()
    final = best_last(history)["best_epoch"]
    assert [p.name for p in (tmp_path / "b").glob("best-*.pt")] == [f"best-{final}.pt"]
    a, b = (torch.load(d / f"best-{final}.pt", weights_only=True)["model"]
            for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_version_0_2_0_with_the_best_weights_inside_resumes(tmp_path):
    cfg = from_dict(tiny_trial(epochs=3))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path).fit(StopAfter(2))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    best = tmp_path / f"best-{state.pop('best_epoch')}.pt"
    state["best_model"] = torch.load(best, weights_only=True)["model"]
    best.unlink()
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = Trainer(cfg, tmp_path)
    assert resumed.epochs_done == 2 and resumed.best_state is not None
    history = resumed.fit()
    assert (tmp_path / f"best-{best_last(history)['best_epoch']}.pt").exists()


def test_a_checkpoint_of_another_trial_is_refused(tmp_path):
    Trainer(from_dict(tiny_trial(epochs=1)), tmp_path).fit()
    with pytest.raises(ConfigError, match="holds trial"):
        Trainer(from_dict(tiny_trial(epochs=1, seed=1)), tmp_path)


@pytest.mark.parametrize("cuda", [[], [torch.zeros(16, dtype=torch.uint8)] * 8],
                         ids=["cpu-writer", "eight-gpu-writer"])
def test_checkpoints_with_the_old_per_gpu_rng_list_resume(tmp_path, cuda):
    # Before 0.3 the RNG part held one CUDA state per visible GPU (an empty list on the CPU).
    cfg = from_dict(tiny_trial(epochs=2))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path).fit(StopAfter(1))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["rng"]["cuda"] is None  # a CPU trial saves no GPU generator now
    state["rng"]["cuda"] = cuda
    torch.save(state, tmp_path / "checkpoint.pt")
    assert Trainer(cfg, tmp_path).epochs_done == 1


def assert_buffers_take_their_parameters_layout(trainer):
    for name, p in trainer.model.named_parameters():
        for key, value in trainer.optimizer.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert value.stride() == p.stride(), f"{name} {key}: {value.stride()} vs " \
                                                     f"{p.stride()}"


@pytest.mark.parametrize("first,then", [(False, True), (True, False)],
                         ids=["to-channels-last", "to-contiguous"])
def test_a_resume_with_another_layout_gives_the_buffers_the_parameters_layout(tmp_path, first,
                                                                            then):
    # CUDA's fused SGD refuses momentum buffers whose strides differ from their parameter's; the
    # CPU's SGD accepts them, so the strides themselves are checked here (the GPU check runs it).
    cfg = from_dict(tiny_trial(epochs=2, **FIX_LR))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg.replace(channels_last=first), tmp_path).fit(StopAfter(1))
    resumed = Trainer(cfg.replace(channels_last=then), tmp_path)
    assert resumed.epochs_done == 1
    conv = resumed.model.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == then
    assert_buffers_take_their_parameters_layout(resumed)
    resumed.fit()


def test_a_fork_with_another_layout_gives_the_buffers_the_parameters_layout(tmp_path):
    from ablation.fork import Fork

    base = tiny_trial(epochs=3, train_eval_size=32)
    parent, child = from_dict(base), from_dict({**base, **FIX_LR, "channels_last": True})
    run = tmp_path / "trials"
    Trainer(parent, run / parent.key, fork_points=[1]).fit()
    forked = Trainer(child, run / child.key, fork=Fork(parent.key, 1))
    assert forked.forked_from == parent.key
    assert_buffers_take_their_parameters_layout(forked)


# ---------------------------------------------------------------------------------------------
# Damaged, foreign and left-over files (a run folder never blocks, misleads or mixes results)


def test_a_best_file_of_another_trial_or_epoch_is_refused_in_one_line(tmp_path):
    mine, other = from_dict(tiny_trial(epochs=1)), from_dict(tiny_trial(epochs=1, seed=1))
    Trainer(mine, tmp_path / "a").fit()
    Trainer(other, tmp_path / "b").fit()
    (best,) = (tmp_path / "a").glob("best-*.pt")
    (tmp_path / "b" / best.name).replace(best)  # trial b's best weights under a's name
    with pytest.raises(ConfigError, match=f"{best}: holds trial '{other.key}', not") as err:
        Trainer(mine, tmp_path / "a")
    assert "\n" not in str(err.value)
    torch.save({"key": mine.key, "epoch": 7, "model": {}}, best)
    with pytest.raises(ConfigError, match="does not hold epoch 0's weights"):
        Trainer(mine, tmp_path / "a")


def test_a_missing_best_file_says_what_is_lost_and_what_is_kept(tmp_path):
    config = from_dict(tiny_trial(epochs=1))
    Trainer(config, tmp_path).fit()
    for best in tmp_path.glob("best-*.pt"):
        best.unlink()
    with pytest.raises(ConfigError) as err:
        Trainer(config, tmp_path)
    message = str(err.value)
    assert "the best epoch's weights are lost" in message and "intact" in message
    assert "move checkpoint.pt aside (keep it)" in message and "delete" not in message


def fork_family(tmp_path):
    """A baseline that wrote its fork file after epoch 1, and the fix-lr trial that forks."""
    from ablation.fork import Fork

    base = tiny_trial(epochs=3, milestones=[0.5, 0.75])
    parent, child = from_dict(base), from_dict({**base, **FIX_LR})
    run = tmp_path / "trials"
    Trainer(parent, run / parent.key, fork_points=[1]).fit()
    return run, parent, child, Fork(parent.key, 1), run / parent.key / "fork-1.pt"


@pytest.mark.parametrize("damage", ["truncated", "another trial's", "another epoch's"])
def test_an_unusable_fork_file_is_set_aside_and_the_trial_trains_from_scratch(tmp_path, damage):
    run, parent, child, fork, path = fork_family(tmp_path)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[:1000])
    else:
        state = torch.load(path, weights_only=True)
        if damage == "another trial's":
            state["key"] = "synthetic-linf-preact_small-at-none-s1-00000000"
        else:
            state["history"] = state["history"] + state["history"]
        torch.save(state, path)
    with pytest.warns(UserWarning, match="fork-1.pt: .*set aside as fork-1.pt.unusable"):
        trainer = Trainer(child, run / child.key, fork=fork)
    assert trainer.forked_from is None and trainer.epochs_done == 0
    assert not path.exists() and path.with_name("fork-1.pt.unusable").exists()
    got = trainer.fit()  # each trainer seeds the generators it draws from when it is built
    scratch = Trainer(child, tmp_path / "scratch").fit()
    assert [{k: v for k, v in r.items() if "seconds" not in k} for r in got] == \
        [{k: v for k, v in r.items() if "seconds" not in k} for r in scratch]
    path.write_bytes(good)  # a good file is used again
    assert Trainer(child, run / "again", fork=fork).forked_from == parent.key


def test_a_trial_removes_the_temporary_files_a_kill_left_in_its_folder(tmp_path):
    config = from_dict(tiny_trial(epochs=1))
    tmp_path.mkdir(exist_ok=True)
    left = [tmp_path / ".checkpoint.pt.0123456789abcdef.tmp",  # io.atomic_path's
            tmp_path / ".best-0.pt.4242.tmp"]  # a file:// upload's
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in left + kept:
        path.write_bytes(b"x" * 100)
    Trainer(config, tmp_path)
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
