"""Attacks against hand computations on a linear model, where every gradient is closed-form;
AutoAttack on models whose robust accuracy is known without running it."""

import numpy as np
import pytest
import torch
from torch import nn

from ablation.attacks import (ThreatModel, autoattack_accuracy, input_gradient, pgd, project,
                              random_start, trades_attack)

EPS, STEP = 8 / 255, 2 / 255


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    W = model[1].weight.detach().numpy()
    b = model[1].bias.detach().numpy()
    x = torch.rand(5, 3, 2, 2, dtype=torch.float64)
    x[0] = 0.0  # samples on the box's edges, so that the [0,1] clip matters
    x[1] = 1.0
    y = torch.tensor([0, 1, 2, 3, 1])
    return model, W, b, x, y


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce_grad(W, b, x, y):
    """d mean-CE / d x for logits = x W^T + b: (softmax - onehot) W / B."""
    flat = x.reshape(len(x), -1)
    p = softmax(flat @ W.T + b)
    p[np.arange(len(y)), y] -= 1
    return (p @ W / len(x)).reshape(x.shape)


def l2n(a):
    return np.sqrt((a.reshape(len(a), -1) ** 2).sum(1)).reshape(-1, *([1] * (a.ndim - 1)))


def test_input_gradient_is_the_analytic_one_and_leaves_weights_alone(linear):
    model, W, b, x, y = linear
    xr = x.clone().requires_grad_(True)
    grad = input_gradient(nn.functional.cross_entropy(model(xr), y), xr)
    np.testing.assert_allclose(grad.numpy(), ce_grad(W, b, x.numpy(), y.numpy()), rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_linf_follows_hand_iterates_inside_ball_and_box(linear):
    model, W, b, x, y = linear
    threat = ThreatModel("linf", EPS, STEP)
    d0 = torch.empty_like(x).uniform_(-EPS, EPS)
    xn, yn, d = x.numpy(), y.numpy(), d0.numpy().copy()
    for _ in range(7):
        d = np.clip(d + STEP * np.sign(ce_grad(W, b, xn + d, yn)), -EPS, EPS)
        d = np.clip(d, -xn, 1 - xn)
    x_adv = pgd(model, x, y, threat, steps=7, delta=d0).numpy()
    np.testing.assert_allclose(x_adv, np.clip(xn + d, 0, 1), atol=1e-12)
    assert np.abs(x_adv - xn).max() <= EPS + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_pgd_l2_follows_hand_iterates_and_projection(linear):
    model, W, b, x, y = linear
    eps, step = 128 / 255, 15 / 255
    threat = ThreatModel("l2", eps, step)
    d0 = random_start(x, threat)
    xn, yn, d = x.numpy(), y.numpy(), d0.numpy().copy()
    for _ in range(6):
        g = ce_grad(W, b, xn + d, yn)
        d = d + step * g / (l2n(g) + 1e-10)
        d = d * np.where(l2n(d) > eps, eps / l2n(d), 1.0)
        d = np.clip(d, -xn, 1 - xn)
    x_adv = pgd(model, x, y, threat, steps=6, delta=d0).numpy()
    np.testing.assert_allclose(x_adv, np.clip(xn + d, 0, 1), atol=1e-12)
    assert (l2n(x_adv - xn) <= eps + 1e-9).all()


def test_project_l2_rescales_only_outside_the_ball():
    x = torch.full((2, 1, 1, 4), 0.5, dtype=torch.float64)
    delta = torch.tensor([[[[0.3, 0.4, 0.0, 0.0]]], [[[0.03, 0.04, 0.0, 0.0]]]], dtype=torch.float64)
    out = project(delta, x, ThreatModel("l2", 0.25, 0.1))
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.15, 0.2, 0, 0])  # norm 0.5 -> 0.25
    np.testing.assert_allclose(out[1].numpy(), delta[1].numpy())  # norm 0.05, untouched


def test_random_starts_have_the_documented_distribution():
    torch.manual_seed(1)
    x = torch.full((4000, 3, 4, 4), 0.5, dtype=torch.float64)  # far from the box's edges
    linf = random_start(x, ThreatModel("linf", EPS, STEP))
    assert linf.abs().max() <= EPS and abs(linf.mean()) < 1e-4
    assert abs(linf.abs().mean() - EPS / 2) < 1e-4  # uniform on [-eps, eps]
    r = l2n(random_start(x, ThreatModel("l2", 0.1, 0.01)).numpy()).ravel() / 0.1
    assert r.max() <= 1 + 1e-9
    assert abs(r.mean() - 0.5) < 0.02 and abs((r < 0.25).mean() - 0.25) < 0.03  # r ~ U(0,1)


def test_pgd_keeps_the_models_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 2, (8,))
    for mode in (True, False):
        model.train(mode)
        pgd(model, x, y, ThreatModel("linf", EPS, STEP), steps=2)
        assert model.training is mode


def test_trades_attack_linf_follows_hand_iterates(linear):
    model, W, b, x, y = linear
    x0 = x + 0.001 * torch.randn_like(x)
    xn, a = x.numpy(), x0.numpy().copy()
    p_nat = softmax(xn.reshape(5, -1) @ W.T + b)
    for _ in range(5):
        q = softmax(a.reshape(5, -1) @ W.T + b)
        g = ((q - p_nat) @ W).reshape(a.shape)  # d/dx of sum KL(p_nat || q(x))
        a = np.clip(np.clip(a + STEP * np.sign(g), xn - EPS, xn + EPS), 0, 1)
    out = trades_attack(model, x, ThreatModel("linf", EPS, STEP), steps=5, start=x0 - x)
    np.testing.assert_allclose(out.numpy(), a, atol=1e-12)


