"""Model registry, layer groups (docs/method.md B §8 shares), forward shapes, normalization."""

from __future__ import annotations

import pytest
import torch

from ablation.config import from_dict
from ablation.errors import ConfigError
from ablation.models import MODELS, Normalize, build_model, group_names, ungrouped_names

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

# % of all parameters per group (CIFAR-10 heads), rounded to 0.1 in docs/method.md B §8.
SHARES = {
    "preact18": (1.3, 4.7, 18.8, 75.1),
    "preact34": (1.0, 5.2, 32.1, 61.6),
    "dpn26": (1.0, 4.9, 18.8, 75.1),
    "dla": (0.9, 8.9, 35.4, 54.7),
    "vgg16": (0.8, 7.0, 44.1, 48.1),
    "wrn34_10": (3.1, 10.6, 22.4, 63.9),
}
# Top-level modules whose parameters belong to no group.
UNGROUPED = {
    "preact18": {"conv1", "bn", "linear"},
    "preact34": {"conv1", "bn", "linear"},
    "preact_small": {"conv1", "bn", "linear"},
    "dpn26": {"conv1", "bn1", "linear"},
    "dla": {"base", "layer1", "layer2", "linear"},
    "vgg16": {"linear"},
    "wrn34_10": set(),
}
ALL = sorted(MODELS)


