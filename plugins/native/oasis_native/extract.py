"""Native extract backend: sep detection of positive and negative sources on a residual,
with aperture photometry against the residual's noise image.

Detection runs ``sep.extract``, unfiltered, on the residual's matched-filter significance
(:func:`oasis_core.engine.sources.matched_significance`: ``(R - median(R)) / noise``, its
weight-0 pixels masked, smoothed with a Gaussian of the PSF's FWHM and scaled to unit
noise, divided by its measured spread when the noise is correlated), so ``thresh`` is a
significance in sigmas of that map. The map is made once, with a separable filter, for
both signs (sep's own matched filter with a noise image cost about 3 CPU-s per 2048^2
residual); sep searches only its rows and columns that hold a pixel above the threshold
(and their neighbours), which gives the objects of the whole map at a fraction of the
cost. With the defaults (5 sigma, ``minarea`` 5) pure Gaussian noise gives well
under one false source per 1024 x 1024 pixels and sign. Negative sources (a source
fainter than in the template) are found the same way on ``-R`` and get ``sign = -1``.

With ``detect_on = "score"`` (or ``"auto"``, the default, when the residual carries a
score image ``extra["score"]``, such as ZOGY's S_corr), detection thresholds the score
instead: it is already a matched-filter significance in sigmas, so it is searched
unfiltered with an error of 1 (``thresh`` sigmas of S_corr) and the positions are the
windowed centroids on the score; ``flux`` and ``flux_err`` are still the aperture sums on
the residual and its noise image (catalogs keep their meaning), ``snr`` is the |S_corr|
peak of the detection and ``peak`` the signed residual pixel at the position.

Columns: ``x``, ``y`` (0-based, windowed centroids), ``flux``, ``flux_err`` (circular
aperture sum and its error from the noise image, divided by the fraction of the PSF inside
the aperture when the residual carries a PSF model (``Residual.psf``: a Moffat PSF puts
~15 % of its light beyond 1.5 FWHM), so ``flux`` is a total flux; negative flux for
negative sources),
``peak`` (signed peak pixel: the highest within a pixel of the significance peak),
``snr`` (the PSF-weighted, matched-filter significance at
the position: the residual in sigmas smoothed with a Gaussian of the PSF's FWHM and scaled
to unit noise; for a point source this is the optimal S/N, about 1.8 times the S/N of the
1.5-FWHM aperture; divided by the measured spread of that map when the residual's noise
is correlated, which also scales the detection threshold and ``flux_err``), ``a``, ``b``,
``theta``
(sep's isophotal ellipse, px and radians), ``npix`` (pixels above threshold), ``sign``
and ``flag`` (sep's extraction flags OR'ed with the aperture flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import ExtractBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Residual
from oasis_core.contracts.validators import fraction, non_negative, positive
from oasis_core.engine.sources import matched_significance
from oasis_core.engine.stats import exact_median

__all__ = ["NativeExtract", "NativeExtractOptions"]

_DEFAULT_FWHM = 3.0
_FLOAT_COLUMNS = ("x", "y", "flux", "flux_err", "peak", "snr", "a", "b", "theta")
_INT_COLUMNS = ("npix", "sign", "flag")


@attrs.frozen(kw_only=True)
class NativeExtractOptions:
    """Options of the native extract backend."""

    thresh: float = option(
        5.0, "detection threshold in sigmas of the matched-filtered residual", range=positive
    )
    minarea: int = option(
        5, "minimum number of connected pixels above the threshold", range=(1, None)
    )
    fwhm: float = option(
        0.0,
        "PSF FWHM (px) for the filter kernel and the aperture; 0 = the residual's "
        "meta['fwhm'] or header FWHM, else 3",
        range=non_negative,
    )
    radius: float = option(0.0, "aperture radius (px); 0 = 1.5 x FWHM", range=non_negative)
    negative: bool = option(True, "also detect negative sources (on -R), with sign = -1")
    deblend_nthresh: int = option(32, "sep deblending thresholds", range=(1, None))
    deblend_cont: float = option(
        0.005, "sep deblending contrast (1 = no deblending)", range=fraction
    )
    clean: bool = option(
        False,
        "sep cleaning of spurious detections near bright sources (off: on residuals it "
        "drops real sources far from one bright residual)",
    )
    detect_on: str = option(
        "auto",
        "image searched: 'residual', 'score' (the residual's extra['score'], e.g. ZOGY's "
        "S_corr, thresholded at thresh sigmas) or 'auto' (the score when there is one)",
        choices=("auto", "residual", "score"),
    )


class NativeExtract(ExtractBackend):
    """Detect positive and negative sources on a residual with sep."""

    name = "native"
    Options = NativeExtractOptions
    description = "sep detection (+/-) with a matched filter, aperture photometry"

    def check(self, options: Any) -> None:
        """Accept: sep is a requirement of OASIS itself."""

    def extract(self, residual: Residual, *, options: NativeExtractOptions, workdir: Path) -> Any:
        """Return an astropy Table of the sources on ``residual``.

        Parameters
        ----------
        residual : Residual
            Its ``noise`` image sets the per-pixel threshold; weight-0 pixels are masked.
        options : NativeExtractOptions
        workdir : Path
            Unused.

        Returns
        -------
        astropy.table.Table
            One row per source, sorted by decreasing ``snr``; the columns of the module
            docstring (an empty table with those columns when nothing is found).

        Raises
        ------
        StageError
            When every pixel is masked, sep fails, or ``detect_on = "score"`` and the
            residual has no score image.
        """
        return _extract(residual, options)


def _fwhm(residual: Residual, options: NativeExtractOptions) -> float:
    candidates: list[Any] = [options.fwhm, residual.meta.get("fwhm")]
    header = residual.header
    if header is not None and "FWHM" in header:
        candidates.append(header["FWHM"])
    for value in candidates:
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            return v
    return _DEFAULT_FWHM


def _empty() -> Any:
    from astropy.table import Table

    cols = {c: np.zeros(0, np.float64) for c in _FLOAT_COLUMNS}
    cols.update({c: np.zeros(0, np.int32) for c in _INT_COLUMNS})
    return Table(cols)


def _score(residual: Residual, options: NativeExtractOptions) -> np.ndarray | None:
    """The score image to detect on, or None to detect on the residual itself."""
    if options.detect_on == "residual":
        return None
    score = residual.extra.get("score") if residual.extra else None
    if score is None:
        if options.detect_on == "score":
            raise StageError(
                f"extract {residual.name!r}: detect_on = 'score' but the residual has no "
                "score image; use extract.native.detect_on = 'auto' or 'residual'"
            )
        return None
    score = np.array(score, dtype=np.float32, order="C")
    if score.shape != residual.data.shape:
        raise StageError(
            f"extract {residual.name!r}: its score image has shape {score.shape}, the "
            f"residual {residual.data.shape}"
        )
    return score


def _aperture_fraction(residual: Residual, radius: float, fwhm: float) -> float:
    """Fraction of the residual's PSF model inside a circle of ``radius`` (the model's
    radius scaled by its FWHM over the residual's); 1 without a model."""
    import sep

    psf = residual.psf
    if psf is None or not (psf.fwhm and psf.fwhm > 0):
        return 1.0
    image = np.array(psf.image, dtype=np.float64, order="C")
    total = image.sum()
    if not np.isfinite(total) or total <= 0:
        return 1.0
    r = radius * float(psf.fwhm) / fwhm
    cy, cx = (np.asarray(image.shape) - 1) / 2.0
    inside, _, _ = sep.sum_circle(image, [cx], [cy], r, subpix=5)
    frac = float(inside[0] / total)
    return frac if 0.3 < frac <= 1.0 else 1.0


