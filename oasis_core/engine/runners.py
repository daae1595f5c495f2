"""The runners of the built-in stages: each a function of the run's
:class:`~oasis_core.engine.Context` that gathers the stage's inputs, runs its
tasks through :func:`~oasis_core.engine.tasks.execute` (or its one backend call, for the
template and the master residual) and writes the stage's summaries.

What is used downstream is only what is current:

* a unit of work that fails (its backend raised) loses its previous output, which is
  removed at once, so no later stage can take the previous run's file for this run's;
  the failure is logged (``residuals/log.txt`` says ``failed: <reason>`` for a frame)
  and counted (``sources/total_sources.txt``);
* a stage reads an upstream output only when it was made from its inputs as they are now
  (:func:`~oasis_core.engine.outputs.made_from`);
* a residual is used by ``mr`` and ``extract`` according to its own recorded verdict
  (``OAS USABLE``: its Q against the ``q_floor`` of the run that made it);
* a stage that ends with nothing usable (every subtraction failed, fewer frames than
  ``[run] min_frames``...) stops the run with an error, and the summaries of the later
  stages (template, master residual, catalogs) are removed rather than left describing an
  earlier run.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from oasis_core.contracts.errors import InputError, StageError
from oasis_core.contracts.model import Template
from oasis_core.engine import io, outputs, tasks, variability
from oasis_core.engine.provenance import Provenance, is_current

if TYPE_CHECKING:
    from oasis_core.engine.context import Context

__all__ = [
    "align",
    "choose_reference",
    "combine",
    "extract",
    "mask",
    "mr",
    "psf",
    "subtract",
    "template_frames",
    "write_subtract_log",
]

log = logging.getLogger("oasis")


def mask(ctx: Context) -> list[str]:
    frames = _check_shapes(outputs.input_frames(ctx.target))
    out_dir = ctx.target.stage_dir("mask")
    units = [
        tasks.stage_task(ctx, "mask", name, {"data": path}, out_dir / f"{name}.weight.fits")
        for name, path in frames
    ]
    results = tasks.execute(ctx, "mask", units)
    usable = [n for n, _ in frames if n not in tasks.failures(results)]
    _need(ctx, "mask", len(usable), "after masking", results)
    return usable


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


def psf(ctx: Context) -> list[str]:
    frames = outputs.masked_frames(ctx)
    units = [
        tasks.stage_task(
            ctx, "psf", name, outputs.psf_inputs(ctx, name, path), outputs.psf_path(ctx, name)
        )
        for name, path in frames
    ]
    results = tasks.execute(ctx, "psf", units)
    stats = _psf_table(ctx, [n for n, _ in frames if n not in tasks.failures(results)])
    _archive_outliers(ctx, stats, dict(frames))
    usable = [str(n) for n, keep in zip(stats["frame"], stats["usable"], strict=True) if keep]
    _need(ctx, "psf", len(usable), "after the PSF selection", results)
    return usable


def _psf_table(ctx: Context, names: Sequence[str]) -> Any:
    from astropy.io import fits
    from astropy.table import Table

    rows = []
    for name in names:
        hdr = fits.getheader(outputs.psf_path(ctx, name))
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


def choose_reference(stats: Any, by: str) -> str:
    """The reference frame: highest S/N (``by="snr"``) or smallest FWHM (``"seeing"``)."""
    if by == "seeing":
        return str(stats["frame"][int(np.argmin(stats["fwhm"]))])
    snr = np.nan_to_num(np.asarray(stats["snr"], float), nan=-np.inf)
    return str(stats["frame"][int(np.argmax(snr))])


def align(ctx: Context) -> list[str]:
    stats = outputs.read_psf_stats(ctx)
    _need(ctx, "psf", len(stats), "with a PSF", {})
    reference = choose_reference(stats, ctx.config.settings["align"].reference)
    paths = dict(outputs.input_frames(ctx.target))
    out_dir = ctx.target.stage_dir("align")
    units = []
    for name in stats["frame"]:
        name = str(name)
        inputs = outputs.align_inputs(ctx, name, reference, paths)
        units.append(tasks.stage_task(ctx, "align", name, inputs, out_dir / f"{name}.fits"))
    log.info("align: reference frame %s (by %s)", reference, ctx.config.settings["align"].reference)
    results = tasks.execute(ctx, "align", units)
    io.write_text(out_dir / "reference.txt", reference + "\n")
    usable = [str(n) for n in stats["frame"] if str(n) not in tasks.failures(results)]
    _need(ctx, "align", len(usable), "after alignment", results)
    return usable


def template_frames(
    stats: Any, names: Sequence[str], fraction: float, min_frames: int
) -> list[str]:
    """The best-seeing ``fraction`` of ``names`` (at least ``min_frames`` when possible)."""
    table = stats[[str(f) in set(names) for f in stats["frame"]]]
    order = np.argsort(np.asarray(table["fwhm"], float), kind="stable")
    n = min(len(order), max(min_frames, math.ceil(fraction * len(order))))
    return [str(table["frame"][i]) for i in order[:n]]


def combine(ctx: Context) -> Path:
    stats = outputs.read_psf_stats(ctx)
    names = outputs.aligned_frames(ctx)
    _need(ctx, "align", len(names), "aligned", {})
    settings = ctx.config.settings["combine"]
    chosen = template_frames(stats, names, settings.fraction, settings.min_frames)
    out = outputs.template_path(ctx)
    align_dir = ctx.target.stage_dir("align")
    inputs = {n: align_dir / f"{n}.fits" for n in chosen}
    configs = tasks.backend_user_files(ctx, ctx.backend("combine")) + tasks.backend_user_files(
        ctx, ctx.backend("psf")
    )
    prov = ctx.provenance("combine", {**inputs, **tasks.named_inputs(configs)}, settings=settings)
    psf_out = out.with_name("template.psf.fits")
    if not ctx.force and is_current(out, prov) and psf_out.exists():
        ctx.reporter.result("combine: template up to date")
        return out
    try:
        return _make_template(ctx, inputs, chosen, prov)
    except Exception:  # the old template must not outlive a failed combine
        for path in outputs.summaries(ctx, "combine"):
            outputs.invalidate(path)
        outputs.drop_after(ctx, "combine")
        raise


def _make_template(
    ctx: Context, inputs: Mapping[str, Path], chosen: Sequence[str], prov: Provenance
) -> Path:
    out = outputs.template_path(ctx)
    psf_out = out.with_name("template.psf.fits")
    backend = ctx.backend("combine")
    # read when the backend asks, never all at once (io.FrameSeries)
    frames = io.FrameSeries(
        inputs.values(),
        [outputs.psf_path(ctx, n) for n in inputs],
        prepare=tasks.readonly_inputs,
    )
    psf_backend = ctx.backend("psf")
    workdir = tasks.workdir(ctx, "combine", "template")
    tasks.prepare_workdir(
        workdir, tasks.backend_user_files(ctx, backend) + tasks.backend_user_files(ctx, psf_backend)
    )
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
            tasks.readonly_inputs(template),
            options=ctx.config.backend_options("psf"),
            workdir=workdir,
        )
        template = attrs.evolve(
            template,
            psf=measured.psf,
            fwhm=measured.fwhm,
            snr=measured.snr,
            background=measured.background,
            noise=measured.noise,
        )
        # where the stack misses frames over a source their seeing changes: judged once
        # here, from the inputs, for every combine backend; every residual is masked there
        from oasis_core.engine.stacking import incomplete_sources, psf_change

        template = attrs.evolve(
            template, holes=incomplete_sources(template, change=psf_change(frames))
        )
        advance()
    psf_cards: dict[str, Any] = {"OASSTAGE": "combine"}
    tasks.keep_psf_files(template.psf, out.parent, "template", psf_cards)
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


def subtract(ctx: Context) -> list[str]:
    names = outputs.aligned_frames(ctx)
    template = outputs.template_path(ctx)
    if not template.exists():
        raise outputs.stopped(
            ctx, "subtract", InputError(f"{template}: missing; run `oasis combine`")
        )
    if not outputs.template_current(ctx, names):
        raise outputs.stopped(
            ctx,
            "subtract",
            InputError(
                f"{template}: made from aligned frames that changed or are no longer usable; "
                "run `oasis combine`"
            ),
        )
    settings = ctx.config.settings["subtract"]
    units = [
        tasks.stage_task(
            ctx,
            "subtract",
            name,
            outputs.subtract_inputs(ctx, name),
            outputs.residual_path(ctx, name),
            settings=settings,
        )
        for name in names
    ]
    results = tasks.execute(ctx, "subtract", units)
    log_path = write_subtract_log(ctx, names, results)
    usable = [n for n in names if n not in tasks.failures(results)]
    if names and not usable:
        raise outputs.stopped(
            ctx,
            "subtract",
            StageError(
                f"subtract: no frame could be subtracted ({tasks.first_failure(results)}); see "
                f"{log_path}"
            ),
        )
    return usable


def write_subtract_log(
    ctx: Context, names: Sequence[str], results: Mapping[str, Any] | None = None
) -> Path:
    """``residuals/log.txt``: per frame the backend, Q, the configuration chosen by the
    optimisation (choice / tries and the backend's description), run time, the fraction
    of the good pixels, the flux the template's brightest stars left in the residual
    (``left``, ``OAS STAR_LEFT``: the median fraction of their flux, ``-`` when no star
    was measured), the choices the backends made (``OAS CHOICE_*``: kernel, PSF,
    alignment...) and flag; a frame whose subtraction failed in this run is listed as
    ``failed: <reason>``."""
    from astropy.io import fits

    head = (
        f"# {'frame':<24} {'backend':<10} {'Q':>6} {'choice':>6} {'seconds':>8} "
        f"{'good':>5} {'left':>6}  configuration | choices | flag"
    )
    lines = [head]
    results = results or {}
    chosen = ctx.config.backend("subtract")
    blank = f"{'-':>6} {'-':>6} {'-':>8} {'-':>5} {'-':>6}"  # Q choice seconds good left
    for name in names:
        path = outputs.residual_path(ctx, name)
        outcome = results.get(name)
        if isinstance(outcome, BaseException):
            reason = tasks.failure_reason(outcome)  # the row names the frame: not its message again
            reason = reason.removeprefix(f"{name}: ")
            lines.append(f"  {name:<24} {chosen:<10} {blank}  failed: {reason}")
            continue
        if not path.exists():
            lines.append(f"  {name:<24} {'-':<10} {blank}  not subtracted")
            continue
        hdr = fits.getheader(path)
        choice = f"{hdr.get('OAS CHOICE', 1)}/{hdr.get('OAS TRIES', 1)}"
        backend = f"auto:{hdr['OASAUTO']}" if "OASAUTO" in hdr else hdr.get("OASBACK", "?")
        lines.append(
            f"  {name:<24} {backend:<10} "
            f"{float(hdr.get('OASQ', 'nan')):6.3f} {choice:>6} "
            f"{float(hdr.get('OAS SECONDS', np.nan)):8.2f} "
            f"{float(hdr.get('OAS GOOD_FRACTION', np.nan)):5.2f} "
            f"{_star_left_text(hdr.get('OAS STAR_LEFT')):>6}  "
            f"{hdr.get('OAS CONFIG', '')} | {outputs.header_choices(hdr) or '-'} | "
            f"{hdr.get('OAS FLAG', '')}"
        )
    log_path = ctx.target.stage_dir("subtract") / "log.txt"
    io.write_text(log_path, "\n".join(lines) + "\n")
    return log_path


def _star_left_text(value: Any) -> str:
    """``OAS STAR_LEFT`` for the log: a signed percentage (``-35.4%``), ``-`` when absent."""
    if isinstance(value, (int, float)) and np.isfinite(value):
        return f"{100 * float(value):+.1f}%"
    return "-"


def mr(ctx: Context) -> Path:
    good, bad = outputs.usable_residuals(ctx)
    if not good:
        outputs.invalidate(outputs.mr_path(ctx))
        outputs.invalidate(outputs.var_path(ctx))
        raise outputs.stopped(ctx, "mr", _no_residual(ctx, bad))
    inputs = {n: outputs.residual_path(ctx, n) for n in good}
    prov = ctx.provenance(
        "mr", {**inputs, **tasks.named_inputs(tasks.backend_user_files(ctx, ctx.backend("mr")))}
    )
    out = outputs.mr_path(ctx)
    var_current = len(good) < variability.MIN_RESIDUALS or is_current(outputs.var_path(ctx), prov)
    if not ctx.force and is_current(out, prov) and var_current:
        ctx.reporter.result("mr: master residual up to date")
        return out
    try:
        return _make_master(ctx, inputs, prov, bad)
    except Exception:  # the old master residual must not outlive a failed mr
        outputs.invalidate(out)
        outputs.invalidate(outputs.var_path(ctx))
        outputs.drop_after(ctx, "mr")
        raise


def _no_residual(ctx: Context, bad: Sequence[str]) -> InputError:
    return InputError(
        f"{ctx.target.path}: no usable residual ({len(bad)} frame(s) not subtracted or "
        "below the Q floor; see residuals/log.txt); run `oasis subtract` first"
    )


def _make_master(
    ctx: Context, inputs: Mapping[str, Path], prov: Provenance, bad: Sequence[str]
) -> Path:
    out = outputs.mr_path(ctx)
    good = list(inputs)
    backend = ctx.backend("mr")
    # read as they are used: the backend and the variability image each go through the
    # series once, so memory stays flat in the number of frames
    residuals = io.ResidualSeries(inputs.values(), prepare=tasks.readonly_inputs)
    workdir = tasks.workdir(ctx, "mr", "MR")
    tasks.prepare_workdir(workdir, tasks.backend_user_files(ctx, backend))
    header = residuals[0].header.copy()
    for key in io.TIME_KEYS:  # the master residual has no single time of observation
        header.remove(key, ignore_missing=True, remove_all=True)
    cards = prov.header_cards()
    cards["NCOMBINE"] = (len(good), "residuals combined")
    from concurrent.futures import ThreadPoolExecutor, wait

    # the backend stacks the series in a thread of this process while the executor's
    # workers make the variability image's terms and this thread sums them: the two
    # passes overlap (each with its own series: the two threads share no cache)
    with (
        ctx.reporter.progress("mr", 1) as advance,
        ThreadPoolExecutor(1, thread_name_prefix="oasis-mr") as pool,
    ):
        made = pool.submit(
            backend.master, residuals, options=ctx.config.backend_options("mr"), workdir=workdir
        )
        try:
            series = io.ResidualSeries(
                inputs.values(), prepare=tasks.readonly_inputs, cache_bytes=0
            )
            _make_variability(ctx, series, header.copy(), cards, names=good)
        except BaseException:
            made.cancel()
            wait([made])  # the backend's thread ends before this error goes up
            raise
        master = made.result()  # raises what the backend raised
        advance()
    shutil.rmtree(workdir, ignore_errors=True)
    # the backend's unit: '' (dimensionless) for residuals combined in sigma units
    unit = str(master.header["BUNIT"]) if "BUNIT" in master.header else ""
    header["BUNIT"] = (unit, "dimensionless: sigma units" if unit == "" else "image unit")
    master = attrs.evolve(
        master, header=header, name="MR", science="MR", template=residuals[0].template
    )
    io.write_residual(out, master, header_extra=cards)
    ctx.reporter.result(
        f"mr: master residual of {len(good)} residuals"
        + (f" ({len(bad)} left out: {', '.join(bad)})" if bad else "")
    )
    return out


def _make_variability(
    ctx: Context,
    residuals: Sequence[Any],
    header: Any,
    cards: Mapping[str, Any],
    *,
    names: Sequence[str],
) -> None:
    """The variability image beside the master residual (``VAR.fits``), from the same
    residuals (of the frames ``names``), for every mr backend alike; none from fewer than
    :data:`~oasis_core.engine.variability.MIN_RESIDUALS`. The template's own frames
    (its ``OASTIN`` cards) give its ``TPLSIG``/``TPLDIFF`` images."""
    path = outputs.var_path(ctx)
    if len(residuals) < variability.MIN_RESIDUALS:
        outputs.invalidate(path)
        return
    template = outputs.template_path(ctx)
    members: set[str] = set()
    if template.exists():
        members = set(io.template_inputs(outputs.read_header(template) or {}))
    paths = getattr(residuals, "paths", None)
    if paths is None:  # residuals in memory: made here
        stars = io.read_output_frame(template).data if template.exists() else None
        image = variability.variability_image(residuals, stars, header, members=members)
    else:  # each residual's terms on the executor's workers, summed here as they come
        where = template if template.exists() else None
        tasks_ = [(name, (Path(p), where)) for name, p in zip(names, paths, strict=True)]
        # in order of seeing: a worker smooths the template once for residuals alike
        seeing = [float(h.get("FWHM", 0.0) or 0.0) for h in residuals.headers()]
        tasks_ = [t for _, t in sorted(zip(seeing, tasks_, strict=True), key=lambda p: p[0])]

        def terms() -> Iterator[tuple[np.ndarray, np.ndarray, bool]]:
            for outcome in ctx.executor.run(variability.residual_terms, tasks_):
                if not outcome.ok:
                    raise StageError(
                        f"mr: variability image: {outcome.key}: {outcome.error}"
                    ) from outcome.error
                yield (*outcome.value, outcome.key in members)

        image = variability.variability_image(
            residuals, None, header, terms=terms(), members=members
        )
    io.write_residual(path, image, header_extra=cards)


def extract(ctx: Context) -> dict[str, Any]:
    settings = ctx.config.settings["extract"]
    good, bad = outputs.usable_residuals(ctx)
    if not good:
        raise outputs.stopped(ctx, "mr", _no_residual(ctx, bad))
    units = _extract_units(ctx, settings.method, good)
    tables, failed = _detections(ctx, units)
    summary: dict[str, Any] = {
        "frames": len([n for n in tables if n not in ("MR", "VAR")]),
        "not_subtracted": bad,
        "not_extracted": failed,
    }
    thresholds = _thresholds(tables, settings)  # before the filters clear the metadata
    summary.update(_catalogs(ctx, tables, units, settings))
    summary.update(thresholds)
    summary["mean_q"] = _mean_q(ctx, good)
    _write_totals(ctx.target.stage_dir("extract"), summary, settings.method)
    ctx.reporter.result(
        "extract: "
        + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.items()
            if k not in ("not_subtracted", "not_extracted")
        )
    )
    return summary


def _extract_units(ctx: Context, method: str, good: Sequence[str]) -> list[tuple[str, Path]]:
    """What the extract stage searches: the usable residuals (``indiv``), the master
    residual (``MR``), or both; the master residual only when it was made from exactly the
    usable residuals as they are now."""
    units: list[tuple[str, Path]] = []
    if method in ("both", "indiv"):
        units += [(n, outputs.residual_path(ctx, n)) for n in good]
    if method in ("both", "MR"):
        mr_path = outputs.mr_path(ctx)
        if not mr_path.exists():
            raise outputs.stopped(
                ctx, "mr", InputError(f"{mr_path}: missing; run `oasis mr` first")
            )
        _check_made_from(ctx, mr_path, good, count=True)
        units.append(("MR", mr_path))
        units += _variability_unit(ctx, good)
    if not units:
        raise outputs.stopped(
            ctx,
            "mr",
            InputError(f"{ctx.target.path}: nothing to extract from; run `oasis subtract`"),
        )
    return units


def _variability_unit(ctx: Context, good: Sequence[str]) -> list[tuple[str, Path]]:
    """``[("VAR", path)]`` when the variability image was made from the usable residuals
    as they are now; none from fewer than
    :data:`~oasis_core.engine.variability.MIN_RESIDUALS` residuals."""
    if len(good) < variability.MIN_RESIDUALS:
        return []
    path = outputs.var_path(ctx)
    _check_made_from(ctx, path, good, count=False)
    return [("VAR", path)]


def _check_made_from(ctx: Context, path: Path, good: Sequence[str], *, count: bool) -> None:
    """Stop unless the stacked image at ``path`` was made from the usable residuals
    ``good`` as they are now (and, with ``count``, its NCOMBINE says as many)."""
    header = outputs.read_header(path) if path.exists() else None
    if (
        header is None
        or (count and int(header.get("NCOMBINE", -1)) != len(good))
        or not outputs.made_from(path, {n: outputs.residual_path(ctx, n) for n in good}, header)
    ):
        missing = "" if path.exists() else "missing or "
        raise outputs.stopped(
            ctx,
            "mr",
            InputError(
                f"{path}: {missing}not made from the {len(good)} usable residuals as they "
                "are now; run `oasis mr`"
            ),
        )


def _detections(ctx: Context, units: Sequence[tuple[str, Path]]) -> tuple[dict[str, Any], list]:
    """Run the extract backend on every unit (``sources/detections/NAME.ecsv``); return
    the detection tables by name and the names whose extraction failed."""
    from astropy.table import Table

    det_dir = ctx.target.stage_dir("extract") / "detections"
    template = outputs.template_path(ctx)
    template_psf = template.with_name("template.psf.fits")
    todo = []
    for n, p in units:
        inputs = {"residual": p}
        if template.exists():  # the template's stars, for the core's wing test
            inputs["template"] = template
        psf = template_psf if n == "MR" else outputs.psf_path(ctx, n)
        # the PSF of the residual's sources, for backends that use it (none describes
        # the variability image)
        if n != "VAR" and psf.exists():
            inputs["psf"] = psf
        todo.append(tasks.stage_task(ctx, "extract", n, inputs, det_dir / f"{n}.ecsv"))
    results = tasks.execute(ctx, "extract", todo)
    failed = tasks.failures(results)
    if len(failed) == len(units):
        raise outputs.stopped(
            ctx,
            "mr",
            StageError(f"extract: nothing could be extracted ({tasks.first_failure(results)})"),
        )
    tables = {
        n: Table.read(det_dir / f"{n}.ecsv", format="ascii.ecsv")
        for n, _ in units
        if n not in failed
    }
    return tables, failed


def _catalogs(
    ctx: Context, tables: Mapping[str, Any], units: Sequence[tuple[str, Path]], settings: Any
) -> dict[str, Any]:
    """The core's filters on every detection table, the catalogs written (``sources``,
    ``filtered_sources``, ``MR_sources``, ``MR_filtered_sources``, ``VAR_sources``,
    ``VAR_filtered_sources``, text and ECSV), and their counts. A detection at a kept
    source of the variability image is kept even when negative or found in most
    residuals (:func:`~oasis_core.engine.variability.exempt_varying`)."""
    from astropy.table import vstack

    from oasis_core.engine.sources import match_catalogs

    out_dir = ctx.target.stage_dir("extract")
    indiv_names = [n for n in tables if n not in ("MR", "VAR")]
    positives = [t[np.asarray(t["sign"]) > 0] for n, t in tables.items() if n in indiv_names]
    common: dict[str, Any] = {
        "settings": settings,
        "catalogs": positives,
        "n_residuals": len(indiv_names),
        "wcs": outputs.template_wcs(ctx),
    }
    prov = {
        k: str(v[0] if isinstance(v, tuple) else v)
        for k, v in ctx.provenance("extract", dict(units), settings=settings).cards().items()
    }
    counts: dict[str, Any] = {}
    # every table filtered without the negative and majority filters (which serve a
    # transient search; a variable is fainter than the template at times): once, for the
    # variability image's artefact verdict and for the exemption of what varies
    loose = attrs.evolve(settings, keep_negative=True)
    lenient = {
        n: tasks.filter_sources(t.copy(), settings=loose, catalogs=(), n_residuals=0)
        for n, t in tables.items()
        if n != "VAR"
    }
    varying = _varying(tables, lenient, indiv_names, common, out_dir, prov, counts)

    template_images = _template_images(ctx)

    def judged(name: str, frame: str | None) -> Any:
        table = tasks.filter_sources(tables[name].copy(), frame=frame, **common)
        _template_test(table, template_images)
        if varying is None:
            return table
        return variability.exempt_varying(table, varying, settings.match_radius, lenient[name])

    indiv = [judged(name, name) for name in indiv_names]
    if len({str(t["flux"].unit) for t in indiv}) > 1:  # frames in different units
        for t in indiv:
            for c in ("flux", "flux_err", "peak"):
                if c in t.colnames:
                    t[c].unit = None
    sources = vstack(indiv) if indiv else None
    if sources is not None:
        filtered = sources[sources["reason"] == "kept"]
        _write_catalog(out_dir, "sources", sources, prov)
        _write_catalog(out_dir, "filtered_sources", filtered, prov)
        counts.update(found=len(sources), filtered=len(filtered))
    if "MR" in tables:
        mr_t = judged("MR", None)
        mr_f = mr_t[mr_t["reason"] == "kept"]
        _write_catalog(out_dir, "MR_sources", mr_t, prov)
        _write_catalog(out_dir, "MR_filtered_sources", mr_f, prov)
        counts.update(mr_found=len(mr_t), mr_filtered=len(mr_f))
        if sources is not None:
            kept = sources[sources["reason"] == "kept"]
            confirmed = mr_f[match_catalogs(mr_f, kept, settings.match_radius) >= 0]
            counts["confirmed"] = len(confirmed)
    return counts


def _template_images(ctx: Context) -> dict[str, np.ndarray]:
    """The variability image's ``TPLSIG`` and ``TPLDIFF`` (none without them)."""
    path = outputs.var_path(ctx)
    if not path.exists():
        return {}
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        names = {h.name for h in hdul}
        return {
            k: np.asarray(hdul[k.upper()].data) for k in ("tplsig", "tpldiff") if k.upper() in names
        }