class Zoo:
    """Builds each (name, num_classes, normalized) model once per test module."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, bool], torch.nn.Module] = {}

    def get(self, name: str, num_classes: int = 10, normalized: bool = False) -> torch.nn.Module:
        key = (name, num_classes, normalized)
        if key not in self._cache:
            torch.manual_seed(0)
            stats = dict(mean=CIFAR_MEAN, std=CIFAR_STD) if normalized else {}
            self._cache[key] = build_model(name, num_classes=num_classes, **stats).eval()
        return self._cache[key]


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def test_registry_names() -> None:
    assert set(MODELS) == {"preact18", "preact34", "wrn34_10", "vgg16", "dpn26", "dla", "preact_small"}


@pytest.mark.parametrize("name", sorted(SHARES))
def test_group_shares_match_method(zoo: Zoo, name: str) -> None:
    model = zoo.get(name)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    groups = model.layer_groups()
    for k, expected in zip((1, 2, 3, 4), SHARES[name]):
        share = 100 * sum(sizes[n] for n in groups[k]) / total
        assert abs(share - expected) <= 0.06, f"{name} group {k}: {share:.3f}% vs {expected}%"


@pytest.mark.parametrize("name", ALL)
def test_groups_partition_parameters(zoo: Zoo, name: str) -> None:
    model = zoo.get(name)
    names = [n for n, _ in model.named_parameters()]
    groups = model.layer_groups()
    assert sorted(groups) == [1, 2, 3, 4]
    seen: set[str] = set()
    for k, members in groups.items():
        assert members, f"group {k} is empty"
        assert set(members) <= set(names)
        assert not seen & set(members), f"group {k} overlaps an earlier group"
        seen |= set(members)
    ungrouped = ungrouped_names(model)
    assert ungrouped == [n for n in names if n.split(".")[0] in UNGROUPED[name]]
    assert len(seen) + len(ungrouped) == len(names)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if n in seen or n in ungrouped
    )


def test_wrn_cuts_inside_blocks(zoo: Zoo) -> None:
    groups = zoo.get("wrn34_10").layer_groups()
    where = {n: k for k, members in groups.items() for n in members}
    assert where["conv1.weight"] == 1
    assert where["block1.layer.3.bn2.weight"] == 1
    assert where["block1.layer.3.conv2.weight"] == 2
    assert where["block2.layer.0.convShortcut.weight"] == 2
    assert where["block2.layer.2.bn2.bias"] == 2
    assert where["block2.layer.2.conv2.weight"] == 3
    assert where["block3.layer.0.convShortcut.weight"] == 3
    assert where["block3.layer.1.bn1.weight"] == 3
    assert where["block3.layer.1.conv1.weight"] == 4
    assert where["bn1.weight"] == 4
    assert where["fc.bias"] == 4


def test_vgg_split_crosses_conv_bn(zoo: Zoo) -> None:
    groups = zoo.get("vgg16").layer_groups()
    where = {n: k for k, members in groups.items() for n in members}
    assert where["features.30.weight"] == 3 and where["features.30.bias"] == 3
    assert where["features.31.weight"] == 4
    assert where["features.10.weight"] == 2 and where["features.8.bias"] == 1
    model = zoo.get("vgg16")
    assert model.features[0].bias is not None
    assert isinstance(model.features[44], torch.nn.AvgPool2d)


@pytest.mark.parametrize("name", ALL)
def test_group_names_is_union_in_model_order(zoo: Zoo, name: str) -> None:
    model = zoo.get(name)
    groups = model.layer_groups()
    order = [n for n, _ in model.named_parameters()]
    for subset in ([2], [1, 3], [4, 2], [1, 2, 3, 4]):
        union = {n for k in subset for n in groups[k]}
        assert group_names(model, subset) == [n for n in order if n in union]
    assert group_names(model, []) == []


def test_group_names_rejects_bad_group(zoo: Zoo) -> None:
    with pytest.raises(ValueError, match="5"):  # a caller's bug: the config has checked layers
        group_names(zoo.get("preact_small"), [1, 5])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_shape(zoo: Zoo, name: str, num_classes: int) -> None:
    model = zoo.get(name, num_classes=num_classes)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_preact_small_on_8x8(in_channels: int) -> None:
    mean = (0.5,) * in_channels
    std = (0.25,) * in_channels
    model = build_model("preact_small", num_classes=10, in_channels=in_channels, mean=mean, std=std)
    out = model(torch.rand(2, in_channels, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_preact_small_width_and_blocks() -> None:
    model = build_model("preact_small", num_classes=10, width=8, blocks=2)
    assert len(model.layer1) == 2 and len(model.layer4) == 2
    assert model.conv1.out_channels == 8 and model.linear.in_features == 64


@pytest.mark.parametrize("name", ALL)
def test_normalization_is_first_and_not_saved(zoo: Zoo, name: str) -> None:
    normalized = zoo.get(name, normalized=True)
    state = normalized.state_dict()
    assert not any(k.startswith("normalize.") for k in state)
    plain = build_model(name, num_classes=10).eval()
    plain.load_state_dict(state)  # strict: same keys with and without mean/std
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), plain((x - mean) / std), rtol=1e-4, atol=1e-5)


def test_normalize_module() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize(None)(x), x)
    norm = Normalize((0.1, 0.2, 0.3), (0.5, 0.5, 2.0))
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    assert dict(norm.state_dict()) == {}
    torch.testing.assert_close(norm(x)[:, 2], (x[:, 2] - 0.3) / 2.0)


def test_unknown_model_is_a_programming_error_the_config_catches_first() -> None:
    with pytest.raises(ConfigError, match="'resnet' is not one of"):
        from_dict({"model": "resnet"})
    with pytest.raises(ValueError) as info:
        build_model("resnet", num_classes=10)
    message = str(info.value)
    assert "'resnet'" in message and "preact18" in message and "wrn34_10" in message
    assert "\n" not in message


def test_stats_must_match_channels() -> None:
    with pytest.raises(ValueError, match="mean"):
        build_model("preact_small", num_classes=10, in_channels=1, mean=CIFAR_MEAN, std=CIFAR_STD)


def test_config_names_every_registered_model_method_and_intervention():
    # config keeps torch-free name lists (a fast CLI); the registries hold the builders. Every
    # described method and intervention has a class that carries it out.
    from ablation import config, strategies
    from ablation.interventions import build_intervention
    from ablation.methods import METHODS

    assert set(config.MODELS) == set(MODELS)
    assert set(config.METHODS) == set(METHODS) == set(strategies.METHODS)
    assert config.INTERVENTIONS == tuple(strategies.INTERVENTIONS)
    model = build_model("preact_small", num_classes=10)
    for name, d in strategies.INTERVENTIONS.items():
        trial = config.from_dict({"intervention": name, "layers": [4] if d.layer_wise else []})
        build_intervention(model, trial)
