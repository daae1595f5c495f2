"""The stages of a comparison (:mod:`oasis_apps.compare`): the shared upstream stages, each
combination's subtractions (timed and measured in the workers: Q, normalised noise,
star-aperture RMS), its mr and extract stages, and the sources they kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.compare_choices import SHARED_STAGES, Combination
from oasis_core.contracts.errors import InputError, OasisError
from oasis_core.engine import io, outputs, runners, tasks
from oasis_core.engine.lock import scratch_dir

__all__ = [
    "Stars",
    "combination_context",
    "count_detections",
    "kept_sources",
    "link",
    "residual_metrics",
    "run_downstream",
    "run_shared",
    "subtract_all",
    "template_stars",
    "variant",
]

log = logging.getLogger("oasis")


@attrs.frozen(kw_only=True)
class Stars:
    """Template stars: all (to exclude from the noise figure) and the bright, unsaturated
    ones of the star-aperture RMS; positions 0-based."""

    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    bright_x: tuple[float, ...] = ()
    bright_y: tuple[float, ...] = ()
    fwhm: float = 3.0


@attrs.frozen(kw_only=True)
class _Unit:
    """One subtraction of a comparison, picklable: the pipeline's task and the stars."""

    task: Any
    stars: Stars


def residual_metrics(path: Path, stars: Stars) -> dict[str, Any]:
    """Q, normalised residual noise and star-aperture RMS of the residual at ``path``.

    The noise figure leaves out the pixels within 2 FWHM of every template star; the
    star-aperture RMS uses apertures of radius 1 FWHM on the bright unsaturated ones
    (:func:`oasis_core.engine.quality.star_aperture_rms`).
    """
    from oasis_core.engine.quality import normalized_noise, star_aperture_rms

    residual = io.read_residual(path)
    shape = residual.data.shape
    exclude = np.zeros(shape, bool)
    r = max(2.0 * stars.fwhm, 3.0)
    if stars.x:
        yy, xx = np.ogrid[: shape[0], : shape[1]]
        for x, y in zip(stars.x, stars.y, strict=True):
            y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, shape[0])
            x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, shape[1])
            exclude[y0:y1, x0:x1] |= (xx[:, x0:x1] - x) ** 2 + (yy[y0:y1] - y) ** 2 <= r * r
    data, noise, weight = residual.data, residual.noise, residual.weight
    return {
        "q": float(residual.q),
        "noise_norm": normalized_noise(data, noise, weight, exclude=exclude),
        "star_rms": star_aperture_rms(
            data,
            noise,
            weight,
            np.asarray(stars.bright_x, float),
            np.asarray(stars.bright_y, float),
            max(stars.fwhm, 1.5),
        ),
        "flag": str(residual.meta.get("flag", "")),
        "subtract": str(residual.header.get("OASBACK", "?"))
        + (f":{residual.header['OASAUTO']}" if "OASAUTO" in residual.header else ""),
    }


def _run_unit(unit: _Unit) -> dict[str, Any]:
    """Run one subtraction (in a worker) and measure it: time, peak memory, quality."""
    import resource
    import tracemalloc

    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    child_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    try:
        tasks.run_task(unit.task)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    seconds = time.perf_counter() - start
    child_after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    child_mb = child_after / 1024.0 if child_after > child_before else 0.0  # KiB on Linux
    out = residual_metrics(unit.task.output, unit.stars)
    out.update(seconds=round(seconds, 3), peak_mb=round(max(peak / 2**20, child_mb), 1))
    return out


def _subtract_task(ctx: Any, choice: str, name: str, inputs: dict[str, Path], output: Path) -> Any:
    """The pipeline's subtract task for ``choice`` (``auto`` included), in a private
    workdir of the combination."""

    settings = ctx.config.settings["subtract"]
    workdir = scratch_dir(ctx.target.path) / "compare" / (ctx.target.variant or "") / name
    task = tasks.stage_task(ctx, "subtract", name, inputs, output, settings=settings)
    if task.backend.name != choice:
        from oasis_core.contracts.errors import StageError

        raise StageError(f"compare: subtract {choice!r} wanted, {task.backend.name!r} chosen")
    return attrs.evolve(task, workdir=workdir)


