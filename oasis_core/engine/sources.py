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
* ``"faint"`` — PSF-weighted significance ``peak_norm`` below the detection threshold:
  ``snr_min``, or higher where the residual's own null says so (``false_per_mpix``, see
  :func:`detection_threshold`), measured by the core the same way for every backend (see
  :func:`add_lobe_columns`);
* ``"wing"`` — above the threshold against the noise alone but not against the noise
  and the residual imperfect PSF matching leaves around the template's stars:
  ``peak_norm`` below ``sqrt(threshold**2 + (wing_sigma * wing)**2)`` (see
  :func:`mismatch_map`): the rings of bright stars;
* ``"template"`` — the template's own frames show the source in their
  residuals' mean as much as the other residuals do (``tpl_sig``,
  :func:`oasis_core.engine.variability.template_artifacts`): a source of the template (its
  PSF at some brightness, a hole), not of the sky, which the template's frames cannot
  show since the template is their stack;
* ``"sharp"`` — the peak pixel holds more than ``sharp_max`` times the fraction of the flux
  that the PSF puts in its peak, 1 / (2 pi sigma^2) for the residual's FWHM (cosmic rays
  and hot pixels that escaped the mask; the point-source test of the native backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from oasis_core.contracts.model import MIN_WEIGHT
from oasis_core.engine.stats import exact_median, local_maxima

