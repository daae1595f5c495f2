"""What a run holds: the target, the configuration, the plugins, the executor and where
progress goes (:class:`Context`, made by :func:`make_context`).

Each stage's backend is resolved and checked once per run (:meth:`Context.backend`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core.engine.config import Config, load_config
from oasis_core.engine.executor import Executor, make_executor
from oasis_core.engine.plugins import Registry
from oasis_core.engine.provenance import Provenance
from oasis_core.engine.tree import Target, find_target

__all__ = [
    "Context",
    "NullReporter",
    "Reporter",
    "closing_executor",
    "make_context",
]

log = logging.getLogger("oasis")


class Reporter:
    """Receives progress from the pipeline; the CLI's shows rich progress bars."""

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        """Context for ``total`` units of work; call the yielded function per unit done."""
        yield lambda: None

    def result(self, text: str) -> None:
        """A line for the user (the summary of a stage)."""
        log.info(text)


NullReporter = Reporter


@attrs.frozen(kw_only=True)
class Context:
    """Everything a stage needs: where, how, with what."""

    target: Target
    config: Config
    registry: Registry
    executor: Executor
    reporter: Reporter = attrs.field(factory=Reporter)
    force: bool = False
    #: stage -> its backend, resolved and checked once per run (see :meth:`backend`)
    _backends: dict[str, Any] = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def backend(self, stage: str) -> Any:
        """The chosen backend of ``stage``, resolved and checked (``check()``) on the first
        call and kept for the rest of the run (every frame uses the same object).

        Raises
        ------
        UnknownBackend, BackendUnavailable
            When the chosen backend is not installed or cannot run here.
        """
        if stage not in self._backends:
            self._backends[stage] = self._resolve_backend(stage)
        return self._backends[stage]

    def _resolve_backend(self, stage: str) -> Any:
        name = self.config.backend(stage)
        self.registry.get(stage, name)  # an unknown name lists the installed ones
        backend = self.registry.select(stage, name, self.config.backend_options(stage, name))
        bind = getattr(backend, "bind", None)  # a selector (subtract 'auto') binds here
        return bind(self.registry, self.config) if callable(bind) else backend

    def provenance(
        self, stage: str, inputs: Mapping[str, Path], settings: Any = None
    ) -> Provenance:
        name = self.config.backend(stage)
        record = self.registry.get(stage, name)
        options = self.config.backend_options(stage, name)
        if callable(getattr(record.backend, "bind", None)):  # a selector: its candidates' too
            options = self.backend(stage).options
        return Provenance(
            stage=stage,
            backend=name,
            plugin=f"{record.dist}=={record.version}",
            inputs=dict(inputs),
            options=options,
            settings=settings,
        )


def make_context(
    path: str | Path,
    *,
    use_config_file: bool = True,
    backends: Mapping[str, str | None] | None = None,
    options: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    jobs: int | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    registry: Registry | None = None,
    executor: Executor | None = None,
) -> Context:
    """Resolve the target, the configuration, the plugins and the executor.

    Parameters
    ----------
    path : str or Path
        The target directory (or its name under ``./OASIS/targets``).
    use_config_file : bool
        Read ``configs/oasis.toml`` (default True).
    backends : mapping
        Stage to backend name, e.g. ``{"subtract": "ois"}`` (function arguments).
    options : mapping
        Dotted keys to values, e.g. ``{"subtract.ois.deg_spatial": 1}`` (function
        arguments).
    cli : mapping
        Dotted keys from the command line; they win over everything.
    jobs : int, optional
        Worker processes (0 = one per core).
    """
    target = find_target(path)
    registry = registry if registry is not None else Registry()
    arguments: dict[str, Any] = dict(options or {})
    for stage, name in (backends or {}).items():
        if name:
            arguments[f"{stage}.backend"] = name
    if jobs is not None:
        arguments["run.jobs"] = jobs
    config = load_config(
        target.config_file, registry, use_config_file=use_config_file, arguments=arguments, cli=cli
    )
    if executor is None:
        executor = make_executor(
            config.run.executor, jobs=config.run.jobs, scheduler=config.run.scheduler
        )
    return Context(
        target=target,
        config=config,
        registry=registry,
        executor=executor,
        reporter=reporter or Reporter(),
        force=force,
    )


@contextlib.contextmanager
def closing_executor(ctx: Context, *, owned: bool = True) -> Iterator[Context]:
    """Close the context's executor at the end (a Dask cluster it started) when this
    call made it (``owned``)."""
    try:
        yield ctx
    finally:
        close = getattr(ctx.executor, "close", None)
        if owned and callable(close):
            close()
