"""Sweep files: one YAML that describes a whole study, expanded into validated trial configs.

A sweep has a ``base`` (fields every trial shares), a ``grid`` of axes whose Cartesian product gives
the trials, optional named ``baselines`` (extra trials crossed with every grid axis except
``intervention`` and ``layers``) and optional per-dataset ``overrides``. Precedence, lowest first:
base < grid cell < baseline fields < dataset override < ``ablate run --set``. See
``sweeps/cifar10_linf.yaml``. An optional list of ``plugins`` (Python files, paths relative to
the sweep file) is loaded before the trials are built, so that their interventions and models
can be named (docs/extending.md).

Trial order is stable: first the grid cells in the product of the axes as written (first axis
slowest), then, for each combination of the axes other than ``intervention`` and ``layers`` (same
order), the baselines in file order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import layers, plugins
from .config import TrialConfig, from_dict, read_yaml
from .errors import ConfigError, quote
from .strategies import layer_wise

TOP_LEVEL = ("name", "description", "autoattack", "plugins", "base", "grid", "baselines",
             "overrides")
TRIAL_FIELDS = tuple(f.name for f in fields(TrialConfig))
# Axes a baseline does not cross: it sets its own intervention, and layers belong to that.
INTERVENTION_AXES = ("intervention", "layers")
_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Sweep:
    """A named study: its validated trials in a stable order, and where it was read from."""

    name: str
    description: str
    autoattack: int | None  # AutoAttack on this many test images after each trial (0 = all)
    trials: tuple[TrialConfig, ...]
    path: Path
    plugins: tuple[plugins.Plugin, ...] = ()  # loaded in this process; the run folder keeps them

    @property
    def total_epochs(self) -> int:
        """Training epochs over all trials (a rough size of the sweep)."""
        return sum(t.epochs for t in self.trials)

    @property
    def by_key(self) -> dict[str, TrialConfig]:
        """Each trial under its key."""
        return {t.key: t for t in self.trials}


def load_sweep(path: str | Path, sets: dict[str, Any] | None = None) -> Sweep:
    """Read a sweep YAML file (safe loader) and expand it into validated trials; ``sets``
    (``ablate run --set``) are fields given to every trial, over everything in the file."""
    return sweep_from_dict(read_yaml(path), source=str(path), sets=sets)


def sweep_from_dict(raw: Any, source: str = "sweep", sets: dict[str, Any] | None = None) -> Sweep:
    """Expand a parsed sweep mapping; ``source`` prefixes every error and becomes ``Sweep.path``.
    ``sets`` take precedence over every section of the file; a runtime field among them
    (``config.RUNTIME_FIELDS``: data_root, device, ...) leaves the keys as they are."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with name, base, grid, ..., "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown top-level key {quote(key)}; allowed: "
                              f"{', '.join(TOP_LEVEL)}")
    name = raw.get("name")
    if name is None:
        raise ConfigError(f"{source}: key 'name' is missing; it names the run folder runs/<name>")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{source}: key 'name': {quote(name)} must use only a-z, 0-9 and _")
    description = raw.get("description")
    description = "" if description is None else description
    if not isinstance(description, str):
        raise ConfigError(f"{source}: key 'description' must be text, got {quote(description)}")
    autoattack = raw.get("autoattack")
    if autoattack is not None and (isinstance(autoattack, bool) or not isinstance(autoattack, int)
                                   or autoattack < 0):
        raise ConfigError(f"{source}: key 'autoattack': {quote(autoattack)} must be an integer "
                          ">= 0 (0 = all test images) or null")
    loaded = _plugins(raw.get("plugins"), source)
    plugins.load(loaded)  # before the trials are built: they may name what a plugin registers
    base = _fields(raw.get("base"), f"{source}: base")
    axes = _axes(raw.get("grid"), source)
    baselines = _baselines(raw.get("baselines"), source)
    overrides = _overrides(raw.get("overrides"), source)
    sets = _fields(sets, "--set")
    if "dataset" in sets:  # the file's per-dataset overrides are chosen by it
        raise ConfigError("--set dataset: a sweep's datasets come from its file; edit the file "
                          "(or train one trial with `ablate train --set dataset=...`)")

    merged = _expand(base, axes, baselines, source)
    if not merged:
        raise ConfigError(f"{source}: the sweep has no trials (no grid axes and no baselines)")
    # A dataset that is not a string is left for from_dict to refuse with its usual message.
    datasets = [m.get("dataset", TrialConfig.dataset) for m in merged]
    used = {d for d in datasets if isinstance(d, str)}
    for dataset in overrides:
        if dataset not in used:
            raise ConfigError(f"{source}: overrides: key {quote(dataset)} is not the dataset of "
                              f"any trial (datasets used: {', '.join(sorted(used))})")
    where = f"{source} with --set {', '.join(sets)}" if sets else source
    trials = tuple(from_dict({**m, **(overrides.get(d, {}) if isinstance(d, str) else {}),
                              **sets}, source=where) for m, d in zip(merged, datasets))
    _check_unique(trials, where)
    return Sweep(name=name, description=description.strip(), autoattack=autoattack,
                 trials=trials, path=Path(source), plugins=tuple(loaded))


