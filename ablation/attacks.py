"""Attacks in [0,1] pixel space: PGD (Linf, L2), the TRADES KL inner maximisation, and standard
AutoAttack through ``pyautoattack`` for the final numbers.

Attacks are functions of (model, inputs, threat model). PGD and TRADES neither change the model's
mode nor fill its parameters' ``.grad``: the caller chooses train or eval mode (method B §2).
AutoAttack alone puts the model in eval mode, as it requires, and restores the mode after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ThreatModel


def mean_ce(logits: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """The mean cross-entropy of a batch, per network: a pack of K networks (``model.pack_size``,
    :mod:`ablation.pack`) takes K batches at once and gets the sum of their means, so each
    network's gradient is that of its own mean. For one network it is torch's mean bit for bit
    on the CPU (the sum over the batch divided by its size is how torch computes it there,
    forward and back; the golden curves did not move)."""
    return F.cross_entropy(logits, y, reduction="sum") / _per_network(y, model)


def _per_network(y: Tensor, model: nn.Module) -> int:
    return len(y) // getattr(model, "pack_size", 1)


def input_gradient(loss: Tensor, x: Tensor) -> Tensor:
    """d loss / d x, without computing or storing any weight gradient."""
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _into_l2_ball(delta: Tensor, eps: float) -> Tensor:
    """Rescale the samples whose L2 norm exceeds eps onto the sphere; leave the others."""
    norm = _per_sample_norm(delta)
    return delta * torch.where(norm > eps, eps / norm, torch.ones_like(norm))


def project(delta: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """Onto the eps-ball, then into the box so that x + delta stays in [0,1] (B §2 order)."""
    if threat.norm == "linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        delta = _into_l2_ball(delta, threat.eps)
    return torch.max(torch.min(delta, 1 - x), -x)


def drawn_like(x: Tensor, fill) -> Tensor:
    """A tensor of ``x``'s shape and memory layout whose values ``fill`` (an in-place sampler such
    as ``Tensor.uniform_``) draws in the standard NCHW order: samplers fill memory in order, so
    drawing into a channels-last tensor would put other numbers at each (image, channel, pixel).
    The memory layout is a runtime field; it must not change the random draws."""
    drawn = fill(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return drawn if x.is_contiguous() else torch.empty_like(x).copy_(drawn)


def random_start(x: Tensor, threat: ThreatModel) -> Tensor:
    """Rice's start: Linf uniform in the cube; L2 a random direction at radius r*eps, r ~ U(0,1)."""
    if threat.norm == "linf":
        delta = drawn_like(x, lambda t: t.uniform_(-threat.eps, threat.eps))
    else:
        z = drawn_like(x, torch.Tensor.normal_)
        r = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = z / _per_sample_norm(z) * r * threat.eps
    return project(delta, x, threat)


def pgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int,
        delta: Tensor | None = None) -> Tensor:
    """PGD on the mean cross-entropy from ``delta`` (a random start if None); returns x_adv.

    One restart and no early stop, as in training and per-epoch evaluation (B §2). Rice's code runs
    one more forward pass after the last step to compare restarts; with one restart it only moves
    BN running statistics, so the training method runs it where that matters (``methods.AT``).
    """
    delta = random_start(x, threat) if delta is None else delta.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = mean_ce(model(x + delta), y, model)
        grad = input_gradient(loss, delta)
        delta = delta.detach()
        if threat.norm == "linf":
            delta = delta + threat.step * grad.sign()
        else:
            delta = delta + threat.step * grad / (_per_sample_norm(grad) + 1e-10)
        delta = project(delta, x, threat)
    return (x + delta).clamp(0, 1).detach()


def trades_kl(logits_adv: Tensor, logits_nat: Tensor, model: nn.Module | None = None) -> Tensor:
    """KL(softmax(nat) || softmax(adv)) in TRADES' kl_div(log p_adv, p_nat) form: summed over
    the batch, or (given the ``model``) its "batchmean" per network (see :func:`mean_ce`)."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                  reduction="sum")
    return kl if model is None else kl / _per_network(logits_adv, model)


def trades_start(x: Tensor) -> Tensor:
    """The TRADES inner maximisation's start: 0.001 * N(0, 1) per pixel (B §6)."""
    return 0.001 * drawn_like(x, torch.Tensor.normal_)


def trades_attack(model: nn.Module, x: Tensor, threat: ThreatModel, steps: int,
                  start: Tensor | None = None) -> Tensor:
    """TRADES inner maximisation of the summed KL from x + ``start`` (default 0.001*N(0,1), B §6).

    Linf iterates on x_adv: sign step, clip to the ball, clip to [0,1]. L2 iterates on the
    perturbation, as the authors' code does: a step along the gradient divided by its norm (no
    epsilon; an exact zero gradient steps nowhere instead of giving NaN), clip x + delta to
    [0,1], then ``torch.renorm`` into the ball. Returns x_adv.
    """
    with torch.no_grad():
        logits_nat = model(x)
    delta = (trades_start(x) if start is None else start).detach()
    if threat.norm == "linf":
        x_adv = x + delta
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad = input_gradient(trades_kl(model(x_adv), logits_nat), x_adv)
            x_adv = x_adv.detach() + threat.step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - threat.eps), x + threat.eps).clamp(0, 1)
        return x_adv.detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        grad = input_gradient(trades_kl(model(x + delta), logits_nat), delta)
        norm = _per_sample_norm(grad)
        # add(alpha=) is the kernel of the authors' SGD step on delta, so the rounding matches
        delta = delta.detach().add(grad / torch.where(norm == 0, 1, norm), alpha=threat.step)
        delta = (delta + x).clamp(0, 1) - x
        delta = delta.renorm(p=2, dim=0, maxnorm=threat.eps)
    return (x + delta).detach()


AA_NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack_accuracy(model: nn.Module, images: Tensor, labels: Tensor, threat: ThreatModel,
                        n_examples: int | None = None, batch_size: int = 250,
                        seed: int = 0) -> float:
    """Robust accuracy under standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; B §7) on the
    first ``n_examples`` images.

    ``images`` are uint8 or [0,1] floats; the model normalises inside its forward and runs in
    eval mode, as AutoAttack requires (B §7.1). The eps is the threat model's (L2: 128/255).
    """
    from pyautoattack import AutoAttack  # imported here: loading it costs a second at start-up

    n = len(labels) if n_examples is None else min(n_examples, len(labels))
    x = images[:n]
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    y = labels[:n]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        attack = AutoAttack(model, norm=AA_NORMS[threat.norm], eps=threat.eps,
                            version="standard", device=device, seed=seed)
        x_adv, _ = attack.run_standard_evaluation(x.to(device), y.to(device),
                                                  batch_size=batch_size)
        correct = 0
        with torch.no_grad():
            for i in range(0, n, batch_size):
                logits = model(x_adv[i:i + batch_size].to(device))
                correct += (logits.argmax(1) == y[i:i + batch_size].to(device)).sum().item()
    finally:
        model.train(was_training)
    return correct / n
