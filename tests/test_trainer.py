"""The trainer: schedule, interventions in a real loop, best/last, checkpoints and resume."""

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_trial

from ablation.config import from_dict
from ablation.errors import ConfigError, DataError, TrainingDiverged
from ablation.models import group_names
from ablation.curves import best_last
from ablation.schedule import learning_rate, schedule_time
from ablation.checkpoint import load_best
from ablation.trainer import Reporter, Trainer

TIMING = ("train_seconds", "eval_seconds")


def lr_of(config, epoch, batch, batches=391):
    return learning_rate(config, schedule_time(config, epoch, batch, batches))


def test_per_iteration_schedule_drops_on_the_last_batch_of_epochs_99_and_149():
    at = from_dict({"method": "at"})  # METHOD B §3.1: lr(e + (i+1)/N), N = 391
    assert lr_of(at, 0, 0) == 0.1
    assert lr_of(at, 99, 389) == 0.1 and lr_of(at, 99, 390) == pytest.approx(0.01)
    assert lr_of(at, 149, 389) == pytest.approx(0.01)
    assert lr_of(at, 149, 390) == pytest.approx(0.001)
    svhn = from_dict({"dataset": "svhn"})
    assert lr_of(svhn, 0, 0) == 0.01 and lr_of(svhn, 120, 0) == pytest.approx(0.001)


def test_per_epoch_schedule_follows_trades_1_based_epochs():
    trades = from_dict({"method": "trades"})  # 1-based epochs 1-99: 0.1, 100-149: 0.01, then 0.001
    assert lr_of(trades, 97, 390) == 0.1 and lr_of(trades, 98, 0) == 0.1
    assert lr_of(trades, 99, 0) == pytest.approx(0.01)
    assert lr_of(trades, 148, 390) == pytest.approx(0.01)
    assert lr_of(trades, 149, 0) == pytest.approx(0.001)


def test_best_last_takes_the_first_best_epoch():
    rows = [{"epoch": e, "test_robust_acc": r, "test_acc": c}
            for e, (r, c) in enumerate([(0.1, 0.5), (0.3, 0.6), (0.3, 0.7), (0.2, 0.8)])]
    s = best_last(rows)
    assert s["best_epoch"] == 1 and s["last_epoch"] == 3
    assert s["diff_test_robust_acc"] == pytest.approx(0.1)
    assert s["best_test_acc"] == 0.6 and s["diff_test_acc"] == pytest.approx(-0.2)


def test_fix_param_keeps_chosen_groups_bit_identical_while_others_and_bn_stats_move(tmp_path):
    cfg = from_dict(tiny_trial(intervention="fix_param", layers=[1, 3], epochs=2))
    trainer = Trainer(cfg, tmp_path)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    frozen = set(group_names(trainer.model, [1, 3]))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, start[name]) is (name in frozen), name
    assert not torch.equal(trainer.model.state_dict()["layer1.0.bn1.running_mean"],
                           start["layer1.0.bn1.running_mean"])


def test_fix_lr_group_stays_at_lr_max_while_the_rest_decays(tmp_path):
    cfg = from_dict(tiny_trial(intervention="fix_lr", layers=[3, 4], lr_max=0.05))
    history = Trainer(cfg, tmp_path).fit()
    # 4 epochs, milestones at 2.0 and 3.0: the drop lands on the last batch of epochs 1 and 2.
    assert [r["lr"] for r in history] == pytest.approx([0.05, 0.005, 0.0005, 0.0005])
    assert [r["lr_fixed"] for r in history] == [0.05] * 4


