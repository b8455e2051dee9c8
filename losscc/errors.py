"""losscc's own exceptions: every stage translates third-party errors into these."""

from __future__ import annotations


class LossccError(Exception):
    """Base class of every error losscc raises on purpose."""


class SpecError(LossccError):
    """A spec is malformed: the message starts with ``file:line:col:``."""

    def __init__(self, loc, message: str):
        self.loc = loc
        self.message = message
        super().__init__(f"{loc}: {message}" if loc is not None else message)


class BuildError(LossccError):
    """Code generation or compilation failed; the message names the spec."""


class LoadError(LossccError):
    """A built module is missing, stale or corrupt; the message says how to rebuild."""
