"""The learning-rate schedule (ablation/schedule.py): per iteration for AT, per 1-based epoch for
TRADES, each drop on the batch its authors' code drops it (docs/method.md B §3.1)."""

import pytest

from ablation.config import from_dict
from ablation.schedule import learning_rate, schedule_time


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
