"""Exceptions raised by OASIS.

Every message is one line: *where* (file, key or stage/backend), *what* is wrong and,
when there is one, *the fix*. The CLI prints ``error: <message>`` and exits with the
error's ``exit_code`` (1, or 2 when the target is busy); any other exception is also
reported in one line (its traceback only with ``--debug`` or ``OASIS_DEBUG=1``). A
backend's plain exception reaches the CLI as a :class:`BackendError` naming the plugin
(see :class:`oasis_core.engine.plugins.BackendHandle`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "InputError",
    "OasisError",
    "StageError",
    "TargetBusy",
    "UnknownBackend",
]


class OasisError(Exception):
    """Base class of every error OASIS reports to a user."""

    #: The command line's exit status for this error.
    exit_code: ClassVar[int] = 1


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


class BackendError(StageError):
    """A backend raised an exception that is not an :class:`OasisError` (a plugin's bug or
    an unexpected library error); the message names the stage, the backend, its
    distribution, the unit of work and the original fault, which is chained."""


class TargetBusy(OasisError):
    """Another run holds the target's lock; the message names its pid, host and start."""

    exit_code = 2
