"""Errors that the CLI turns into a one-line message and an exit code (see DESIGN.md)."""


class ResyncError(Exception):
    """Base class: a clean, expected failure with a one-line cause."""

    exit_code = 3


class UsageError(ResyncError):
    """The user asked for something contradictory (e.g. -o equal to an input)."""

    exit_code = 2


class LoadError(ResyncError):
    """A model file is missing, corrupt, or unsafe to read."""


class ModelMismatchError(ResyncError):
    """Two models that must share an architecture (or a signature) do not."""


class UnsupportedError(ResyncError):
    """The model uses something this tool will not touch (never guessed)."""


class CheckFailed(ResyncError):
    """A safety check failed: e.g. a permuted model is not equivalent; nothing was written."""

    exit_code = 1