def _peak_pixel(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, sign: int = 1) -> np.ndarray:
    """The signed extreme of ``image`` (the highest of ``sign * image``, times ``sign``) in
    the 3x3 box around each (``xs``, ``ys``): a source's peak pixel, found from the
    significance map's peak."""
    ny, nx = image.shape
    d = np.arange(-1, 2)
    yy = np.clip(np.asarray(ys, np.int64)[:, None, None] + d[None, :, None], 0, ny - 1)
    xx = np.clip(np.asarray(xs, np.int64)[:, None, None] + d[None, None, :], 0, nx - 1)
    box = sign * image[yy, xx].reshape(len(xs), -1).astype(np.float64)
    return sign * box.max(axis=1)


def _kept(hot: np.ndarray) -> np.ndarray:
    """Indices of the ``hot`` lines and of their neighbours (the cold line on each side of
    a run of hot ones)."""
    keep = hot.copy()
    keep[1:] |= hot[:-1]
    keep[:-1] |= hot[1:]
    return np.flatnonzero(keep)


def _sep_extract(
    search: np.ndarray, bad: np.ndarray, sign: int, options: NativeExtractOptions
) -> Any:
    """``sep.extract`` of ``sign * search`` (masked by ``bad``, unfiltered, at ``thresh``
    in the map's units), run on the rows and columns that hold a pixel above the threshold
    and their neighbours only, with the positions put back on the full image; None when
    nothing is above it.

    The result is sep's on the whole map (a tenth of the pixels or fewer on a residual):
    its objects are 8-connected pixels above the threshold; the lines left out hold none
    (masked pixels count as 0, below it) and each run of them is replaced by one such line,
    which separates what it separated, so every object keeps its pixels in the same raster
    order and, its rows and columns being contiguous, is only shifted (its moments differ
    at the double rounding of the shift); a kept first or last line is the image's own, so
    sep's truncation flags are unchanged. Cleaning (``clean``) compares the objects'
    distances, so with it the whole map is searched.
    """
    import sep

    level = np.float32(options.thresh)
    hot = search >= level if sign > 0 else search <= -level
    rows = _kept(hot.any(axis=1))
    if rows.size == 0:
        return None
    if options.clean:  # cleaning compares the objects' distances: the whole map
        rows, cols = np.arange(search.shape[0]), np.arange(search.shape[1])
    else:
        cols = _kept(hot[rows].any(axis=0))
    box = np.ix_(rows, cols)
    sub = search[box]
    if sign < 0:
        np.negative(sub, out=sub)
    # sep's pixel stack (a process global) holds the pixels above the threshold; it is
    # allocated and linked at each call, 45 ms at 2048^2 entries, so it is sized to them
    previous = sep.get_extract_pixstack()
    sep.set_extract_pixstack(int(np.count_nonzero(hot[box])) + 1024)
    try:
        objs = sep.extract(
            sub,
            options.thresh,
            mask=bad[box],
            minarea=options.minarea,
            filter_kernel=None,
            deblend_nthresh=options.deblend_nthresh,
            deblend_cont=options.deblend_cont,
            clean=options.clean,
        )
    finally:
        sep.set_extract_pixstack(previous)
    if len(objs) == 0:
        return None
    dx = cols[objs["xmin"]] - objs["xmin"]
    dy = rows[objs["ymin"]] - objs["ymin"]
    for name in objs.dtype.names:
        if name in ("x", "xmin", "xmax", "xpeak", "xcpeak"):
            objs[name] += dx
        elif name in ("y", "ymin", "ymax", "ypeak", "ycpeak"):
            objs[name] += dy
    return objs


