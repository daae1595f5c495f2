"""The pipeline: stages in order, per-frame work through the executor, resume on rerun.

Each stage is a function of a target path (``mask(path)``, ``psf(path)``, ...,
``pipeline(path)`` runs them all). A stage turns its per-frame work into :class:`Task`
objects run by a :mod:`~oasis_core.executor`; a task reads its inputs, calls the backend
and writes its output atomically with a provenance header. A task whose output is already
there with the same provenance is skipped, so an interrupted run resumes; ``force=True``
redoes everything.

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
from oasis_core.model import Frame, PsfModel, Residual, Template, readonly
from oasis_core.plugins import Registry
from oasis_core.provenance import Provenance, is_current, options_dict
from oasis_core.tree import Target, find_target

__all__ = [
    "Context",
    "NullReporter",
    "Reporter",
    "align",
    "combine",
    "extract",
    "make_context",
    "mask",
    "mr",
    "pipeline",
    "psf",
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

    def backend(self, stage: str) -> Any:
        name = self.config.backend(stage)
        if stage == "subtract" and name == "auto":
            from oasis_core.subtraction import auto_subtract

            return auto_subtract(self.registry, self.config)
        self.registry.get(stage, name)  # an unknown name lists the installed ones
        return self.registry.select(stage, name, self.config.backend_options(stage, name))

    def provenance(
        self, stage: str, inputs: Mapping[str, Path], settings: Any = None
    ) -> Provenance:
        name = self.config.backend(stage)
        if stage == "subtract" and name == "auto":
            from oasis_core import __version__

            return Provenance(
                stage=stage,
                backend="auto",
                plugin=f"oasis-dia=={__version__}",
                inputs=dict(inputs),
                options=self.backend(stage).options,
                settings=settings,
            )
        record = self.registry.get(stage, name)
        return Provenance(
            stage=stage,
            backend=name,
            plugin=f"{record.dist}=={record.version}",
            inputs=dict(inputs),
            options=self.config.backend_options(stage, name),
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
        summary = _STAGE_TASKS[task.stage](task)
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
    from oasis_core.subtraction import auto_cards, residual_cards, run_auto, run_subtraction

    science = _ro(_load_output(task.inputs["science"], task.inputs.get("psf")))
    template = _ro(
        _load_output(task.inputs["template"], task.inputs.get("template_psf"), cls=Template)
    )
    if _is_auto(task.backend):
        residual = run_auto(
            task.backend,
            science,
            template,
            workdir=task.workdir,
            settings=task.extra,
            ceiling=float(task.extra.get("auto_ceiling", 1.0)),
        )
    else:
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
    (``sign``, ``peak_norm``, ``lobe_min``, ``masked_frac``, ``fwhm``)."""
    from oasis_core.sources import add_lobe_columns

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
    return table


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


_STAGE_TASKS: dict[str, Callable[[Task], dict[str, Any]]] = {
    "mask": _task_mask,
    "psf": _task_psf,
    "align": _task_align,
    "subtract": _task_subtract,
    "extract": _task_extract,
}


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
        for outcome in ctx.executor.run(_run_task, [(t.name, t) for t in todo]):
            advance()
            if outcome.ok:
                results[outcome.key] = outcome.value
            else:
                err = outcome.error
                results[outcome.key] = err
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


def _output_current(task: Task) -> bool:
    if task.output.suffix == ".ecsv":
        if not task.output.exists():
            return False
        from astropy.table import Table

        try:
            meta = Table.read(task.output, format="ascii.ecsv").meta
        except (OSError, ValueError):
            return False
        expected = {
            k: str(v[0] if isinstance(v, tuple) else v) for k, v in task.provenance.cards().items()
        }
        return all(meta.get(k) == v for k, v in expected.items())
    return is_current(task.output, task.provenance)


def _failures(results: Mapping[str, Any]) -> list[str]:
    return sorted(k for k, v in results.items() if isinstance(v, BaseException))


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


def _need(ctx: Context, n: int, what: str) -> None:
    need = ctx.config.run.min_frames
    if n < need:
        raise InputError(
            f"{ctx.target.path}: only {n} usable frame(s) {what}; at least {need} are needed "
            "([run] min_frames)"
        )


def _workdir(ctx: Context, stage: str, name: str) -> Path:
    return ctx.target.work / stage / name


def _is_auto(backend: Any) -> bool:
    from oasis_core.subtraction import AutoSubtract

    return isinstance(backend, AutoSubtract)


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
        options=None if _is_auto(backend) else ctx.config.backend_options(stage),
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
    _need(ctx, len(usable), "after masking")
    return usable


def _mask_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("mask") / f"{name}.weight.fits"


def _psf_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("psf") / f"{name}.psf.fits"


