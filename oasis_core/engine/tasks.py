"""Per-unit work: a :class:`Task` is one frame's (or residual's) call of a stage's backend,
picklable and a pure function of its fields, run by the executor (:func:`run_task`); a
task reads its inputs, calls the backend and writes its output atomically with a
provenance header. :func:`execute` runs a stage's tasks, skipping those whose output is
current (so an interrupted run resumes) and removing the output of one that fails.

The task functions here (:func:`mask`, :func:`psf`, :func:`align`, :func:`subtract`,
:func:`extract`) are the built-in stages' ``task`` in :mod:`oasis_core.contracts.stages`;
:func:`detect` and :func:`filter_sources` are the extract stage's detection and the core's
decision on it, which ``oasis subtract-pair --catalog`` uses too.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from oasis_core.contracts.errors import OasisError, StageError
from oasis_core.contracts.model import PsfModel, Residual, Template, readonly
from oasis_core.contracts.stages import StageTable
from oasis_core.engine import io, outputs
from oasis_core.engine.files import file_key
from oasis_core.engine.lock import scratch_dir
from oasis_core.engine.provenance import (
    Provenance,
    digests_known,
    is_current,
    options_dict,
    remember_digests,
)

if TYPE_CHECKING:
    from oasis_core.engine.context import Context

__all__ = [
    "Task",
    "align",
    "backend_user_files",
    "detect",
    "execute",
    "extract",
    "failure_reason",
    "failures",
    "filter_sources",
    "first_failure",
    "keep_psf_files",
    "mask",
    "named_inputs",
    "output_current",
    "prepare_workdir",
    "psf",
    "readonly_inputs",
    "run_task",
    "stage_task",
    "subtract",
    "workdir",
    "worker_cached",
    "worker_template",
]

log = logging.getLogger("oasis")


@attrs.frozen(kw_only=True)
class Task:
    """One unit of per-frame work, picklable, a pure function of its fields."""

    stage: str
    name: str
    backend: Any
    options: Any
    inputs: Mapping[str, Path]
    output: Path
    provenance: Provenance
    workdir: Path
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    user_files: tuple[Path, ...] = ()
    #: The inputs' digests the main process knew (by file key): the worker hashes none
    #: of them again for the output's provenance cards.
    digests: Mapping[Any, str] = attrs.field(factory=dict)


#: The key of a task's summary that carries its output's digest to the main process
#: (taken out before the summary is kept).
DIGESTS = "_digests"


def readonly_inputs(obj: Any) -> Any:
    for field in ("data", "weight", "noise"):
        value = getattr(obj, field, None)
        if isinstance(value, np.ndarray):
            readonly(value)
    return obj


def prepare_workdir(workdir: Path, user_files: Sequence[Path]) -> None:
    """Create ``workdir`` and copy the user's configuration files for the backend into it."""
    workdir.mkdir(parents=True, exist_ok=True)
    for f in user_files:
        shutil.copyfile(f, workdir / f.name)


