"""The paper's four layer groups and their 15 subsets: the one place that names, orders, validates
and spells them. Torch-free, so the CLI and the reports use it without loading a model.

A subset is a sorted tuple of distinct ints in 1..4 everywhere in the code. It is written
``"3,4"`` in a Parquet column (:func:`to_column`) and ``[3, 4]`` on a figure or in a table
(:func:`display`); :func:`from_column` reads the column form back.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import ConfigError, quote

GROUPS = (1, 2, 3, 4)  # each architecture maps these to its parameters (models/, method B §8)

Subset = tuple[int, ...]

# All non-empty subsets in the paper's order: by size, then lexicographically. It is the row
# order of Table 5, the order of a sweep's `layers: all`, and, cut into PANELS, the order of
# the four panels of Figures 2(a), 3(a) and 4(a).
ALL_SUBSETS: tuple[Subset, ...] = tuple(
    s for size in range(1, len(GROUPS) + 1) for s in itertools.combinations(GROUPS, size))

# The figure grids' panels: single layers; pairs with layer 1; the other pairs; triples and all
# four. The paper's panels have no [1, 2, 3, 4]; it joins the triples (Figure 3 draws it).
PANELS: tuple[tuple[Subset, ...], ...] = (ALL_SUBSETS[0:4], ALL_SUBSETS[4:7],
                                          ALL_SUBSETS[7:10], ALL_SUBSETS[10:15])
# Their titles, in that order (each figure grid names its panels with them).
RAT = (3, 4)  # the groups RAT_LR and RAT_WP act on (method A.4, A.5): the tables' rows
PANEL_TITLES = ("Single layers", "Pairs with layer 1", "Other pairs", "Triples and all four")


def parse(value: Any, where: str) -> Subset:
    """A user's subset (a list or tuple of ints) as a sorted tuple; ConfigError naming ``where``
    for anything that is not a non-empty subset of 1..4 without repeats."""
    if (not isinstance(value, (list, tuple)) or not value
            or any(type(g) is not int or g not in GROUPS for g in value)
            or len(set(value)) != len(value)):
        given = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{where}: {quote(given)} is not a non-empty subset of {list(GROUPS)} "
                          "without repeats")
    return tuple(sorted(value))


def to_column(subset: Subset) -> str:
    """The Parquet column form: ``"3,4"`` ("" for no subset)."""
    return ",".join(map(str, subset))


def from_column(text: str) -> Subset:
    """Back from the column form (``"3,4"`` -> (3, 4); ``""`` -> ())."""
    return tuple(int(g) for g in text.split(",")) if text else ()


def display(subset: Subset) -> str:
    """How figures and tables write a subset: ``[3, 4]``."""
    return "[" + ", ".join(map(str, subset)) + "]"