def _frames_with(
    ctx: Context, stage_paths: Callable[[str], list[Path]], what: str
) -> list[tuple[str, Path]]:
    out = []
    for name, path in input_frames(ctx.target):
        missing = [p for p in stage_paths(name) if not p.exists()]
        if missing:
            log.warning("%s: no %s (%s); frame left out", name, what, missing[0])
            continue
        out.append((name, path))
    return out


def _psf(ctx: Context) -> list[str]:
    frames = _frames_with(ctx, lambda n: [_mask_path(ctx, n)], "weight map: run `oasis mask`")
    tasks = []
    for name, path in frames:
        inputs = {"data": path, "mask": _mask_path(ctx, name)}
        tasks.append(_task(ctx, "psf", name, inputs, _psf_path(ctx, name)))
    results = _execute(ctx, "psf", tasks)
    stats = _psf_table(ctx, [n for n, _ in frames if n not in _failures(results)])
    _archive_outliers(ctx, stats, dict(frames))
    usable = [str(n) for n, keep in zip(stats["frame"], stats["usable"], strict=True) if keep]
    _need(ctx, len(usable), "after the PSF selection")
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
        shutil.move(src, dest)
        line = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {src.name}: {row['archive_reason']} "
            f"(FWHM {row['fwhm']:.2f} px, S/N {row['snr']:.1f}); moved to archive/"
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
    present = {n for n, _ in input_frames(ctx.target)}
    keep = np.array(
        [
            bool(u) and str(f) in present
            for f, u in zip(table["frame"], table["usable"], strict=True)
        ],
        bool,
    )
    return table[keep] if len(table) else table


def choose_reference(stats: Any, by: str) -> str:
    """The reference frame: highest S/N (``by="snr"``) or smallest FWHM (``"seeing"``)."""
    if by == "seeing":
        return str(stats["frame"][int(np.argmin(stats["fwhm"]))])
    snr = np.nan_to_num(np.asarray(stats["snr"], float), nan=-np.inf)
    return str(stats["frame"][int(np.argmax(snr))])


def _align(ctx: Context) -> list[str]:
    stats = _read_psf_stats(ctx)
    _need(ctx, len(stats), "with a PSF")
    reference = choose_reference(stats, ctx.config.settings["align"].reference)
    paths = dict(input_frames(ctx.target))
    out_dir = ctx.target.stage_dir("align")
    ref_inputs = {
        "ref_data": paths[reference],
        "ref_mask": _mask_path(ctx, reference),
        "ref_psf": _psf_path(ctx, reference),
    }
    tasks = []
    for name in stats["frame"]:
        name = str(name)
        inputs = {
            "data": paths[name],
            "mask": _mask_path(ctx, name),
            "psf": _psf_path(ctx, name),
            **ref_inputs,
        }
        tasks.append(_task(ctx, "align", name, inputs, out_dir / f"{name}.fits"))
    log.info("align: reference frame %s (by %s)", reference, ctx.config.settings["align"].reference)
    results = _execute(ctx, "align", tasks)
    io.write_text(out_dir / "reference.txt", reference + "\n")
    usable = [str(n) for n in stats["frame"] if str(n) not in _failures(results)]
    _need(ctx, len(usable), "after alignment")
    return usable


def _aligned(ctx: Context) -> list[str]:
    stats = _read_psf_stats(ctx)
    out_dir = ctx.target.stage_dir("align")
    names = [str(n) for n in stats["frame"] if (out_dir / f"{n}.fits").exists()]
    missing = [str(n) for n in stats["frame"] if str(n) not in names]
    if missing:
        log.warning("no aligned frame for %s (run `oasis align`); left out", ", ".join(missing))
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


def _combine(ctx: Context) -> Path:
    stats = _read_psf_stats(ctx)
    names = _aligned(ctx)
    _need(ctx, len(names), "aligned")
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


def _subtract(ctx: Context) -> list[str]:
    names = _aligned(ctx)
    template = _template_path(ctx)
    if not template.exists():
        raise InputError(f"{template}: missing; run `oasis combine` first")
    settings = ctx.config.settings["subtract"]
    align_dir = ctx.target.stage_dir("align")
    tasks = []
    for name in names:
        inputs = {
            "science": align_dir / f"{name}.fits",
            "template": template,
            "psf": _psf_path(ctx, name),
            "template_psf": template.with_name("template.psf.fits"),
        }
        tasks.append(
            _task(ctx, "subtract", name, inputs, _residual_path(ctx, name), settings=settings)
        )
    results = _execute(ctx, "subtract", tasks)
    _write_subtract_log(ctx, names)
    return [n for n in names if n not in _failures(results)]


def _write_subtract_log(ctx: Context, names: Sequence[str]) -> None:
    """``residuals/log.txt``: per frame the backend, Q, the configuration chosen by the
    optimisation (choice / tries and the backend's description), run time and flag."""
    from astropy.io import fits

    head = (
        f"# {'frame':<24} {'backend':<10} {'Q':>6} {'choice':>6} {'seconds':>8} "
        f"{'good':>5}  configuration | flag"
    )
    lines = [head]
    for name in names:
        path = _residual_path(ctx, name)
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
            f"{hdr.get('OAS CONFIG', '')} | {hdr.get('OAS FLAG', '')}"
        )
    io.write_text(ctx.target.stage_dir("subtract") / "log.txt", "\n".join(lines) + "\n")


