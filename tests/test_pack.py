"""ablation/pack.py: K networks as one batched computation compute what each computes alone."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ablation.attacks import mean_ce
from ablation.models import MODELS, build_model
from ablation.pack import PackedNet


def copies(name, k, **kwargs):
    torch.manual_seed(0)
    return [build_model(name, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, **kwargs)
            .double() for _ in range(k)]


def check_pack(models, x, y, train: bool):
    """Logits, weight and input gradients of a mean loss, and BN statistics: pack vs alone."""
    k = len(models)
    alone = [copy.deepcopy(m).train(train) for m in models]
    pack = PackedNet.stack(models).train(train)
    xs = [x[i].clone().requires_grad_(True) for i in range(k)]
    packed_x = torch.cat(xs).detach().requires_grad_(True)
    logits = pack(packed_x)
    loss = mean_ce(logits, y.repeat(k), pack)  # per network, as the attacks and methods take it
    grads = torch.autograd.grad(loss, [*pack.params.values(), packed_x])
    worst = 0.0
    for i, m in enumerate(alone):
        out = m(xs[i])
        own = torch.autograd.grad(F.cross_entropy(out, y), [*m.parameters(), xs[i]])
        worst = max(worst, (out - logits.unflatten(0, (k, -1))[i]).abs().max().item())
        for (name, _), g, packed in zip([*m.named_parameters(), ("x", None)], own, grads):
            got = packed[i] if name != "x" else packed.unflatten(0, (k, -1))[i]
            worst = max(worst, (g - got).abs().max().item())
        for name, b in m.named_buffers():
            worst = max(worst, (b.double() - pack.buffers[name][i].double()).abs().max().item())
    return worst


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_a_pack_of_three_computes_what_each_network_computes_alone(train):
    models = copies("preact_small", 3, width=4)
    for i, m in enumerate(models):  # three different networks
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * i * torch.randn_like(p))
    x = torch.rand(3, 8, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    assert check_pack(models, x, y, train) < 1e-12


def test_a_copys_state_dict_goes_in_and_out_of_the_pack():
    models = copies("preact_small", 2, width=4)
    pack = PackedNet.stack(models)
    state = models[1].state_dict()
    assert list(pack.state_dict(1)) == list(state)
    assert all(torch.equal(pack.state_dict(1)[n], v) for n, v in state.items())
    other = copies("preact_small", 1, width=4)[0]
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    pack.load_state_dict(0, other.state_dict())
    assert all(torch.equal(pack.state_dict(0)[n], v) for n, v in other.state_dict().items())
    assert all(torch.equal(pack.state_dict(1)[n], v) for n, v in state.items())


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MODELS if m != "preact_small"])
def test_every_model_is_packable(name):
    # Concatenations (DPN, DLA), max pooling (VGG), wide blocks (WRN): vmap carries each.
    models = copies(name, 2)
    x = torch.rand(2, 2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    assert check_pack(models, x, y, train=True) < 1e-12