__all__ = [
    "CATALOG_COLUMNS",
    "FILTER_KEYS",
    "MIN_WEIGHT",
    "add_lobe_columns",
    "add_null_columns",
    "count_matches",
    "describe_columns",
    "detection_threshold",
    "filter_detections",
    "filter_options",
    "match_catalogs",
    "matched_significance",
    "matched_significance_at",
    "mismatch_map",
    "null_peak_density",
    "peak_count_threshold",
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
    "false_per_mpix",
    "wing_sigma",
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
    "masked_frac": ("", "fraction of the pixels within 1.5 FWHM that are masked (weight < 0.5)"),
    "extent": ("", "significance through a filter twice the PSF over the PSF's (~0.8 point)"),
    "fwhm": ("pix", "FWHM of the residual's PSF"),
    "wing": (
        "",
        "expected matched-filter spread (sigmas) of the imperfect PSF matching around the "
        "template's stars at the source; 0 away from them",
    ),
    "threshold": ("", "the residual's detection threshold on peak_norm (sigmas)"),
    "tpl_sig": (
        "",
        "the template's own frames' residuals' mean there, PSF-weighted, "
        "sigmas, signed like the source: a source of the sky is about 0 there",
    ),
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
    significance: tuple[np.ndarray, float] | None = None,
) -> Any:
    """Add ``peak_norm`` and ``lobe_min``: the extreme normalised pixel at each source and
    the opposite extreme within ``radius`` pixels, and ``masked_frac``: the fraction of
    pixels within ``radius`` whose ``weight`` is below 0.5 (vectorised over sources).

    With ``smooth`` > 0 the normalised residual is first smoothed with a Gaussian of that
    sigma and rescaled to unit noise (white noise smoothed so loses a factor
    ``2 sqrt(pi) smooth``), so the columns are matched-filter significances. When the
    residual's noise is correlated (the science frame was the image convolved) that map
    spreads more than unit; it is then divided by its measured robust spread, recorded in
    ``table.meta["noise_correlation"]``.

    Also with ``smooth`` > 0, ``extent``: the significance through a filter twice as wide
    over that through the PSF-matched one, at the peak. A point source gives about 0.8
    (a Gaussian PSF; a little more with Moffat wings), a source much wider than the PSF
    up to 2: the point-source test of backends that measure no SPREAD_MODEL.

    ``significance``: :func:`matched_significance` of ``norm`` at ``smooth`` when the
    caller has it already (the map and its factor), not made again."""
    n = len(table)
    table["peak_norm"] = np.zeros(n, dtype=np.float32)
    table["lobe_min"] = np.zeros(n, dtype=np.float32)
    table["masked_frac"] = np.zeros(n, dtype=np.float32)
    if smooth > 0:
        table["extent"] = np.zeros(n, dtype=np.float32)
    if n == 0:
        return table
    wide = False
    if smooth > 0:
        bad = None if weight is None else np.asarray(weight) <= 0
        raw = norm
        norm, factor = significance or matched_significance(raw, bad, smooth)
        table.meta["noise_correlation"] = round(factor, 4)
        wide = True
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
    if wide:
        at = np.where(inside, oriented, -np.inf).reshape(n, -1).argmax(axis=1)
        py = ys - r + dy.ravel()[at]
        px = xs - r + dx.ravel()[at]
        inside_image = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        wide_at = matched_significance_at(
            raw, bad, 2 * smooth, py.clip(0, ny - 1), px.clip(0, nx - 1)
        )
        wide_at = np.where(inside_image, wide_at * sign, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            table["extent"] = (wide_at / np.where(peak > 0, peak, np.nan)).astype(np.float32)
    if weight is not None:
        # below half weight, less than half the data behind a pixel is good (the
        # template's median of one frame of five around a saturated star): masked
        bad = np.pad(weight < MIN_WEIGHT, r, mode="constant", constant_values=True)
        stamps_bad = bad[ys[:, None, None] + dy[None], xs[:, None, None] + dx[None]]
        frac = (stamps_bad & inside).sum(axis=(1, 2)) / inside.sum()
        table["masked_frac"] = frac.astype(np.float32)
    return table


#: About how many pixels :func:`matched_significance` measures its spread on (every
#: other pixel of a 1024^2 residual; the IQR of that many is good to a fraction of a %).
SPREAD_SAMPLE = 262_144


def matched_significance(
    norm: np.ndarray, bad: np.ndarray | None, sigma: float
) -> tuple[np.ndarray, float]:
    """A residual in sigmas (``norm``, 0 on ``bad`` pixels) smoothed with a Gaussian of
    ``sigma`` pixels and scaled to unit noise: at a point source of that width, its
    PSF-weighted (optimal) significance.

    White noise smoothed so has unit spread; a residual whose noise is correlated (the
    science frame was the image convolved) spreads more, which would turn noise into
    sources. So the map is divided by its measured robust spread when that exceeds 1;
    that factor is returned too. The spread is the IQR / 1.349 of every other pixel (every
    ``n``-th in both axes on images larger than 1024^2, :data:`SPREAD_SAMPLE`) away
    from ``bad`` ones (of every pixel farther than 2 sigma from them when that leaves
    fewer than 400: a cutout), the
    values more than 4 spreads from the median left out until none is (on a cutout a
    single bright source covers much of the sample); fewer than 100 pixels: no rescaling.
    """
    from scipy.ndimage import gaussian_filter

    smoothed = gaussian_filter(np.asarray(norm, np.float32), sigma, mode="constant")
    smoothed *= np.float32(2.0 * np.sqrt(np.pi) * sigma)
    grow = max(1, int(np.ceil(2 * sigma)))
    step = max(2, int(np.sqrt(smoothed.size / SPREAD_SAMPLE)))
    sample = _sample(smoothed, bad, step, -(-2 * grow // step))  # 2 grow pixels away
    if sample.size < 400:  # a cutout: every pixel farther than 2 sigma from a bad one
        sample = _sample(smoothed, bad, 1, grow)
    if sample.size < 100:
        return smoothed, 1.0
    spread = _clipped_spread(sample)
    factor = spread if np.isfinite(spread) and spread > 1.0 else 1.0
    return smoothed / np.float32(factor), factor


#: Side (px) of the central crop on which :func:`noise_correlation` measures a residual.
CORRELATION_CROP = 512


def noise_correlation(residual: Any, fwhm: float | None = None) -> float:
    """How much more a residual's noise spreads at the PSF's scale than white noise of
    its noise image would: :func:`matched_significance`'s factor (at least 1), measured
    on a central :data:`CORRELATION_CROP`-px crop (the correlation is a property of the
    convolution, the same across the frame). A residual whose science frame was
    convolved (or both frames, as in cross-convolution) has neighbouring pixels that
    share noise: at the PSF's scale its noise is this many times its pixels' noise, so in
    a mean of residuals it deserves ``1 / factor**2`` of the weight its pixels suggest.

    ``fwhm``: the residual's PSF FWHM (default: its ``FWHM`` card, else
    ``meta["fwhm"]``, else 3 px). 1 when fewer than 400 pixels are usable.
    """
    data = np.asarray(residual.data)
    ny, nx = data.shape
    half = CORRELATION_CROP // 2
    y0, x0 = max(0, ny // 2 - half), max(0, nx // 2 - half)
    crop = np.s_[y0 : y0 + CORRELATION_CROP, x0 : x0 + CORRELATION_CROP]
    values = np.asarray(data[crop], np.float32)
    noise = np.asarray(residual.noise[crop], np.float32)
    good = (np.asarray(residual.weight[crop]) > 0) & (noise > 0) & np.isfinite(values)
    if good.sum() < 400:
        return 1.0
    if fwhm is None:
        header = residual.header or {}
        for value in (header.get("FWHM"), residual.meta.get("fwhm"), 3.0):
            if isinstance(value, (int, float)) and np.isfinite(value) and value > 0:
                fwhm = float(value)
                break
    level = np.median(values[good])
    z = np.where(good, (values - level) / np.where(good, noise, 1.0), np.float32(0.0))
    _, factor = matched_significance(z, ~good, float(fwhm) / 2.3548)
    return float(factor)


def _sample(smoothed: np.ndarray, bad: np.ndarray | None, step: int, grow: int) -> np.ndarray:
    """Every ``step``-th pixel of ``smoothed`` farther than ``grow`` (in sampled pixels)
    from a ``bad`` one, or, without ``bad``, its non-zero ones."""
    return _grid_sample(smoothed[::step, ::step], bad, step, grow)


def _grid_sample(grid: np.ndarray, bad: np.ndarray | None, step: int, grow: int) -> np.ndarray:
    """:func:`_sample` of a map of which only the sampled pixels (``grid``, every
    ``step``-th) were made."""
    from scipy.ndimage import binary_dilation

    if bad is None:
        return grid[grid != 0]
    near = binary_dilation(bad[::step, ::step], iterations=grow)
    return grid[~near]


def _gaussian_weights(sigma: float) -> np.ndarray:
    """The 1-D kernel of ``scipy.ndimage.gaussian_filter(..., sigma)`` (truncated at 4
    sigma, normalised)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
    return weights / weights.sum()


def matched_significance_at(
    norm: np.ndarray, bad: np.ndarray | None, sigma: float, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """:func:`matched_significance` of ``norm`` at the pixels ``(ys, xs)`` only: the
    smoothed map is made there and on the grid its spread is measured on (every
    ``step``-th pixel), about a tenth of the work of the whole map for a few sources
    (the ``extent`` column needs a second, wider map at the peaks only)."""
    norm = np.asarray(norm, np.float32)
    ys, xs = np.asarray(ys, np.int64), np.asarray(xs, np.int64)
    step = max(2, int(np.sqrt(norm.size / SPREAD_SAMPLE)))
    grow = max(1, int(np.ceil(2 * sigma)))
    gain = np.float32(2.0 * np.sqrt(np.pi) * sigma)
    weights = _gaussian_weights(sigma)
    r = weights.size // 2
    kernel = weights.astype(np.float32)
    ny, nx = norm.shape
    # the grid: rows smoothed at every step-th row, then those at every step-th column
    padded = np.pad(norm, ((r, r), (0, 0)))
    n = len(range(0, ny, step))
    rows = np.zeros((n, nx), np.float32)
    for k, w in enumerate(kernel):
        rows += w * padded[k : k + (n - 1) * step + 1 : step]
    padded = np.pad(rows, ((0, 0), (r, r)))
    m = len(range(0, nx, step))
    grid = np.zeros((n, m), np.float32)
    for k, w in enumerate(kernel):
        grid += w * padded[:, k : k + (m - 1) * step + 1 : step]
    grid *= gain
    sample = _grid_sample(grid, bad, step, -(-2 * grow // step))
    if sample.size < 400:  # a cutout: the whole map, as matched_significance measures it
        return matched_significance(norm, bad, sigma)[0][ys, xs]
    spread = _clipped_spread(sample)
    factor = spread if np.isfinite(spread) and spread > 1.0 else 1.0
    # the pixels asked for: their stamps against the 2-D kernel
    padded = np.pad(norm, r)
    off = np.arange(-r, r + 1)
    stamps = padded[(ys + r)[:, None, None] + off[None, :, None], (xs + r)[:, None, None] + off]
    values = np.einsum("nij,i,j->n", stamps.astype(np.float64), weights, weights)
    return (values * gain / factor).astype(np.float32)


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


#: Levels (matched-filter sigmas) between which :func:`null_peak_density` counts the peaks
#: of the sign-flipped significance map: where a Gaussian field's peaks are plentiful and
#: sources few.
NULL_LEVELS = (3.0, 4.5)

#: Fewest null peaks between :data:`NULL_LEVELS` for a calibration (fewer: none).
NULL_MIN_PEAKS = 20

#: Pixels whose expected mismatch spread (:func:`mismatch_map`) exceeds this are left out
#: of the null count: there the residual is not noise alone.
NULL_WING_MAX = 0.5

#: How far from a star :func:`mismatch_map` measures and paints, in FWHM of the residual.
WING_RADIUS = 6.0

#: Stars that calibrate :func:`mismatch_map`: this many whose core is unmasked and whose
#: peak is at least :data:`WING_MIN_PEAK` times the residual's noise, the brightest
#: :data:`WING_GROUP` of each of ``WING_STARS // WING_GROUP`` bins equal in log
#: brightness (the mismatch is not proportional to brightness: the brightest stars leave
#: relatively more with some kernels, the faint ones with a median template).
WING_STARS = 64
WING_MIN_PEAK = 30.0
WING_GROUP = 8

#: Fewest calibration stars for a mismatch model (fewer: no ``wing`` test).
WING_MIN_STARS = 5

#: Stars whose expected mismatch spread stays below this everywhere are not painted.
WING_PAINT_MIN = 0.2


def _peak_law(u: Any) -> Any:
    """The shape of the number of peaks above ``u`` of a smooth Gaussian field (its Euler
    characteristic density at high levels): ``u exp(-u**2 / 2)``."""
    u = np.asarray(u, float)
    return u * np.exp(-0.5 * u**2)


def null_peak_density(
    significance: np.ndarray,
    clean: np.ndarray,
    *,
    levels: tuple[float, float] = NULL_LEVELS,
    min_peaks: int = NULL_MIN_PEAKS,
) -> tuple[float, int, float]:
    """The amplitude ``A`` of the residual's own null: peaks per megapixel above level
    ``u`` are ``A u exp(-u**2 / 2)``.

    The null is the significance map with its sign flipped (transients are positive;
    what is negative there is noise, fading sources aside): its local maxima on the
    ``clean`` pixels between ``levels`` are counted and ``A`` is the maximum-likelihood
    amplitude of the Gaussian-field peak-count law (the Euler-characteristic density,
    which holds whatever the noise's correlation; the correlation sets ``A``).

    Parameters
    ----------
    significance : ndarray
        Matched-filter significance map (:func:`matched_significance`).
    clean : ndarray of bool
        The pixels to count on (away from masked pixels and from bright stars' wings).
    levels : (float, float)
        The range of levels counted.
    min_peaks : int
        Fewer peaks in range: no calibration (``nan``).

    Returns
    -------
    amplitude : float
        ``A``, per megapixel (``nan`` when there are too few peaks or pixels).
    n_peaks : int
        Peaks counted.
    area : float
        Clean area, megapixels.
    """
    flipped = -np.asarray(significance, np.float32)
    clean = np.asarray(clean, bool)
    area = float(clean.sum()) / 1e6
    lo, hi = levels
    # the peaks below ``lo`` are not counted: only the pixels above it are candidates
    ys, xs = local_maxima(flipped, *np.nonzero(clean & (flipped >= lo)), 1)
    values = flipped[ys, xs]
    n_peaks = int(((values >= lo) & (values < hi)).sum())
    expected = float(_peak_law(lo) - _peak_law(hi))
    if n_peaks < min_peaks or area <= 0:
        return float("nan"), n_peaks, area
    return n_peaks / expected / area, n_peaks, area


def peak_count_threshold(amplitude: float, rate: float) -> float:
    """The level ``u`` at which ``amplitude * u * exp(-u**2 / 2)`` peaks per megapixel
    (:func:`null_peak_density`) are expected: ``rate``. ``nan`` when either is not
    positive and finite; at least the lower of :data:`NULL_LEVELS`.

    Examples
    --------
    >>> round(peak_count_threshold(5000.0, 0.45), 2)
    4.65
    """
    if not (np.isfinite(amplitude) and np.isfinite(rate) and amplitude > 0 and rate > 0):
        return float("nan")
    u = 5.0
    for _ in range(60):  # u = sqrt(2 ln(A u / rate)) converges fast for u > 1
        arg = amplitude * u / rate
        if arg <= np.e ** (0.5 * NULL_LEVELS[0] ** 2):
            return NULL_LEVELS[0]
        u = float(np.sqrt(2.0 * np.log(arg)))
    return max(u, NULL_LEVELS[0])


def detection_threshold(meta: Any, *, snr_min: float, false_per_mpix: float) -> tuple[float, float]:
    """A residual's detection threshold on ``peak_norm``: the level its own null gives
    ``false_per_mpix`` false detections per megapixel at (:func:`peak_count_threshold` of
    ``meta["null_density"]``, which :func:`add_null_columns` records), never below
    ``snr_min`` (the floor; ``false_per_mpix`` 0 or no calibration: ``snr_min`` alone).

    Returns
    -------
    threshold, calibrated : float
        The threshold and the null's level alone (``nan`` without one).
    """
    density = float(meta.get("null_density", np.nan)) if meta is not None else np.nan
    calibrated = peak_count_threshold(density, false_per_mpix) if false_per_mpix > 0 else np.nan
    threshold = max(snr_min, calibrated) if np.isfinite(calibrated) else snr_min
    return float(threshold), float(calibrated)


def _stamps(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, r: int, fill: Any) -> np.ndarray:
    """``(n, 2r+1, 2r+1)`` cutouts of ``image`` centred on integer ``xs``, ``ys``, ``fill``
    beyond its edges."""
    padded = np.pad(image, r, mode="constant", constant_values=fill)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    return padded[ys[:, None, None] + r + dy[None], xs[:, None, None] + r + dx[None]]


def mismatch_map(
    significance: np.ndarray,
    template: np.ndarray,
    noise: np.ndarray,
    weight: np.ndarray,
    *,
    fwhm: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The spread, in matched-filter sigmas, that imperfect PSF matching adds around the
    template's stars, measured on the residual itself.

    A kernel never reproduces the science PSF exactly: its support and basis reach only
    so far into the wings, so every star leaves a ring whose amplitude is a fixed fraction
    of the star's brightness at each distance (about 1e-3 of its peak 2.5-4 FWHM out in
    the demo, as bright as the template's own wing there; so not a fraction of the local
    template brightness). So for each distance ``r`` (bins of half a FWHM out to
    :data:`WING_RADIUS` FWHM) the excess variance of the significance map over unit,
    in units of (star peak / local noise)**2, is the median over groups of
    :data:`WING_GROUP` unmasked template stars of like brightness, from the brightest
    down to :data:`WING_MIN_PEAK` times the noise (:func:`_calibration_stars`),
    ``c(r)**2``; each star of template peak ``T`` then adds ``c(r) T / noise`` at
    distance ``r`` with the profile of the group nearest its brightness (the largest
    where stars overlap). The median ignores a star that varied: a brightening centred
    on a star is judged against the mismatch of the stars like it, not its own. Every
    star of the template is painted, its core masked in the residual or not (a star
    saturated there, or where the template misses frames): its rings reach the
    residual's pixels around the mask all the same.

    Parameters
    ----------
    significance : ndarray
        Matched-filter significance map of the residual (:func:`matched_significance`).
    template : ndarray
        The template, on the residual's grid (its sky is taken as its median).
    noise, weight : ndarray
        The residual's noise image and weight.
    fwhm : float
        FWHM of the residual's PSF, pixels.

    Returns
    -------
    wing : ndarray
        float32 map, 0 away from stars (and everywhere when fewer than
        :data:`WING_MIN_STARS` stars calibrate it).
    info : dict
        ``wing_stars`` (calibration stars found; used when at least
        :data:`WING_MIN_STARS`) and ``wing_peak`` (the largest ``c(r)``
        over ``r``, per unit of peak / noise).
    """
    template = np.asarray(template, np.float32)
    noise = np.asarray(noise, np.float32)
    good = (np.asarray(weight) > 0) & (noise > 0) & np.isfinite(template)
    wing = np.zeros(template.shape, np.float32)
    info: dict[str, Any] = {"wing_stars": 0, "wing_peak": 0.0}
    if good.sum() < 100:
        return wing, info
    # every star of the template, its core masked in the residual or not (a saturated
    # star, a template that misses frames there): its rings are in the residual anyway
    finite = np.isfinite(template)
    stars = np.where(finite, template - np.float32(exact_median(template[good])), 0)
    n0 = exact_median(noise[good])
    size = max(3, 2 * round(fwhm / 2) + 1)
    # the template's stars, 3 times the template's own sky noise above its sky: in the
    # template's units (a master residual's noise, in sigmas, would make every bump of
    # the template's sky a star)
    sample = stars[good][:: max(1, int(good.sum()) // 200_000)]
    t0 = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    ys, xs = local_maxima(stars, *np.nonzero(finite & (stars > 3 * t0)), size // 2)
    peaks = stars[ys, xs]
    order = np.argsort(peaks)[::-1]
    ys, xs, peaks = ys[order], xs[order], peaks[order]

    step = max(1.0, fwhm / 2)
    r = int(np.ceil(WING_RADIUS * fwhm))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    dist = np.hypot(dx, dy)
    nbins = int(np.ceil(r / step))
    bins = np.minimum((dist / step).astype(int), nbins)  # nbins: beyond the radius
    core = dist <= fwhm

    # calibration: stars with an unmasked core, in groups of like brightness spread over
    # the whole range from the brightest down to WING_MIN_PEAK (the mismatch is not
    # proportional to brightness: a median template leaves faint stars relatively more)
    chosen = _calibration_stars(peaks, xs, ys, good, r, core, WING_MIN_PEAK * n0)
    cx, cy, cp = xs[chosen], ys[chosen], peaks[chosen]
    valid = _stamps(good, cx, cy, r, False)
    info["wing_stars"] = len(cp)
    if len(cp) < WING_MIN_STARS:
        return wing, info
    ratio2 = _excess_by_distance(
        _stamps(np.asarray(significance, np.float32), cx, cy, r, 0),
        _stamps(noise, cx, cy, r, 0),
        valid,
        cp,
        bins,
        nbins,
    )
    group = np.minimum(np.arange(len(cp)) // WING_GROUP, max(len(cp) // WING_GROUP - 1, 0))
    n_groups = int(group.max()) + 1
    c = np.zeros((n_groups, nbins + 1), np.float32)  # the last column: beyond the radius
    group_peak = np.zeros(n_groups)
    for g in range(n_groups):  # a handful of groups
        members = ratio2[group == g]
        measured = np.isfinite(members).any(axis=0)  # bins with a valid star (cutouts)
        c2 = np.zeros(nbins)
        c2[measured] = np.nanmedian(members[:, measured], axis=0)
        c[g, :nbins] = np.sqrt(np.clip(c2, 0, None))
        group_peak[g] = np.median(cp[group == g])
    info = {"wing_stars": len(cp), "wing_peak": float(c.max())}
    if not c.max() > 0:
        return wing, info

    # every star whose mismatch can reach WING_PAINT_MIN, with its group's profile
    nearest = np.abs(np.log(peaks)[:, None] - np.log(group_peak)[None]).argmin(axis=1)
    paint = peaks * c.max(axis=1)[nearest] / n0 >= WING_PAINT_MIN
    profiles = c[:, bins]  # (group, offset): per unit of peak / noise
    for lo in range(0, int(paint.sum()), 512):  # in chunks, to bound memory
        idx = np.flatnonzero(paint)[lo : lo + 512]
        _paint(wing, xs[idx], ys[idx], peaks[idx], profiles[nearest[idx]], r, n0)
    # the largest peak x profile over the stars, in the noise of each pixel: the noise is
    # the pixel's, whichever star paints it, so it divides once, at the end
    wing /= np.where(noise > 0, noise, np.float32(n0))
    return wing, info


def _calibration_stars(
    peaks: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    good: np.ndarray,
    r: int,
    core: np.ndarray,
    floor: float,
) -> np.ndarray:
    """Indices (brightest first) of up to :data:`WING_STARS` stars of peak at least
    ``floor`` whose core is unmasked: up to :data:`WING_GROUP` from each of
    ``WING_STARS // WING_GROUP`` bins equal in log brightness between ``floor`` and the
    brightest, the brightest of each bin; ``peaks`` are sorted brightest first."""
    bright = np.flatnonzero(peaks >= floor)
    if bright.size == 0:
        return np.zeros(0, np.int64)
    n_bins = max(1, WING_STARS // WING_GROUP)
    edges = np.geomspace(floor, float(peaks[bright[0]]) * (1 + 1e-6), n_bins + 1)
    which = np.clip(np.searchsorted(edges, peaks[bright], side="right") - 1, 0, n_bins - 1)
    keep: list[np.ndarray] = []
    for b in range(n_bins - 1, -1, -1):  # brightest bin first
        members = bright[which == b]
        found: list[np.ndarray] = []
        for lo in range(0, len(members), 4 * WING_GROUP):  # (a master residual in sigma
            # units makes every template pixel "bright": its stamps at once took GBs)
            chunk = members[lo : lo + 4 * WING_GROUP]
            found.append(chunk[_stamps(good, xs[chunk], ys[chunk], r, False)[:, core].all(axis=1)])
            if sum(len(f) for f in found) >= WING_GROUP:
                break
        if found:
            keep.append(np.concatenate(found)[:WING_GROUP])
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


def _excess_by_distance(
    sig: np.ndarray,
    noise: np.ndarray,
    valid: np.ndarray,
    peaks: np.ndarray,
    bins: np.ndarray,
    nbins: int,
) -> np.ndarray:
    """Per star and distance bin, the excess variance of the significance over unit in
    units of (peak / mean noise)**2; ``nan`` where fewer than half the bin's pixels are
    valid. ``sig``, ``noise``, ``valid``: ``(star, y, x)`` stamps; ``bins``: each offset's
    bin (``nbins`` beyond the radius).

    The variance is a trimmed mean: the highest :data:`WING_TRIM` of each bin's squared
    significances left out and the rest divided by what unit Gaussian noise gives
    (:data:`TRIMMED_CHI2`; for a coherent ring that overstates its spread by up to 1.5,
    which makes up for the lumps the trim leaves out), so a compact source in a star's
    annulus (a transient, a neighbour: crowded fields, cutouts) does not pass for that
    star's mismatch, while a ring or a crescent does."""
    n = len(peaks)
    out = np.full((n, nbins), np.nan)
    squared = np.where(valid, sig.astype(np.float64) ** 2, np.nan)
    noise = np.where(valid, noise, 0.0)
    for b in range(nbins):  # a dozen distance bins, each whole-array over stars
        where = bins == b
        values = np.sort(squared[:, where], axis=1)  # nan last
        count = valid[:, where].sum(axis=1)
        kept = np.floor((1.0 - WING_TRIM) * count).astype(int)
        sums = np.nancumsum(values, axis=1)
        trimmed = sums[np.arange(n), np.maximum(kept - 1, 0)] / np.maximum(kept, 1)
        scale = noise[:, where].sum(axis=1) / np.maximum(count, 1) / peaks
        enough = (count >= 0.5 * where.sum()) & (kept > 0)
        out[:, b] = np.where(enough, (trimmed / TRIMMED_CHI2 - 1.0) * scale**2, np.nan)
    return out


#: The fraction of each distance bin's highest squared significances
#: :func:`_excess_by_distance` leaves out, and the trimmed mean of a squared unit Gaussian
#: (``P - 2 c phi(c)`` over ``P`` for ``P = 1 - WING_TRIM``, ``c`` its two-sided quantile).
WING_TRIM = 0.2
TRIMMED_CHI2 = 0.4377


def _paint(
    wing: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    peaks: np.ndarray,
    profiles: np.ndarray,
    r: int,
    n0: float,
) -> None:
    """``wing`` raised (in place) to ``profile * peak`` around each star, within ``r``
    pixels (``profiles``: ``(star, 2r+1, 2r+1)``, per unit of peak / noise), where that
    reaches :data:`WING_PAINT_MIN` at the median noise ``n0`` (the rule that leaves a
    star out altogether, applied to each pixel: fainter rings change no verdict)."""
    ny, nx = wing.shape
    values = profiles * peaks[:, None, None].astype(np.float32)
    star, oy, ox = np.nonzero(values >= np.float32(WING_PAINT_MIN * n0))
    ty, tx = ys[star] + oy - r, xs[star] + ox - r
    inside = (ty >= 0) & (ty < ny) & (tx >= 0) & (tx < nx)
    star, oy, ox = star[inside], oy[inside], ox[inside]
    np.maximum.at(wing, (ty[inside], tx[inside]), values[star, oy, ox])


def add_null_columns(
    table: Any,
    norm: np.ndarray,
    *,
    fwhm: float,
    weight: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    template: np.ndarray | None = None,
    significance: np.ndarray | None = None,
) -> Any:
    """Add ``wing``, the mismatch spread at each source (:func:`mismatch_map`; 0 without a
    ``template``), and record the residual's null in ``table.meta``: ``null_density``
    (:func:`null_peak_density`, on the pixels away from masked ones and where ``wing``
    is below :data:`NULL_WING_MAX`), ``null_peaks``, ``null_area`` (megapixels),
    ``wing_stars`` and ``wing_peak`` (in place; ``table`` is returned).

    Parameters
    ----------
    table : astropy.table.Table
        Detections with ``x``, ``y``.
    norm : ndarray
        The residual in sigmas (:attr:`Residual.normalized`).
    fwhm : float
        FWHM of the residual's PSF, pixels.
    weight, noise : ndarray, optional
        The residual's weight and noise image.
    template : ndarray, optional
        The template on the residual's grid.
    significance : ndarray, optional
        :func:`matched_significance` of ``norm`` at the PSF's sigma, when the caller has
        it already.
    """
    from scipy.ndimage import binary_dilation

    sigma = fwhm / 2.3548
    bad = None if weight is None else np.asarray(weight) <= 0
    if significance is None:
        significance, _ = matched_significance(norm, bad, sigma)
    wing = np.zeros(significance.shape, np.float32)
    info: dict[str, Any] = {"wing_stars": 0, "wing_peak": 0.0}
    if template is not None and noise is not None and np.shape(template) == np.shape(norm):
        w = np.ones(significance.shape, np.float32) if weight is None else weight
        wing, info = mismatch_map(significance, template, noise, w, fwhm=fwhm)
    clean = wing < NULL_WING_MAX
    if bad is not None:
        clean &= ~binary_dilation(bad, iterations=max(1, int(np.ceil(2 * sigma))))
    density, n_peaks, area = null_peak_density(significance, clean)
    ny, nx = significance.shape
    xs = np.rint(np.asarray(table["x"], float)).astype(int).clip(0, nx - 1)
    ys = np.rint(np.asarray(table["y"], float)).astype(int).clip(0, ny - 1)
    table["wing"] = wing[ys, xs].astype(np.float32)
    table.meta.update(
        null_density=round(density, 3) if np.isfinite(density) else float("nan"),
        null_peaks=n_peaks,
        null_area=round(area, 4),
        wing_stars=int(info["wing_stars"]),
        wing_peak=round(float(info["wing_peak"]), 6),
    )
    return table


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
    false_per_mpix: float = 0.0,
    wing_sigma: float = 0.0,
) -> Any:
    """Return ``table`` with ``n_frames`` (residuals where the source is found),
    ``threshold`` (the residual's detection threshold, :func:`detection_threshold` of
    ``table.meta``, with ``snr_min`` as its floor) and ``reason`` columns.

    Parameters
    ----------
    table : astropy.table.Table
        Detections with ``x``, ``y``, ``sign``, ``peak_norm``, ``lobe_min`` (see
        :func:`add_lobe_columns`) and optionally ``spread_model``.
    catalogs : sequence of Table
        The positive detections of every individual residual (for the majority test).
    n_residuals : int
        Number of residuals searched.
    false_per_mpix : float
        False detections per megapixel the threshold allows on the residual's own null
        (``table.meta["null_density"]``, see :func:`add_null_columns`); 0: ``snr_min``
        alone.
    wing_sigma : float
        How many times its expected mismatch spread (the ``wing`` column) a detection
        must stand out by, beside the threshold against the noise: ``wing`` when
        ``peak_norm < sqrt(threshold**2 + (wing_sigma * wing)**2)``; 0: no wing test.
    """
    n = len(table)
    threshold, _ = detection_threshold(table.meta, snr_min=snr_min, false_per_mpix=false_per_mpix)
    reason = np.full(n, "kept", dtype="U10")
    sign = np.asarray(table["sign"]) if "sign" in table.colnames else np.ones(n)
    counts = count_matches(table, catalogs, match_radius) if n else np.zeros(0, int)
    table["n_frames"] = counts
    table["threshold"] = np.full(n, threshold, dtype=np.float32)
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
        reason[peak < threshold] = "faint"
        if wing_sigma > 0 and "wing" in table.colnames:
            wing = wing_sigma * np.nan_to_num(np.asarray(table["wing"], float), nan=0.0)
            reason[(peak >= threshold) & (peak < np.sqrt(threshold**2 + wing**2))] = "wing"
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