def _plugins(value: Any, source: str) -> list[plugins.Plugin]:
    """The plugin files a sweep names, read relative to the sweep file's folder."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: key 'plugins' must be a list of Python files such as "
                          f"[my_intervention.py], got {quote(value)}")
    folder = Path(source).parent
    return [plugins.read(folder / Path(name).expanduser(), name, source) for name in value]


def _mapping(value: Any, where: str) -> dict:
    """An optional mapping section: None means empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {quote(value)}")
    return value


def _fields(value: Any, where: str) -> dict[str, Any]:
    """A mapping of trial fields, with unknown names refused here so the error names the section."""
    value = _mapping(value, where)
    for key in value:
        if key not in TRIAL_FIELDS:
            raise ConfigError(f"{where}: unknown key {quote(key)}; allowed: "
                              f"{', '.join(TRIAL_FIELDS)}")
    return value


def _overrides(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """Fields per dataset name; an override cannot move trials to another dataset."""
    out = {}
    for dataset, fields_ in _mapping(value, f"{source}: overrides").items():
        out[dataset] = _fields(fields_, f"{source}: overrides: {dataset}")
        if "dataset" in out[dataset]:
            raise ConfigError(f"{source}: overrides: {dataset}: key 'dataset' cannot be overridden")
    return out


def _axes(grid: Any, source: str) -> dict[str, list[Any]]:
    """The grid's axes in file order, each a non-empty list; ``layers: all`` expanded."""
    axes = {}
    for key, values in _mapping(grid, f"{source}: grid").items():
        if key not in TRIAL_FIELDS:
            raise ConfigError(f"{source}: grid: key {quote(key)} is not a trial field; allowed: "
                              f"{', '.join(TRIAL_FIELDS)}")
        if key == "layers":
            values = _layer_axis(values, source)
        elif not isinstance(values, list):
            raise ConfigError(f"{source}: grid: key {key!r} must be a list of values, "
                              f"got {quote(values)}")
        if not values:
            raise ConfigError(f"{source}: grid: key {key!r} is an empty list")
        axes[key] = values
    has_layer_wise = any(i in layer_wise() for i in axes.get("intervention", []))
    if has_layer_wise and "layers" not in axes:
        raise ConfigError(f"{source}: grid: key 'intervention' has layer-wise interventions "
                          f"({', '.join(layer_wise())}) but the grid has no 'layers' axis")
    return axes


def _layer_axis(values: Any, source: str) -> list[layers.Subset]:
    """``all`` (the 15 subsets in the paper's order) or an explicit list of subsets. [3, 4] and
    [4, 3] are one subset: written twice, they reach the duplicate-key check."""
    if values == "all":
        return list(layers.ALL_SUBSETS)
    if not isinstance(values, list) or not all(isinstance(s, list) for s in values):
        raise ConfigError(f"{source}: grid: key 'layers' must be 'all' or a list of subsets "
                          f"such as [[3, 4], [4]], got {quote(values)}")
    return [layers.parse(subset, f"{source}: grid: key 'layers'") for subset in values]


def _baselines(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """Named baselines in file order, each a mapping of trial fields."""
    out = {}
    for name, fields_ in _mapping(value, f"{source}: baselines").items():
        if not isinstance(fields_, dict):
            raise ConfigError(f"{source}: baselines: key {quote(name)} must be a mapping of "
                              f"trial fields such as {{intervention: none}}, got {quote(fields_)}")
        out[name] = _fields(fields_, f"{source}: baselines: {name}")
    return out


def _expand(base: dict[str, Any], axes: dict[str, list[Any]],
            baselines: dict[str, dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The merged raw fields of every trial, in the documented order (before overrides)."""
    names = list(axes)
    trials: list[dict[str, Any]] = []
    seen_collapsed: set[tuple[int, ...]] = set()
    layers_used = False
    if axes:
        for picks in itertools.product(*(range(len(axes[n])) for n in names)):
            cell = {n: axes[n][i] for n, i in zip(names, picks)}
            merged = {**base, **cell}
            if "layers" in cell and merged.get("intervention", TrialConfig.intervention) \
                    not in layer_wise():
                # none / awp_full take no subset: one trial per other-axes cell, not one per subset.
                signature = tuple(i for n, i in zip(names, picks) if n != "layers")
                if signature in seen_collapsed:
                    continue
                seen_collapsed.add(signature)
                merged = {**base, **{n: v for n, v in cell.items() if n != "layers"}}
            elif "layers" in cell:
                layers_used = True
            trials.append(merged)
    if "layers" in axes and not layers_used:
        raise ConfigError(f"{source}: grid: key 'layers' is given but no trial's intervention "
                          f"takes layers ({', '.join(layer_wise())})")
    others = [n for n in names if n not in INTERVENTION_AXES]
    for values in itertools.product(*(axes[n] for n in others)):
        for fields_ in baselines.values():
            trials.append({**base, **dict(zip(others, values)), **fields_})
    return trials


def _check_unique(trials: tuple[TrialConfig, ...], source: str) -> None:
    """Refuse two trials with one key: they would share a run folder and curve rows."""
    first: dict[str, int] = {}
    for number, trial in enumerate(trials, start=1):
        if trial.key in first:
            raise ConfigError(f"{source}: trials {first[trial.key]} and {number} have the same key "
                              f"{trial.key}; every trial must differ")
        first[trial.key] = number
