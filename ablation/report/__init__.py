"""Reports from a run folder's Parquet store: the paper's figures and tables, and more.

Everything here reads only ``curves/``, ``summary.parquet`` and ``sweep.json`` of a run folder
(never Ray state), so a report works on a partial run and on a copy of the folder elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import files
from ..errors import AblateError
from ..strategies import METHODS, method_label

# The columns that tell trials apart in a report; a figure or table is made per combination of
# SETTING columns, and curves within it differ by intervention and layers.
SETTING = ["dataset", "threat", "model", "method"]
# How figures and tables write the other SETTING values (a value not listed is shown as it is).
DISPLAY_NAMES = {
    "dataset": {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN"},
    "threat": {"linf": "L∞", "l2": "L2"},
    "model": {"preact18": "PreAct ResNet-18", "preact34": "PreAct ResNet-34",
              "wrn34_10": "WRN-34-10", "vgg16": "VGG-16", "dpn26": "DPN-26", "dla": "DLA"},
    "method": {name: m.display for name, m in METHODS.items()},
}


def display_name(column: str, value: str) -> str:
    """The name a report shows for a SETTING value: CIFAR-10, L∞, PreAct ResNet-18, AT."""
    return DISPLAY_NAMES[column].get(value, value)


@dataclass(frozen=True)
class RunData:
    """A run folder's data: per-epoch curves, per-trial summaries, and which trials are done."""

    root: Path
    name: str
    description: str  # the sweep file's own words (the demo's says what it does not show)
    curves: pd.DataFrame  # one row per (key, epoch), plus `label` and `complete` columns
    summary: pd.DataFrame  # one row per finished trial (may be empty), plus `label`

    @property
    def partial(self) -> bool:
        return not self.curves.complete.all()


def label(method: str, intervention: str, layers: str) -> str:
    """The paper's name of a setting: AT, AWP, AT_fix_lr_[3, 4], TRADES_awp_[4], ..."""
    name = method_label(method)
    if intervention == "none":
        return name
    if intervention == "awp_full":
        return "AWP" if method == "at" else f"{name}-AWP"
    subset = ", ".join(layers.split(",")) if layers else ""
    return f"{name}_{intervention}_[{subset}]"


def _with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["label"] = [label(m, i, l) for m, i, l in
                      zip(frame.method, frame.intervention, frame.layers)]
    return frame


def load_run(location: str | Path) -> RunData:
    """Read a run folder (a path, or a URI whose store is pulled first); a clear one-line error
    if it is not one or holds no curves yet."""
    from ..store import RunDir

    folder = RunDir.open(location)
    root = folder.root
    if not folder.exists():
        raise AblateError(f"{location}: not an ablate run folder (no {files.SWEEP})")
    stored = folder.manifest()
    frames = [folder.curves(key) for key in stored["trials"]]  # the run's own files only
    frames = [f for f in frames if len(f)]
    if not frames:
        raise AblateError(f"{location}: no epoch has finished yet ({files.CURVES_DIR}/ is empty)")
    curves = pd.concat(frames, ignore_index=True).sort_values(["key", "epoch"])
    curves = curves.reset_index(drop=True)
    done = curves.groupby("key").epoch.transform("count") >= curves.epochs
    curves["complete"] = done
    # Derived from the trial folders, not read from summary.parquet, which a killed driver may
    # have left short (the next run or evaluate rewrites it).
    summary = folder.rebuild_summaries(write=False, fetch=False)  # open() pulled it
    if summary.empty:
        summary = pd.DataFrame(columns=["key", *SETTING, "intervention", "layers", "seed"])
    return RunData(root=root, name=stored["name"], description=stored.get("description", ""),
               curves=_with_labels(curves), summary=_with_labels(summary))
