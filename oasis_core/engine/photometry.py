"""The photometry stage: forced PSF photometry on every usable residual, light curves.

The runner (:func:`run`, the stage's ``runner``) gathers the positions to measure
(:func:`positions`: the kept sources of the extract stage, ``sources/filtered_sources``
and ``MR_filtered_sources`` merged by position, and the user's ``[photometry] at`` /
``at_file``), writes them to ``lightcurves/positions.ecsv``, then runs one task per
usable residual and one on the template (:func:`task`, the stage's ``task``), each
writing ``lightcurves/frames/<name>.fits`` with a provenance header, so a rerun measures
only what changed. Each residual is measured with its own PSF (:func:`residual_psf`).
The light curves, the variables and the pages are then made by
:mod:`oasis_core.engine.lightcurves` from the per-frame tables and the frames' times
(:func:`frame_times`: the headers' mid-exposure MJD, barycentric on request).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from oasis_core.contracts.errors import InputError, StageError
from oasis_core.contracts.model import PsfModel, Residual
from oasis_core.engine import io, outputs, tasks
from oasis_core.engine.provenance import is_current

if TYPE_CHECKING:
    from oasis_core.engine.context import Context

__all__ = [
    "FLAG_RESIDUAL",
    "frame_times",
    "parse_position",
    "positions",
    "read_positions_file",
    "residual_psf",
    "run",
    "task",
    "template_image",
]

log = logging.getLogger("oasis")

#: The flag the core adds to every measurement on a residual the subtraction flagged
#: (``OAS FLAG``: mostly masked, few stamps, Q low...).
FLAG_RESIDUAL = 16

_PIXEL_RE = re.compile(r"^\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*px\s*$")


def parse_position(text: str, wcs: Any) -> tuple[float, float]:
    """The 0-based template pixel ``(x, y)`` of one user position.

    ``"X,Ypx"`` (a ``px`` suffix) is a pixel position; ``"RA,DEC"`` is a sky position in
    degrees or sexagesimal (``"10:00:01.2,+2:10:03"``), converted with the template's
    WCS. When the template has no WCS, two plain numbers are pixels.

    Raises
    ------
    InputError
        When the text is neither, or a sky position is given and there is no WCS.
    """
    match = _PIXEL_RE.match(text)
    if match:
        return float(match.group(1)), float(match.group(2))
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise InputError(
            f"[photometry] at: {text!r}: not 'RA,DEC' or 'X,Ypx' (e.g. '150.1,2.2' or '120,85px')"
        )
    sexagesimal = any(c in text for c in ":hdms")
    if wcs is None:
        if sexagesimal:
            raise InputError(
                f"[photometry] at: {text!r}: a sky position, but the template has no WCS; "
                "give 'X,Ypx'"
            )
        try:
            return float(parts[0]), float(parts[1])
        except ValueError as err:
            raise InputError(f"[photometry] at: {text!r}: not two numbers") from err
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    try:
        unit = (u.hourangle, u.deg) if sexagesimal else (u.deg, u.deg)
        coord = SkyCoord(parts[0], parts[1], unit=unit)
    except ValueError as err:
        raise InputError(f"[photometry] at: {text!r}: not a sky position ({err})") from err
    x, y = wcs.all_world2pix([coord.ra.deg], [coord.dec.deg], 0)
    return float(x[0]), float(y[0])


def read_positions_file(path: Path) -> list[str]:
    """The positions of a file, one a line (``RA,DEC`` or ``X,Ypx``; blanks separate too;
    ``#`` starts a comment).

    Raises
    ------
    InputError
        When the file cannot be read.
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InputError(
            f"[photometry] at_file = {str(path)!r}: cannot read ({err.strerror or err})"
        ) from err
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pixels = line.endswith("px")
        tokens = line.removesuffix("px").replace(",", " ").split()
        out.append(",".join(tokens) + ("px" if pixels else ""))
    return out


#: The weight of a catalog's positions when positions closer than ``match_radius`` are
#: merged: the variability image's are the least precise (a chi-square map, the most
#: deviant residual left out), so they only place a source no other catalog has.
_POSITION_WEIGHT = {
    "MR_filtered_sources": 1.0,
    "filtered_sources": 1.0,
    "VAR_filtered_sources": 1e-3,
}


def _catalog_positions(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) and weight (S/N, less for the variability image's) of the kept sources of
    the extract stage's catalogs."""
    from astropy.table import Table

    xs, ys, snrs = [], [], []
    for stem, factor in _POSITION_WEIGHT.items():
        path = ctx.target.stage_dir("extract") / f"{stem}.ecsv"
        if not path.is_file():
            continue
        table = Table.read(path, format="ascii.ecsv")
        if len(table) == 0:
            continue
        xs.append(np.asarray(table["x"], float))
        ys.append(np.asarray(table["y"], float))
        snr = table["snr"] if "snr" in table.colnames else np.ones(len(table))
        snrs.append(factor * np.abs(np.asarray(snr, float)))
    if not xs:
        return np.zeros((0, 2)), np.zeros(0)
    return np.column_stack([np.concatenate(xs), np.concatenate(ys)]), np.concatenate(snrs)


def _image_kinds(ctx: Context, xy: np.ndarray, radius: float) -> np.ndarray:
    """For each position, the ``kind`` of the kept source of the variability image within
    ``radius`` pixels (``VAR_filtered_sources``), or ''."""
    from astropy.table import Table

    from oasis_core.engine.sources import match_catalogs

    kinds = np.full(len(xy), "", dtype="U9")
    path = ctx.target.stage_dir("extract") / "VAR_filtered_sources.ecsv"
    if not len(xy) or not path.is_file():
        return kinds
    varying = Table.read(path, format="ascii.ecsv")
    if not len(varying) or "kind" not in varying.colnames:
        return kinds
    hit = match_catalogs(Table({"x": xy[:, 0], "y": xy[:, 1]}), varying, radius)
    kinds[hit >= 0] = np.asarray(varying["kind"], dtype="U9")[hit[hit >= 0]]
    return kinds


def _merge(xy: np.ndarray, weight: np.ndarray, radius: float) -> np.ndarray:
    """Positions closer than ``radius`` merged into one (the weighted mean of a group
    formed around its strongest member, strongest first)."""
    if len(xy) == 0:
        return np.zeros((0, 2))
    from scipy.spatial import cKDTree

    order = np.argsort(-np.nan_to_num(weight, nan=0.0), kind="stable")
    tree = cKDTree(xy)
    taken = np.zeros(len(xy), bool)
    out = []
    for i in order:  # a catalog's sources, not the hot path
        if taken[i]:
            continue
        group = [j for j in tree.query_ball_point(xy[i], radius) if not taken[j]]
        taken[group] = True
        w = np.maximum(np.nan_to_num(weight[group], nan=0.0), 1e-6)
        out.append((xy[group] * w[:, None]).sum(axis=0) / w.sum())
    return np.asarray(out)


def positions(ctx: Context, settings: Any, wcs: Any) -> Any:
    """The sources to measure: ``source_id`` (1, 2...), ``x``, ``y`` (0-based template
    pixels), ``ra``, ``dec`` (degrees; NaN without a WCS) and ``origin`` (``catalog``,
    ``user`` or both), catalog sources merged by position within ``match_radius``; a
    user's position that close to one replaces it."""
    from astropy.table import Table

    xy, snr = _catalog_positions(ctx) if settings.catalog else (np.zeros((0, 2)), np.zeros(0))
    merged = _merge(xy, snr, settings.match_radius)
    origin = ["catalog"] * len(merged)
    texts = list(settings.at)
    if settings.at_file:
        texts += read_positions_file(Path(settings.at_file))
    for text in texts:
        x, y = parse_position(text, wcs)
        if len(merged):
            d = np.hypot(merged[:, 0] - x, merged[:, 1] - y)
            i = int(np.argmin(d))
            if d[i] <= settings.match_radius:  # the user's position is the source's
                merged[i] = (x, y)
                origin[i] = "catalog,user" if origin[i] == "catalog" else origin[i]
                continue
        merged = np.vstack([merged.reshape(-1, 2), [[x, y]]])
        origin.append("user")
    merged = merged.reshape(-1, 2)
    image_kind = _image_kinds(ctx, merged, settings.match_radius)
    if wcs is not None and len(merged):
        ra, dec = wcs.all_pix2world(merged[:, 0], merged[:, 1], 0)
    else:
        ra = dec = np.full(len(merged), np.nan)
    table = Table(
        {
            "source_id": np.arange(1, len(merged) + 1, dtype=np.int32),
            "x": merged[:, 0],
            "y": merged[:, 1],
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "origin": np.asarray(origin, dtype="U12"),
            "image_kind": image_kind,
        }
    )
    from oasis_core.engine.lightcurves import describe

    return describe(table)


def residual_psf(
    residual: Residual, template_psf: PsfModel | None, frame_psf: PsfModel | None
) -> PsfModel:
    """The PSF of a point source of unit flux in template ADU on ``residual``.

    When the template was convolved (``kernel.direction == "template"``) with a kernel
    image: the template's PSF convolved with the kernel (whose sum is the photometric
    scale); when the science frame was: the template's PSF; otherwise the science frame's
    PSF (unit sum; the aligned frames are on the template's photometric level).

    Raises
    ------
    StageError
        When there is no PSF to use.
    """
    from scipy.signal import fftconvolve

    kernel = residual.kernel
    if template_psf is not None and kernel is not None:
        if kernel.direction == "template" and kernel.image is not None:
            image = fftconvolve(template_psf.image, np.asarray(kernel.image, float), mode="full")
            fwhm = frame_psf.fwhm if frame_psf is not None else template_psf.fwhm
            return PsfModel(image=image, fwhm=float(fwhm), model="template*kernel")
        if kernel.direction == "science":
            return template_psf
    model = frame_psf if frame_psf is not None else template_psf
    if model is None:
        raise StageError(f"{residual.name}: no PSF (neither the frame's nor the template's)")
    total = float(np.sum(model.image))
    return attrs.evolve(model, image=model.image / total) if total > 0 else model


def template_image(path: Path) -> Residual:
    """The template as a :class:`Residual` for its photometry (``name = "template"``):
    its data, its weight and a noise image of its sky noise plus the sources' own Poisson
    noise in the frames' gain."""
    frame = io.read_output_frame(path)
    data = np.asarray(frame.data, np.float64)
    sky = float(frame.background) if frame.background is not None else float(np.nanmedian(data))
    sigma = float(frame.noise) if frame.noise is not None else float(np.nanstd(data))
    gain = float(frame.gain) if frame.gain else 1.0
    noise = np.sqrt(sigma**2 + np.clip(np.nan_to_num(data - sky), 0, None) / gain)
    return Residual(
        data=data, noise=noise, weight=frame.weight, header=frame.header, name="template"
    )


def task(unit: tasks.Task) -> dict[str, Any]:
    """One unit of the photometry stage: the backend on one residual (or the template),
    at every position (given in ``unit.extra``: ``source_id``, ``x``, ``y``, the contents
    of the ``positions`` input); ``lightcurves/frames/<name>.fits``, a FITS table whose
    primary header holds the provenance cards."""
    from astropy.table import Table

    if "x" in unit.extra:
        ids = np.asarray(unit.extra["source_id"])
        xy = np.column_stack(
            [np.asarray(unit.extra["x"], float), np.asarray(unit.extra["y"], float)]
        )
    else:
        table = Table.read(unit.inputs["positions"], format="ascii.ecsv")
        ids = np.asarray(table["source_id"])
        xy = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])
    template_psf = io.read_psf(unit.inputs["template_psf"])
    if "template" in unit.inputs:
        image = tasks.readonly_inputs(template_image(unit.inputs["template"]))
        psf = template_psf
    else:
        image = tasks.readonly_inputs(io.read_residual(unit.inputs["residual"]))
        frame_psf = io.read_psf(unit.inputs["psf"]) if "psf" in unit.inputs else None
        psf = residual_psf(image, template_psf, frame_psf)
    result = unit.backend.photometry(image, xy, psf=psf, options=unit.options, workdir=unit.workdir)
    missing = [c for c in ("flux", "flux_err", "flag") if c not in result.colnames]
    if missing or len(result) != len(xy):
        raise StageError(
            f"{unit.name}: photometry backend {unit.backend.name!r} returned "
            + (
                f"no column {', '.join(missing)}"
                if missing
                else f"{len(result)} rows for {len(xy)}"
            )
        )
    out = Table({"source_id": ids})
    for name in result.colnames:
        out[name] = result[name]
    if str(image.header.get("OAS FLAG", "") or "").strip():  # the subtraction's own doubt
        out["flag"] = np.asarray(out["flag"], np.int16) | FLAG_RESIDUAL
    from oasis_core.engine.lightcurves import write_frame_table

    write_frame_table(unit.output, out, unit.provenance.header_cards(), result.meta)
    good = np.isfinite(np.asarray(out["flux"], float))
    return {"measured": int(good.sum())}