def _residuals(ctx: Context) -> tuple[list[str], list[str]]:
    """(usable residual names, names that could not be subtracted or are flagged out)."""
    from astropy.io import fits

    good, bad = [], []
    for name in _aligned(ctx):
        path = _residual_path(ctx, name)
        if not path.exists():
            bad.append(name)
            continue
        hdr = fits.getheader(path)
        q = float(hdr.get("OASQ", "nan"))
        floor = ctx.config.settings["subtract"].q_floor
        if not np.isfinite(q) or q < floor:
            bad.append(name)
        else:
            good.append(name)
    return good, bad


def _mr_path(ctx: Context) -> Path:
    return ctx.target.stage_dir("mr") / "MR.fits"


def _mr(ctx: Context) -> Path:
    good, bad = _residuals(ctx)
    if not good:
        raise InputError(f"{ctx.target.path}: no usable residual; run `oasis subtract` first")
    inputs = {n: _residual_path(ctx, n) for n in good}
    prov = ctx.provenance("mr", {**inputs, **_named(_user_files(ctx, ctx.backend("mr")))})
    out = _mr_path(ctx)
    if not ctx.force and is_current(out, prov):
        ctx.reporter.result("mr: master residual up to date")
        return out
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

    from oasis_core.sources import filter_detections, filter_options, match_catalogs

    settings = ctx.config.settings["extract"]
    good, bad = _residuals(ctx)
    method = settings.method
    units: list[tuple[str, Path]] = []
    if method in ("both", "indiv"):
        units += [(n, _residual_path(ctx, n)) for n in good]
    if method in ("both", "MR"):
        if not _mr_path(ctx).exists():
            raise InputError(f"{_mr_path(ctx)}: missing; run `oasis mr` first")
        units.append(("MR", _mr_path(ctx)))
    if not units:
        raise InputError(f"{ctx.target.path}: nothing to extract from; run `oasis subtract`")
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
    tables = {
        n: Table.read(det_dir / f"{n}.ecsv", format="ascii.ecsv")
        for n, _ in units
        if n not in failed
    }
    indiv_names = [n for n in tables if n != "MR"]
    positives = [t[np.asarray(t["sign"]) > 0] for n, t in tables.items() if n != "MR"]
    common: dict[str, Any] = {
        "catalogs": positives,
        "n_residuals": len(indiv_names),
        **filter_options(settings),
    }
    wcs = _template_wcs(ctx)
    prov = {
        k: str(v[0] if isinstance(v, tuple) else v)
        for k, v in ctx.provenance("extract", dict(units), settings=settings).cards().items()
    }
    indiv = []
    for name in indiv_names:
        t = filter_detections(tables[name], **common)
        t.add_column(name, name="frame", index=0)
        indiv.append(_cleaned(t))
    sources = vstack(indiv) if indiv else None
    summary: dict[str, Any] = {"frames": len(indiv_names), "not_subtracted": bad}
    written = []
    if sources is not None:
        _add_radec(sources, wcs)
        filtered = sources[sources["reason"] == "kept"]
        written += _write_catalog(out_dir, "sources", sources, prov)
        written += _write_catalog(out_dir, "filtered_sources", filtered, prov)
        summary.update(found=len(sources), filtered=len(filtered))
    if "MR" in tables:
        mr_t = _cleaned(filter_detections(tables["MR"], **common))
        _add_radec(mr_t, wcs)
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
        "extract: " + ", ".join(f"{k} {v}" for k, v in summary.items() if k != "not_subtracted")
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
    if wcs is None or len(table) == 0:
        return
    ra, dec = wcs.all_pix2world(np.asarray(table["x"], float), np.asarray(table["y"], float), 0)
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
    io.write_text(out_dir / "total_sources.txt", "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- public API


_RUNNERS: dict[str, Callable[[Context], Any]] = {
    "mask": _mask,
    "psf": _psf,
    "align": _align,
    "combine": _combine,
    "subtract": _subtract,
    "mr": _mr,
    "extract": _extract,
}


def run_stages(ctx: Context, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Run ``stages`` in pipeline order on a prepared context; return each stage's result."""
    ctx.target.create()
    _remove_partial_files(ctx.target)
    _save_config(ctx)
    # resolve every backend first: a bad name or a missing program fails before any work
    for stage in stages:
        ctx.backend(stage)
    if "combine" in stages:
        ctx.backend("psf")
    return {stage: _RUNNERS[stage](ctx) for stage in STAGES if stage in stages}


def _remove_partial_files(target: Target) -> None:
    """Delete temporary files a killed run left behind (never a finished output)."""
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
