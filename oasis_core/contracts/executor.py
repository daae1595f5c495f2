"""The executor interface: how per-unit work runs, locally or on a distributed engine.

The pipeline turns per-frame work into *tasks* (picklable, pure functions of their
arguments). An :class:`Executor` runs a batch of them and yields an :class:`Outcome` per
task as each completes; a failure of one task is an outcome, not an exception, so the
other frames go on. The engine's executors (:mod:`oasis_core.engine.executor`: a process
pool; :mod:`oasis_core.engine.executor_dask`: a Dask cluster) implement it; another
distributed engine only has to implement :meth:`Executor.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs

__all__ = ["Executor", "Outcome"]


@attrs.frozen
class Outcome:
    """The result of one task: ``value`` on success, ``error`` (the exception) otherwise."""

    key: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor(Protocol):
    """Runs tasks ``fn(arg)`` and yields an :class:`Outcome` per task as each finishes."""

    def run(self, fn: Callable[[Any], Any], args: Sequence[tuple[str, Any]]) -> Iterator[Outcome]:
        """Run ``fn(arg)`` for every ``(key, arg)``; yield outcomes in completion order."""
        ...