def test_rows_hold_every_metric_and_best_weights_follow_the_best_epoch(tmp_path):
    trainer = Trainer(from_dict(tiny_trial()), tmp_path)
    history = trainer.fit()
    assert len(history) == 4 and [r["epoch"] for r in history] == [0, 1, 2, 3]
    for row in history:
        for key in ("lr", "train_loss", "train_acc", "train_robust_loss", "train_robust_acc",
                    "train_eval_acc", "train_eval_robust_acc", "test_loss", "test_acc",
                    "test_robust_loss", "test_robust_acc", *TIMING):
            assert math.isfinite(row[key]), key
        assert 0 <= row["test_robust_acc"] <= row["test_acc"] + 0.05
        assert math.isnan(row["lr_fixed"])
    assert history[-1]["test_acc"] > 0.2  # learns something: 10 classes, chance is 0.1
    best = best_last(history)["best_epoch"]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["best_epoch"] == best and "best_model" not in saved  # not rewritten each epoch
    assert [p.name for p in tmp_path.glob("best-*.pt")] == [f"best-{best}.pt"]  # older ones go
    trainer.model.load_state_dict(load_best(tmp_path, saved))  # the file the checkpoint names
    assert trainer.attack_metrics(trainer.data.test_x, trainer.data.test_y, 0)["acc"] == \
        pytest.approx(history[best]["test_acc"])


class StopAfter(Reporter):
    """Simulates a kill right after an epoch's checkpoint reached the disk."""

    def __init__(self, epochs):
        self.epochs = epochs

    def epoch(self, row, checkpoint):
        assert checkpoint.exists()
        if row["epoch"] + 1 == self.epochs:
            raise KeyboardInterrupt


@pytest.mark.parametrize("extra", [{"intervention": "awp", "layers": [2, 3]},
                                   {"intervention": "fix_lr", "layers": [4]},
                                   {"method": "trades", "threat": "l2"}])
def test_resume_reproduces_the_uninterrupted_curve_exactly(tmp_path, extra):
    cfg = from_dict(tiny_trial(**extra))
    straight = Trainer(cfg, tmp_path / "a").fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b").fit(StopAfter(2))
    resumed = Trainer(cfg, tmp_path / "b")
    assert resumed.epochs_done == 2
    again = resumed.fit()
    frame = lambda rows: pd.DataFrame(rows).drop(columns=list(TIMING))
    pd.testing.assert_frame_equal(frame(again), frame(straight), check_exact=True)
    final = lambda d: torch.load(d / "checkpoint.pt", weights_only=True)["model"]
    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_a_diverging_loss_stops_the_trial(tmp_path):
    cfg = from_dict(tiny_trial(lr_max=1e12, momentum=0.0))
    with pytest.raises(TrainingDiverged, match="epoch 0, batch"):
        Trainer(cfg, tmp_path).fit()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_trains_on_real_format_files(fake_dataset, tmp_path, name):
    root, _ = fake_dataset(name, n_train=40, n_test=20)
    cfg = from_dict(tiny_trial(dataset=name, data_root=str(root), epochs=1, batch_size=16,
                               train_eval_size=8, model="preact_small", width=2))
    trainer = Trainer(cfg, tmp_path / "out")
    assert trainer.data.info.num_classes == (100 if name == "cifar100" else 10)
    (row,) = trainer.fit()
    assert math.isfinite(row["train_robust_loss"])


def test_missing_dataset_names_the_path(tmp_path):
    cfg = from_dict(tiny_trial(dataset="cifar10", data_root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="nowhere"):
        Trainer(cfg, tmp_path / "out")


def test_the_clean_logging_pass_moves_bn_statistics_only_in_train_mode(tmp_path):
    # One batch per epoch. AT attacks and trains in train mode, so the weights cannot depend on
    # the logging pass; in train mode (Rice's loop) it adds one momentum-0.1 update with the clean
    # batch's statistics at the new weights: r_train = 0.9 * r_eval + 0.1 * batch mean.
    def run(mode):
        cfg = from_dict(tiny_trial(epochs=1, batch_size=10_000, log_pass_mode=mode))
        trainer = Trainer(cfg, tmp_path / mode)
        trainer.fit()
        return trainer
    train, eval_ = run("train"), run("eval")
    assert from_dict(tiny_trial()).log_pass_mode == "train"  # the AT default
    params = lambda t: dict(t.model.named_parameters())
    assert all(torch.equal(p, params(eval_)[n]) for n, p in params(train).items())
    model = train.model
    with torch.no_grad():
        x = train.data.train_x.float() / 255
        feature = model.conv1(model.normalize(x))  # what layer1.0.bn1 sees
    expected = 0.9 * eval_.model.layer1[0].bn1.running_mean + 0.1 * feature.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, expected, rtol=1e-5, atol=1e-6)