def run_task(task: Task) -> dict[str, Any]:
    """Execute one task (in a worker process or in this one)."""
    from oasis_core.engine.provenance import digest_of

    remember_digests(task.digests)
    prepare_workdir(task.workdir, task.user_files)
    start = time.perf_counter()
    try:
        summary = _STAGE_TASKS[task.stage](task)  # the stage's ``task`` function
    finally:
        shutil.rmtree(task.workdir, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if task.output.is_file():  # hashed here, once, while its pages are fresh
        summary[DIGESTS] = digest_of(task.output)
    return summary


def mask(task: Task) -> dict[str, Any]:
    frame = readonly_inputs(io.read_frame(task.inputs["data"]))
    out = task.backend.mask(frame, options=task.options, workdir=task.workdir)
    if out.weight.shape != frame.shape:
        raise StageError(f"{frame.name}: mask backend returned a weight of the wrong shape")
    weight = np.minimum(np.asarray(out.weight, np.float32), frame.weight)
    out = attrs.evolve(out, weight=np.clip(weight, 0, 1))
    masked = float((out.weight == 0).mean())
    cards = task.provenance.header_cards()
    cards["MASKFRAC"] = (round(masked, 6), "fraction of pixels masked")
    io.write_frame(task.output, out, header_extra=cards, weight_only=True)
    return {"masked_fraction": masked, **_numbers(out.meta)}


def psf(task: Task) -> dict[str, Any]:
    frame = readonly_inputs(outputs.load_frame(task.inputs))
    out = task.backend.psf(frame, options=task.options, workdir=task.workdir)
    if out.psf is None or out.fwhm is None:
        raise StageError(f"{frame.name}: psf backend {task.backend.name!r} returned no PSF")
    cards = task.provenance.header_cards()
    for attr, (key, comment) in io.MEASURED_KEYS.items():
        value = getattr(out, attr)
        if value is not None and np.isfinite(value):
            cards[key] = (float(value), comment)
    kept = keep_psf_files(out.psf, task.output.parent, frame.name, cards)
    io.write_psf(task.output, out.psf, header_extra=cards)
    return {
        "fwhm": float(out.fwhm),
        "snr": float(out.snr or np.nan),
        "background": float(out.background if out.background is not None else np.nan),
        "noise": float(out.noise if out.noise is not None else np.nan),
        "nstars": int(out.psf.nstars),
        "files": kept,
    }


def align(task: Task) -> dict[str, Any]:
    frame = readonly_inputs(outputs.load_frame(task.inputs))
    ref = {k: task.inputs[k] for k in ("ref_data", "ref_mask", "ref_psf") if k in task.inputs}
    reference = worker_cached(
        "reference", ref, lambda: readonly_inputs(outputs.load_frame(task.inputs, "ref_"))
    )
    out = task.backend.align(frame, reference, options=task.options, workdir=task.workdir)
    if out.shape != reference.shape:
        raise StageError(
            f"{frame.name}: align backend returned shape {out.shape}, reference has "
            f"{reference.shape}"
        )
    cards = task.provenance.header_cards()
    cards["OASREF"] = (reference.name, "alignment reference frame")
    io.write_frame(task.output, out, header_extra=cards)
    return {"masked_fraction": float((out.weight == 0).mean()), **_numbers(out.meta)}


def subtract(task: Task) -> dict[str, Any]:
    from oasis_core.engine.auto import auto_cards
    from oasis_core.engine.subtraction import residual_cards, run_subtraction

    science = readonly_inputs(outputs.load_output(task.inputs["science"], task.inputs.get("psf")))
    template = worker_template(task.inputs["template"], task.inputs.get("template_psf"))
    residual = run_subtraction(
        task.backend,
        science,
        template,
        options=task.options,
        workdir=task.workdir,
        settings=task.extra,
    )
    residual = attrs.evolve(
        residual, name=f"{science.name}_residual", science=science.name, template=template.name
    )
    cards = {
        **task.provenance.header_cards(),
        **residual_cards(residual, science, template),
        **auto_cards(residual),
    }
    io.write_residual(task.output, residual, header_extra=cards)
    return {
        "q": float(residual.q),
        "flag": str(residual.meta.get("flag", "")),
        "seconds": residual.meta["seconds"],
        "good_fraction": residual.meta["good_fraction"],
    }


def extract(task: Task) -> dict[str, Any]:
    residual = readonly_inputs(io.read_residual(task.inputs["residual"]))
    psf_path = task.inputs.get("psf")
    if psf_path is not None and Path(psf_path).exists():
        residual = attrs.evolve(residual, psf=io.read_psf(psf_path))
    template = _template_data(task.inputs.get("template"), residual.data.shape)
    table = detect(
        task.backend, residual, options=task.options, workdir=task.workdir, template=template
    )
    table.meta.update(
        {k: str(v[0] if isinstance(v, tuple) else v) for k, v in task.provenance.cards().items()}
    )
    io.write_table(table, task.output)
    return {"n": len(table)}


def _template_data(path: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The template's pixels (for the ``wing`` test), when given and on the residual's
    grid (:func:`worker_template`)."""
    if path is None or not Path(path).exists():
        return None
    data = np.asarray(worker_template(Path(path)).data)
    return data if data.shape == tuple(shape) else None


def worker_template(path: Path, psf_path: Path | None = None) -> Template:
    """The template (with its PSF model when ``psf_path`` names one), read once per worker
    process while its files stay the same (:func:`oasis_core.engine.files.file_key`),
    its arrays read-only. Every frame of a series is subtracted from one template: a
    worker reads it once rather than once per frame, and a backend sees the very same
    object from one frame to the next (so it may keep what it prepared of it, keyed by
    the object, as the ``ois`` backend does)."""
    psf = Path(psf_path) if psf_path is not None and Path(psf_path).exists() else None
    files = {"template": Path(path)} if psf is None else {"template": Path(path), "psf": psf}
    return worker_cached(
        "template",
        files,
        lambda: readonly_inputs(outputs.load_output(Path(path), psf, cls=Template)),
    )


def worker_cached(slot: str, files: Mapping[str, Path], load: Callable[[], Any]) -> Any:
    """What ``load`` makes of ``files``, made once per worker process while the files
    stay the same (:func:`oasis_core.engine.files.file_key`). A worker keeps one such
    object, the last asked for (the align tasks' reference; the template of the
    subtract and extract tasks; the mr tasks' template stars): the previous one is let go before the next is
    made, so memory does not grow from stage to stage. ``slot`` names what it is."""
    key = (slot, tuple(sorted((name, file_key(Path(p))) for name, p in files.items())))
    if _WORKER_CACHE[0] != key:
        _WORKER_CACHE[:] = [None, None]
        _WORKER_CACHE[:] = [key, load()]
    return _WORKER_CACHE[1]


#: Per worker process: (slot and the files' keys, the object made of them).
_WORKER_CACHE: list[Any] = [None, None]


def keep_psf_files(model: PsfModel, directory: Path, stem: str, cards: dict[str, Any]) -> list[str]:
    """Copy the files a psf backend produced (``model.files``, in its workdir) to
    ``directory/stem.<suffix>``; name them in ``cards["OASFILES"]``."""
    kept = []
    for f in model.files:
        dest = directory / f"{stem}{Path(f).suffix}"
        with io.atomic_write(dest) as tmp:
            shutil.copyfile(f, tmp)
        kept.append(dest.name)
    if kept:
        cards["OASFILES"] = (",".join(kept), "psf backend files")
    return kept


def detect(
    backend: Any,
    residual: Residual,
    *,
    options: Any,
    workdir: Path,
    template: np.ndarray | None = None,
) -> Any:
    """Run an extract backend on ``residual`` and add the columns the core's filters use
    (``sign``, ``peak_norm``, ``lobe_min``, ``masked_frac``, ``wing``, ``fwhm``) and the
    frame's mid-exposure ``mjd`` (:func:`oasis_core.engine.io.header_mjd` of the residual's
    header), with the units and descriptions of
    :data:`oasis_core.engine.sources.CATALOG_COLUMNS` (fluxes in the residual's ``BUNIT``);
    the residual's null (for the detection threshold) goes in the table's metadata
    (:func:`oasis_core.engine.sources.add_null_columns`). ``template``, the template's
    pixels on the residual's grid, gives the ``wing`` column (0 without it)."""
    from oasis_core.engine.sources import (
        add_lobe_columns,
        add_null_columns,
        describe_columns,
        matched_significance,
    )

    table = backend.extract(residual, options=options, workdir=workdir)
    missing = [c for c in ("x", "y", "flux", "snr") if c not in table.colnames]
    if missing:
        raise StageError(
            f"{residual.name}: extract backend {backend.name!r} returned no column "
            f"{', '.join(missing)}"
        )
    if "sign" not in table.colnames:
        table["sign"] = np.where(np.asarray(table["flux"], float) < 0, -1, 1)
    fwhm = float(residual.header.get("FWHM", 3.0) or 3.0)
    norm = residual.normalized
    # an image that is a PSF-weighted significance already (the variability image, card
    # PSFWTD) is not smoothed again; it carries its own mismatch terms and is searched at
    # snr_min (no wing column, no null of its own)
    weighted = bool(residual.header.get("PSFWTD"))
    significance = None  # made once, for both
    if not weighted:
        significance = matched_significance(norm, residual.weight <= 0, fwhm / 2.3548)
    add_lobe_columns(
        table,
        norm,
        radius=max(3.0, 1.5 * fwhm),
        weight=residual.weight,
        smooth=0.0 if weighted else fwhm / 2.3548,
        significance=significance,
    )
    if significance is not None:
        add_null_columns(
            table,
            norm,
            fwhm=fwhm,
            weight=residual.weight,
            noise=residual.noise,
            template=template,
            significance=significance[0],
        )
    table["fwhm"] = np.full(len(table), fwhm, dtype=np.float32)
    _add_mjd(table, io.header_mjd(residual.header))
    return describe_columns(table, flux_unit=io.header_unit(residual.header))


def _add_mjd(table: Any, mjd: float | None) -> None:
    """The frame's mid-exposure ``mjd`` on every row (masked when unknown)."""
    from astropy.table import MaskedColumn

    n = len(table)
    if mjd is None:
        table["mjd"] = MaskedColumn(np.zeros(n), mask=np.ones(n, bool))
    else:
        table["mjd"] = np.full(n, mjd, dtype=np.float64)


def filter_sources(
    table: Any,
    *,
    settings: Any,
    catalogs: Sequence[Any],
    n_residuals: int,
    frame: str | None = None,
    wcs: Any = None,
) -> Any:
    """The core's decision on one residual's detections (from :func:`detect`), as the
    extract stage makes it and ``oasis subtract-pair --catalog`` too.

    Parameters
    ----------
    table : astropy.table.Table
        The detections of one residual (or of the master residual).
    settings : ExtractSettings
        The ``[extract]`` settings (the filters' thresholds).
    catalogs : sequence of Table
        The positive detections of every residual searched (for the majority filter).
    n_residuals : int
        Number of residuals searched (the majority filter needs 3 or more).
    frame : str, optional
        Added as a first column ``frame``.
    wcs : astropy.wcs.WCS, optional
        Adds ``ra`` and ``dec`` (degrees) from ``x``, ``y``.

    Returns
    -------
    astropy.table.Table
        ``table`` with ``n_frames`` and ``reason`` (``kept`` or why not: see
        :mod:`oasis_core.engine.sources`), floats shown with 3 decimals (``ra``, ``dec``,
        ``mjd`` with 6), units and descriptions on every column, no metadata.
    """
    from oasis_core.engine.sources import describe_columns, filter_detections, filter_options

    out = filter_detections(
        table, catalogs=catalogs, n_residuals=n_residuals, **filter_options(settings)
    )
    if frame is not None:
        out.add_column(
            np.full(len(out), frame, dtype=f"U{max(1, len(frame))}"), name="frame", index=0
        )
    _cleaned(out)
    _add_radec(out, wcs)
    return describe_columns(out)


def _cleaned(table: Any) -> Any:
    table.meta.clear()
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".3f"
    return table


def _add_radec(table: Any, wcs: Any) -> None:
    if wcs is None:
        return
    if len(table) == 0:  # the columns all the same, so that catalogs stack
        ra = dec = np.zeros(0)
    else:
        x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
        ra, dec = wcs.all_pix2world(x, y, 0)
    table["ra"] = ra
    table["dec"] = dec
    table["ra"].info.format = ".6f"
    table["dec"].info.format = ".6f"


#: Stage -> its per-unit task function: a view of :mod:`oasis_core.contracts.stages`.
_STAGE_TASKS: Mapping[str, Callable[[Task], dict[str, Any]]] = StageTable(
    lambda stage: stage.task_function
)


def _numbers(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}


def execute(ctx: Context, label: str, tasks: Sequence[Task]) -> dict[str, Any]:
    """Run tasks not already current; return name -> summary (or exception)."""
    results: dict[str, Any] = {}
    todo = []
    for task in tasks:
        if not ctx.force and output_current(task):
            results[task.name] = "skipped"
        else:
            todo.append(task)
    with ctx.reporter.progress(label, len(tasks)) as advance:
        for _ in range(len(tasks) - len(todo)):
            advance()
        todo = [attrs.evolve(t, digests=digests_known(t.inputs.values())) for t in todo]
        by_name = {t.name: t for t in todo}
        for outcome in ctx.executor.run(run_task, [(t.name, t) for t in todo]):
            advance()
            if outcome.ok:
                if isinstance(outcome.value, dict):
                    remember_digests(outcome.value.pop(DIGESTS, {}))
                results[outcome.key] = outcome.value
                log.debug("%s: %s: %s", label, outcome.key, _brief(outcome.value))
            else:
                err = outcome.error
                results[outcome.key] = err
                outputs.invalidate(by_name[outcome.key].output)
                if isinstance(err, OasisError):
                    log.warning("%s: %s", label, err)
                else:
                    log.error("%s: %s failed: %s: %s", label, outcome.key, type(err).__name__, err)
                    log.debug("%s: %s traceback", label, outcome.key, exc_info=err)
    for directory in {t.output.parent for t in todo}:  # temp files of a killed worker
        for orphan in directory.glob(".*.part"):
            orphan.unlink(missing_ok=True)
    done = sum(1 for v in results.values() if not isinstance(v, BaseException))
    skipped = sum(1 for v in results.values() if v == "skipped")
    ctx.reporter.result(f"{label}: {done}/{len(tasks)} done ({skipped} already up to date)")
    return results


def _brief(summary: Any) -> str:
    """A task's summary as one ``key value, ...`` line (``oasis -v``'s per-frame line)."""
    if not isinstance(summary, Mapping):
        return str(summary)
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
    )


def output_current(task: Task) -> bool:
    return is_current(task.output, task.provenance)  # FITS header or ECSV metadata


def failures(results: Mapping[str, Any]) -> list[str]:
    return sorted(k for k, v in results.items() if isinstance(v, BaseException))


def failure_reason(err: BaseException) -> str:
    """One line for a failure: an OasisError's message, else the type and message."""
    text = " ".join(str(err).split())
    if isinstance(err, OasisError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def first_failure(results: Mapping[str, Any]) -> str:
    failed = failures(results)
    if not failed:
        return ""
    name, reason = failed[0], failure_reason(results[failed[0]])
    if not reason.startswith(f"{name}:"):
        reason = f"{name}: {reason}"
    return f"{len(failed)} failed; the first: {reason}"


def workdir(ctx: Context, stage: str, name: str) -> Path:
    """Scratch for one unit, inside the run's own scratch folder (see
    :mod:`~oasis_core.engine.lock`)."""
    return scratch_dir(ctx.target.path) / stage / name


def named_inputs(user_files: Sequence[Path]) -> dict[str, Path]:
    """User configuration files as provenance inputs: editing one redoes the work."""
    return {f"cfg:{f.name}": f for f in user_files}


def backend_user_files(ctx: Context, backend: Any) -> tuple[Path, ...]:
    """The target's ``configs/`` files that override ``backend``'s own (its ``user_files``)."""
    files = (ctx.target.configs / n for n in getattr(backend, "user_files", ()))
    return tuple(f for f in files if f.is_file())


def stage_task(
    ctx: Context,
    stage: str,
    name: str,
    inputs: Mapping[str, Path],
    output: Path,
    *,
    settings: Any = None,
) -> Task:
    """The task running ``stage``'s chosen backend on one unit (frame or residual)."""
    backend = ctx.backend(stage)
    user_files = backend_user_files(ctx, backend)
    return Task(
        stage=stage,
        name=name,
        backend=backend,
        options=ctx.config.backend_options(stage),
        inputs=dict(inputs),
        output=output,
        provenance=ctx.provenance(stage, {**inputs, **named_inputs(user_files)}, settings=settings),
        workdir=workdir(ctx, stage, name),
        extra=options_dict(settings) if settings is not None else {},
        user_files=user_files,
    )
