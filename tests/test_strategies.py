"""ablation/strategies.py: each method and intervention described once, read by the planner and
the cost model from the description, never from the name."""

import pytest

from ablation import strategies
from ablation.config import from_dict
from ablation.cost import passes_per_epoch
from ablation.errors import ConfigError
from ablation.fork import shared_epochs


@pytest.fixture
def described():
    """Register descriptions for the test, and take them out again after it."""
    added = []

    def add(**fields):
        added.append(strategies.register(strategies.Intervention(**fields)))
        return added[-1]

    yield add
    for d in added:
        del strategies.INTERVENTIONS[d.name]


def test_a_name_without_a_description_raises_instead_of_meaning_no_effect():
    with pytest.raises(ConfigError, match="intervention 'freeze_late' is not one of none, "):
        strategies.intervention("freeze_late")
    with pytest.raises(ConfigError, match="method 'mart' is not one of at, trades"):
        strategies.method("mart")
    with pytest.raises(ValueError, match="described already"):
        strategies.register(strategies.Intervention("fix_lr", layer_wise=True))


@pytest.mark.parametrize("fields,shared", [
    ({"frozen": True}, 0),  # like fix_param: from the first batch
    ({"keeps_lr_max": True}, 7),  # like fix_lr: until the first drop (15 epochs, milestone 0.5)
    ({"perturbs": "groups"}, 0),  # like awp, without warm-up
    ({}, 14),  # no effect at all: every epoch but the last is shared
])
def test_the_fork_planner_reads_a_new_interventions_description(described, fields, shared):
    d = described(name="custom", layer_wise=True, **fields)
    base = {"dataset": "synthetic", "epochs": 15, "batch_size": 64}
    parent = from_dict(base)
    child = from_dict({**base, "intervention": d.name, "layers": [3, 4]})
    assert shared_epochs(parent, child, batches=8) == shared


def test_awp_switches_on_at_the_epoch_its_authors_number_the_warm_up():
    at = from_dict({"intervention": "awp", "layers": [3], "awp_warmup": 5})
    trades = at.replace(method="trades")  # the TRADES scripts count epochs from 1 (B §4.2)
    assert [strategies.awp_active(at, e) for e in (4, 5)] == [False, True]
    assert [strategies.awp_active(trades, e) for e in (3, 4)] == [False, True]
    assert not strategies.awp_active(at.replace(awp_gamma=0.0), 100)


def test_passes_per_step_by_hand():
    # docs/method.md D.2: PGD-10 is 20F; AT trains 3F plus Rice's restart forward in train mode;
    # TRADES a clean KL target 1F and three training passes 9F; AWP's proxy 3F; logging 1F.
    at = from_dict({"dataset": "synthetic", "train_eval_size": 0})
    per_image = lambda c: (passes_per_epoch(c) - 256 * (2 * c.test_steps + 2)) / 512
    assert per_image(at) == 20 + 3 + 1 + 1
    assert per_image(at.replace(train_attack_mode="eval")) == 20 + 3 + 1
    assert per_image(at.replace(method="trades")) == 20 + 1 + 9 + 1
    assert per_image(at.replace(intervention="awp_full")) == 20 + 3 + 1 + 3 + 1
    assert per_image(at.replace(intervention="fix_lr", layers=[1])) == per_image(at)
