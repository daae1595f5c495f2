"""Source filtering, the same for every extract backend.

The extract backend detects; the core decides. Each detection gets a ``reason``:

* ``"kept"`` — kept;
* ``"negative"`` — a negative (fading) source, unless ``[extract] keep_negative``;
* ``"dipole"`` — a positive lobe next to a negative one of at least ``dipole_ratio`` of its
  peak and itself at least ``dipole_min`` sigmas deep (a misalignment or PSF-matching
  artefact); both are measured on the residual smoothed with the PSF (a matched filter,
  scaled to unit noise), so that pixel noise around a faint source is not taken for a
  lobe;
* ``"majority"`` — found in more than ``majority`` of the residuals (a variable or badly
  subtracted static object, not a transient);
* ``"point"`` — ``spread_model`` measured and outside [0, 0.1] by more than
  ``SPREAD_TOLERANCE`` plus twice its error ``spread_model_err`` (when given): not
  point-like (sharper than the PSF, a cosmic ray; or extended). A point source scatters
  around 0, so the bare interval would reject half of them; ``SPREAD_TOLERANCE`` (0.003)
  is the margin DES uses to call a source stellar;
* ``"extended"`` — ``extent`` (see :func:`add_lobe_columns`) above ``extent_max``: wider
  than the PSF (fragments of a badly subtracted galaxy or halo); with ``"sharp"`` the
  two-sided point-source test of backends that measure no SPREAD_MODEL;
* ``"masked"`` — more than ``masked_max`` of the pixels within 1.5 FWHM are masked (the
  wings of saturated stars and bleed trails, frame edges, cosmic-ray holes);
* ``"faint"`` — PSF-weighted significance ``peak_norm`` below ``snr_min``, measured by the
  core the same way for every backend (see :func:`add_lobe_columns`);
* ``"sharp"`` — the peak pixel holds more than ``sharp_max`` times the fraction of the flux
  that the PSF puts in its peak, 1 / (2 pi sigma^2) for the residual's FWHM (cosmic rays
  and hot pixels that escaped the mask; the point-source test of the native backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "CATALOG_COLUMNS",
    "FILTER_KEYS",
    "add_lobe_columns",
    "count_matches",
    "describe_columns",
    "filter_detections",
    "filter_options",
    "match_catalogs",
    "matched_significance",
]

#: Margin on the SPREAD_MODEL interval [0, 0.1] (the |SPREAD_MODEL| DES calls stellar).
SPREAD_TOLERANCE = 0.003

#: The ``[extract]`` settings that :func:`filter_detections` takes.
FILTER_KEYS = (
    "extent_max",
    "majority",
    "match_radius",
    "dipole_ratio",
    "dipole_min",
    "keep_negative",
    "masked_max",
    "snr_min",
    "sharp_max",
)


#: The catalog schema: every column an OASIS catalog (``sources/*.ecsv``, the per-residual
#: detections, ``oasis subtract-pair --catalog``) may hold, as ``name: (unit, description)``.
#: ``FLUX`` stands for the residual's unit (its ``BUNIT``: the science frame's, e.g. adu;
#: dimensionless for the master residual, which is in sigma units); ``""`` is dimensionless;
#: None: no unit (text). Extract backends may add columns of their own.
CATALOG_COLUMNS: dict[str, tuple[str | None, str]] = {
    "frame": (None, "the frame whose residual holds the source"),
    "mjd": (
        "d",
        "mid-exposure time of the frame, MJD in the header's TIMESYS (UTC when absent): "
        "MJD-AVG/DATE-AVG, else MJD-OBS/DATE-OBS (the start) plus EXPTIME/2; masked when "
        "the header gives no time and for the master residual (no single time)",
    ),
    "x": ("pix", "0-based column of the source on the residual's (the template's) grid"),
    "y": ("pix", "0-based row of the source on the residual's (the template's) grid"),
    "flux": ("FLUX", "flux of the source in the residual's unit, negative when fading"),
    "flux_err": ("FLUX", "1-sigma error of flux, in the residual's unit"),
    "peak": ("FLUX", "the source's extreme pixel value in the residual's unit, signed"),
    "snr": ("", "detection significance (sigmas), as the extract backend measures it"),
    "a": ("pix", "semi-major axis of the source"),
    "b": ("pix", "semi-minor axis of the source"),
    "theta": ("rad", "position angle of the major axis, counter-clockwise from +x"),
    "npix": ("pix2", "number of pixels of the detection"),
    "sign": ("", "+1: brighter in the science frame than in the template; -1: fainter"),
    "flag": ("", "the extract backend's flags (a bit field; 0: clean)"),
    "spread_model": ("", "SExtractor's SPREAD_MODEL (about 0 for a point source)"),
    "spread_model_err": ("", "1-sigma error of spread_model"),
    "peak_norm": ("", "PSF-weighted (matched-filter) significance at the source, sigmas"),
    "lobe_min": ("", "opposite extreme of the matched-filter significance nearby, sigmas"),
    "masked_frac": ("", "fraction of the pixels within 1.5 FWHM that are masked"),
    "extent": ("", "significance through a filter twice the PSF over the PSF's (~0.8 point)"),
    "fwhm": ("pix", "FWHM of the residual's PSF"),
    "n_frames": ("", "number of individual residuals with a positive detection there"),
    "reason": (None, "'kept', or why the source was filtered out (oasis_core.engine.sources)"),
    "kind": (
        None,
        "transient, fading or variable: the kind of a source of the variability image "
        "there, else transient (positive) or fading (negative)",
    ),
    "ra": ("deg", "right ascension from the template's WCS (its RADESYS, ICRS when absent)"),
    "dec": ("deg", "declination from the template's WCS (its RADESYS, ICRS when absent)"),
}

#: Display formats of the columns that need more than the catalogs' 3 decimals.
_FORMATS = {"ra": ".6f", "dec": ".6f", "mjd": ".6f"}


def describe_columns(table: Any, *, flux_unit: Any = None, missing_only: bool = False) -> Any:
    """Give the columns of ``table`` named in :data:`CATALOG_COLUMNS` their unit and
    description (in place; ``table`` is returned): the one place catalog columns get them.

    Parameters
    ----------
    table : astropy.table.Table
        A catalog; columns the schema does not know are left as they are.
    flux_unit : str or astropy.units.Unit, optional
        The residual's unit (:func:`oasis_core.engine.io.header_unit`) for ``flux``, ``flux_err``
        and ``peak``; None keeps the unit those columns have (none when they have none).
    missing_only : bool
        Only the columns that have no description yet (what a writer adds to a table
        whose builder described its own columns).
    """
    import astropy.units as u

    for name in table.colnames:
        if name not in CATALOG_COLUMNS or (missing_only and table[name].info.description):
            continue
        unit, description = CATALOG_COLUMNS[name]
        col = table[name]
        col.info.description = description
        if unit == "FLUX":
            if flux_unit is not None:
                col.info.unit = u.Unit(flux_unit)
        elif unit is not None:
            col.info.unit = u.Unit(unit)
        if name in _FORMATS:
            col.info.format = _FORMATS[name]
    return table


def filter_options(settings: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`filter_detections` from the ``[extract]`` settings."""
    return {k: getattr(settings, k) for k in FILTER_KEYS}