def _extract(residual: Residual, options: NativeExtractOptions) -> Any:
    import sep
    from astropy.table import Table, vstack

    data = np.array(residual.data, dtype=np.float32, order="C")  # private, native order
    # read, never written; sep takes only writeable buffers
    noise = np.require(residual.noise, np.float32, ("C", "A", "W"))
    good = np.asarray(residual.weight) > 0
    good &= noise > 0
    good &= noise < np.inf
    good &= np.isfinite(data)
    score = _score(residual, options)
    if score is not None:
        good &= np.isfinite(score)
    if not good.any():
        raise StageError(f"extract {residual.name!r}: every pixel has weight 0")
    data -= np.float32(exact_median(data[good]))
    bad = np.logical_not(good, out=good)
    del good
    np.copyto(data, np.float32(0.0), where=bad)
    # sep leaves the masked pixels out of the aperture sums: their noise is never used
    fwhm = _fwhm(residual, options)
    radius = options.radius if options.radius > 0 else 1.5 * fwhm
    matched, correlation = None, 1.0
    if score is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.divide(data, noise)
        np.copyto(z, np.float32(0.0), where=bad)
        matched, correlation = matched_significance(z, bad, fwhm / 2.3548)
        del z
    else:
        np.copyto(score, np.float32(0.0), where=bad)
    apcorr = _aperture_fraction(residual, radius, fwhm)
    sep.set_sub_object_limit(max(sep.get_sub_object_limit(), 4096))

    tables = []
    detect_map = matched if score is None else score  # both in sigmas, unit noise
    ny, nx = data.shape
    for sign in (1, -1) if options.negative else (1,):
        try:
            objs = _sep_extract(detect_map, bad, sign, options)
        except Exception as err:  # sep raises a bare Exception on buffer overflows
            raise StageError(
                f"extract {residual.name!r}: sep failed ({err}); raise extract.native.thresh"
            ) from err
        if objs is None:
            continue
        x, y = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
        search = detect_map if sign > 0 else np.negative(detect_map)
        xw, yw, wflag = sep.winpos(search, x, y, fwhm / 2.3548, mask=bad)
        ok = (wflag == 0) & (np.hypot(xw - x, yw - y) < 0.5 * fwhm)
        x, y = np.where(ok, xw, x), np.where(ok, yw, y)
        flux, flux_err, aflag = sep.sum_circle(data, x, y, radius, err=noise, mask=bad)
        flux, flux_err = flux / apcorr, flux_err * correlation / apcorr
        iy = np.clip(np.rint(y).astype(np.int64), 0, ny - 1)
        ix = np.clip(np.rint(x).astype(np.int64), 0, nx - 1)
        if score is None:
            measured = np.isfinite(flux_err) & (flux_err > 0)
            snr = np.where(measured, sign * matched[iy, ix].astype(np.float64), np.nan)
            peak = _peak_pixel(data, objs["xpeak"], objs["ypeak"], sign)
        else:  # sep's peak on the unfiltered score: the S_corr maximum of the detection
            snr = objs["peak"].astype(np.float64)
            peak = data[iy, ix].astype(np.float64)
        tables.append(
            Table(
                {
                    "x": x,
                    "y": y,
                    "flux": flux.astype(np.float64),
                    "flux_err": flux_err.astype(np.float64),
                    "peak": peak,
                    "snr": snr,
                    "a": objs["a"].astype(np.float64),
                    "b": objs["b"].astype(np.float64),
                    "theta": objs["theta"].astype(np.float64),
                    "npix": objs["npix"].astype(np.int32),
                    "sign": np.full(len(objs), sign, np.int32),
                    "flag": (objs["flag"].astype(np.int32) | aflag.astype(np.int32)),
                }
            )
        )
    if not tables:
        return _empty()
    table = vstack(tables) if len(tables) > 1 else tables[0]
    order = np.argsort(-np.nan_to_num(np.asarray(table["snr"]), nan=-1.0), kind="stable")
    table = table[order]
    table.meta.update(
        {
            "fwhm": fwhm,
            "radius": radius,
            "thresh": options.thresh,
            "aperture_fraction": apcorr,
            "noise_correlation": correlation,
            "detect_on": "residual" if score is None else "score",
        }
    )
    return table
