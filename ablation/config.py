"""The trial config: one frozen dataclass per training run, validated once when it is built.

Fields left as ``None`` are filled with the paper's defaults for the chosen dataset, method and
model (docs/method.md part A), so a built config always holds concrete values and its key names
exactly what was trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from . import layers as layer_groups
from . import strategies
from .datasets import DATASETS as dataset_table
from .errors import ConfigError, quote

DATASETS = tuple(dataset_table)
# Torch-free for a fast CLI; ablation.models holds the builders (a test checks the two agree) and
# its register() adds a plugin's model to both.
MODELS = ["preact18", "preact34", "wrn34_10", "vgg16", "dpn26", "dla", "preact_small"]
BUILT_IN_MODELS = frozenset(MODELS)  # the rest come from plugins (ablation.plugins)
METHODS = tuple(strategies.METHODS)
THREATS = ("linf", "l2")
INTERVENTIONS = tuple(strategies.INTERVENTIONS)
# fp32: IEEE float32 throughout (no TF32 tensor-core math); tf32: float32 tensors, convolutions
# and matmuls in TF32 on GPUs that have it (Ampere and newer; elsewhere the same as fp32); bf16:
# autocast to bfloat16 (GPUs of compute capability 8.0 and newer); fp64: float64 throughout, for
# checks (reference numbers that hold across CPUs, docs/method.md C.8).
PRECISIONS = ("fp32", "tf32", "bf16", "fp64")
LR_UPDATES = ("iteration", "epoch")
MODEL_MODES = ("train", "eval")

# Fields that say where, on what or how fast a trial runs, not what it computes: they stay out of
# the key, so a sweep moved to a cluster with another data path or device resumes instead of
# restarting. The evaluation batch size only groups eval-mode attacks, which are independent per
# image; channels_last only changes the memory layout and compile only how the forward is run
# (all three: equal up to float rounding; the random draws are the same, docs/method.md C.1).
RUNTIME_FIELDS = ("data_root", "download", "device", "test_batch_size", "channels_last", "compile")


@dataclass(frozen=True)
class ThreatModel:
    """A norm ball of radius ``eps`` around each input, attacked with step size ``step``."""

    norm: str  # "linf" or "l2"
    eps: float
    step: float


@dataclass(frozen=True)
class TrialConfig:
    """Everything that defines one adversarial-training run; see docs/method.md for each default."""

    dataset: str = "cifar10"
    data_root: str = "data"
    download: bool = False
    model: str = "preact18"
    width: int = 16  # preact_small only: width of the first stage (then 2x, 4x, 8x)
    blocks: int = 1  # preact_small only: blocks per stage
    method: str = "at"
    threat: str = "linf"
    eps: float | None = None  # linf 8/255, l2 128/255 (A.1)
    step: float | None = None  # linf 2/255 (SVHN AT 1/255), l2 15/255 (A.1)
    train_steps: int = 10
    test_steps: int = 20
    train_attack_mode: str | None = None  # AT attacks in train mode (Rice), TRADES in eval (A.1, A.6)
    log_pass_mode: str | None = None  # clean logging pass after a step: AT train, TRADES eval (C.2)
    trades_beta: float = 6.0
    normalize: bool | None = None  # per-channel mean/std inside the model; TRADES code uses none (B §1.2)
    intervention: str = "none"
    layers: tuple[int, ...] = ()
    awp_gamma: float | None = None  # 0.01; TRADES and VGG-16: 0.005 (A.5)
    awp_warmup: int | None = None  # 0; SVHN Linf AT: 5; TRADES and VGG-16: 10 (A.5)
    epochs: int = 200
    batch_size: int = 128
    test_batch_size: int | None = None  # eval batches; None: 128 on a CPU, from a GPU's free memory
    lr_max: float | None = None  # 0.1; SVHN 0.01 (A.2)
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the run where the LR drops x0.1
    lr_update: str | None = None  # AT: every iteration (A.2); TRADES: per epoch, as its code does
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    train_eval_size: int = 10_000  # fixed train subset attacked in eval mode each epoch (A.8)
    device: str = "auto"
    precision: str = "fp32"  # fp32, tf32, bf16 or fp64 (PRECISIONS above)
    channels_last: bool = False  # NHWC memory layout on CUDA (faster convolutions; runtime field)
    compile: bool = False  # torch.compile the model's forward (faster once compiled; runtime field)

    def __post_init__(self) -> None:
        for name, value in _paper_defaults(self).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _validate(self)

    @property
    def key(self) -> str:
        """Readable slug plus a short hash of every identifying field, e.g.
        ``cifar10-linf-preact18-at-fix_lr-34-s0-1a2b3c4d``."""
        parts = [self.dataset, self.threat, self.model, self.method, self.intervention]
        if self.layers:
            parts.append("".join(map(str, self.layers)))  # "34": a key has no commas
        digest = hashlib.sha256(
            json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return "-".join([*parts, f"s{self.seed}", digest])

    @property
    def threat_model(self) -> ThreatModel:
        """The trial's threat model: its training attack's, and the per-epoch evaluation's."""
        return ThreatModel(self.threat, self.eps, self.step)

    def identity(self) -> dict[str, Any]:
        """The fields that determine what is computed (all but where and on what it runs)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def columns(self) -> dict[str, Any]:
        """The key and every identifying field as flat table values (lists joined by commas)."""
        flat = {k: layer_groups.to_column(v) if k == "layers"
                else ",".join(map(str, v)) if isinstance(v, list) else v
                for k, v in self.identity().items()}
        return {"key": self.key, **flat}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "TrialConfig":
        """A copy with some fields changed, validated like any other config."""
        return from_dict({**self.to_dict(), **changes})


def from_dict(raw: dict[str, Any], source: str = "config") -> TrialConfig:
    """Build a config from plain values, refusing unknown keys and wrong types in one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of trial fields, got {type(raw).__name__}")
    known = {f.name: f for f in fields(TrialConfig)}
    hints = typing.get_type_hints(TrialConfig)
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {quote(key)}; allowed: {', '.join(known)}")
        values[key] = _coerce(key, value, hints[key], source)
    try:
        return TrialConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


