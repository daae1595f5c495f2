"""The pipeline: stages in order, per-frame work through the executor, resume on rerun.

Each stage is a function of a target path (``mask(path)``, ``psf(path)``, ...,
``pipeline(path)`` runs them all). :func:`run_stages` runs stages on a prepared
:class:`~oasis_core.engine.context.Context`, each through its runner in the stage
registry (:mod:`oasis_core.contracts.stages`; the built-in ones are in
:mod:`oasis_core.engine.runners`). A stage turns its per-frame work into tasks
(:mod:`oasis_core.engine.tasks`) run by an :mod:`~oasis_core.engine.executor`; a task
whose output is already there with the same provenance is skipped, so an interrupted run
resumes; ``force=True`` redoes everything. A run holds the target's lock
(:mod:`oasis_core.engine.lock`) throughout. Where the outputs are and when they count as
current: :mod:`oasis_core.engine.outputs`.

This module is the engine's public face for applications: besides the stage functions it
re-exports the names they use (:class:`Context`, :func:`make_context`,
:func:`closing_executor`, :func:`stage_task`, :func:`execute`, :func:`detect`,
:func:`filter_sources`, :func:`input_frames`, :func:`residual_verdict`).
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from oasis_core.contracts.backends import STAGES
from oasis_core.contracts.stages import StageTable, get_stage
from oasis_core.contracts.stages import stages as all_stages
from oasis_core.engine import io
from oasis_core.engine.config import dump_config
from oasis_core.engine.context import (
    Context,
    NullReporter,
    Reporter,
    closing_executor,
    make_context,
)
from oasis_core.engine.lock import target_lock
from oasis_core.engine.outputs import input_frames, residual_verdict
from oasis_core.engine.tasks import detect, execute, filter_sources, stage_task
from oasis_core.engine.tree import Target

__all__ = [
    "Context",
    "NullReporter",
    "Reporter",
    "align",
    "closing_executor",
    "combine",
    "detect",
    "execute",
    "extract",
    "filter_sources",
    "input_frames",
    "make_context",
    "mask",
    "mr",
    "photometry",
    "pipeline",
    "psf",
    "residual_verdict",
    "run_stage",
    "run_stages",
    "stage_task",
    "subtract",
]

log = logging.getLogger("oasis")


def _save_config(ctx: Context) -> None:
    text = dump_config(ctx.config, ctx.registry)
    io.write_text(ctx.target.configs / "last_run.toml", text)


#: Stage -> its runner, ``f(ctx)``: a view of :mod:`oasis_core.contracts.stages`.
_RUNNERS: Mapping[str, Callable[[Context], Any]] = StageTable(lambda stage: stage.run)


def run_stages(ctx: Context, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run ``stages`` in pipeline order on a prepared context; return each stage's result.

    The run holds the target's lock throughout (:func:`oasis_core.engine.lock.target_lock`).

    Raises
    ------
    TargetBusy
        Another run holds the target (exit code 2 on the command line).
    InputError
        The target is not writable, or a stage has too few usable frames.
    StageError
        A stage produced nothing usable (every subtraction failed...).
    """
    with target_lock(ctx.target.path):
        ctx.target.create()
        _remove_partial_files(ctx.target)
        _save_config(ctx)
        # resolve every backend first: a bad name or a missing program fails before any work
        for stage in stages:
            ctx.backend(stage)
        if "combine" in stages:
            ctx.backend("psf")
        return {s.name: run_stage(ctx, s.name) for s in all_stages() if s.name in stages}


def run_stage(ctx: Context, stage: str) -> Any:
    """Run one stage on a prepared context (its runner from the stage registry) and return
    its result; the caller holds the target's lock (:func:`run_stages` does). The one way
    an application runs a single stage."""
    return get_stage(stage).run(ctx)


def _remove_partial_files(target: Target) -> None:
    """Delete temporary files a killed run left behind (never a finished output); only
    under the target's lock, so never another run's."""
    for stage in STAGES:
        directory = target.stage_dir(stage)
        if directory.is_dir():
            for part in directory.rglob(".*.part"):
                part.unlink(missing_ok=True)


def _stage_function(stage: str) -> Callable[..., Any]:
    def run(path: str | Path, **kwargs: Any) -> Any:
        ctx = make_context(path, **kwargs)
        with closing_executor(ctx, owned=kwargs.get("executor") is None):
            return run_stages(ctx, [stage])[stage]

    run.__name__ = stage
    run.__doc__ = (
        f"Run the {stage} stage on the target at ``path``.\n\n"
        "Keyword arguments are those of :func:`make_context` (``backends``, ``options``, "
        "``use_config_file``, ``jobs``, ``force``...)."
    )
    return run


mask = _stage_function("mask")


psf = _stage_function("psf")


align = _stage_function("align")


combine = _stage_function("combine")


subtract = _stage_function("subtract")


mr = _stage_function("mr")


extract = _stage_function("extract")


photometry = _stage_function("photometry")


def pipeline(path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run every stage on the target at ``path``; return each stage's result.

    Parameters
    ----------
    path : str or Path
        Target directory or name.
    **kwargs
        Passed to :func:`make_context`: ``backends={"subtract": "ois"}``,
        ``options={"subtract.ois.deg_spatial": 1}``, ``use_config_file``, ``jobs``,
        ``force``, ``reporter``.

    Returns
    -------
    dict
        ``result["extract"]`` is the summary of the detections (counts, mean Q),
        ``result["photometry"]`` that of the light curves (sources, frames, kinds).
    """
    ctx = make_context(path, **kwargs)
    with closing_executor(ctx, owned=kwargs.get("executor") is None):
        return run_stages(ctx)


class _CallablePipelineModule(types.ModuleType):
    """Lets ``oasis_core.pipeline(path, **options)`` run the pipeline (OasisPy's habit)
    while ``oasis_core.engine.pipeline`` stays this module."""

    def __call__(self, path: str | Path, **kwargs: Any) -> dict[str, Any]:
        return pipeline(path, **kwargs)


sys.modules[__name__].__class__ = _CallablePipelineModule
