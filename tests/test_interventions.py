"""Interventions against hand computations of docs/method.md B §4-§5 on a tiny PreAct ResNet."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ablation.config import from_dict
from ablation.interventions import build_intervention
from ablation.methods import build_method
from ablation.models import build_model, group_names


def tiny(intervention="awp", layers=(2, 4), **kw):
    cfg = from_dict({"dataset": "synthetic", "model": "preact_small", "width": 2,
                     "intervention": intervention, "layers": list(layers), **kw})
    torch.manual_seed(0)
    model = build_model("preact_small", num_classes=10, width=2, blocks=1,
                        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).double()
    x = torch.rand(16, 3, 8, 8, dtype=torch.float64)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (16,))
    return cfg, model, x, x_adv, y


def hand_awp(model, names, gamma, x_adv, y):
    """v_l = gamma * ||w_l|| * g_l / ||g_l|| with g the CE gradient at w, in train mode (B §4.1)."""
    ref = copy.deepcopy(model).train()
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), [params[n] for n in names])
    return {n: gamma * params[n].norm() * g / g.norm() for n, g in zip(names, grads)}


@pytest.mark.parametrize("intervention,layers", [("awp", (2, 4)), ("awp", (1,)), ("awp_full", ())])
def test_awp_perturbs_exactly_the_hand_computed_tensors_and_restores(intervention, layers):
    cfg, model, x, x_adv, y = tiny(intervention, layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = group_names(model, layers) if layers else list(before)
    expected_names = [n for n in names if before[n].dim() > 1]
    expected = hand_awp(model, expected_names, cfg.awp_gamma, x_adv, y)
    awp = build_intervention(model, cfg)
    model.train()
    awp.before_step(0, build_method(cfg), x, x_adv, y)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.detach() - before[name], expected[name],
                                       rtol=1e-6, atol=1e-12)
        else:
            assert torch.equal(p, before[name]), f"{name} should not move"
    if intervention == "awp_full":  # full AWP also perturbs the stem and the classifier
        assert {"conv1.weight", "linear.weight"} <= set(expected)
    else:
        assert "conv1.weight" not in expected and "linear.weight" not in expected
    awp.after_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-15)


def test_awp_waits_for_its_warmup():
    cfg, model, x, x_adv, y = tiny(awp_warmup=3)
    before = copy.deepcopy(model.state_dict())
    awp = build_intervention(model, cfg)
    awp.before_step(2, build_method(cfg), x, x_adv, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_awp_does_not_move_the_models_bn_statistics():
    cfg, model, x, x_adv, y = tiny()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    build_intervention(model, cfg).before_step(0, build_method(cfg), x, x_adv, y)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_trades_awp_ascends_the_trades_objective():
    cfg, model, x, x_adv, y = tiny(method="trades", layers=(3,))
    names = [n for n in group_names(model, (3,)) if model.get_parameter(n).dim() > 1]
    ref = copy.deepcopy(model).train()
    params = dict(ref.named_parameters())
    nat = ref(x)
    kl = F.kl_div(F.log_softmax(ref(x_adv), 1), F.softmax(nat, 1), reduction="batchmean")
    grads = torch.autograd.grad(F.cross_entropy(nat, y) + 6.0 * kl, [params[n] for n in names])
    awp = build_intervention(model, cfg)
    assert cfg.awp_gamma == 0.005  # TRADES default (A.5)
    v = awp.perturbation(build_method(cfg), x, x_adv, y)
    for n, g, got in zip(names, grads, v):
        torch.testing.assert_close(cfg.awp_gamma * got, 0.005 * params[n].norm() * g / g.norm(),
                                   rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method,warmup,first_awp_epoch", [
    ("at", 0, 0), ("at", 5, 5), ("at", 10, 10),           # AT-AWP scripts: 0-based, epoch >= w
    ("trades", 10, 9), ("trades", 1, 0), ("trades", 0, 0),  # TRADES-AWP: 1-based, epoch >= w
])
def test_awp_warmup_boundary_follows_each_methods_epoch_numbering(method, warmup,
                                                                  first_awp_epoch):
    # Written out from the scripts: AT_AWP/train_cifar10.py loops `for epoch in range(0, E)` and
    # TRADES_AWP/train_trades_cifar.py `for epoch in range(1, E + 1)`, both perturbing when
    # `epoch >= awp_warmup`; so the first perturbed 0-based epoch is w for AT and w - 1 for TRADES.
    cfg, model, x, x_adv, y = tiny(method=method, awp_warmup=warmup)
    awp = build_intervention(model, cfg)
    moved = []
    for epoch in range(12):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.train()
        awp.before_step(epoch, build_method(cfg), x, x_adv, y)
        moved.append(any(not torch.equal(p, before[n]) for n, p in model.named_parameters()))
        awp.after_step()
    assert moved.index(True) == first_awp_epoch and all(moved[first_awp_epoch:])


@pytest.mark.parametrize("method,proxy_lr", [("at", 0.01), ("trades", 0.1)])
def test_awp_proxy_steps_with_the_authors_learning_rate(method, proxy_lr):
    # AT_AWP scripts: proxy_optim = SGD(proxy.parameters(), lr=0.01); TRADES_AWP scripts:
    # SGD(proxy.parameters(), lr=args.lr) with --lr 0.1. The proxy moves by lr * gradient.
    cfg, model, x, x_adv, y = tiny(method=method, layers=(4,))
    method_ = build_method(cfg)
    ref = copy.deepcopy(model).train()
    names = [n for n in group_names(model, (4,)) if model.get_parameter(n).dim() > 1]
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(method_.proxy_loss(ref, x, x_adv, y), [params[n] for n in names])
    awp = build_intervention(model, cfg)
    awp.perturbation(method_, x, x_adv, y)
    for n, g, q in zip(names, grads, awp.proxy_params):
        torch.testing.assert_close(q.detach() - model.get_parameter(n).detach(), proxy_lr * g,
                                   rtol=1e-9, atol=1e-15)


def test_fix_param_freezes_only_the_chosen_groups():
    cfg, model, *_ = tiny("fix_param", (1, 3))
    build_intervention(model, cfg)
    frozen = set(group_names(model, (1, 3)))
    for name, p in model.named_parameters():
        assert p.requires_grad is (name not in frozen)


def test_fix_lr_puts_the_chosen_groups_in_a_fixed_group():
    cfg, model, *_ = tiny("fix_lr", (3, 4))
    groups = build_intervention(model, cfg).param_groups()
    ids = {id(p): n for n, p in model.named_parameters()}
    assert [ids[id(p)] for p in groups[1]["params"]] == group_names(model, (3, 4))
    assert groups[1]["fixed_lr"] and not groups[0].get("fixed_lr")
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_awp_foreach_updates_equal_the_authors_per_tensor_loop_bit_for_bit(dtype):
    # utils_awp.py: diff_in_weights computes ||w|| / (||d|| + 1e-20) * d per tensor, and
    # add_into_weights adds coeff * v with coeff = +gamma, then -gamma. On the CPU the
    # torch._foreach_* calls must give the same bits as that loop, not only the same numbers.
    cfg, model, x, x_adv, y = tiny("awp_full", ())
    model.to(dtype)
    x, x_adv = x.to(dtype), x_adv.to(dtype)
    awp = build_intervention(model, cfg)
    model.train()
    start = [w.detach().clone() for w in awp.params]
    awp.before_step(0, build_method(cfg), x, x_adv, y)
    diffs = [q.detach() - w for q, w in zip(awp.proxy_params, start)]
    v = [w.norm() / (d.norm() + 1e-20) * d for w, d in zip(start, diffs)]
    perturbed = [w + cfg.awp_gamma * d for w, d in zip(start, v)]
    for name, got, want in zip(awp.perturbed, awp.v, v):
        assert torch.equal(got, want), f"{name}: v differs from the authors' loop"
    for name, got, want in zip(awp.perturbed, awp.params, perturbed):
        assert torch.equal(got, want), f"{name}: w + gamma*v differs from the authors' loop"
    awp.after_step()
    for name, got, w, d in zip(awp.perturbed, awp.params, perturbed, v):
        assert torch.equal(got, w + -cfg.awp_gamma * d), f"{name}: the restore differs"