def test_trades_has_no_logging_pass_by_default():
    assert from_dict(tiny_trial(method="trades")).log_pass_mode == "eval"


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="needs a CUDA device"))])
def test_bf16_training_loss_is_taken_at_the_awp_perturbed_weights(tmp_path, monkeypatch, device):
    # autocast caches a weight's bf16 copy for the life of a region; the training forward must
    # see the weights AWP has just perturbed in place, not the copies cached during the attack.
    cfg = from_dict(tiny_trial(intervention="awp_full", precision="bf16", epochs=1,
                               awp_gamma=0.5, device=device))
    trainer = Trainer(cfg, tmp_path)
    loss_fn, seen = trainer.method.loss, []

    def recording_loss(model, x, x_adv, y):
        loss, logits = loss_fn(model, x, x_adv, y)
        seen.append((copy.deepcopy(model), x_adv.clone(), y.clone(), loss.item()))
        return loss, logits

    monkeypatch.setattr(trainer.method, "loss", recording_loss)
    trainer.fit()
    assert seen
    for snapshot, x_adv, y, got in seen:  # snapshot: the perturbed weights, in train mode
        with torch.autocast(device, dtype=torch.bfloat16):
            expected = F.cross_entropy(snapshot(x_adv), y).item()
        # CUDA may pick other convolution kernels for the copy: equal up to bf16 rounding there
        assert got == pytest.approx(expected, rel=0 if device == "cpu" else 1e-2)


def test_divergence_is_reported_at_the_first_bad_batch_without_a_sync_per_batch(tmp_path,
                                                                                monkeypatch):
    # 64 images, batch 8: 8 batches; the loss turns NaN from batch 3 on. The flag stays on the
    # device and is read at the end of the epoch (< DIVERGENCE_CHECK batches), naming batch 3.
    trainer = Trainer(from_dict(tiny_trial(epochs=1, batch_size=8)), tmp_path)
    loss_fn, calls = trainer.method.loss, []

    def poisoned(model, x, x_adv, y):
        loss, logits = loss_fn(model, x, x_adv, y)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 3 else loss), logits

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 0, batch 3 "):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing of the bad epoch was saved


def test_channels_last_changes_speed_not_the_networks_numbers(tmp_path):
    # Same weights, same batch: logits and weight gradients agree up to float rounding. (A whole
    # step is not compared: PGD's sign() turns rounding into different examples.)
    plain = Trainer(from_dict(tiny_trial(epochs=1)), tmp_path / "a")
    fast = Trainer(from_dict(tiny_trial(epochs=1, channels_last=True)), tmp_path / "b")
    x, y = plain.batch(plain.data.train_x[:64]), plain.data.train_y[:64]
    grads = []
    for trainer in (plain, fast):
        trainer.model.train()
        logits = trainer.model(x.contiguous(memory_format=trainer.memory_format))
        F.cross_entropy(logits, y).backward()
        grads.append((logits, {n: p.grad for n, p in trainer.model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-3, atol=1e-5)


def test_eval_batch_size_changes_speed_not_results(tmp_path):
    trainer = Trainer(from_dict(tiny_trial(epochs=1)), tmp_path)
    out = []
    for bs in (16, 1000):
        trainer.eval_batch = bs
        torch.manual_seed(2)
        out.append(trainer.attack_metrics(trainer.data.test_x, trainer.data.test_y, 3))
    assert out[0] == pytest.approx(out[1], rel=1e-5, abs=1e-6)