def link(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (a copy where links are not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def subtract_all(
    ctx: Any,
    combo: Combination,
    stars: Stars,
    measured: dict[tuple[str, str], dict[str, Any]],
    shared_from: Path | None,
    previous: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """Subtract every aligned frame for ``combo``; fill ``measured[(choice, frame)]``.

    A residual already current is not redone; its time and memory come from
    ``previous`` (frame to the row of an earlier comparison), else from its header
    (time only)."""

    choice = combo.backends.get("subtract") or ctx.config.backend("subtract")
    names = outputs.aligned_frames(ctx)
    template = outputs.template_path(ctx)
    if not template.exists():
        raise InputError(f"{template}: missing; run `oasis combine` first")
    align_dir = ctx.target.stage_dir("align")
    out_dir = ctx.target.stage_dir("subtract")
    units, done = [], []
    for name in names:
        output = out_dir / f"{name}_residual.fits"
        if shared_from is not None and (shared_from / output.name).exists():
            link(shared_from / output.name, output)  # same subtraction: share it
            done.append(name)
            continue
        inputs = {
            "science": align_dir / f"{name}.fits",
            "template": template,
            "psf": outputs.psf_path(ctx, name),
            "template_psf": template.with_name("template.psf.fits"),
        }
        task = _subtract_task(ctx, choice, name, inputs, output)
        if not ctx.force and tasks.output_current(task):
            done.append(name)
        else:
            units.append(_Unit(task=task, stars=stars))
    label = f"subtract {combo.name}"
    failed: dict[str, BaseException] = {}
    with ctx.reporter.progress(label, len(names)) as advance:
        for name in done:
            key = (choice, name)
            if key not in measured:  # from an earlier run
                from astropy.io import fits

                path = out_dir / f"{name}_residual.fits"
                old = (previous or {}).get(name, {})
                seconds = float(fits.getheader(path).get("OAS SECONDS", np.nan))
                measured[key] = {
                    **residual_metrics(path, stars),
                    "seconds": float(old.get("seconds", seconds)),
                    "peak_mb": float(old.get("peak_mb", np.nan)),
                }
            advance()
        for outcome in ctx.executor.run(_run_unit, [(u.task.name, u) for u in units]):
            advance()
            if outcome.ok:
                measured[(choice, outcome.key)] = outcome.value
            else:
                err = outcome.error
                failed[outcome.key] = err
                outputs.invalidate(out_dir / f"{outcome.key}_residual.fits")  # not this run's
                log.warning("%s: %s: %s: %s", label, outcome.key, type(err).__name__, err)
                measured[(choice, outcome.key)] = {"flag": f"failed: {err}"}
    runners.write_subtract_log(ctx, names, failed)
    return names


def template_stars(ctx: Any) -> Stars:
    """Stars of the template (5 sigma), and the bright unsaturated ones (peak above 20
    sigma and below half the saturation level, isolated and unflagged; the 100 brightest)."""
    import sep
    from astropy.io import fits

    path = outputs.template_path(ctx)
    frame = io.read_output_frame(path)
    psf_path = path.with_name("template.psf.fits")
    fwhm = float(frame.fwhm or 0.0) or float(fits.getheader(psf_path).get("FWHM", 3.0))
    data = np.ascontiguousarray(frame.data, np.float64)
    mask = np.ascontiguousarray(~(frame.weight > 0) | ~np.isfinite(data))
    data = np.where(mask, 0.0, data)
    try:
        bkg = sep.Background(data, mask=mask)
        sub = data - bkg.back()
        sep.set_extract_pixstack(max(300_000, data.size // 4))
        objs = sep.extract(sub, 5.0, err=bkg.globalrms, mask=mask)
    except Exception as err:  # sep raises bare Exceptions; the figures become nan
        log.warning("compare: %s: no stars measured on the template (%s)", path, err)
        return Stars(fwhm=fwhm)
    saturation = float(frame.saturation or np.inf)
    bright = objs[
        (objs["flag"] == 0)
        & (objs["peak"] > 20 * bkg.globalrms)
        & (objs["peak"] + np.median(bkg.back()) < 0.5 * saturation)
    ]
    bright = bright[np.argsort(-bright["flux"])[:100]]
    return Stars(
        x=tuple(map(float, objs["x"])),
        y=tuple(map(float, objs["y"])),
        bright_x=tuple(map(float, bright["x"])),
        bright_y=tuple(map(float, bright["y"])),
        fwhm=fwhm,
    )


def run_shared(ctx: Any) -> None:
    """Mask, psf, align and combine in the target's own directories (resumed when
    current), without touching ``configs/last_run.toml``."""
    from oasis_core.engine import pipeline as pl

    ctx.target.create()
    for stage in SHARED_STAGES:
        ctx.backend(stage)  # a missing program fails before any work
    for stage in SHARED_STAGES:
        pl.run_stage(ctx, stage)


def variant(ctx: Any, variant: str, variant_from: str = "subtract") -> Any:
    from oasis_core.engine.tree import Target

    return attrs.evolve(
        ctx, target=Target(ctx.target.path, variant=variant, variant_from=variant_from)
    )


def combination_context(path: Any, combo: Combination, common: Mapping[str, Any]) -> Any:
    from oasis_core.engine import pipeline as pl

    cli = {**(common.get("cli") or {})}
    for stage, name in combo.backends.items():
        cli[f"{stage}.backend"] = name
    return pl.make_context(path, **{**common, "cli": cli})


def run_downstream(ctx: Any, label: str) -> str:
    """mr and extract for one combination; the error text when one fails."""
    from oasis_core.engine import pipeline as pl

    for stage in ("mr", "extract"):
        try:
            pl.run_stage(ctx, stage)
        except OasisError as err:
            log.warning("compare %s: %s: %s", label, stage, err)
            return f"{stage}: {err}"
    return ""


def kept_sources(ctx: Any) -> tuple[Any, Any]:
    """(filtered sources of the residuals, filtered sources of the master residual)."""
    from astropy.table import Table

    out = []
    for stem in ("filtered_sources", "MR_filtered_sources"):
        path = ctx.target.stage_dir("extract") / f"{stem}.ecsv"
        if path.exists():
            out.append(Table.read(path, format="ascii.ecsv"))
        else:
            out.append(Table(names=("frame", "x", "y", "snr"), dtype=(str, float, float, float)))
    return out[0], out[1]


def count_detections(ctx: Any, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per frame: kept sources, and those also kept in the master residual."""
    from oasis_core.engine.sources import match_catalogs

    kept, mr = kept_sources(ctx)
    radius = ctx.config.settings["extract"].match_radius
    frames = np.asarray(kept["frame"]).astype(str) if len(kept) else np.array([], str)
    out = {}
    for name in names:
        rows = kept[frames == name]
        confirmed = int(np.sum(match_catalogs(rows, mr, radius) >= 0)) if len(rows) else 0
        out[name] = (len(rows), confirmed)
    return out
