"""The pipeline: stages in order, per-frame work through the executor, resume on rerun.

Each stage is a function of a target path (``mask(path)``, ``psf(path)``, ...,
``pipeline(path)`` runs them all). A stage turns its per-frame work into :class:`Task`
objects run by a :mod:`~oasis_core.executor`; a task reads its inputs, calls the backend
and writes its output atomically with a provenance header. A task whose output is already
there with the same provenance is skipped, so an interrupted run resumes; ``force=True``
redoes everything. A run holds the target's lock (:mod:`oasis_core.lock`) throughout.

What is used downstream is only what is current:

* a unit of work that fails (its backend raised) loses its previous output, which is
  removed at once, so no later stage can take the previous run's file for this run's;
  the failure is logged (``residuals/log.txt`` says ``failed: <reason>`` for a frame)
  and counted (``sources/total_sources.txt``);
* a stage reads an upstream output only when it was made from its inputs as they are now
  (their sha256 among its provenance cards): a changed raw frame, weight map, PSF,
  aligned frame or template makes what was made from it unusable until it is redone;
* a residual is used by ``mr`` and ``extract`` according to its own recorded verdict
  (``OAS USABLE``: its Q against the ``q_floor`` of the run that made it);
* a stage that ends with nothing usable (every subtraction failed, fewer frames than
  ``[run] min_frames``...) stops the run with an error, and the summaries of the later
  stages (template, master residual, catalogs) are removed rather than left describing an
  earlier run.

Stage order and outputs (see :mod:`oasis_core.tree`)::

    mask     data/NAME      -> masks/NAME.weight.fits
    psf      + mask         -> psf/NAME.psf.fits, psf/psf.ecsv; outliers moved to archive/
    align    + psf, ref     -> aligned/NAME.fits, aligned/reference.txt
    combine  best seeing    -> templates/template.fits, template.psf.fits, log.txt
    subtract aligned, tmpl  -> residuals/NAME_residual.fits, residuals/log.txt
    mr       residuals      -> residuals/MR.fits
    extract  residuals, MR  -> sources/*.txt, *.ecsv
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core import io
from oasis_core.backends import STAGES
from oasis_core.config import Config, dump_config, load_config
from oasis_core.errors import InputError, OasisError, StageError
from oasis_core.executor import Executor, make_executor
from oasis_core.lock import target_lock
from oasis_core.model import Frame, PsfModel, Residual, Template, readonly
from oasis_core.plugins import Registry
from oasis_core.provenance import Provenance, is_current, options_dict
from oasis_core.stages import StageTable, get_stage
from oasis_core.stages import stages as all_stages
from oasis_core.tree import Target, find_target

__all__ = [
    "Context",
    "NullReporter",
    "Reporter",
    "align",
    "combine",
    "detect",
    "execute",
    "extract",
    "filter_sources",
    "make_context",
    "mask",
    "mr",
    "pipeline",
    "psf",
    "residual_verdict",
    "run_stage",
    "run_stages",
    "stage_task",
    "subtract",
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


# ---------------------------------------------------------------------------- tasks


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


def _ro(obj: Any) -> Any:
    for field in ("data", "weight", "noise"):
        value = getattr(obj, field, None)
        if isinstance(value, np.ndarray):
            readonly(value)
    return obj


def _load_frame(inputs: Mapping[str, Path], prefix: str = "") -> Frame:
    """A frame from ``data`` (+ ``mask`` weight, + ``psf`` model) inputs."""
    frame = io.read_frame(
        inputs[prefix + "data"], weight_path=inputs.get(prefix + "mask"), warn=False
    )
    psf_path = inputs.get(prefix + "psf")
    if psf_path is not None:
        frame = _with_psf(frame, psf_path)
    return frame


def _with_psf(frame: Frame, psf_path: Path) -> Frame:
    from astropy.io import fits

    model = io.read_psf(psf_path)
    hdr = fits.getheader(psf_path)
    values = {attr: float(hdr[key]) for attr, (key, _) in io.MEASURED_KEYS.items() if key in hdr}
    return attrs.evolve(frame, psf=model, **values)


def _prepare_workdir(workdir: Path, user_files: Sequence[Path]) -> None:
    """Create ``workdir`` and copy the user's configuration files for the backend into it."""
    workdir.mkdir(parents=True, exist_ok=True)
    for f in user_files:
        shutil.copyfile(f, workdir / f.name)