def _template_test(table: Any, images: Mapping[str, np.ndarray]) -> None:
    """The sources of a residual or of the master residual that the template's own frames
    show as much as the other residuals do, in place: ``tpl_sig`` (their residuals' mean
    there, sigmas, signed like the source; NaN without ``images``, the variability
    image's ``TPLSIG``/``TPLDIFF``) and ``reason`` ``template`` for the kept ones
    (:func:`~oasis_core.engine.variability.template_artifacts`)."""
    sig = variability.template_sigma(table, images)
    table["tpl_sig"] = sig
    table["tpl_sig"].info.format = ".3f"
    from oasis_core.engine.sources import describe_columns

    describe_columns(table)
    artifact = variability.template_artifacts(table, images) & (table["reason"] == "kept")
    table["reason"][artifact] = "template"


def _varying(
    tables: Mapping[str, Any],
    lenient: Mapping[str, Any],
    indiv_names: Sequence[str],
    common: Mapping[str, Any],
    out_dir: Path,
    prov: Mapping[str, str],
    counts: dict[str, Any],
) -> Any:
    """The kept sources of the variability image with their ``kind``
    (:func:`~oasis_core.engine.variability.detection_kinds`), its catalogs written
    (``VAR_sources``, ``VAR_filtered_sources``); None without a variability image. The
    ``majority`` and ``dipole`` filters do not apply to a map without sign; a negative
    detection there (residuals that vary less than their noise says) is no variable; a
    source whose every detection in the residuals is an artefact takes their reason
    (:func:`~oasis_core.engine.variability.artefact_verdict`)."""
    if "VAR" not in tables:
        return None
    settings = common["settings"]
    table = tasks.filter_sources(
        tables["VAR"].copy(),
        settings=attrs.evolve(settings, keep_negative=False, dipole_min=1e30),  # no dipole
        catalogs=(),
        n_residuals=0,
        wcs=common["wcs"],
    )
    table["kind"] = variability.detection_kinds(
        table, {n: tables[n] for n in indiv_names}, settings.match_radius
    )
    judged = {n: lenient[n] for n in indiv_names}
    table["reason"] = variability.artefact_verdict(table, judged, settings.match_radius)
    kept = table[table["reason"] == "kept"]
    _write_catalog(out_dir, "VAR_sources", table, prov)
    _write_catalog(out_dir, "VAR_filtered_sources", kept, prov)
    counts.update(var_found=len(table), var_filtered=len(kept))
    return kept


