"""ablation: layer-wise interventions in adversarial training, one shared trainer.

Comments cite the method document, ``docs/method.md``, by section: ``A.8`` (a decision),
``B §3.1`` (evidence and constants from the authors' code), ``C.2`` (a departure from it).
"""

from importlib.metadata import PackageNotFoundError, version
from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .analysis import Run

try:
    __version__ = version("ablation")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def open_run(location: str | PathLike[str]) -> "Run":
    """A run folder opened for analysis: an :class:`ablation.analysis.Run` with its curves,
    summary, configs and status as DataFrames and ``ablate report``'s figures and tables;
    ``refresh()`` reads a running sweep's new epochs.

    Args:
        location: the run folder's path, or its URI (``s3://bucket/runs/x``), as ``ablate report``
            takes it.

    Raises AblateError (one line) for a folder that is not a run or has no finished epoch yet.
    """
    # pandas and matplotlib load here, not on `import ablation` (every `ablate` command imports it)
    from .analysis import Run

    return Run(location)
