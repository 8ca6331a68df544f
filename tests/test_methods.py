"""Training methods against the authors' loops: which forward passes run, and in which order."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablation.attacks import ThreatModel, pgd
from ablation.config import from_dict
from ablation.methods import build_method


class Recorder(nn.Module):
    """Wraps a model and records which input each forward pass saw ("nat" or "adv")."""

    def __init__(self, model, x, x_adv):
        super().__init__()
        self.model, self.x, self.x_adv, self.seen = model, x, x_adv, []

    def forward(self, inputs):
        self.seen.append("nat" if inputs is self.x else "adv" if inputs is self.x_adv else "?")
        return self.model(inputs)


def batch():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4, dtype=torch.float64)
    return x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1), torch.randint(0, 3, (8,))


def bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3)).double().train()


@pytest.mark.parametrize("method,loss_passes,proxy_passes", [
    # Rice's train_cifar.py: robust_output = model(X_adv) only.
    ("at", ["adv"], ["adv"]),
    # TRADES_AWP train loop: logits_adv = model(x_adv); KL target softmax(model(x_natural));
    # logits = model(x_natural) for the CE. TradesAWP.calc_awp: proxy(x_nat) for the CE, then
    # proxy(x_adv), then proxy(x_nat) as the KL target.
    ("trades", ["adv", "nat", "nat"], ["nat", "adv", "nat"]),
])
def test_forward_passes_follow_the_authors_order(method, loss_passes, proxy_passes):
    x, x_adv, y = batch()
    m = build_method(from_dict({"method": method}))
    rec = Recorder(bn_net(), x, x_adv)
    m.loss(rec, x, x_adv, y)
    assert rec.seen == loss_passes
    rec.seen = []
    m.proxy_loss(rec, x, x_adv, y)
    assert rec.seen == proxy_passes


def test_trades_loss_moves_bn_statistics_as_the_authors_three_passes_do():
    # Running mean after momentum-0.1 updates with the batch means of x_adv, x, x, in that order.
    x, x_adv, y = batch()
    model = bn_net()
    r = torch.zeros(3, dtype=torch.float64)
    for inputs in (x_adv, x, x):
        r = 0.9 * r + 0.1 * inputs.mean(dim=(0, 2, 3))
    loss, logits_adv = build_method(from_dict({"method": "trades"})).loss(model, x, x_adv, y)
    torch.testing.assert_close(model[0].running_mean, r, rtol=1e-12, atol=1e-15)
    assert model[0].num_batches_tracked.item() == 3


def test_trades_loss_is_ce_plus_beta_kl_with_an_undetached_target():
    x, x_adv, y = batch()
    model = bn_net()
    ref = copy.deepcopy(model)
    p_nat = F.softmax(ref(x), 1)
    expected = F.cross_entropy(ref(x), y) + 6.0 * (
        p_nat * (p_nat.log() - F.log_softmax(ref(x_adv), 1))).sum(1).mean()
    loss, _ = build_method(from_dict({"method": "trades"})).loss(model, x, x_adv, y)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss, model[2].weight)[0]
    g_ref = torch.autograd.grad(expected, ref[2].weight)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_at_attack_in_train_mode_moves_bn_like_rices_attack_pgd():
    # Rice's attack_pgd: one train-mode forward per step, then one more at the final point to
    # compare restarts: steps + 1 momentum updates of BN's running statistics, the last one with
    # the statistics of the adversarial batch itself.
    x, x_adv, y = batch()
    cfg = from_dict({"method": "at", "train_steps": 3, "normalize": False})
    model = bn_net()
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    out = build_method(cfg).attack(model, x, y)
    assert model.training and model[0].num_batches_tracked.item() == 4
    torch.manual_seed(5)
    pgd(ref, x, y, ThreatModel("linf", cfg.eps, cfg.step), 3)
    with torch.no_grad():
        ref(out)
    assert torch.equal(model[0].running_mean, ref[0].running_mean)
    assert torch.equal(model[0].running_var, ref[0].running_var)


def test_at_attack_in_eval_mode_leaves_bn_alone():
    x, x_adv, y = batch()
    cfg = from_dict({"method": "at", "train_attack_mode": "eval"})
    model = bn_net()
    build_method(cfg).attack(model, x, y)
    assert not model.training and model[0].num_batches_tracked.item() == 0
