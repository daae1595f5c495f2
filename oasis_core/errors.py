"""Exceptions raised by OASIS.

Every message is one line: *where* (file, key or stage/backend), *what* is wrong and,
when there is one, *the fix*. The CLI prints ``error: <message>`` and exits with code 1
for any :class:`OasisError`; other exceptions keep their traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "InputError",
    "OasisError",
    "StageError",
    "UnknownBackend",
]


class OasisError(Exception):
    """Base class of every error OASIS reports to a user."""


class ConfigError(OasisError):
    """A configuration file or option is invalid (unknown key, wrong type)."""


class InputError(OasisError):
    """An input file or argument cannot be used (not FITS, empty, wrong shape...)."""


class UnknownBackend(OasisError):
    """No installed plugin provides a backend with the requested name."""


class BackendUnavailable(OasisError):
    """A backend is installed but cannot run here (missing program, library...)."""


class StageError(OasisError):
    """A stage failed on one unit of work (one frame, the template...).

    Parameters
    ----------
    message : str
        One-line description naming the unit and the cause.
    metadata : mapping, optional
        Numbers describing the failure (Rubin's ``AlgorithmError`` idea).
    """

    def __init__(self, message: str, *, metadata: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.metadata = dict(metadata or {})
