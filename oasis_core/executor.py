"""The one interface through which per-frame work runs.

The pipeline turns per-frame work into *tasks*: picklable, pure functions of their
arguments (a task reads its inputs from the target tree and writes its output atomically),
so running one twice writes the same file. An :class:`Executor` runs a batch of tasks and
yields each outcome as it completes; a failure of one task is an outcome, not an
exception, so the other frames go on. :class:`LocalExecutor` uses a process pool;
a distributed engine (Dask) only has to implement :meth:`Executor.run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs

__all__ = ["Executor", "LocalExecutor", "Outcome", "make_executor"]


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


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    return fn(arg)


#: Thread-count variables of the libraries the backends use (OpenMP: astroscrappy;
#: OpenBLAS / MKL: numpy and scipy).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_threads(threads: int) -> None:
    """Worker initializer: share the cores among the workers (``threads`` each), unless
    the user set the variables. N workers each running one OpenMP thread per core would
    oversubscribe the machine (astroscrappy's mask stage ran 1.6 times slower so)."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))


@attrs.define
class LocalExecutor:
    """Run tasks in this process (``jobs == 1``) or in a pool of worker processes.

    Parameters
    ----------
    jobs : int
        Worker processes; 0 means one per core.
    """

    jobs: int = 0

    @property
    def workers(self) -> int:
        return self.jobs if self.jobs > 0 else (os.cpu_count() or 1)

    def run(self, fn: Callable[[Any], Any], args: Sequence[tuple[str, Any]]) -> Iterator[Outcome]:
        args = list(args)
        if not args:
            return
        if self.workers == 1 or len(args) == 1:
            for key, arg in args:
                try:
                    yield Outcome(key, fn(arg))
                except Exception as err:  # reported per task; the others go on
                    yield Outcome(key, error=err)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # not "fork": a parent that already ran OpenMP code (astroscrappy) or holds
        # threads' locks would hand its children a deadlock. Workers start from a clean
        # fork server and import what a task needs (backends are pickled by reference,
        # so a plugin registered by hand must live in an importable module).
        ctx = mp.get_context("forkserver")
        n = min(self.workers, len(args))
        threads = max(1, (os.cpu_count() or 1) // n)
        with ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=_limit_threads, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(_call, fn, arg): key for key, arg in args}
            for future in as_completed(futures):
                key = futures[future]
                try:
                    yield Outcome(key, future.result())
                except Exception as err:
                    yield Outcome(key, error=err)


def make_executor(name: str, *, jobs: int = 0, scheduler: str = "") -> Executor:
    """The executor called ``name``: ``"local"`` (a process pool of ``jobs`` workers) or
    ``"dask"`` (a ``dask.distributed`` cluster at ``scheduler``, else a local cluster of
    ``jobs`` worker processes)."""
    if name == "local":
        return LocalExecutor(jobs)
    if name == "dask":
        from oasis_core.executor_dask import DaskExecutor

        return DaskExecutor(scheduler=scheduler, workers=jobs)
    from oasis_core.errors import ConfigError

    raise ConfigError(f"[run] executor {name!r} is not available; available: dask, local")