# A trial or sweep file is a few KB (the largest in sweeps/ is 2 KB); PyYAML's pure-Python parser
# takes about a second per 100 KB of nested lists, so this bounds a file's parse to a few seconds.
_MAX_YAML_BYTES = 256 * 1024
# Values a document may stand for once its aliases are expanded: a shipped sweep is at most 60,
# while a 500-byte "billion laughs" file stands for 9^9 strings, which any later pass would walk.
_MAX_YAML_VALUES = 100_000


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a document whose aliases expand past ``_MAX_YAML_VALUES`` values
    or refer to a value that contains them, and reading ``1e-3`` as a number (YAML 1.2 does;
    PyYAML's YAML 1.1 wants ``1.0e-3`` and would give the string "1e-3")."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, {}, set()) > _MAX_YAML_VALUES:
            raise ConfigError(f"its aliases (*name) expand to more than {_MAX_YAML_VALUES:,} "
                              "values; write the values out")
        return super().construct_document(node)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` stands for with every alias expanded (memoised per node, so a
    shared node costs one visit however often it is referred to)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConfigError("an alias (*name) refers to a value that contains it")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(id(node))
    return sizes[id(node)]


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the safe loader (no tags run code, no alias bombs); whatever is wrong
    with it is one ConfigError line naming ``source``."""
    try:
        loader = _Loader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    except ValueError as err:  # a date such as 2024-13-01, an integer of over 4,300 digits
        raise ConfigError(f"{source}: not valid YAML ({str(err).split(':')[0][:80]})") from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with ``parse_yaml``; unreadable, oversized or non-UTF-8 files are a
    ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    if len(raw) > _MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {_MAX_YAML_BYTES // 1024} KB; a trial or sweep "
                          "file is a few KB (is it the right file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); is it a YAML "
                          "file?") from None
    return parse_yaml(text, str(path))


def load_trial(path: str | Path) -> TrialConfig:
    """Read a trial YAML file into a validated config."""
    raw = read_yaml(path)
    return from_dict(raw if raw is not None else {}, source=str(path))


_FRACTION = re.compile(r"^\s*([0-9.]+(?:e-?[0-9]+)?)\s*/\s*([0-9.]+)\s*$")


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check one raw value against its field type; accept lists for tuples and 'a/b' for floats."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key {key!r} must be a list, got {quote(value)}")
        item = typing.get_args(base)[0]
        return tuple(_coerce(key, v, item, source) for v in value)
    if base is float:
        if isinstance(value, str) and (m := _FRACTION.match(value)):  # "8/255", as papers write it
            try:
                value = float(m.group(1)) / float(m.group(2))
            except (ValueError, ZeroDivisionError):  # "./255", "1/0"
                raise ConfigError(f"{source}: key {key!r}: {quote(value)} is not a number or a "
                                  "fraction such as 8/255") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key {key!r} must be a number, got {quote(value)}")
        return float(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key {key!r} must be an integer, got {quote(value)}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key {key!r} must be true or false, got {quote(value)}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key {key!r} must be a string, got {quote(value)}")
        return value
    raise TypeError(f"no coercion for field type {hint}")  # a bug in this module, not user input


def _paper_defaults(c: TrialConfig) -> dict[str, Any]:
    """docs/method.md part A defaults that depend on the dataset, method, threat model or model."""
    svhn = c.dataset == "svhn"
    trades = c.method == "trades"
    vgg = c.model == "vgg16"
    eps = c.eps if c.eps is not None else (8 / 255 if c.threat == "linf" else 128 / 255)
    if c.threat == "linf":
        step = 1 / 255 if svhn and not trades else 2 / 255
    else:  # TRADES' L2 inner maximisation steps 2*eps/K (B §6); PGD uses 15/255 (A.1)
        step = 2 * eps / c.train_steps if trades else 15 / 255
    if trades or vgg:
        gamma, warmup = 0.005, 10
    else:
        gamma, warmup = 0.01, (5 if svhn and c.threat == "linf" else 0)
    return {
        "eps": eps,
        "step": step,
        "train_attack_mode": "eval" if trades else "train",
        "log_pass_mode": "eval" if trades else "train",
        "normalize": not trades,
        "awp_gamma": gamma,
        "awp_warmup": warmup,
        "lr_max": 0.01 if svhn else 0.1,
        "lr_update": "epoch" if trades else "iteration",
    }


# Every float of a trial reaches a float32 tensor or optimizer scalar (bf16 shares the range);
# torch refuses a larger one mid-run ("value cannot be converted to type float without overflow").
_FLOAT32_MAX = 3.4028234663852886e38


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"key {name!r}: {quote(value)} is not one of {', '.join(allowed)}")


def _validate(c: TrialConfig) -> None:
    _choice("dataset", c.dataset, DATASETS)
    _choice("model", c.model, tuple(MODELS))  # live: extensible
    _choice("method", c.method, tuple(strategies.METHODS))
    _choice("threat", c.threat, THREATS)
    _choice("intervention", c.intervention, tuple(strategies.INTERVENTIONS))  # live: extensible
    _choice("precision", c.precision, PRECISIONS)
    _choice("lr_update", c.lr_update, LR_UPDATES)
    _choice("train_attack_mode", c.train_attack_mode, MODEL_MODES)
    _choice("log_pass_mode", c.log_pass_mode, MODEL_MODES)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device):
        raise ConfigError(f"key 'device': {quote(c.device)} is not one of auto, cpu, cuda, cuda:N, "
                          "mps")
    if strategies.intervention(c.intervention).layer_wise:
        if not c.layers:
            raise ConfigError(f"key 'layers': intervention {c.intervention!r} needs a non-empty "
                              f"subset of {list(layer_groups.GROUPS)}")
        # one spelling, one key: a sorted tuple
        object.__setattr__(c, "layers", layer_groups.parse(c.layers, "key 'layers'"))
    elif c.layers:
        raise ConfigError(f"key 'layers': intervention {c.intervention!r} takes no layer subset "
                          f"(got {quote(list(c.layers))}); use [] or leave it out")
    for f in fields(c):
        value = getattr(c, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"key {f.name!r}: must be a finite number, got {v!r}")
            if isinstance(v, float) and abs(v) > _FLOAT32_MAX:
                raise ConfigError(f"key {f.name!r}: {v!r} is beyond float32's range (3.4e38), "
                                  "in which training computes")
    positive = {"eps": c.eps, "step": c.step, "lr_max": c.lr_max, "epochs": c.epochs,
                "batch_size": c.batch_size,
                "train_steps": c.train_steps, "test_steps": c.test_steps,
                "width": c.width, "blocks": c.blocks}
    if c.test_batch_size is not None:
        positive["test_batch_size"] = c.test_batch_size
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"key {name!r}: must be > 0, got {quote(value)}")
    nonneg = {"awp_gamma": c.awp_gamma, "awp_warmup": c.awp_warmup, "trades_beta": c.trades_beta,
              "weight_decay": c.weight_decay, "train_eval_size": c.train_eval_size,
              "seed": c.seed}
    for name, value in nonneg.items():
        if not value >= 0:
            raise ConfigError(f"key {name!r}: must be >= 0, got {quote(value)}")
    if c.seed >= 2**32:
        raise ConfigError(f"key 'seed': must be below 2**32 (NumPy's seed range), got "
                          f"{quote(c.seed)}")
    if not 0 <= c.momentum < 1:
        raise ConfigError(f"key 'momentum': must be in [0, 1), got {c.momentum!r}")
    if c.threat == "linf" and c.eps >= 1:
        raise ConfigError(f"key 'eps': {c.eps!r} is not below 1; Linf eps is in [0,1] pixel units "
                          "(write 8/255, not 8)")
    if any(not 0 < m < 1 for m in c.milestones) or list(c.milestones) != sorted(c.milestones):
        raise ConfigError(f"key 'milestones': {quote(list(c.milestones))} must be increasing "
                          "fractions of the run in (0, 1)")