def _run_task(task: Task) -> dict[str, Any]:
    """Execute one task (in a worker process or in this one)."""
    _prepare_workdir(task.workdir, task.user_files)
    start = time.perf_counter()
    try:
        summary = _STAGE_TASKS[task.stage](task)  # the stage's ``task`` function
    finally:
        shutil.rmtree(task.workdir, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


def _task_mask(task: Task) -> dict[str, Any]:
    frame = _ro(io.read_frame(task.inputs["data"]))
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


def _task_psf(task: Task) -> dict[str, Any]:
    frame = _ro(_load_frame(task.inputs))
    out = task.backend.psf(frame, options=task.options, workdir=task.workdir)
    if out.psf is None or out.fwhm is None:
        raise StageError(f"{frame.name}: psf backend {task.backend.name!r} returned no PSF")
    cards = task.provenance.header_cards()
    for attr, (key, comment) in io.MEASURED_KEYS.items():
        value = getattr(out, attr)
        if value is not None and np.isfinite(value):
            cards[key] = (float(value), comment)
    kept = _keep_psf_files(out.psf, task.output.parent, frame.name, cards)
    io.write_psf(task.output, out.psf, header_extra=cards)
    return {
        "fwhm": float(out.fwhm),
        "snr": float(out.snr or np.nan),
        "background": float(out.background if out.background is not None else np.nan),
        "noise": float(out.noise if out.noise is not None else np.nan),
        "nstars": int(out.psf.nstars),
        "files": kept,
    }


def _keep_psf_files(
    model: PsfModel, directory: Path, stem: str, cards: dict[str, Any]
) -> list[str]:
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


def _task_align(task: Task) -> dict[str, Any]:
    frame = _ro(_load_frame(task.inputs))
    reference = _ro(_load_frame(task.inputs, "ref_"))
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


def _task_subtract(task: Task) -> dict[str, Any]:
    from oasis_core.subtraction import auto_cards, residual_cards, run_subtraction

    science = _ro(_load_output(task.inputs["science"], task.inputs.get("psf")))
    template = _ro(
        _load_output(task.inputs["template"], task.inputs.get("template_psf"), cls=Template)
    )
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


def _load_output(path: Path, psf_path: Path | None, *, cls: type[Frame] = Frame) -> Frame:
    frame = io.read_output_frame(path, cls=cls)
    if psf_path is not None and Path(psf_path).exists():
        model = io.read_psf(psf_path)
        frame = attrs.evolve(frame, psf=model)
    return frame


def detect(backend: Any, residual: Residual, *, options: Any, workdir: Path) -> Any:
    """Run an extract backend on ``residual`` and add the columns the core's filters use
    (``sign``, ``peak_norm``, ``lobe_min``, ``masked_frac``, ``fwhm``) and the frame's
    mid-exposure ``mjd`` (:func:`oasis_core.io.header_mjd` of the residual's header), with
    the units and descriptions of :data:`oasis_core.sources.CATALOG_COLUMNS` (fluxes in
    the residual's ``BUNIT``)."""
    from oasis_core.sources import add_lobe_columns, describe_columns

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
    add_lobe_columns(
        table,
        residual.normalized,
        radius=max(3.0, 1.5 * fwhm),
        weight=residual.weight,
        smooth=fwhm / 2.3548,
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
        :mod:`oasis_core.sources`), floats shown with 3 decimals (``ra``, ``dec``,
        ``mjd`` with 6), units and descriptions on every column, no metadata.
    """
    from oasis_core.sources import describe_columns, filter_detections, filter_options

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


def _task_extract(task: Task) -> dict[str, Any]:
    residual = _ro(io.read_residual(task.inputs["residual"]))
    psf_path = task.inputs.get("psf")
    if psf_path is not None and Path(psf_path).exists():
        residual = attrs.evolve(residual, psf=io.read_psf(psf_path))
    table = detect(task.backend, residual, options=task.options, workdir=task.workdir)
    table.meta.update(
        {k: str(v[0] if isinstance(v, tuple) else v) for k, v in task.provenance.cards().items()}
    )
    io.write_table(table, task.output)
    return {"n": len(table)}


#: Stage -> its per-unit task function: a view of :mod:`oasis_core.stages`.
_STAGE_TASKS: Mapping[str, Callable[[Task], dict[str, Any]]] = StageTable(
    lambda stage: stage.task_function
)


def _numbers(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}


def _execute(ctx: Context, label: str, tasks: Sequence[Task]) -> dict[str, Any]:
    """Run tasks not already current; return name -> summary (or exception)."""
    results: dict[str, Any] = {}
    todo = []
    for task in tasks:
        if not ctx.force and _output_current(task):
            results[task.name] = "skipped"
        else:
            todo.append(task)
    with ctx.reporter.progress(label, len(tasks)) as advance:
        for _ in range(len(tasks) - len(todo)):
            advance()
        by_name = {t.name: t for t in todo}
        for outcome in ctx.executor.run(_run_task, [(t.name, t) for t in todo]):
            advance()
            if outcome.ok:
                results[outcome.key] = outcome.value
                log.debug("%s: %s: %s", label, outcome.key, _brief(outcome.value))
            else:
                err = outcome.error
                results[outcome.key] = err
                _invalidate(by_name[outcome.key].output)
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


def _output_current(task: Task) -> bool:
    return is_current(task.output, task.provenance)  # FITS header or ECSV metadata


def _failures(results: Mapping[str, Any]) -> list[str]:
    return sorted(k for k, v in results.items() if isinstance(v, BaseException))


def _reason(err: BaseException) -> str:
    """One line for a failure: an OasisError's message, else the type and message."""
    text = " ".join(str(err).split())
    if isinstance(err, OasisError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _first_failure(results: Mapping[str, Any]) -> str:
    failed = _failures(results)
    if not failed:
        return ""
    name, reason = failed[0], _reason(results[failed[0]])
    if not reason.startswith(f"{name}:"):
        reason = f"{name}: {reason}"
    return f"{len(failed)} failed; the first: {reason}"


# ---------------------------------------------------------------------------- currency


def _invalidate(output: Path) -> None:
    """Remove a unit's previous output (and the files its header names, ``OASFILES``),
    so that nothing downstream takes it for this run's. Each removal is atomic."""
    output = Path(output)
    extra: list[Path] = []
    if output.suffix == ".fits" and output.is_file():
        from astropy.io import fits

        try:
            named = str(fits.getheader(output).get("OASFILES", ""))
        except (OSError, ValueError):
            named = ""
        extra = [output.parent / n for n in named.split(",") if n and Path(n).name == n]
    for path in (output, *extra):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _summaries(ctx: Context, stage: str) -> list[Path]:
    """The outputs of ``stage`` that sum up the whole target rather than one unit."""
    directory = ctx.target.stage_dir(stage)
    if stage == "align":
        return [directory / "reference.txt"]
    if stage == "combine":
        template = _template_path(ctx)
        return [template, template.with_name("template.psf.fits")]
    if stage == "mr":
        return [_mr_path(ctx)]
    if stage == "extract":
        stems = ("sources", "filtered_sources", "MR_sources", "MR_filtered_sources")
        return [
            *(directory / f"{stem}{suffix}" for stem in stems for suffix in (".txt", ".ecsv")),
            directory / "total_sources.txt",
            directory / "detections",
        ]
    return []


def _drop_after(ctx: Context, stage: str) -> None:
    """Remove the summaries of every stage after ``stage``: a run that stops at ``stage``
    leaves no template, master residual or catalog of an earlier run looking like this
    one's."""
    for later in STAGES[STAGES.index(stage) + 1 :]:
        for path in _summaries(ctx, later):
            _invalidate(path)


def _stopped(ctx: Context, stage: str, err: OasisError) -> OasisError:
    """``err``, to raise, after :func:`_drop_after` (``stage``)."""
    _drop_after(ctx, stage)
    return err


def _header(path: Path) -> Any:
    """The primary header of a FITS output (None when unreadable)."""
    from astropy.io import fits

    try:
        return fits.getheader(path)
    except (OSError, ValueError):
        return None


def _made_from(output: Path, inputs: Mapping[str, Path], header: Any = None) -> bool:
    """Was ``output`` made from ``inputs`` as they are now? True when it exists and the
    name and sha256 of every input are among its provenance cards (``OASINn``; the
    backend's options are the stage's business, not its readers')."""
    from oasis_core.provenance import Provenance

    output = Path(output)
    if not output.is_file() or not all(Path(p).is_file() for p in inputs.values()):
        return False
    if output.suffix == ".ecsv":
        from astropy.table import Table

        try:
            recorded = dict(Table.read(output, format="ascii.ecsv").meta)
        except (OSError, ValueError):
            return False
    else:
        recorded = header if header is not None else _header(output)
        if recorded is None:
            return False
    found = {str(recorded[k]) for k in recorded if k.startswith("OASIN") and k[5:].isdigit()}
    expected = Provenance(stage="", backend="", plugin="", inputs=dict(inputs)).input_cards()
    return set(expected) <= found


# ---------------------------------------------------------------------------- frames


def input_frames(target: Target) -> list[tuple[str, Path]]:
    """The frames in ``data/``: (name, path), sorted; non-FITS files warned about."""
    if not target.data.is_dir():
        raise InputError(f"{target.path}: no data/ directory (is this a target? see `oasis init`)")
    frames = []
    for path in sorted(target.data.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not io.is_fits_name(path):
            log.warning("%s: not a FITS file name; ignored", path)
            continue
        frames.append((io.frame_name(path), path))
    return frames


def _need(ctx: Context, stage: str, n: int, what: str, results: Mapping[str, Any]) -> None:
    """Stop the run (see :func:`_stopped`) when fewer than ``[run] min_frames`` frames are
    usable after ``stage``; the message gives the first failure of the stage, if any."""
    need = ctx.config.run.min_frames
    if n < need:
        failed = _first_failure(results)
        raise _stopped(
            ctx,
            stage,
            InputError(
                f"{ctx.target.path}: only {n} usable frame(s) {what}; at least {need} are "
                "needed ([run] min_frames)" + (f"; {stage}: {failed}" if failed else "")
            ),
        )


def _workdir(ctx: Context, stage: str, name: str) -> Path:
    """Scratch for one unit, inside the run's own scratch folder (see :mod:`~oasis_core.lock`)."""
    return ctx.target.scratch / stage / name


def _named(user_files: Sequence[Path]) -> dict[str, Path]:
    """User configuration files as provenance inputs: editing one redoes the work."""
    return {f"cfg:{f.name}": f for f in user_files}


def _user_files(ctx: Context, backend: Any) -> tuple[Path, ...]:
    """The target's ``configs/`` files that override ``backend``'s own (its ``user_files``)."""
    files = (ctx.target.configs / n for n in getattr(backend, "user_files", ()))
    return tuple(f for f in files if f.is_file())


def _task(
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
    user_files = _user_files(ctx, backend)
    return Task(
        stage=stage,
        name=name,
        backend=backend,
        options=ctx.config.backend_options(stage),
        inputs=dict(inputs),
        output=output,
        provenance=ctx.provenance(stage, {**inputs, **_named(user_files)}, settings=settings),
        workdir=_workdir(ctx, stage, name),
        extra=options_dict(settings) if settings is not None else {},
        user_files=user_files,
    )


def _save_config(ctx: Context) -> None:
    text = dump_config(ctx.config, ctx.registry)
    io.write_text(ctx.target.configs / "last_run.toml", text)


def _check_shapes(frames: Sequence[tuple[str, Path]]) -> list[tuple[str, Path]]:
    shapes = {}
    kept = []
    for name, path in frames:
        try:
            shapes[name] = io.read_shape(path)
            kept.append((name, path))
        except InputError as err:
            log.warning("%s", err)
    if shapes:
        values = list(shapes.values())
        common = max(set(values), key=values.count)
        for name, path in kept:
            if shapes[name] != common:
                log.warning(
                    "%s: shape %s differs from the other frames' %s; it is resampled onto "
                    "the reference grid by the align stage",
                    path,
                    shapes[name],
                    common,
                )
    return kept


# ---------------------------------------------------------------------------- stages


def _mask(ctx: Context) -> list[str]:
    frames = _check_shapes(input_frames(ctx.target))
    out_dir = ctx.target.stage_dir("mask")
    tasks = [
        _task(ctx, "mask", name, {"data": path}, out_dir / f"{name}.weight.fits")
        for name, path in frames
    ]
    results = _execute(ctx, "mask", tasks)
    usable = [n for n, _ in frames if n not in _failures(results)]
    _need(ctx, "mask", len(usable), "after masking", results)
    return usable


def _mask_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("mask") / f"{name}.weight.fits"


def _psf_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("psf") / f"{name}.psf.fits"


def _mask_inputs(path: Path) -> dict[str, Path]:
    return {"data": path}


def _psf_inputs(ctx: Context, name: str, path: Path) -> dict[str, Path]:
    return {"data": path, "mask": _mask_path(ctx, name)}


def _masked_frames(ctx: Context) -> list[tuple[str, Path]]:
    """The frames of ``data/`` whose weight map was made from them as they are now."""
    out = []
    for name, path in input_frames(ctx.target):
        mask = _mask_path(ctx, name)
        if not mask.exists():
            log.warning("%s: no weight map (%s; run `oasis mask`); frame left out", name, mask)
        elif not _made_from(mask, _mask_inputs(path)):
            log.warning(
                "%s: its weight map %s was made from other data (run `oasis mask`); left out",
                name,
                mask,
            )
        else:
            out.append((name, path))
    return out


def _psf(ctx: Context) -> list[str]:
    frames = _masked_frames(ctx)
    tasks = [
        _task(ctx, "psf", name, _psf_inputs(ctx, name, path), _psf_path(ctx, name))
        for name, path in frames
    ]
    results = _execute(ctx, "psf", tasks)
    stats = _psf_table(ctx, [n for n, _ in frames if n not in _failures(results)])
    _archive_outliers(ctx, stats, dict(frames))
    usable = [str(n) for n, keep in zip(stats["frame"], stats["usable"], strict=True) if keep]
    _need(ctx, "psf", len(usable), "after the PSF selection", results)
    return usable


def _psf_table(ctx: Context, names: Sequence[str]) -> Any:
    from astropy.io import fits
    from astropy.table import Table

    rows = []
    for name in names:
        hdr = fits.getheader(_psf_path(ctx, name))
        rows.append(
            (
                name,
                float(hdr["FWHM"]),
                float(hdr.get("OASSNR", np.nan)),
                float(hdr.get("OASBKG", np.nan)),
                float(hdr.get("OASNOISE", np.nan)),
                int(hdr.get("NSTARS", 0)),
            )
        )
    table = Table(
        rows=rows or None,
        names=("frame", "fwhm", "snr", "background", "noise", "nstars"),
        dtype=(str, float, float, float, float, int),
    )
    settings = ctx.config.settings["psf"]
    reason = np.full(len(table), "", dtype="U60")
    if len(table):
        fwhm = np.asarray(table["fwhm"])
        med = float(np.median(fwhm))
        if settings.fwhm_max > 0:
            reason[fwhm > settings.fwhm_max] = f"FWHM above fwhm_max={settings.fwhm_max}"
        if settings.fwhm_max_ratio > 0:
            reason[fwhm > settings.fwhm_max_ratio * med] = (
                f"FWHM above {settings.fwhm_max_ratio} x median ({med:.2f})"
            )
        if settings.snr_min > 0:
            snr = np.asarray(table["snr"])
            reason[np.isfinite(snr) & (snr < settings.snr_min)] = (
                f"S/N below snr_min={settings.snr_min}"
            )
    table["archive_reason"] = reason
    table["usable"] = reason == ""
    io.write_table(table, ctx.target.stage_dir("psf") / "psf.ecsv")
    return table


def _archive_outliers(ctx: Context, table: Any, paths: Mapping[str, Path]) -> None:
    lines = []
    for row in table:
        if row["usable"]:
            continue
        src = paths[str(row["frame"])]
        dest = ctx.target.archive / src.name
        ctx.target.archive.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(src, dest)
            where = "moved to archive/"
        except OSError as err:  # a read-only data/: the frame stays, psf.ecsv leaves it out
            where = f"left in data/ ({err.strerror or err}) and left out"
        line = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {src.name}: {row['archive_reason']} "
            f"(FWHM {row['fwhm']:.2f} px, S/N {row['snr']:.1f}); {where}"
        )
        log.warning("%s", line)
        lines.append(line)
    if lines:
        logfile = ctx.target.archive / "log.txt"
        old = logfile.read_text() if logfile.exists() else ""
        io.write_text(logfile, old + "\n".join(lines) + "\n")


def _read_psf_stats(ctx: Context) -> Any:
    from astropy.table import Table

    path = ctx.target.stage_dir("psf") / "psf.ecsv"
    if not path.exists():
        raise InputError(f"{path}: missing; run `oasis psf` first")
    table = Table.read(path, format="ascii.ecsv")
    present = dict(input_frames(ctx.target))
    keep = []
    for f, usable in zip(table["frame"], table["usable"], strict=True):
        name = str(f)
        ok = bool(usable) and name in present
        if ok and not _made_from(_psf_path(ctx, name), _psf_inputs(ctx, name, present[name])):
            log.warning(
                "%s: its PSF was not measured from its current data and weight map (run "
                "`oasis psf`); frame left out",
                name,
            )
            ok = False
        keep.append(ok)
    return table[np.array(keep, bool)] if len(table) else table


def choose_reference(stats: Any, by: str) -> str:
    """The reference frame: highest S/N (``by="snr"``) or smallest FWHM (``"seeing"``)."""
    if by == "seeing":
        return str(stats["frame"][int(np.argmin(stats["fwhm"]))])
    snr = np.nan_to_num(np.asarray(stats["snr"], float), nan=-np.inf)
    return str(stats["frame"][int(np.argmax(snr))])


def _align(ctx: Context) -> list[str]:
    stats = _read_psf_stats(ctx)
    _need(ctx, "psf", len(stats), "with a PSF", {})
    reference = choose_reference(stats, ctx.config.settings["align"].reference)
    paths = dict(input_frames(ctx.target))
    out_dir = ctx.target.stage_dir("align")
    tasks = []
    for name in stats["frame"]:
        name = str(name)
        inputs = _align_inputs(ctx, name, reference, paths)
        tasks.append(_task(ctx, "align", name, inputs, out_dir / f"{name}.fits"))
    log.info("align: reference frame %s (by %s)", reference, ctx.config.settings["align"].reference)
    results = _execute(ctx, "align", tasks)
    io.write_text(out_dir / "reference.txt", reference + "\n")
    usable = [str(n) for n in stats["frame"] if str(n) not in _failures(results)]
    _need(ctx, "align", len(usable), "after alignment", results)
    return usable


def _align_inputs(
    ctx: Context, name: str, reference: str, paths: Mapping[str, Path]
) -> dict[str, Path]:
    return {
        "data": paths[name],
        "mask": _mask_path(ctx, name),
        "psf": _psf_path(ctx, name),
        "ref_data": paths[reference],
        "ref_mask": _mask_path(ctx, reference),
        "ref_psf": _psf_path(ctx, reference),
    }


def _aligned(ctx: Context) -> list[str]:
    """The frames whose aligned image was made from their current data, weight map and
    PSF and from those of the reference it records (``OASREF``)."""
    stats = _read_psf_stats(ctx)
    out_dir = ctx.target.stage_dir("align")
    paths = dict(input_frames(ctx.target))
    names, missing, stale = [], [], []
    for n in stats["frame"]:
        name = str(n)
        out = out_dir / f"{name}.fits"
        header = _header(out) if out.exists() else None
        if header is None:
            missing.append(name)
            continue
        reference = str(header.get("OASREF", ""))
        if reference not in paths or not _made_from(
            out, _align_inputs(ctx, name, reference, paths), header
        ):
            stale.append(name)
            continue
        names.append(name)
    if missing:
        log.warning("no aligned frame for %s (run `oasis align`); left out", ", ".join(missing))
    if stale:
        log.warning(
            "the aligned frames of %s were made from other inputs than the current ones (run "
            "`oasis align`); left out",
            ", ".join(stale),
        )
    return names


def template_frames(
    stats: Any, names: Sequence[str], fraction: float, min_frames: int
) -> list[str]:
    """The best-seeing ``fraction`` of ``names`` (at least ``min_frames`` when possible)."""
    table = stats[[str(f) in set(names) for f in stats["frame"]]]
    order = np.argsort(np.asarray(table["fwhm"], float), kind="stable")
    n = min(len(order), max(min_frames, math.ceil(fraction * len(order))))
    return [str(table["frame"][i]) for i in order[:n]]


def _template_path(ctx: Context) -> Path:
    return ctx.target.stage_dir("combine") / "template.fits"


def _template_current(ctx: Context, aligned: Sequence[str]) -> bool:
    """Was the template (and its PSF) made from aligned frames that are current now?"""
    template = _template_path(ctx)
    header = _header(template) if template.exists() else None
    if header is None or not template.with_name("template.psf.fits").exists():
        return False
    used = [str(header[k]) for k in header if k.startswith("OASTIN") and k[6:].isdigit()]
    align_dir = ctx.target.stage_dir("align")
    return (
        bool(used)
        and set(used) <= set(aligned)
        and _made_from(template, {n: align_dir / f"{n}.fits" for n in used}, header)
    )


def _combine(ctx: Context) -> Path:
    stats = _read_psf_stats(ctx)
    names = _aligned(ctx)
    _need(ctx, "align", len(names), "aligned", {})
    settings = ctx.config.settings["combine"]
    chosen = template_frames(stats, names, settings.fraction, settings.min_frames)
    out = _template_path(ctx)
    align_dir = ctx.target.stage_dir("align")
    inputs = {n: align_dir / f"{n}.fits" for n in chosen}
    configs = _user_files(ctx, ctx.backend("combine")) + _user_files(ctx, ctx.backend("psf"))
    prov = ctx.provenance("combine", {**inputs, **_named(configs)}, settings=settings)
    psf_out = out.with_name("template.psf.fits")
    if not ctx.force and is_current(out, prov) and psf_out.exists():
        ctx.reporter.result("combine: template up to date")
        return out
    try:
        return _make_template(ctx, inputs, chosen, prov)
    except Exception:  # the old template must not outlive a failed combine
        for path in _summaries(ctx, "combine"):
            _invalidate(path)
        _drop_after(ctx, "combine")
        raise


def _make_template(
    ctx: Context, inputs: Mapping[str, Path], chosen: Sequence[str], prov: Provenance
) -> Path:
    out = _template_path(ctx)
    psf_out = out.with_name("template.psf.fits")
    backend = ctx.backend("combine")
    frames = [_ro(_load_output(p, _psf_path(ctx, n))) for n, p in inputs.items()]
    psf_backend = ctx.backend("psf")
    workdir = _workdir(ctx, "combine", "template")
    _prepare_workdir(workdir, _user_files(ctx, backend) + _user_files(ctx, psf_backend))
    start = time.perf_counter()
    with ctx.reporter.progress("combine", 2) as advance:
        template = backend.combine(
            frames, options=ctx.config.backend_options("combine"), workdir=workdir
        )
        advance()
        if not isinstance(template, Template):
            raise StageError(
                f"combine backend {backend.name!r} returned {type(template)}, not a Template"
            )
        template = attrs.evolve(template, inputs=tuple(chosen), name="template")
        # measure the template's PSF with the psf stage's backend
        measured = psf_backend.psf(
            _ro(template), options=ctx.config.backend_options("psf"), workdir=workdir
        )
        template = attrs.evolve(
            template,
            psf=measured.psf,
            fwhm=measured.fwhm,
            snr=measured.snr,
            background=measured.background,
            noise=measured.noise,
        )
        advance()
    psf_cards: dict[str, Any] = {"OASSTAGE": "combine"}
    _keep_psf_files(template.psf, out.parent, "template", psf_cards)
    shutil.rmtree(workdir, ignore_errors=True)
    cards = prov.header_cards()
    cards["NCOMBINE"] = (len(chosen), "frames stacked")
    for i, name in enumerate(chosen):
        cards[f"OASTIN{i}"] = name
    io.write_psf(psf_out, template.psf, header_extra=psf_cards)
    io.write_frame(out, template, header_extra=cards)
    line = (
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} template from {len(chosen)} frames "
        f"({', '.join(chosen)}) by {backend.name}; FWHM {template.fwhm:.2f} px; "
        f"{time.perf_counter() - start:.1f} s"
    )
    logfile = out.parent / "log.txt"
    old = logfile.read_text() if logfile.exists() else ""
    io.write_text(logfile, old + line + "\n")
    ctx.reporter.result(f"combine: {line}")
    return out


def _residual_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("subtract") / f"{name}_residual.fits"


def _subtract_inputs(ctx: Context, name: str) -> dict[str, Path]:
    template = _template_path(ctx)
    return {
        "science": ctx.target.stage_dir("align") / f"{name}.fits",
        "template": template,
        "psf": _psf_path(ctx, name),
        "template_psf": template.with_name("template.psf.fits"),
    }


def _subtract(ctx: Context) -> list[str]:
    names = _aligned(ctx)
    template = _template_path(ctx)
    if not template.exists():
        raise _stopped(ctx, "subtract", InputError(f"{template}: missing; run `oasis combine`"))
    if not _template_current(ctx, names):
        raise _stopped(
            ctx,
            "subtract",
            InputError(
                f"{template}: made from aligned frames that changed or are no longer usable; "
                "run `oasis combine`"
            ),
        )
    settings = ctx.config.settings["subtract"]
    tasks = [
        _task(
            ctx,
            "subtract",
            name,
            _subtract_inputs(ctx, name),
            _residual_path(ctx, name),
            settings=settings,
        )
        for name in names
    ]
    results = _execute(ctx, "subtract", tasks)
    log_path = _write_subtract_log(ctx, names, results)
    usable = [n for n in names if n not in _failures(results)]
    if names and not usable:
        raise _stopped(
            ctx,
            "subtract",
            StageError(
                f"subtract: no frame could be subtracted ({_first_failure(results)}); see "
                f"{log_path}"
            ),
        )
    return usable


def _write_subtract_log(
    ctx: Context, names: Sequence[str], results: Mapping[str, Any] | None = None
) -> Path:
    """``residuals/log.txt``: per frame the backend, Q, the configuration chosen by the
    optimisation (choice / tries and the backend's description), run time, the choices
    the backends made (``OAS CHOICE_*``: kernel, PSF, alignment...) and flag; a
    frame whose subtraction failed in this run is listed as ``failed: <reason>``."""
    from astropy.io import fits

    head = (
        f"# {'frame':<24} {'backend':<10} {'Q':>6} {'choice':>6} {'seconds':>8} "
        f"{'good':>5}  configuration | choices | flag"
    )
    lines = [head]
    results = results or {}
    chosen = ctx.config.backend("subtract")
    for name in names:
        path = _residual_path(ctx, name)
        outcome = results.get(name)
        if isinstance(outcome, BaseException):
            reason = _reason(outcome)  # the row names the frame: not its message again
            reason = reason.removeprefix(f"{name}: ")
            lines.append(
                f"  {name:<24} {chosen:<10} {'-':>6} {'-':>6} {'-':>8} {'-':>5}  "
                f"failed: {reason}"
            )
            continue
        if not path.exists():
            lines.append(
                f"  {name:<24} {'-':<10} {'-':>6} {'-':>6} {'-':>8} {'-':>5}  not subtracted"
            )
            continue
        hdr = fits.getheader(path)
        choice = f"{hdr.get('OAS CHOICE', 1)}/{hdr.get('OAS TRIES', 1)}"
        backend = f"auto:{hdr['OASAUTO']}" if "OASAUTO" in hdr else hdr.get("OASBACK", "?")
        lines.append(
            f"  {name:<24} {backend:<10} "
            f"{float(hdr.get('OASQ', 'nan')):6.3f} {choice:>6} "
            f"{float(hdr.get('OAS SECONDS', np.nan)):8.2f} "
            f"{float(hdr.get('OAS GOOD_FRACTION', np.nan)):5.2f}  "
            f"{hdr.get('OAS CONFIG', '')} | {_header_choices(hdr) or '-'} | "
            f"{hdr.get('OAS FLAG', '')}"
        )
    log_path = ctx.target.stage_dir("subtract") / "log.txt"
    io.write_text(log_path, "\n".join(lines) + "\n")
    return log_path


def _header_choices(header: Any) -> str:
    """The choices recorded in a residual's header (``OAS CHOICE_*`` cards) as the log
    shows them, ``kernel=delta, align=wcs``; the backend 'auto' chose is in the backend
    column already."""
    from oasis_core.subtraction import CHOICE_PREFIX, choice_text

    prefix = "OAS " + CHOICE_PREFIX.upper()
    meta = {
        CHOICE_PREFIX + str(k)[len(prefix) :].lower(): header[k]
        for k in header
        if str(k).startswith(prefix) and str(k) != prefix + "BACKEND"
    }
    return choice_text(meta)


def residual_verdict(header: Any) -> bool:
    """A residual's own recorded verdict: usable (its Q reached the ``q_floor`` of the run
    that made it), from its ``OAS USABLE`` card; a residual written before that card
    existed is judged by its weights (a residual below the floor has none left)."""
    if "OAS USABLE" in header:
        return bool(header["OAS USABLE"])
    try:
        return float(header.get("OAS GOOD_FRACTION", 1.0)) > 0
    except (TypeError, ValueError):
        return False


def _residuals(ctx: Context) -> tuple[list[str], list[str]]:
    """(usable residual names, names that could not be subtracted or are flagged out).

    A residual is usable when it was made from the current aligned frame, template and
    PSFs and its own recorded verdict says so (:func:`residual_verdict`); the ``q_floor``
    of the current command plays no part."""
    good, bad, stale = [], [], []
    for name in _aligned(ctx):
        path = _residual_path(ctx, name)
        header = _header(path) if path.exists() else None
        if header is None:
            bad.append(name)
        elif not _made_from(path, _subtract_inputs(ctx, name), header):
            stale.append(name)
            bad.append(name)
        elif residual_verdict(header):
            good.append(name)
        else:
            bad.append(name)
    if stale:
        log.warning(
            "the residuals of %s were made from another template or aligned frame than the "
            "current ones (run `oasis subtract`); left out",
            ", ".join(stale),
        )
    return good, bad


def _mr_path(ctx: Context) -> Path:
    return ctx.target.stage_dir("mr") / "MR.fits"


def _no_residual(ctx: Context, bad: Sequence[str]) -> InputError:
    return InputError(
        f"{ctx.target.path}: no usable residual ({len(bad)} frame(s) not subtracted or "
        "below the Q floor; see residuals/log.txt); run `oasis subtract` first"
    )


def _mr(ctx: Context) -> Path:
    good, bad = _residuals(ctx)
    if not good:
        _invalidate(_mr_path(ctx))
        raise _stopped(ctx, "mr", _no_residual(ctx, bad))
    inputs = {n: _residual_path(ctx, n) for n in good}
    prov = ctx.provenance("mr", {**inputs, **_named(_user_files(ctx, ctx.backend("mr")))})
    out = _mr_path(ctx)
    if not ctx.force and is_current(out, prov):
        ctx.reporter.result("mr: master residual up to date")
        return out
    try:
        return _make_master(ctx, inputs, prov, bad)
    except Exception:  # the old master residual must not outlive a failed mr
        _invalidate(out)
        _drop_after(ctx, "mr")
        raise


def _make_master(
    ctx: Context, inputs: Mapping[str, Path], prov: Provenance, bad: Sequence[str]
) -> Path:
    out = _mr_path(ctx)
    good = list(inputs)
    backend = ctx.backend("mr")
    residuals = [_ro(io.read_residual(p)) for p in inputs.values()]
    workdir = _workdir(ctx, "mr", "MR")
    _prepare_workdir(workdir, _user_files(ctx, backend))
    with ctx.reporter.progress("mr", 1) as advance:
        master = backend.master(
            residuals, options=ctx.config.backend_options("mr"), workdir=workdir
        )
        advance()
    shutil.rmtree(workdir, ignore_errors=True)
    header = residuals[0].header.copy()
    for key in io.TIME_KEYS:  # the master residual has no single time of observation
        header.remove(key, ignore_missing=True, remove_all=True)
    # the backend's unit: '' (dimensionless) for residuals combined in sigma units
    unit = str(master.header["BUNIT"]) if "BUNIT" in master.header else ""
    header["BUNIT"] = (unit, "dimensionless: sigma units" if unit == "" else "image unit")
    master = attrs.evolve(
        master, header=header, name="MR", science="MR", template=residuals[0].template
    )
    cards = prov.header_cards()
    cards["NCOMBINE"] = (len(good), "residuals combined")
    io.write_residual(out, master, header_extra=cards)
    ctx.reporter.result(
        f"mr: master residual of {len(good)} residuals"
        + (f" ({len(bad)} left out: {', '.join(bad)})" if bad else "")
    )
    return out


def _extract(ctx: Context) -> dict[str, Any]:
    from astropy.table import Table, vstack

    from oasis_core.sources import match_catalogs

    settings = ctx.config.settings["extract"]
    good, bad = _residuals(ctx)
    if not good:
        raise _stopped(ctx, "mr", _no_residual(ctx, bad))
    method = settings.method
    units: list[tuple[str, Path]] = []
    if method in ("both", "indiv"):
        units += [(n, _residual_path(ctx, n)) for n in good]
    if method in ("both", "MR"):
        mr_path = _mr_path(ctx)
        if not mr_path.exists():
            raise _stopped(ctx, "mr", InputError(f"{mr_path}: missing; run `oasis mr` first"))
        header = _header(mr_path)
        if (
            header is None
            or int(header.get("NCOMBINE", -1)) != len(good)
            or not _made_from(mr_path, {n: _residual_path(ctx, n) for n in good}, header)
        ):
            raise _stopped(
                ctx,
                "mr",
                InputError(
                    f"{mr_path}: not made from the {len(good)} usable residuals as they are "
                    "now; run `oasis mr`"
                ),
            )
        units.append(("MR", mr_path))
    if not units:
        raise _stopped(
            ctx,
            "mr",
            InputError(f"{ctx.target.path}: nothing to extract from; run `oasis subtract`"),
        )
    out_dir = ctx.target.stage_dir("extract")
    det_dir = out_dir / "detections"
    template_psf = _template_path(ctx).with_name("template.psf.fits")
    tasks = []
    for n, p in units:
        inputs = {"residual": p}
        psf = template_psf if n == "MR" else _psf_path(ctx, n)
        if psf.exists():  # the PSF of the residual's sources, for backends that use it
            inputs["psf"] = psf
        tasks.append(_task(ctx, "extract", n, inputs, det_dir / f"{n}.ecsv"))
    results = _execute(ctx, "extract", tasks)
    failed = _failures(results)
    if len(failed) == len(units):
        raise _stopped(
            ctx,
            "mr",
            StageError(f"extract: nothing could be extracted ({_first_failure(results)})"),
        )
    tables = {
        n: Table.read(det_dir / f"{n}.ecsv", format="ascii.ecsv")
        for n, _ in units
        if n not in failed
    }
    indiv_names = [n for n in tables if n != "MR"]
    positives = [t[np.asarray(t["sign"]) > 0] for n, t in tables.items() if n != "MR"]
    wcs = _template_wcs(ctx)
    common: dict[str, Any] = {
        "settings": settings,
        "catalogs": positives,
        "n_residuals": len(indiv_names),
        "wcs": wcs,
    }
    prov = {
        k: str(v[0] if isinstance(v, tuple) else v)
        for k, v in ctx.provenance("extract", dict(units), settings=settings).cards().items()
    }
    indiv = [filter_sources(tables[name], frame=name, **common) for name in indiv_names]
    if len({str(t["flux"].unit) for t in indiv}) > 1:  # frames in different units
        for t in indiv:
            for c in ("flux", "flux_err", "peak"):
                if c in t.colnames:
                    t[c].unit = None
    sources = vstack(indiv) if indiv else None
    summary: dict[str, Any] = {
        "frames": len(indiv_names),
        "not_subtracted": bad,
        "not_extracted": failed,
    }
    written = []
    if sources is not None:
        filtered = sources[sources["reason"] == "kept"]
        written += _write_catalog(out_dir, "sources", sources, prov)
        written += _write_catalog(out_dir, "filtered_sources", filtered, prov)
        summary.update(found=len(sources), filtered=len(filtered))
    if "MR" in tables:
        mr_t = filter_sources(tables["MR"], **common)
        mr_f = mr_t[mr_t["reason"] == "kept"]
        written += _write_catalog(out_dir, "MR_sources", mr_t, prov)
        written += _write_catalog(out_dir, "MR_filtered_sources", mr_f, prov)
        summary.update(mr_found=len(mr_t), mr_filtered=len(mr_f))
        if sources is not None:
            kept = sources[sources["reason"] == "kept"]
            confirmed = mr_f[match_catalogs(mr_f, kept, settings.match_radius) >= 0]
            summary["confirmed"] = len(confirmed)
    qs = []
    from astropy.io import fits

    for name in good:
        qs.append(float(fits.getheader(_residual_path(ctx, name)).get("OASQ", np.nan)))
    summary["mean_q"] = float(np.nanmean(qs)) if qs else float("nan")
    _write_totals(out_dir, summary, method)
    ctx.reporter.result(
        "extract: "
        + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.items()
            if k not in ("not_subtracted", "not_extracted")
        )
    )
    return summary


def _cleaned(table: Any) -> Any:
    table.meta.clear()
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".3f"
    return table


def _template_wcs(ctx: Context) -> Any:
    from astropy.io import fits

    path = _template_path(ctx)
    return io.header_wcs(fits.getheader(path)) if path.exists() else None


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


def _write_catalog(
    out_dir: Path, stem: str, table: Any, provenance: Mapping[str, str]
) -> list[Path]:
    txt, ecsv = out_dir / f"{stem}.txt", out_dir / f"{stem}.ecsv"
    io.write_table(table, txt)
    table.meta.update(provenance)
    io.write_table(table, ecsv)
    return [txt, ecsv]


def _write_totals(out_dir: Path, summary: Mapping[str, Any], method: str) -> None:
    bad = summary.get("not_subtracted", [])
    lines = [
        f"extraction method: {method}",
        f"residuals searched: {summary.get('frames', 0)}",
        f"sources found in residuals: {summary.get('found', 0)}",
        f"sources after filtering: {summary.get('filtered', 0)}",
        f"sources found in the master residual: {summary.get('mr_found', 0)}",
        f"master-residual sources after filtering: {summary.get('mr_filtered', 0)}",
        f"confirmed (master residual and a residual): {summary.get('confirmed', 0)}",
        f"frames that could not be subtracted: {len(bad)}"
        + (f" ({', '.join(bad)})" if bad else ""),
        f"mean Q: {summary.get('mean_q', float('nan')):.3f}",
    ]
    failed = summary.get("not_extracted", [])
    if failed:
        lines.append(f"residuals whose extraction failed: {len(failed)} ({', '.join(failed)})")
    io.write_text(out_dir / "total_sources.txt", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- public API


#: Stage -> its runner, ``f(ctx)``: a view of :mod:`oasis_core.stages`.
_RUNNERS: Mapping[str, Callable[[Context], Any]] = StageTable(lambda stage: stage.run)

#: For a third-party stage's runner: the task running the stage's chosen backend on one
#: unit, and the execution of tasks (skipping those whose output is current).
stage_task = _task
execute = _execute


def run_stages(ctx: Context, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run ``stages`` in pipeline order on a prepared context; return each stage's result.

    The run holds the target's lock throughout (:func:`oasis_core.lock.target_lock`).

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
        ``result["extract"]`` is the summary of the detections (counts, mean Q).
    """
    ctx = make_context(path, **kwargs)
    with closing_executor(ctx, owned=kwargs.get("executor") is None):
        return run_stages(ctx)


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


class _CallablePipelineModule(types.ModuleType):
    """Lets ``oasis_core.pipeline(path, **options)`` run the pipeline (OasisPy's habit)
    while ``oasis_core.pipeline`` stays this module."""

    def __call__(self, path: str | Path, **kwargs: Any) -> dict[str, Any]:
        return pipeline(path, **kwargs)


sys.modules[__name__].__class__ = _CallablePipelineModule