def add_lobe_columns(
    table: Any,
    norm: np.ndarray,
    *,
    radius: float,
    weight: np.ndarray | None = None,
    smooth: float = 0.0,
) -> Any:
    """Add ``peak_norm`` and ``lobe_min``: the extreme normalised pixel at each source and
    the opposite extreme within ``radius`` pixels, and ``masked_frac``: the fraction of
    pixels within ``radius`` whose ``weight`` is 0 (vectorised over sources).

    With ``smooth`` > 0 the normalised residual is first smoothed with a Gaussian of that
    sigma and rescaled to unit noise (white noise smoothed so loses a factor
    ``2 sqrt(pi) smooth``), so the columns are matched-filter significances. When the
    residual's noise is correlated (the science frame was the image convolved) that map
    spreads more than unit; it is then divided by its measured robust spread, recorded in
    ``table.meta["noise_correlation"]``.

    Also with ``smooth`` > 0, ``extent``: the significance through a filter twice as wide
    over that through the PSF-matched one, at the peak. A point source gives about 0.8
    (a Gaussian PSF; a little more with Moffat wings), a source much wider than the PSF
    up to 2: the point-source test of backends that measure no SPREAD_MODEL."""
    n = len(table)
    table["peak_norm"] = np.zeros(n, dtype=np.float32)
    table["lobe_min"] = np.zeros(n, dtype=np.float32)
    table["masked_frac"] = np.zeros(n, dtype=np.float32)
    if smooth > 0:
        table["extent"] = np.zeros(n, dtype=np.float32)
    if n == 0:
        return table
    wide = None
    if smooth > 0:
        bad = None if weight is None else np.asarray(weight) <= 0
        raw = norm
        norm, factor = matched_significance(raw, bad, smooth)
        table.meta["noise_correlation"] = round(factor, 4)
        wide, _ = matched_significance(raw, bad, 2 * smooth)
    r = int(np.ceil(radius))
    ny, nx = norm.shape
    padded = np.pad(norm, r, mode="constant")
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = (dx**2 + dy**2) <= radius**2
    xs = np.rint(np.asarray(table["x"], float)).astype(int).clip(0, nx - 1) + r
    ys = np.rint(np.asarray(table["y"], float)).astype(int).clip(0, ny - 1) + r
    stamps = padded[ys[:, None, None] + dy[None], xs[:, None, None] + dx[None]]
    sign = np.asarray(table["sign"], float) if "sign" in table.colnames else np.ones(n)
    oriented = stamps * sign[:, None, None]
    peak = np.where(inside, oriented, -np.inf).max(axis=(1, 2))
    lobe = np.where(inside, oriented, np.inf).min(axis=(1, 2))
    table["peak_norm"] = peak.astype(np.float32)
    table["lobe_min"] = lobe.astype(np.float32)
    if wide is not None:
        at = np.where(inside, oriented, -np.inf).reshape(n, -1).argmax(axis=1)
        py = ys - r + dy.ravel()[at]
        px = xs - r + dx.ravel()[at]
        inside_image = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        wide_at = np.where(
            inside_image, wide[py.clip(0, ny - 1), px.clip(0, nx - 1)] * sign, np.nan
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            table["extent"] = (wide_at / np.where(peak > 0, peak, np.nan)).astype(np.float32)
    if weight is not None:
        bad = np.pad(weight <= 0, r, mode="constant", constant_values=True)
        stamps_bad = bad[ys[:, None, None] + dy[None], xs[:, None, None] + dx[None]]
        frac = (stamps_bad & inside).sum(axis=(1, 2)) / inside.sum()
        table["masked_frac"] = frac.astype(np.float32)
    return table


def matched_significance(
    norm: np.ndarray, bad: np.ndarray | None, sigma: float
) -> tuple[np.ndarray, float]:
    """A residual in sigmas (``norm``, 0 on ``bad`` pixels) smoothed with a Gaussian of
    ``sigma`` pixels and scaled to unit noise: at a point source of that width, its
    PSF-weighted (optimal) significance.

    White noise smoothed so has unit spread; a residual whose noise is correlated (the
    science frame was the image convolved) spreads more, which would turn noise into
    sources. So the map is divided by its measured robust spread when that exceeds 1;
    that factor is returned too. The spread is the IQR / 1.349 of every other pixel away
    from ``bad`` ones (of every pixel farther than 2 sigma from them when that leaves
    fewer than 400: a cutout), the
    values more than 4 spreads from the median left out until none is (on a cutout a
    single bright source covers much of the sample); fewer than 100 pixels: no rescaling.
    """
    from scipy.ndimage import gaussian_filter

    smoothed = gaussian_filter(np.asarray(norm, np.float32), sigma, mode="constant")
    smoothed *= np.float32(2.0 * np.sqrt(np.pi) * sigma)
    grow = max(1, int(np.ceil(2 * sigma)))
    sample = _sample(smoothed, bad, 2, grow)
    if sample.size < 400:  # a cutout: every pixel farther than 2 sigma from a bad one
        sample = _sample(smoothed, bad, 1, grow)
    if sample.size < 100:
        return smoothed, 1.0
    spread = _clipped_spread(sample)
    factor = spread if np.isfinite(spread) and spread > 1.0 else 1.0
    return smoothed / np.float32(factor), factor


def _sample(smoothed: np.ndarray, bad: np.ndarray | None, step: int, grow: int) -> np.ndarray:
    """Every ``step``-th pixel of ``smoothed`` farther than ``grow`` (in sampled pixels)
    from a ``bad`` one, or, without ``bad``, its non-zero ones."""
    from scipy.ndimage import binary_dilation

    sample = smoothed[::step, ::step]
    if bad is None:
        return sample[sample != 0]
    near = binary_dilation(bad[::step, ::step], iterations=grow)
    return sample[~near]


def _clipped_spread(sample: np.ndarray) -> float:
    """IQR / 1.349 of ``sample``, values beyond 4 spreads from the median left out until
    none is (at most 10 rounds)."""
    values = np.asarray(sample, np.float64)
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    spread = float((q75 - q25) / 1.349)
    for _ in range(10):
        keep = np.abs(values - med) <= 4.0 * spread
        if keep.all() or keep.sum() < 100:
            break
        values = values[keep]
        q25, med, q75 = np.percentile(values, [25, 50, 75])
        spread = float((q75 - q25) / 1.349)
    return spread


def match_catalogs(a: Any, b: Any, radius: float) -> np.ndarray:
    """For each row of ``a``, the index of the nearest row of ``b`` within ``radius``
    pixels, or -1."""
    from scipy.spatial import cKDTree

    out = np.full(len(a), -1, dtype=int)
    if len(a) == 0 or len(b) == 0:
        return out
    tree = cKDTree(np.column_stack([b["x"], b["y"]]))
    dist, idx = tree.query(np.column_stack([a["x"], a["y"]]), distance_upper_bound=radius)
    ok = np.isfinite(dist)
    out[ok] = idx[ok]
    return out


def count_matches(points: Any, catalogs: Sequence[Any], radius: float) -> np.ndarray:
    """Number of catalogs in ``catalogs`` with a source within ``radius`` of each point."""
    counts = np.zeros(len(points), dtype=int)
    for cat in catalogs:
        counts += match_catalogs(points, cat, radius) >= 0
    return counts


def filter_detections(
    table: Any,
    *,
    catalogs: Sequence[Any],
    n_residuals: int,
    majority: float,
    match_radius: float,
    dipole_ratio: float,
    keep_negative: bool,
    masked_max: float = 1.0,
    snr_min: float = 0.0,
    sharp_max: float = 0.0,
    dipole_min: float = 0.0,
    extent_max: float = 0.0,
) -> Any:
    """Return ``table`` with ``n_frames`` (residuals where the source is found) and
    ``reason`` columns.

    Parameters
    ----------
    table : astropy.table.Table
        Detections with ``x``, ``y``, ``sign``, ``peak_norm``, ``lobe_min`` (see
        :func:`add_lobe_columns`) and optionally ``spread_model``.
    catalogs : sequence of Table
        The positive detections of every individual residual (for the majority test).
    n_residuals : int
        Number of residuals searched.
    """
    n = len(table)
    reason = np.full(n, "kept", dtype="U10")
    sign = np.asarray(table["sign"]) if "sign" in table.colnames else np.ones(n)
    counts = count_matches(table, catalogs, match_radius) if n else np.zeros(0, int)
    table["n_frames"] = counts
    if n:
        peak = np.asarray(table["peak_norm"], float)
        lobe = np.asarray(table["lobe_min"], float)
        dipole = (lobe < -dipole_ratio * np.maximum(peak, 0)) & (lobe < -dipole_min)
        too_common = counts > majority * max(n_residuals, 1)
        if n_residuals < 3:
            too_common[:] = False  # a majority of one or two frames means nothing
        point = np.zeros(n, bool)
        if "spread_model" in table.colnames:
            sm = np.asarray(table["spread_model"], float)
            err = np.zeros(n)
            if "spread_model_err" in table.colnames:
                raw = np.asarray(table["spread_model_err"], float)
                err = np.clip(np.nan_to_num(raw, nan=0.0, posinf=1.0), 0.0, 1.0)
            margin = SPREAD_TOLERANCE + 2 * err
            point = np.isfinite(sm) & ((sm < -margin) | (sm > 0.1 + margin))
        reason[point] = "point"
        reason[np.asarray(table["peak_norm"], float) < snr_min] = "faint"
        if sharp_max > 0 and {"peak", "flux", "fwhm"} <= set(table.colnames):
            sigma = np.asarray(table["fwhm"], float) / 2.3548
            psf_peak = 1.0 / (2.0 * np.pi * sigma**2)
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.asarray(table["peak"], float) / np.asarray(table["flux"], float)
            reason[np.isfinite(frac) & (frac > sharp_max * psf_peak)] = "sharp"
        if extent_max > 0 and "extent" in table.colnames:
            ext = np.asarray(table["extent"], float)
            reason[np.isfinite(ext) & (ext > extent_max)] = "extended"
        if "masked_frac" in table.colnames:
            reason[np.asarray(table["masked_frac"], float) > masked_max] = "masked"
        reason[too_common] = "majority"
        reason[dipole] = "dipole"
        if not keep_negative:
            reason[sign < 0] = "negative"
    table["reason"] = reason
    return table
