"""Run the pipeline's per-frame work on a Dask cluster (``run.executor = "dask"``).

:class:`DaskExecutor` implements :class:`~oasis_core.engine.executor.Executor` with
``dask.distributed``: with a scheduler address it connects to a running cluster (``dask
scheduler`` + ``dask worker``, dask-jobqueue on SLURM/PBS...); without one it starts a
:class:`distributed.LocalCluster` of worker processes the first time it runs tasks, and
keeps it for the next stages until :meth:`DaskExecutor.close` (or the end of a ``with``
block).

Tasks are pickled *by reference* (module and name), so every worker must be able to import
``oasis_core`` and the plugins that provide the selected backends, and must see the target
directory at the same path (a shared filesystem): a task reads its inputs from the target
tree and writes its output there atomically. A task that fails with an
:class:`~oasis_core.contracts.errors.OasisError` (bad frame, backend failure) is reported at once;
any other exception is retried (``retries`` times) on the cluster before it is reported. A
task whose worker dies (killed, out of memory) is rescheduled by Dask on another worker.

``dask`` is imported only when a cluster is needed, so ``oasis --help`` stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from oasis_core.contracts.errors import BackendUnavailable, ConfigError, OasisError
from oasis_core.contracts.executor import Outcome

__all__ = ["DaskExecutor"]

MISSING_DASK = "executor 'dask' needs dask.distributed: pip install 'oasis-dia[dask]'"


@attrs.frozen
class _Failed:
    """A task's :class:`OasisError`, returned (not raised) so Dask does not retry it."""

    error: OasisError


def _call(fn: Callable[[Any], Any], arg: Any) -> Any:
    """Run one task on a worker; an OasisError is deterministic, so it is not retried."""
    try:
        return fn(arg)
    except OasisError as err:
        return _Failed(err)


def _shutdown(client: Any, cluster: Any) -> None:
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


@attrs.define(eq=False)
class DaskExecutor:
    """Run tasks on a Dask cluster; yield an :class:`Outcome` per task as each finishes.

    Parameters
    ----------
    scheduler : str
        Address of a running scheduler (``tcp://host:8786``). Empty: start a local cluster
        of worker processes on first use.
    workers : int
        Worker processes of the local cluster; 0 means one per core. Ignored with a
        ``scheduler``, whose workers are started separately.
    threads_per_worker : int
        Threads in each local worker process (1: tasks run in parallel processes).
    retries : int
        How many times Dask reruns a task that raised an exception other than an
        :class:`~oasis_core.contracts.errors.OasisError` (an I/O hiccup on a shared filesystem...).

    Raises
    ------
    BackendUnavailable
        ``dask.distributed`` is not installed.

    Examples
    --------
    >>> with DaskExecutor(workers=2) as executor:  # doctest: +SKIP
    ...     for outcome in executor.run(abs, [("a", -1), ("b", 2)]):
    ...         print(outcome.key, outcome.value)
    """

    scheduler: str = ""
    workers: int = 0
    threads_per_worker: int = 1
    retries: int = 2
    _client: Any = attrs.field(default=None, init=False, repr=False)
    _cluster: Any = attrs.field(default=None, init=False, repr=False)
    _finalizer: Any = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # fail when the executor is chosen, before any stage runs; importing is left for later
        if importlib.util.find_spec("distributed") is None:
            raise BackendUnavailable(MISSING_DASK)

    @property
    def n_workers(self) -> int:
        """Worker processes of the local cluster."""
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @property
    def client(self) -> Any:
        """The :class:`distributed.Client`, connected (or its local cluster started) on
        first use."""
        if self._client is None:
            self._start()
        return self._client

    def _start(self) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as err:
            raise BackendUnavailable(MISSING_DASK) from err
        if self.scheduler:
            try:
                client = Client(self.scheduler)
            except (OSError, ValueError) as err:
                msg = (
                    f"[run] scheduler: cannot connect to the dask scheduler {self.scheduler!r} "
                    f"({err}); start one with `dask scheduler` or leave run.scheduler empty "
                    "for a local cluster"
                )
                raise ConfigError(msg) from err
            cluster = None
        else:
            cluster = LocalCluster(
                n_workers=self.n_workers,
                threads_per_worker=self.threads_per_worker,
                processes=True,
                dashboard_address=None,
            )
            client = Client(cluster)
        self._client, self._cluster = client, cluster
        self._finalizer = weakref.finalize(self, _shutdown, client, cluster)

    def run(self, fn: Callable[[Any], Any], args: Sequence[tuple[str, Any]]) -> Iterator[Outcome]:
        """Run ``fn(arg)`` on the cluster for every ``(key, arg)``; yield outcomes in
        completion order. A task's exception is its outcome's ``error``."""
        args = list(args)
        if not args:
            return
        from distributed import as_completed

        client = self.client
        token = uuid.uuid4().hex[:12]
        name = getattr(fn, "__name__", "task").strip("_") or "task"
        futures = {}
        for i, (key, arg) in enumerate(args):
            future = client.submit(
                _call, fn, arg, key=f"{name}-{key}-{i}-{token}", pure=False, retries=self.retries
            )
            futures[future] = key
        try:
            for future in as_completed(futures):
                key = futures.pop(future)
                try:
                    value = future.result()
                except Exception as err:  # reported per task; the others go on
                    yield Outcome(key, error=err)
                else:
                    if isinstance(value, _Failed):
                        yield Outcome(key, error=value.error)
                    else:
                        yield Outcome(key, value)
                finally:
                    future.release()
        finally:
            if futures:  # the caller stopped early: do not leave work on the cluster
                client.cancel(list(futures))

    def close(self) -> None:
        """Disconnect from the scheduler and stop the local cluster, if one was started."""
        if self._finalizer is not None:
            self._finalizer()
        self._client = self._cluster = self._finalizer = None

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