def _thresholds(tables: Mapping[str, Any], settings: Any) -> dict[str, Any]:
    """The detection threshold on ``peak_norm`` the individual residuals were searched at
    (the median over them, see :func:`oasis_core.engine.sources.detection_threshold`) and
    the level their own nulls alone gave for ``[extract] false_per_mpix`` (``nan``: no
    calibration)."""
    from oasis_core.engine.sources import detection_threshold

    pairs = [
        detection_threshold(
            t.meta, snr_min=settings.snr_min, false_per_mpix=settings.false_per_mpix
        )
        for n, t in tables.items()
        if n not in ("MR", "VAR")
    ]
    if not pairs:
        return {}
    used, null = np.array(pairs, dtype=float).T
    finite = null[np.isfinite(null)]
    return {
        "threshold": float(np.median(used)),
        "null_threshold": float(np.median(finite)) if finite.size else float("nan"),
    }


def _mean_q(ctx: Context, good: Sequence[str]) -> float:
    """The mean Q of the usable residuals (from their ``OASQ`` cards)."""
    from astropy.io import fits

    qs = [
        float(fits.getheader(outputs.residual_path(ctx, name)).get("OASQ", np.nan)) for name in good
    ]
    return float(np.nanmean(qs)) if qs else float("nan")


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
        f"sources found in the variability image: {summary.get('var_found', 0)}",
        f"variability-image sources after filtering: {summary.get('var_filtered', 0)}",
        f"confirmed (master residual and a residual): {summary.get('confirmed', 0)}",
        *_threshold_lines(summary),
        f"frames that could not be subtracted: {len(bad)}"
        + (f" ({', '.join(bad)})" if bad else ""),
        f"mean Q: {summary.get('mean_q', float('nan')):.3f}",
    ]
    failed = summary.get("not_extracted", [])
    if failed:
        lines.append(f"residuals whose extraction failed: {len(failed)} ({', '.join(failed)})")
    io.write_text(out_dir / "total_sources.txt", "\n".join(lines) + "\n")


def _threshold_lines(summary: Mapping[str, Any]) -> list[str]:
    """The ``total_sources.txt`` lines of the detection threshold (none when unknown)."""
    if "threshold" not in summary:
        return []
    null = summary.get("null_threshold", float("nan"))
    return [
        f"detection threshold (peak_norm, median over residuals): {summary['threshold']:.2f}",
        "threshold from the residuals' null alone ([extract] false_per_mpix): "
        + (f"{null:.2f}" if np.isfinite(null) else "none (too few null peaks)"),
    ]


def _need(ctx: Context, stage: str, n: int, what: str, results: Mapping[str, Any]) -> None:
    """Stop the run (see :func:`outputs.stopped`) when fewer than ``[run] min_frames`` frames are
    usable after ``stage``; the message gives the first failure of the stage, if any."""
    need = ctx.config.run.min_frames
    if n < need:
        failed = tasks.first_failure(results)
        raise outputs.stopped(
            ctx,
            stage,
            InputError(
                f"{ctx.target.path}: only {n} usable frame(s) {what}; at least {need} are "
                "needed ([run] min_frames)" + (f"; {stage}: {failed}" if failed else "")
            ),
        )
