"""Plugins: a user's own interventions and models, each kept in one Python file outside the
package (docs/extending.md). Running the file registers what it defines: an intervention with
:func:`ablation.interventions.register`, a model with :func:`ablation.models.register`.

A plugin travels as its text (:class:`Plugin`), never as a path another machine may not see: a
sweep file names its plugins (``plugins:``, :mod:`ablation.grid`) and ``ablate train`` takes
``--plugin``; the run folder's ``sweep.json`` records their text, which each dispatched trial
carries to its worker. Every process that trains loads its plugins before it builds a trial
config: until then a name they register is unknown. Loading the same text again in one process
does nothing.

Code is run only from files the user names (a sweep's ``plugins:``, ``--plugin``) and in the
workers of the driver that read them. What merely reads a run folder (``ablate status``,
``report``, ``evaluate``, :func:`ablation.open_run`) never runs the text a folder holds: a
folder may come from anyone. ``sweep.json`` also records, as data, the description of each
plugin intervention and the name of each plugin model its trials use (:func:`record`); readers
register those as stand-ins (:func:`stand_ins`), which describe but cannot train.
"""

from __future__ import annotations

import hashlib
import re
import sys
import traceback
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import strategies
from .errors import AblateError, ConfigError, quote


@dataclass(frozen=True)
class Plugin:
    """A plugin file: its name as the user wrote it (how messages name it) and its text."""

    name: str
    source: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "source": self.source}


_loaded: set[str] = set()  # the digests of the plugins run in this process


def read(path: Path, name: str, where: str) -> Plugin:
    """The plugin file at ``path``, called ``name``; ConfigError naming ``where`` (the sweep
    file or option that names it) when it cannot be read."""
    try:
        return Plugin(name, path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{where}: plugin {quote(name)}: cannot read {path} "
                          f"({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: plugin {quote(name)}: not UTF-8 text; a plugin is a "
                          "Python file") from None


def from_dicts(raw: Any, where: str) -> list[Plugin]:
    """Plugins as ``sweep.json`` and a trial's params hold them (:meth:`Plugin.to_dict`)."""
    if not isinstance(raw, list) or not all(
            isinstance(p, dict) and set(p) == {"name", "source"}
            and all(isinstance(v, str) for v in p.values()) for p in raw):
        raise ConfigError(f"{where}: 'plugins' is not the list of plugin files ablate writes")
    return [Plugin(p["name"], p["source"]) for p in raw]


def load(plugins: Iterable[Plugin]) -> None:
    """Run each plugin in this process, once. Whatever goes wrong in one (an import that fails,
    a name registered already) is one ConfigError line naming its file and line."""
    for plugin in plugins:
        if plugin.digest in _loaded:
            continue
        stem = re.sub(r"\W", "_", Path(plugin.name).stem)
        module = types.ModuleType(f"ablate_plugin_{stem}_{plugin.digest[:8]}")
        module.__file__ = plugin.name
        sys.modules[module.__name__] = module  # dataclasses and pickle look classes up there
        try:
            exec(compile(plugin.source, plugin.name, "exec"), module.__dict__)
        except Exception as err:  # the boundary: whatever a user's file raises is one line
            del sys.modules[module.__name__]
            raise ConfigError(f"plugin {plugin.name}: {_line(err, plugin.name)}") from None
        _loaded.add(plugin.digest)


def _line(err: Exception, name: str) -> str:
    """An exception raised while running plugin ``name``, as one line with the plugin's line."""
    if isinstance(err, SyntaxError) and err.filename == name:
        lineno, text = err.lineno, err.msg
    else:
        lineno = next((frame.lineno for frame in reversed(traceback.extract_tb(err.__traceback__))
                       if frame.filename == name), None)
        text = str(err)
    text = " ".join(f"{type(err).__name__}: {text}".split())
    return f"line {lineno}: {text}" if lineno else text


# The fields of an intervention's description that are data (acts_from is code, and only the
# planner of a driver that loaded the plugin reads it).
_RECORDED = ("layer_wise", "keeps_lr_max", "frozen", "perturbs", "grid_baseline", "extra_passes")


def record(trials: Iterable[Any]) -> dict[str, Any]:
    """What ``sweep.json`` keeps of the plugins its ``trials`` (TrialConfigs) use, as data: each
    plugin intervention's description and each plugin model's name."""
    from .config import BUILT_IN_MODELS

    trials = list(trials)
    used = dict.fromkeys(c.intervention for c in trials if c.intervention not in strategies.BUILT_IN)
    models = dict.fromkeys(c.model for c in trials if c.model not in BUILT_IN_MODELS)
    return {"interventions": {name: {f: getattr(strategies.intervention(name), f)
                                     for f in _RECORDED} for name in used},
            "models": list(models)}


STAND_INS: set[str] = set()  # interventions this process knows from a record only


def stand_ins(recorded: Any, where: str) -> None:
    """Register what :func:`record` kept for the names this process does not know (a reader of
    a run folder that never loaded its plugins): descriptions that reports and the status can
    read, and model names a config may hold. None of them can train (:func:`missing`)."""
    from .config import MODELS

    if recorded is None:
        return
    kinds = {"layer_wise": bool, "keeps_lr_max": bool, "frozen": bool, "perturbs": str,
             "grid_baseline": str, "extra_passes": (int, float)}
    try:
        for name, fields in recorded["interventions"].items():
            if not all(isinstance(fields[f], kinds[f]) for f in _RECORDED):
                raise TypeError(name)
            if name not in strategies.INTERVENTIONS:
                strategies.register(strategies.Intervention(
                    name, packed=False, **{f: fields[f] for f in _RECORDED}))
                STAND_INS.add(name)
        for name in recorded["models"]:
            if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(name)
            if name not in MODELS:
                MODELS.append(name)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AblateError(f"{where}: 'plugin_names' is not the record ablate writes") from None


def missing(config: Any) -> str | None:
    """What of ``config`` this process knows from a run folder's record only (it must load the
    plugin file to train or attack the trial), as words for a message; None if nothing."""
    from .models import MODELS as BUILDERS

    if config.model not in BUILDERS:
        return f"model {quote(config.model)}"
    if config.intervention in STAND_INS:
        return f"intervention {quote(config.intervention)}"
    return None
