"""ablation: layer-wise interventions in adversarial training, one shared trainer.

Comments cite the method document, ``docs/method.md``, by section: ``A.8`` (a decision),
``B §3.1`` (evidence and constants from the authors' code), ``C.2`` (a departure from it).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ablation")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
