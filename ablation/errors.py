"""Errors caused by what the user gave us: the CLI prints the one-line message and exits 2."""


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
