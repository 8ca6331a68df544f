"""Errors caused by what the user gave us: the CLI prints the one-line message and exits 2."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3  # deep enough for a list of layer subsets


def quote(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters: reprlib stops at a few items
    per level and a few levels, so a value of any size (a YAML alias bomb's 9^9 strings) costs
    microseconds and stays on one short line. A value of a few items reads exactly as ``repr``."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(err: BaseException) -> str:
    """A foreign library's exception as ``Type: message`` on one line of at most ~200 chars."""
    text = " ".join(str(err).split())[:200] or type(err).__name__
    return f"{type(err).__name__}: {text}"


class AblateError(Exception):
    """Bad input (config, data, run folder). The message is one line naming the thing at fault."""


class ConfigError(AblateError):
    """A trial or sweep config that cannot be used as written."""


class DataError(AblateError):
    """A dataset that is missing, unreadable, or not in the expected format."""


class RunFailed(Exception):
    """Work that did not complete (a diverged trial, errored sweep trials): one line, exit 1."""


class TrainingDiverged(RunFailed):
    """The training loss became NaN or infinite; the trial stops with a one-line message."""


class OutOfMemory(RunFailed):
    """A training step that does not fit in the GPU's memory: one line naming the trial, the
    model and the memory asked for (retrying cannot help)."""