def test_trades_attack_l2_stays_in_ball_and_box(linear):
    model, W, b, x, y = linear
    eps = 128 / 255
    out = trades_attack(model, x, ThreatModel("l2", eps, 2 * eps / 10), steps=10)
    assert (l2n((out - x).numpy()) <= eps + 1e-9).all()
    assert out.min() >= 0 and out.max() <= 1


def kl_grad(W, b, x_nat, a):
    """d/da of sum KL(p(x_nat) || p(a)) for the linear model: (p(a) - p(x_nat)) W."""
    n = len(a)
    p_nat = softmax(x_nat.reshape(n, -1) @ W.T + b)
    q = softmax(a.reshape(n, -1) @ W.T + b)
    return ((q - p_nat) @ W).reshape(a.shape)


# scale 1e-3 gives gradient norms of 1e-10 to 4e-10, as TRADES meets at initialisation, where an
# epsilon of 1e-10 in the division shortens the step by 20-40%; its first two steps are compared
# (the softmax difference behind so small a gradient carries ~1e-10 relative rounding).
@pytest.mark.parametrize("scale,steps,atol", [(1.0, 10, 1e-12), (1e-3, 3, 1e-9)])
def test_trades_attack_l2_follows_the_authors_iterates(linear, scale, steps, atol):
    # The layer-wise TRADES scripts' L2 branch: SGD (lr 2*eps/K) on delta along -grad/||grad||
    # of -KL (no epsilon in the division), delta <- clip(x + delta, 0, 1) - x, then
    # delta.renorm_(2, 0, eps), which scales by eps / (||delta|| + 1e-7) where ||delta|| > eps.
    model, W, b, x, y = linear
    with torch.no_grad():
        model[1].weight.mul_(scale)  # W is a view of this weight, so it is scaled too
    eps = 128 / 255
    step = 2 * eps / 10
    torch.manual_seed(3)
    d0 = 0.001 * torch.randn_like(x)
    xn, d = x.numpy(), d0.numpy().copy()
    for _ in range(steps):
        g = kl_grad(W, b, xn, xn + d)
        d = d + step * g / l2n(g)
        d = np.clip(xn + d, 0, 1) - xn
        norm = l2n(d)
        d = d * np.where(norm > eps, eps / (norm + 1e-7), 1.0)
    out = trades_attack(model, x, ThreatModel("l2", eps, step), steps=steps, start=d0)
    np.testing.assert_allclose(out.numpy(), xn + d, rtol=0, atol=atol)


def test_trades_attack_l2_stays_put_where_the_gradient_is_exactly_zero(linear):
    model, W, b, x, y = linear
    with torch.no_grad():
        model[1].weight.zero_()  # the logits ignore the input: every input gradient is exactly 0
    start = 0.001 * torch.randn_like(x)
    out = trades_attack(model, x, ThreatModel("l2", 0.5, 0.1), steps=3, start=start)
    assert torch.equal(out, x + ((x + start).clamp(0, 1) - x))  # clipped, never moved, no NaN


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_starts_do_not_depend_on_the_memory_layout(norm):
    # channels_last is a runtime field: samplers fill memory in order, so drawing straight into
    # an NHWC tensor would give each (image, channel, pixel) another number.
    x = torch.rand(4, 3, 5, 5)
    threat = ThreatModel(norm, 0.1, 0.01)
    torch.manual_seed(3)
    plain = random_start(x, threat)
    torch.manual_seed(3)
    nhwc = random_start(x.contiguous(memory_format=torch.channels_last), threat)
    assert torch.equal(nhwc, plain)
    assert nhwc.is_contiguous(memory_format=torch.channels_last), "the start keeps x's layout"


def test_the_trades_start_does_not_depend_on_the_memory_layout():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4))
    x = torch.rand(4, 3, 6, 6)
    threat = ThreatModel("linf", 0.1, 0.02)
    model(x)
    out = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(5)
        out.append(trades_attack(model, x.contiguous(memory_format=layout), threat, 0))
    assert torch.equal(out[0], out[1])


# --- AutoAttack (standard), on models whose robust accuracy is known without running it ------


class Constant(nn.Module):
    """Ignores its input: no attack can change its prediction (always class 3)."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.eye(10)[3])

    def forward(self, x):  # the 0 * x term keeps a (zero) input gradient for the attacks
        return self.logits.expand(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)


@pytest.mark.slow
def test_an_input_independent_model_keeps_its_clean_accuracy():
    y = torch.tensor([3, 3, 1, 3, 0, 3, 2, 3])
    x = torch.rand(8, 1, 4, 4)
    acc = autoattack_accuracy(Constant(), x, y, ThreatModel("linf", 8 / 255, 2 / 255))
    assert acc == 5 / 8


def test_a_linear_model_falls_to_a_large_eps_and_the_cap_is_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x = torch.rand(12, 1, 4, 4)
    y = model(x).argmax(1)  # clean accuracy 1 by construction
    assert autoattack_accuracy(model, x, y, ThreatModel("l2", 4.0, 0.1), n_examples=6) == 0.0
    assert model.training  # mode restored after the eval-mode attack