def _site(header: Any) -> Any:
    """The observatory's EarthLocation from the header's numbers, or None."""
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    geo = [io.finite_value(header.get(k)) for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")]
    if all(v is not None for v in geo):
        return EarthLocation.from_geocentric(*geo, unit=u.m)
    for lat_k, lon_k, alt_k in (
        ("SITELAT", "SITELONG", "SITEALT"),
        ("OBS-LAT", "OBS-LONG", "OBS-ELEV"),
        ("LATITUDE", "LONGITUD", "ALTITUDE"),
        ("OBSGEO-B", "OBSGEO-L", "OBSGEO-H"),
    ):
        lat, lon = header.get(lat_k), header.get(lon_k)
        if lat is None or lon is None:
            continue
        try:
            from astropy.coordinates import Angle

            alt = io.finite_value(header.get(alt_k)) or 0.0
            return EarthLocation.from_geodetic(
                Angle(str(lon), unit=u.deg), Angle(str(lat), unit=u.deg), alt * u.m
            )
        except (ValueError, TypeError):
            continue
    return None


def _pointing(header: Any, wcs: Any) -> Any:
    """The field's sky position: the template WCS's centre, else the header's RA/DEC."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    if wcs is not None and wcs.pixel_shape:
        ra, dec = wcs.all_pix2world([wcs.pixel_shape[0] / 2], [wcs.pixel_shape[1] / 2], 0)
        return SkyCoord(float(ra[0]), float(dec[0]), unit=u.deg)
    ra, dec = header.get("RA"), header.get("DEC")
    if ra is None or dec is None:
        return None
    try:
        numbers = isinstance(ra, (int, float))
        return SkyCoord(ra, dec, unit=(u.deg, u.deg) if numbers else (u.hourangle, u.deg))
    except ValueError:
        return None


def frame_times(
    headers: Mapping[str, Any], *, barycentric: bool = False, wcs: Any = None
) -> tuple[dict[str, float | None], str]:
    """Each frame's mid-exposure MJD (:func:`~oasis_core.engine.io.header_mjd`; None
    without a readable time) and the time scale it is in.

    With ``barycentric``, the times become barycentric MJD in TDB (astropy's light travel
    time, built-in ephemeris) for every frame whose header gives a site (``OBSGEO-X/Y/Z``,
    ``SITELAT``/``SITELONG``, ``OBS-LAT``/``OBS-LONG``, ``LATITUDE``/``LONGITUD``) and whose
    field has coordinates (the template's WCS or the header's ``RA``/``DEC``); when some
    frame lacks them, no time is corrected (one scale for the whole curve) and a warning
    says why.
    """
    times = {name: io.header_mjd(h) for name, h in headers.items()}
    if not barycentric:
        return times, "utc"
    from astropy.time import Time

    corrected: dict[str, float | None] = {}
    for name, header in headers.items():
        mjd = times[name]
        if mjd is None:
            corrected[name] = None
            continue
        site, where = _site(header), _pointing(header, wcs)
        if site is None or where is None:
            log.warning(
                "photometry: %s: no %s in the header; times are left uncorrected "
                "([photometry] barycentric)",
                name,
                "site (OBSGEO-X/Y/Z, SITELAT/SITELONG...)" if site is None else "RA/DEC",
            )
            return times, "utc"
        t = Time(mjd, format="mjd", scale="utc", location=site)
        corrected[name] = float((t.tdb + t.light_travel_time(where, ephemeris="builtin")).mjd)
    return corrected, "tdb-barycentric"


def _units(ctx: Context, names: Sequence[str], pos_path: Path, positions: Any) -> list[tasks.Task]:
    """The template's task and one per residual, the positions in each task's ``extra``
    (the ``positions`` file is their provenance input)."""
    where = {
        "source_id": np.asarray(positions["source_id"]),
        "x": np.asarray(positions["x"], float),
        "y": np.asarray(positions["y"], float),
    }
    template = outputs.template_path(ctx)
    template_psf = template.with_name("template.psf.fits")
    frames_dir = ctx.target.stage_dir("photometry") / "frames"
    units = [
        tasks.stage_task(
            ctx,
            "photometry",
            "template",
            {"template": template, "template_psf": template_psf, "positions": pos_path},
            frames_dir / "template.fits",
        )
    ]
    for name in names:
        inputs = {
            "residual": outputs.residual_path(ctx, name),
            "template_psf": template_psf,
            "positions": pos_path,
        }
        if outputs.psf_path(ctx, name).exists():
            inputs["psf"] = outputs.psf_path(ctx, name)
        units.append(tasks.stage_task(ctx, "photometry", name, inputs, frames_dir / f"{name}.fits"))
    return [attrs.evolve(u, extra={**u.extra, **where}) for u in units]


def run(ctx: Context) -> dict[str, Any]:
    """The photometry stage's runner: positions, one task per residual and the template,
    then the light curves, the variables and their pages
    (:func:`oasis_core.engine.lightcurves.write_outputs`); returns a summary."""
    from oasis_core.engine import lightcurves

    settings = ctx.config.settings["photometry"]
    good, bad = outputs.usable_residuals(ctx)
    template = outputs.template_path(ctx)
    if not good or not template.exists():  # no light curve of an earlier run outlives it
        raise outputs.stopped(
            ctx,
            "extract",
            InputError(
                f"{ctx.target.path}: no usable residual or no template; run `oasis subtract` first"
            ),
        )
    wcs = outputs.template_wcs(ctx)
    out_dir = ctx.target.stage_dir("photometry")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = positions(ctx, settings, wcs)
    pos_path = out_dir / "positions.ecsv"
    io.write_table(table, pos_path)
    units = _units(ctx, good, pos_path, table)
    results = tasks.execute(ctx, "photometry", units)
    failed = tasks.failures(results)
    if "template" in failed:
        reason = tasks.failure_reason(results["template"])
        raise outputs.stopped(
            ctx, "extract", StageError(f"photometry: the template could not be measured ({reason})")
        )
    measured = [n for n in good if n not in failed]
    if not measured:
        raise outputs.stopped(
            ctx,
            "extract",
            StageError(
                f"photometry: no residual could be measured ({tasks.first_failure(results)})"
            ),
        )
    frame_tables = {u.name: u.output for u in units if u.name not in failed}
    prov = ctx.provenance("photometry", {"positions": pos_path, **frame_tables}, settings=settings)
    main = out_dir / "lightcurves.ecsv"
    summary: dict[str, Any] = {
        "sources": len(table),
        "frames": len(measured),
        "not_measured": failed,
        "not_subtracted": bad,
    }
    if not ctx.force and is_current(main, prov) and lightcurves.outputs_exist(ctx.target, settings):
        ctx.reporter.result(f"photometry: light curves of {len(table)} source(s) up to date")
        return {**summary, **lightcurves.read_summary(ctx.target)}
    headers = {n: outputs.read_header(outputs.residual_path(ctx, n)) for n in measured}
    times, scale = frame_times(headers, barycentric=settings.barycentric, wcs=wcs)
    summary.update(
        lightcurves.write_outputs(
            ctx.target,
            table,
            frame_tables,
            times,
            settings=settings,
            scale=scale,
            image_kinds={
                int(sid): str(kind)
                for sid, kind in zip(table["source_id"], table["image_kind"], strict=True)
                if kind
            },
            provenance={
                k: str(v[0] if isinstance(v, tuple) else v) for k, v in prov.cards().items()
            },
        )
    )
    ctx.reporter.result(
        f"photometry: {len(table)} source(s) on {len(measured)} residual(s); "
        + ", ".join(f"{k} {v}" for k, v in summary.get("kinds", {}).items())
    )
    return summary
