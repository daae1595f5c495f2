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
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from oasis_core.contracts.executor import Executor, Outcome

__all__ = [
    "TRIM_ABOVE",
    "Executor",
    "LocalExecutor",
    "Outcome",
    "die_with_parent",
    "make_executor",
    "process_alive",
    "process_start",
    "release_memory",
]


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return fn(arg)
    finally:
        release_memory()


_LIBC: Any = None

#: Free heap (bytes) above which a worker hands it back after a task: less is not worth
#: the page faults of getting it back (a 512x512 subtraction is 10 % slower when trimmed
#: every time; a 2048x2048 one not measurably).
TRIM_ABOVE = 64 * 2**20


def release_memory() -> None:
    """Hand the memory a finished task freed back to the system (glibc's ``malloc_trim``;
    nothing elsewhere) when more than :data:`TRIM_ABOVE` of it is free. glibc keeps freed
    blocks of up to 32 MB (a 2048x2048 image is 16) in its heap, so an idle worker would
    hold the high-water mark of its largest task, and the workers' idle memory would add
    up with the next stage's."""
    global _LIBC
    if _LIBC is None:
        _LIBC = _load_libc()
    if not _LIBC:
        return
    libc, counts = _LIBC
    if not counts or libc.mallinfo2().fordblks > TRIM_ABOVE:
        libc.malloc_trim(0)


def _load_libc() -> Any:
    """(libc, whether it has ``mallinfo2`` (glibc 2.33 and later)), or False."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return False
    if not hasattr(libc, "mallinfo2"):
        return libc, False
    libc.mallinfo2.restype = MallInfo2
    return libc, True


#: Thread-count variables of the libraries the backends use (OpenMP: astroscrappy;
#: OpenBLAS / MKL: numpy and scipy).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Seconds between a worker's checks that the main process is still there.
WATCHDOG_INTERVAL = 0.25


def _limit_threads(threads: int) -> None:
    """Share the cores among the workers (``threads`` each), unless the user set the
    variables. N workers each running one OpenMP thread per core would oversubscribe the
    machine (astroscrappy's mask stage ran 1.6 times slower so)."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``; ``""`` where
    there is no ``/proc``): with the pid, it names one process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def process_alive(pid: int, start: str = "") -> bool:
    """Is process ``pid`` (started at ``start``, see :func:`process_start`) still running?
    A zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (not start or fields[19] == start)


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux's
    ``PR_SET_PDEATHSIG``; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # no prctl: the watchdog alone
        pass


def _watch(pid: int, start: str) -> None:
    while process_alive(pid, start):
        time.sleep(WATCHDOG_INTERVAL)
    os._exit(1)


def _init_worker(threads: int, main_pid: int, main_start: str) -> None:
    """Worker initializer: limit threads (:func:`_limit_threads`) and die with the main
    process. A worker's parent is the fork server, not the main process, and a killed main
    process leaves both (with the resource tracker) waiting forever on pipes they hold
    themselves; so besides ``PR_SET_PDEATHSIG`` (the fork server's death) a daemon thread
    polls the main process and ends the worker when it is gone. With the workers gone, the
    fork server and the resource tracker see their pipes close and exit too."""
    _limit_threads(threads)
    die_with_parent()
    if not process_alive(main_pid, main_start):
        os._exit(1)
    threading.Thread(
        target=_watch, args=(main_pid, main_start), name="oasis-watchdog", daemon=True
    ).start()


#: Tasks in flight per worker process (:meth:`LocalExecutor.run`): enough to keep every
#: worker busy while the caller consumes the outcomes.
IN_FLIGHT = 2


@attrs.define(eq=False)
class LocalExecutor:
    """Run tasks in this process (``jobs == 1``) or in a pool of worker processes.

    The pool is started on first use and kept for the next stages (workers import the
    backends once) until :meth:`close`. Workers end with the main process, even when it is
    killed (see :func:`_init_worker`).

    Parameters
    ----------
    jobs : int
        Worker processes; 0 means one per core.
    """

    jobs: int = 0
    _pool: Any = attrs.field(default=None, init=False, repr=False)

    @property
    def workers(self) -> int:
        return self.jobs if self.jobs > 0 else (os.cpu_count() or 1)

    def _get_pool(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # not "fork": a parent that already ran OpenMP code (astroscrappy) or holds
            # threads' locks would hand its children a deadlock. Workers start from a clean
            # fork server and import what a task needs (backends are pickled by reference,
            # so a plugin registered by hand must live in an importable module).
            ctx = mp.get_context("forkserver")
            n = self.workers
            threads = max(1, (os.cpu_count() or 1) // n)
            me = os.getpid()
            self._pool = ProcessPoolExecutor(
                max_workers=n,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(threads, me, process_start(me)),
            )
        return self._pool

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
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        pool = self._get_pool()
        todo = iter(args)
        futures: dict[Any, str] = {}
        refused: list[Outcome] = []

        def submit() -> None:
            for key, arg in todo:
                try:
                    futures[pool.submit(_call, fn, arg)] = key
                except (BrokenProcessPool, RuntimeError) as err:  # the pool broke
                    self._pool = None
                    refused.append(Outcome(key, error=err))
                return

        # A window of tasks in flight, each outcome let go once yielded: what the caller
        # has not consumed yet stays bounded (a stage whose tasks return images, e.g. the
        # variability image's terms, holds a few, never the whole series).
        for _ in range(IN_FLIGHT * self.workers):
            submit()
        try:
            while futures or refused:
                while refused:
                    yield refused.pop(0)
                    submit()
                if not futures:
                    continue
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                while done:
                    future = done.pop()
                    key = futures.pop(future)
                    submit()
                    try:
                        outcome = Outcome(key, future.result())
                    except BrokenProcessPool as err:  # a worker died: a new pool next time
                        self._pool = None
                        outcome = Outcome(key, error=err)
                    except Exception as err:
                        outcome = Outcome(key, error=err)
                    del future
                    yield outcome
                    del outcome
        finally:
            for future in futures:  # the caller stopped early: drop what has not started
                future.cancel()

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`run` starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(name: str, *, jobs: int = 0, scheduler: str = "") -> Executor:
    """The executor called ``name``: ``"local"`` (a process pool of ``jobs`` workers) or
    ``"dask"`` (a ``dask.distributed`` cluster at ``scheduler``, else a local cluster of
    ``jobs`` worker processes)."""
    if name == "local":
        return LocalExecutor(jobs)
    if name == "dask":
        from oasis_core.engine.executor_dask import DaskExecutor

        return DaskExecutor(scheduler=scheduler, workers=jobs)
    from oasis_core.contracts.errors import ConfigError

    raise ConfigError(f"[run] executor {name!r} is not available; available: dask, local")
