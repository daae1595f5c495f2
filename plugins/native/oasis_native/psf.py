"""The ``native`` PSF backend: sep detection, a bounded Moffat or Gaussian fitted to the PSF
stars jointly, and flagged fallbacks when the stars are too few or the fit fails.

Steps: a sep background (the frame may be sky-subtracted; masked pixels, weight 0, are left
out); sep detection; PSF stars are the unsaturated, untruncated, roundish, high-S/N
detections on the stellar locus (half-light radii within 25% of the smallest well-populated
size: stars, not galaxies, not cosmic rays) with no comparably bright neighbour and no
masked pixel in their stamp; their stamps are cut at sub-pixel centres (sep windowed
centroids, cubic-spline resampling, all stars at once), normalised by their core flux and
median-stacked; the chosen model is fitted to the stack with
:func:`scipy.optimize.least_squares`, its FWHM bounded to what the frame can hold
(``fwhm_min`` to the stamp half-size and a quarter of the frame's shorter side). From
there (``fit = "joint"``, the default) the model is fitted to all the stars' own pixels
at once (:func:`_joint_fit`): each star's flux, centre and sky free, the shape shared,
each pixel weighted by its noise, so that the stars count by their S/N, and stars the
profile fits far worse than the others (unresolved pairs, variables in a stack) left out.
The median stack alone is dominated by the fainter half of the stars, whose noisy
centroids sharpen its core: on simulated Moffat stars its beta comes out 0.1-0.5 too high
and PSF fluxes 1-4 % low; the joint fit recovers beta within 0.1 and the fluxes within
about 1 %. The PSF image of a Moffat reaches out to where all but 0.5 % of its light is
in (at most 10 FWHM), so that its unit sum leaves no more light in its core than there is.

**Fallbacks** (``fallback = true``, the default; each recorded in the PSF's ``params``):

* fewer than ``min_stars`` stars: the stack of those there are, even one;
* the fit fails, ends on a bound of its FWHM, or a Moffat on its lower bound of beta (a
  profile it cannot describe): the profile whose Gaussian-weighted (adaptive) second moments
  equal the stack's (a Moffat of beta 3, or a Gaussian);
* no usable star at all: that profile matched to the autocorrelation of the detected
  sources (sky noise's own autocorrelation, measured away from the sources, removed): in a
  crowded field it is the PSF's autocorrelation plus pairs of neighbours, which the
  Gaussian weight keeps out; with no detection at all the frame fails.

``params["psf_source"]`` says how the PSF was made: ``"fit"``, ``"moments"`` or
``"fwhm-moffat"`` (no star: a profile of the autocorrelation FWHM,
``params["fwhm_source"] = "autocorrelation"``); ``params["psf_flag"]`` is empty for a fit to
at least ``min_stars`` stars and otherwise says, in one line, what was done and why.

The frame's ``snr`` is the median peak signal-to-noise ``peak / sqrt(rms**2 + peak / gain)``
(just ``peak / rms`` when the gain is unknown) of the ``snr_stars`` brightest PSF stars (of
the brightest unsaturated detections when there is none). In a series of one field these
are mostly the same stars in every frame, so the figure ranks the frames by seeing, sky and
transparency (the median over *all* stars above a S/N cut would not: with power-law counts
it sits near twice the cut whatever the frame).
``background`` and ``noise`` are sep's global sky level and robust sky standard deviation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import PsfBackend, option
from oasis_core.contracts.model import Frame, PsfModel
from oasis_core.contracts.validators import fraction, in_range, non_negative, positive
from oasis_native import sepstack

__all__ = ["NativePsf", "NativePsfOptions", "gaussian_profile", "moffat_profile"]

_MODELS = ("moffat", "gaussian")
_FALLBACK_BETA = 3.0  # Moffat beta of the fallback profiles (moments, autocorrelation)
_BETA_MIN = 1.01  # lower bound of the fitted Moffat beta (flux diverges at 1)
_LOCUS_WIDTH = 1.25  # PSF stars' half-light radii within this factor of the stellar locus
_LOCUS_MIN = 5  # candidates needed to look for a stellar locus
_SHARP_MAX = 50.0  # Laplacian / fine structure above which a peak is a cosmic ray
_CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)  # grows each stamp by 1 px
# least zero-lag S/N of the sources' autocorrelation (about a star of matched-filter S/N 20)
_AC_MIN_SNR = 25.0
#: The pixel-difference sky noise is measured on bands of rows holding about this many
#: pixels (:func:`oasis_core.engine.stats.sky_noise`): the same statistic on a regular
#: sample of a large frame, a quarter of a 2048x2048 one.
_NOISE_PIXELS = 1 << 20
#: Fraction of the model added (in quadrature) to each pixel's noise in the joint fit of
#: the PSF stars: no real PSF is exactly the profile, and without it the brightest star
#: would decide the shape alone.
_PROFILE_ERROR = 0.02
#: A PSF star whose reduced chi-square in the joint fit exceeds this many times the
#: stars' median is left out (an unresolved pair, a variable in a stack of frames), and
#: the fit made again, at most _REJECT_ROUNDS times.
_REJECT = 3.0
_REJECT_ROUNDS = 3
#: The joint fit's loss: pixels more than this many sigmas off count linearly (Huber), so
#: that a contaminated star that passed every test (on a galaxy, a faint companion) does
#: not pull the shape.
_HUBER = 2.0
#: A Moffat PSF image reaches the radius outside which this fraction of its flux lies...
_TRUNCATION = 0.005
#: ...but no further than this many FWHM.
_MAX_HALF_FWHM = 10.0


@attrs.frozen(kw_only=True)
class NativePsfOptions:
    """Options of the ``native`` PSF backend (``[psf.native]``)."""

    model: str = option(
        "moffat", "profile fitted to the PSF stars: 'moffat' or 'gaussian'", choices=_MODELS
    )
    fit: str = option(
        "joint",
        "how the profile is fitted: 'joint' (to every PSF star's own pixels at once, each "
        "star's flux, centre and sky free, the pixels weighted by their noise, stars the "
        "profile fits far worse than the others left out) or 'stack' (to the median stack "
        "of the stars normalised by their core flux: faster, but its core comes out too "
        "sharp when faint stars dominate, and PSF fluxes a few per cent low)",
        choices=("joint", "stack"),
    )
    threshold: float = option(
        5.0, "sep detection threshold (sigmas of the sky noise)", range=positive
    )
    min_snr: float = option(10.0, "minimum peak signal-to-noise of a PSF star", range=non_negative)
    max_stars: int = option(
        200, "use at most this many PSF stars (the highest S/N ones)", range=(1, None)
    )
    min_stars: int = option(
        3,
        "with fewer usable PSF stars the PSF comes from those there are (even one) and is "
        "flagged (params psf_flag); with fallback = false the frame fails",
        range=(1, None),
    )
    fallback: bool = option(
        True,
        "when the stars are too few or the fit fails, fall back (fewer stars, second "
        "moments, a profile of the autocorrelation FWHM) and flag the PSF instead of "
        "failing the frame",
    )
    fwhm_min: float = option(
        0.8,
        "smallest FWHM (px) the fit may return; a fit at this bound (or at the largest, the "
        "stamp half-size or a quarter of the frame) falls back to second moments",
        range=positive,
    )
    stamp_half: int = option(
        0,
        "half size (pixels) of the star stamps and the least of the PSF image's (a Moffat's "
        "reaches further, to hold 99.5 % of its light); 0 = 3 x the first FWHM estimate, "
        "between 7 and 25",
        range=(0, None),
    )
    isolation: float = option(
        3.0,
        "reject a star with a neighbour closer than this many FWHM that is brighter "
        "than neighbour_fraction of it",
        range=non_negative,
    )
    neighbour_fraction: float = option(0.1, "see isolation", range=non_negative)
    max_ellipticity: float = option(
        0.3, "reject detections more elongated than this (1 - b/a)", range=fraction
    )
    saturation_fraction: float = option(
        0.8,
        "reject stars whose peak pixel reaches this fraction of the saturation level (when "
        "unknown: 0.98 x the data maximum if 4+ pixels reach it, a clipping plateau)",
        range=in_range(0, 1, lo_open=True),
    )
    snr_stars: int = option(
        10, "the frame S/N is the median peak S/N of this many brightest PSF stars", range=(1, None)
    )
    back_size: int = option(64, "sep background mesh size (pixels)", range=(1, None))
    image: str = option(
        "model",
        "PSF image returned: 'model' (the fitted profile) or 'empirical' (the "
        "median stack of the stars)",
        choices=("model", "empirical"),
    )


def moffat_profile(r2: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Moffat profile ``(1 + r2 / alpha**2) ** -beta`` (peak 1) at squared radii ``r2``.

    Parameters
    ----------
    r2 : ndarray
        Squared distances from the centre, pixels**2.
    alpha, beta : float
        Core width (pixels) and wing index; FWHM = ``2 alpha sqrt(2**(1/beta) - 1)``.

    Returns
    -------
    ndarray
    """
    return (1.0 + r2 / (alpha * alpha)) ** (-beta)


def gaussian_profile(r2: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian profile ``exp(-r2 / (2 sigma**2))`` (peak 1) at squared radii ``r2``.

    Parameters
    ----------
    r2 : ndarray
        Squared distances from the centre, pixels**2.
    sigma : float
        Standard deviation (pixels); FWHM = 2.3548 sigma.

    Returns
    -------
    ndarray
    """
    return np.exp(-0.5 * r2 / (sigma * sigma))


_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _moffat_alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _profile(model: str, fwhm: float, half: int, beta: float = _FALLBACK_BETA) -> np.ndarray:
    """The (2 half + 1)**2 stamp of ``model`` with ``fwhm`` (peak 1, centred)."""
    g = np.arange(-half, half + 1, dtype=np.float64)
    rr = g[:, None] ** 2 + g[None, :] ** 2
    if model == "moffat":
        return moffat_profile(rr, _moffat_alpha(fwhm, beta), beta)
    return gaussian_profile(rr, fwhm * _SIGMA_PER_FWHM)


def _model_image(model: str, fwhm: float, beta: float | None, half: int) -> np.ndarray:
    """The PSF image of ``model`` (peak 1, centred; ``beta`` None: the fallback's): half
    size at least ``half`` and 3 FWHM, and for a Moffat out to the radius that holds all
    but :data:`_TRUNCATION` of its flux (at most :data:`_MAX_HALF_FWHM` FWHM). The image is
    normalised to unit sum, so the light its edge cuts off would go to its core: cut at
    3 FWHM, a Moffat of beta 2.5 puts 1.5 % too much there and PSF fluxes come out that
    much too low."""
    out_half = max(half, math.ceil(3.0 * fwhm))
    if model != "moffat":
        return _profile(model, fwhm, out_half)
    beta = _FALLBACK_BETA if beta is None else beta
    # Moffat flux outside radius r: (1 + r**2 / alpha**2) ** (1 - beta)
    r = _moffat_alpha(fwhm, beta) * math.sqrt(_TRUNCATION ** (1.0 / (1.0 - beta)) - 1.0)
    out_half = max(out_half, math.ceil(min(r, _MAX_HALF_FWHM * fwhm)))
    return _profile(model, fwhm, out_half, beta)


# --------------------------------------------------------------------------- fit


def _fit(
    stack: np.ndarray, model: str, fwhm0: float, bounds: tuple[float, float]
) -> dict[str, Any]:
    """Fit ``model`` (plus amplitude, centre, constant) to the stacked stamp, its FWHM
    within ``bounds``.

    The Moffat is fitted to the whole stamp. A Gaussian cannot follow the wings of a real
    PSF, which would inflate its width, so it is fitted to the core only (radius 1.5 FWHM,
    twice: around the first estimate, then around the first fit).
    """
    if model == "gaussian":
        first = _fit_model(stack, model, fwhm0, 1.5 * fwhm0, bounds)
        return _fit_model(stack, model, first["fwhm"], 1.5 * first["fwhm"], bounds)
    return _fit_model(stack, model, fwhm0, np.inf, bounds)


def _fit_model(
    stack: np.ndarray, model: str, fwhm0: float, radius: float, bounds: tuple[float, float]
) -> dict[str, Any]:
    """One bounded least-squares fit, parametrised by the FWHM itself.

    ``out["at_bound"]`` names the bound the fit ended on ("" when none): the FWHM within 1%
    of either end of ``bounds``, or a Moffat beta at its lower limit.
    """
    from scipy.optimize import least_squares

    lo_fwhm, hi_fwhm = bounds
    half = stack.shape[0] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    use = ((xx**2 + yy**2) <= max(radius, 2.0) ** 2) & np.isfinite(stack)
    xx, yy = xx[use], yy[use]
    z = stack.astype(np.float64)[use]
    amp0 = float(np.nanmax(stack))
    fwhm0 = float(np.clip(fwhm0, lo_fwhm, hi_fwhm))
    if model == "moffat":

        def resid(p: np.ndarray) -> np.ndarray:
            r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
            return p[0] * moffat_profile(r2, _moffat_alpha(p[3], p[4]), p[4]) + p[5] - z

        p0 = [amp0, 0.0, 0.0, fwhm0, 3.0, 0.0]
        lo = [0.0, -2.0, -2.0, lo_fwhm, _BETA_MIN, -np.inf]
        hi = [np.inf, 2.0, 2.0, hi_fwhm, 30.0, np.inf]
    else:

        def resid(p: np.ndarray) -> np.ndarray:
            r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
            return p[0] * gaussian_profile(r2, p[3] * _SIGMA_PER_FWHM) + p[4] - z

        p0 = [amp0, 0.0, 0.0, fwhm0, 0.0]
        lo = [0.0, -2.0, -2.0, lo_fwhm, -np.inf]
        hi = [np.inf, 2.0, 2.0, hi_fwhm, np.inf]
    p0 = np.clip(p0, np.add(lo, 1e-6), np.subtract(hi, 1e-6))
    res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
    p = res.x
    fwhm = float(p[3])
    out: dict[str, Any] = {"amplitude": float(p[0]), "x0": float(p[1]), "y0": float(p[2])}
    if model == "moffat":
        beta = float(p[4])
        out.update(alpha=_moffat_alpha(fwhm, beta), beta=beta, sky=float(p[5]), fwhm=fwhm)
    else:
        out.update(sigma=fwhm * _SIGMA_PER_FWHM, sky=float(p[4]), fwhm=fwhm)
    out["rms_residual"] = float(np.sqrt(np.mean(res.fun**2)) / max(amp0, 1e-30))
    out["at_bound"] = _at_bound(fwhm, out.get("beta"), (lo_fwhm, hi_fwhm))
    return out


def _at_bound(fwhm: float, beta: float | None, bounds: tuple[float, float]) -> str:
    """Which bound of the fit the shape sits at ("" when none): the FWHM's or beta's."""
    if not math.isfinite(fwhm) or fwhm <= bounds[0] * 1.01:
        return f"its smallest FWHM ({bounds[0]:.3g} px)"
    if fwhm >= bounds[1] * 0.99:
        return f"its largest FWHM ({bounds[1]:.3g} px)"
    if beta is not None and beta <= _BETA_MIN * 1.01:
        return f"its smallest beta ({_BETA_MIN:g})"
    return ""


def _unit_profile(
    model: str, shape: Sequence[float], r2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``model`` of unit total flux (its analytic integral) at squared radii ``r2``, its
    derivative in ``r2`` and its derivatives in the ``shape`` parameters, ``(fwhm, beta)``
    for a Moffat (beta at fixed FWHM) and ``(fwhm,)`` for a Gaussian."""
    if model == "moffat":
        fwhm, beta = shape
        alpha = _moffat_alpha(fwhm, beta)
        a2 = alpha * alpha
        u = r2 * (1.0 / a2)
        u += 1.0
        lu = np.log(u)
        f = np.exp(lu * -beta)
        f *= (beta - 1.0) / (math.pi * a2)
        f_u = f / u
        d_r2 = f_u * (-beta / a2)
        # d f / d alpha = f (2 beta r2 / (alpha**3 u) - 2 / alpha)
        #               = (2 / alpha) (beta (f - f / u) - f)
        d_alpha = (f - f_u) * (2.0 * beta / alpha) - f * (2.0 / alpha)
        t = 2.0 ** (1.0 / beta)
        alpha_beta = alpha * t * math.log(2.0) / (2.0 * beta * beta * (t - 1.0))
        d_beta = f * (1.0 / (beta - 1.0)) - f * lu + d_alpha * alpha_beta
        return f, d_r2, [d_alpha * (alpha / fwhm), d_beta]
    sigma = shape[0] * _SIGMA_PER_FWHM
    f = gaussian_profile(r2, sigma) / (2.0 * math.pi * sigma * sigma)
    d_sigma = f * (r2 / sigma**3 - 2.0 / sigma)
    return f, -0.5 * f / (sigma * sigma), [d_sigma * _SIGMA_PER_FWHM]


@attrs.frozen(kw_only=True)
class _Stamps:
    """The PSF stars' pixels for the joint fit (internal): ``(n, p)`` arrays, one row of
    ``p`` pixels (a square box, flattened) per star."""

    data: np.ndarray = attrs.field(eq=False)  # 0 where not used
    use: np.ndarray = attrs.field(eq=False)  # pixels that enter the fit
    dx: np.ndarray = attrs.field(eq=False)  # pixel centre minus the star's first centre
    dy: np.ndarray = attrs.field(eq=False)

    def __getitem__(self, keep: np.ndarray) -> _Stamps:
        return _Stamps(data=self.data[keep], use=self.use[keep], dx=self.dx[keep], dy=self.dy[keep])


def _star_pixels(
    sub: np.ndarray, bad: np.ndarray, seg: np.ndarray, stars: _Stars, radius: float
) -> _Stamps:
    """The stars' own pixels, not resampled: the boxes around their nearest pixels (half
    size ``stars.half``, less when ``radius`` is smaller), within ``radius`` of their
    centres, left out where masked, off the frame or on another source's segment (grown
    by 1 px)."""
    from scipy import ndimage

    ny, nx = sub.shape
    # a pixel more than ceil(radius) + 1 px from the nearest pixel is further than radius
    # from the centre, and so is what its segment grows onto
    half = stars.half if not math.isfinite(radius) else min(stars.half, math.ceil(radius) + 1)
    g = np.arange(-half, half + 1)
    iy = np.rint(stars.y).astype(np.int64)[:, None, None] + g[None, :, None]
    ix = np.rint(stars.x).astype(np.int64)[:, None, None] + g[None, None, :]
    inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    iyc, ixc = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    lab = seg[iyc, ixc]
    other = (lab > 0) & (lab != (stars.index + 1)[:, None, None])
    other = ndimage.binary_dilation(other, structure=_CROSS)
    dx = (ix - stars.x[:, None, None]).astype(np.float64)
    dy = (iy - stars.y[:, None, None]).astype(np.float64)
    dx, dy = np.broadcast_arrays(dx, dy)
    use = inside & ~bad[iyc, ixc] & ~other & (dx * dx + dy * dy <= radius * radius)
    data = np.where(use, sub[iyc, ixc], 0.0).astype(np.float64)
    n = len(data)
    return _Stamps(
        data=data.reshape(n, -1),
        use=use.reshape(n, -1),
        dx=np.ascontiguousarray(dx).reshape(n, -1),
        dy=np.ascontiguousarray(dy).reshape(n, -1),
    )


def _joint_fit(
    sub: np.ndarray,
    bad: np.ndarray,
    seg: np.ndarray,
    stars: _Stars,
    model: str,
    start: Mapping[str, float],
    bounds: tuple[float, float],
    noise: float,
    gain: float | None,
    min_stars: int,
) -> dict[str, Any]:
    """One profile fitted to all the PSF stars at once, on their own pixels.

    Each star has its own flux, centre and sky constant; the profile's shape (FWHM, and
    beta for a Moffat) is shared. Every pixel is weighted by its noise (sky, the star's
    Poisson noise in ``gain``, and :data:`_PROFILE_ERROR` of the model: no real PSF is
    exactly the profile, and the brightest star must not decide alone), so the stars
    count by their signal-to-noise; pixels more than :data:`_HUBER` sigmas off count
    linearly (a Huber loss). The median stack's shape comes from the faintest half of
    the stars, whose noisy centroids sharpen its core (the fit's own centres do not). A
    star the profile fits far worse than the others (an unresolved pair, a variable in a
    stack of frames) is left out and the fit made again (:data:`_REJECT` x their median
    reduced chi-square, at most :data:`_REJECT_ROUNDS` times, never below ``min_stars``).
    ``start`` (the stack's fit) gives the first shape. A Gaussian, which cannot follow a
    real PSF's wings, is fitted within 1.5 FWHM only.

    Returns the shape (``fwhm``, ``alpha``/``beta`` or ``sigma``), ``fit_stars``,
    ``rejected_stars``, ``fit_chi2`` (reduced chi-square of the kept stars) and
    ``at_bound`` as :func:`_fit_model`; raises ValueError when no star is left.
    """
    shape = [start["fwhm"], start["beta"]] if model == "moffat" else [start["fwhm"]]
    k = len(shape)
    radius = 1.5 * start["fwhm"] if model == "gaussian" else math.inf
    pix = _star_pixels(sub, bad, seg, stars, max(radius, 2.0))
    lo, hi = np.array([bounds[0], _BETA_MIN][:k]), np.array([bounds[1], 30.0][:k])
    keep = pix.use.sum(axis=1) > k + 4
    rejected = 0
    for _ in range(_REJECT_ROUNDS + 1):
        if not keep.any():
            raise ValueError("no star with enough unmasked pixels")
        stamps = pix[keep]
        fitted, chi2 = _joint_solve(stamps, model, shape, (lo, hi), noise, gain)
        worse = chi2 > _REJECT * np.median(chi2)
        if not worse.any() or len(chi2) - int(worse.sum()) < max(min_stars, 1):
            break
        keep[np.flatnonzero(keep)[worse]] = False
        rejected += int(worse.sum())
        shape = list(np.clip(fitted.x[:k], lo + 1e-6, hi - 1e-6))
    fitted, chi2 = _joint_solve(stamps, model, shape, (lo, hi), noise, gain, fitted.x)
    fwhm = float(fitted.x[0])
    out: dict[str, Any] = {"fwhm": fwhm}
    if model == "moffat":
        beta = float(fitted.x[1])
        out.update(alpha=_moffat_alpha(fwhm, beta), beta=beta)
    else:
        out["sigma"] = fwhm * _SIGMA_PER_FWHM
    dof = max(len(fitted.fun) - len(fitted.x), 1)
    out.update(
        fit_stars=len(chi2),
        rejected_stars=rejected,
        fit_chi2=float(np.sum(fitted.fun**2) / dof),
    )
    out["at_bound"] = _at_bound(fwhm, out.get("beta"), bounds)
    return out


def _joint_solve(
    stamps: _Stamps,
    model: str,
    shape: Sequence[float],
    bounds: tuple[np.ndarray, np.ndarray],
    noise: float,
    gain: float | None,
    start: np.ndarray | None = None,
) -> tuple[Any, np.ndarray]:
    """One joint least-squares fit (its parameters ``x`` and the used pixels' weighted
    residuals ``fun``) from the first ``shape``, and each star's reduced chi-square; with
    ``start`` (an earlier fit's parameters), a Huber loss: from there, pixels more than
    :data:`_HUBER` sigmas off that fit count linearly. The Jacobian is analytic: a pixel
    depends on the shape and on its own star's flux, centre and sky, which
    :func:`_block_lm` uses. The stars' pixels stay in their ``(n, p)`` rows, those not
    used weighted 0."""
    k, n, use = len(shape), len(stamps.data), stamps.use
    d, dx, dy = stamps.data, stamps.dx, stamps.dy
    # first fluxes: the linear fit of the first shape; the pixels' variances from that model
    p0 = np.where(use, _unit_profile(model, shape, dx * dx + dy * dy)[0], 0.0)
    flux0 = np.maximum((p0 * d).sum(axis=1) / (p0 * p0).sum(axis=1), 0.0)
    m0 = flux0[:, None] * p0
    var = noise * noise + (_PROFILE_ERROR * m0) ** 2 + (m0 / gain if gain else 0.0)
    w = np.where(use, 1.0 / np.sqrt(var), 0.0)

    def parts(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        q = p[k:].reshape(n, 4, 1)  # flux, x, y, sky of each star
        ex, ey = dx - q[:, 1], dy - q[:, 2]
        return q, ex, ey, _unit_profile(model, p[:k], ex * ex + ey * ey)

    def resid(p: np.ndarray) -> np.ndarray:
        q, _, _, (f, _, _) = parts(p)
        return (q[:, 0] * f + q[:, 3] - d) * w

    def rows(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, ex, ey, (f, f_r2, f_shape) = parts(p)
        fw = q[:, 0] * w  # flux x weight
        jac = np.empty((n, k + 4, d.shape[1]))
        for i, g in enumerate(f_shape):
            np.multiply(g, fw, out=jac[:, i])
        np.multiply(f, w, out=jac[:, k])
        r = q[:, 0] * jac[:, k] + (q[:, 3] - d) * w
        g = f_r2 * fw
        g *= -2.0
        np.multiply(g, ex, out=jac[:, k + 1])
        np.multiply(g, ey, out=jac[:, k + 2])
        jac[:, k + 3] = w
        return r, jac

    lower = np.concatenate([bounds[0], np.tile([0.0, -1.5, -1.5, -np.inf], n)])
    upper = np.concatenate([bounds[1], np.tile([np.inf, 1.5, 1.5, np.inf], n)])
    first = np.concatenate([shape, np.column_stack([flux0, np.zeros((n, 3))]).ravel()])
    first = np.clip(first, lower + 1e-9, upper - 1e-9)
    down = np.ones_like(w)
    if start is not None:  # Huber by reweighting (scipy's robust losses: 20-100x slower)
        first = np.clip(start, lower + 1e-9, upper - 1e-9)
        z = np.abs(resid(first))
        down = np.sqrt(np.where(z > _HUBER, _HUBER / np.maximum(z, 1e-30), 1.0))
        w = w * down
    x = _block_lm(rows, first, (lower, upper), k)
    fun = resid(x)
    full = fun / down  # without the down-weighting: the stars' own misfit
    pixels = use.sum(axis=1)
    chi2 = (full * full).sum(axis=1) / np.maximum(pixels - 4, 1)
    return SimpleNamespace(x=x, fun=fun[use]), chi2


def _block_lm(
    rows: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    first: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    k: int,
    max_iter: int = 200,
    ftol: float = 1e-9,
) -> np.ndarray:
    """Levenberg-Marquardt for the joint fit's block-arrow normal matrix: ``k`` shared
    parameters, then 4 of each of ``n`` stars' own. ``rows(p)`` gives the weighted
    residuals ``r`` (n, p), one row of pixels per star, and the Jacobian (n, k + 4, p):
    the shared columns, then the star's own (each star's pixels depend on its own 4
    only). Each step eliminates the stars' 4x4 blocks (a Schur complement: all stars at
    once, no loop over them) and solves the k x k system left; steps are projected onto
    ``bounds``. Marquardt's diagonal scaling makes it blind to the parameters' units."""
    lower, upper = bounds
    p = first.copy()
    r, jac = rows(p)
    cost = float(np.vdot(r, r))
    lam = 1e-3
    eye = np.eye(4)
    for _ in range(max_iter):
        h = jac @ jac.transpose(0, 2, 1)  # (n, k + 4, k + 4), one block per star
        g = (jac @ r[:, :, None])[:, :, 0]  # (n, k + 4)
        hss, gs = h[:, :k, :k].sum(axis=0), g[:, :k].sum(axis=0)
        hsb, hbb, gb = h[:, :k, k:], h[:, k:, k:], g[:, k:]
        dss, dbb = np.diag(hss).copy(), np.diagonal(hbb, axis1=1, axis2=2).copy()
        dbb = np.maximum(dbb, 1e-12 * dbb.max(axis=1, keepdims=True) + 1e-300)
        while True:
            inv = np.linalg.inv(hbb + (lam * dbb + 1e-12 * dbb)[:, :, None] * eye)
            hsb_inv = hsb @ inv  # (n, k, 4)
            schur = hss + np.diag(lam * dss) - np.einsum("nki,nli->kl", hsb_inv, hsb)
            rhs = -gs + np.einsum("nki,ni->k", hsb_inv, gb)
            ds = np.linalg.solve(schur, rhs)
            db = -np.einsum("nij,nj->ni", inv, gb + np.einsum("nki,k->ni", hsb, ds))
            trial = np.clip(p + np.concatenate([ds, db.ravel()]), lower, upper)
            r_new, jac_new = rows(trial)
            new_cost = float(np.vdot(r_new, r_new))
            if np.isfinite(new_cost) and new_cost <= cost:
                break
            lam *= 4.0
            if lam > 1e12:
                return p
        gain, p, r, jac, cost = cost - new_cost, trial, r_new, jac_new, new_cost
        lam = max(lam / 3.0, 1e-9)
        if gain <= ftol * max(cost, 1e-300):
            break
    return p


# --------------------------------------------------------------------------- moments


def _adaptive_size(image: np.ndarray) -> float:
    """Gaussian-weighted (adaptive) size ``s2`` (px**2) of a centred stamp.

    The weight is a round Gaussian of variance ``s2``, iterated to the fixed point
    ``s2 = M_xx + M_yy`` of the weighted moments (for a round Gaussian of sigma ``s``,
    ``s2 = s**2``); the centre follows the weighted centroid within 2 px. NaN when the
    weighted flux is not positive (no source).
    """
    half = image.shape[0] // 2
    g = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    img = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    s2_min, s2_max = 0.05, (half / 1.5) ** 2
    s2 = min(4.0, s2_max)
    mx = my = 0.0
    for _ in range(100):
        w = np.exp(-0.5 * ((xx - mx) ** 2 + (yy - my) ** 2) / s2) * img
        total = w.sum()
        if not total > 0:
            return math.nan
        mx = float(np.clip((w * xx).sum() / total, -2.0, 2.0))
        my = float(np.clip((w * yy).sum() / total, -2.0, 2.0))
        new = float((w * ((xx - mx) ** 2 + (yy - my) ** 2)).sum() / total)
        new = min(max(new, s2_min), s2_max)
        if abs(new - s2) < 1e-5 * s2:
            return new
        s2 = new
    return s2


def _match_fwhm(
    target: float, size_of: Callable[[float], float], bounds: tuple[float, float]
) -> tuple[float, str]:
    """The FWHM whose profile has the adaptive size ``target`` (bisection in log FWHM;
    ``size_of`` increases with the FWHM), and the bound it was clipped to ("" if none)."""
    lo, hi = bounds
    if size_of(lo) >= target:
        return lo, f"the smallest FWHM ({lo:.3g} px)"
    if size_of(hi) <= target:
        return hi, f"the largest FWHM ({hi:.3g} px)"
    a, b = math.log(lo), math.log(hi)
    for _ in range(40):
        m = 0.5 * (a + b)
        if size_of(math.exp(m)) < target:
            a = m
        else:
            b = m
        if b - a < 1e-4:
            break
    return math.exp(0.5 * (a + b)), ""


def _autocorrelation(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Full (linear, zero-padded) autocorrelation of ``image``, zero lag at (0, 0)."""
    import scipy.fft as sfft

    spec = sfft.rfft2(image, s=shape)
    return sfft.irfft2(spec.real**2 + spec.imag**2, s=shape)


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` grown by a disk of ``radius`` px."""
    from scipy import ndimage

    r = math.ceil(radius)
    if r <= 0 or not mask.any():
        return mask.copy()
    g = np.arange(-r, r + 1)
    return ndimage.binary_dilation(mask, structure=g[:, None] ** 2 + g[None, :] ** 2 <= radius**2)


def _source_autocorrelation(
    sub: np.ndarray,
    bad: np.ndarray,
    seg: np.ndarray,
    objs: np.ndarray,
    labels: np.ndarray,
    noise: float,
    grow: float,
    half: int,
) -> tuple[np.ndarray, float]:
    """The summed autocorrelations of the sources ``objs`` (segmentation ``labels``), each
    on its own, noise removed, as a centred (2 half + 1)**2 stamp, and its zero-lag S/N.

    Each source keeps the pixels within ``grow`` px of its isophotal extent that belong to
    no other source (its neighbours would otherwise add pairs at their separations); the
    sky noise's own autocorrelation per pixel pair, from the pixels away from every
    source (white, of variance ``noise**2``, when fewer than 500 are), times the kept
    pixels' pair counts, is subtracted.
    """
    import scipy.fft as sfft

    ny, nx = sub.shape
    sources = seg > 0
    sky = ~_grow(sources, 2.0 * grow) & ~bad
    shape = (sfft.next_fast_len(ny + half + 1), sfft.next_fast_len(nx + half + 1))
    if sky.sum() >= 500:
        ac_sky = _autocorrelation(np.where(sky, sub, 0.0), shape)
        pairs_sky = _autocorrelation(sky.astype(np.float64), shape)
        cov_full = np.where(pairs_sky > 0.5, ac_sky / np.maximum(pairs_sky, 1.0), 0.0)
    else:  # too little sky to measure it: white noise of the frame's sky noise
        cov_full = np.zeros(shape)
        cov_full[0, 0] = noise * noise
    # per-source boxes: radius = isophotal extent + grow
    extent = np.sqrt(np.maximum(objs["npix"], 1) / math.pi) + grow
    box = math.ceil(float(extent.max()))
    g = np.arange(-box, box + 1)
    iy = np.rint(objs["y"]).astype(np.int64)[:, None, None] + g[None, :, None]
    ix = np.rint(objs["x"]).astype(np.int64)[:, None, None] + g[None, None, :]
    inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    iyc, ixc = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    lab = seg[iyc, ixc]
    dist2 = (iy - objs["y"][:, None, None]) ** 2 + (ix - objs["x"][:, None, None]) ** 2
    keep = inside & ~bad[iyc, ixc] & (dist2 <= extent[:, None, None] ** 2)
    keep &= (lab == 0) | (lab == labels[:, None, None])
    values = np.where(keep, sub[iyc, ixc], 0.0)
    bshape = (sfft.next_fast_len(2 * box + 1 + half + 1),) * 2
    spec = sfft.rfft2(values, s=bshape, axes=(1, 2))
    ac = sfft.irfft2(spec.real**2 + spec.imag**2, s=bshape, axes=(1, 2)).sum(axis=0)
    spec = sfft.rfft2(keep.astype(np.float64), s=bshape, axes=(1, 2))
    pairs = sfft.irfft2(spec.real**2 + spec.imag**2, s=bshape, axes=(1, 2)).sum(axis=0)
    ys = np.arange(-half, half + 1)
    cov = cov_full[np.ix_(ys % shape[0], ys % shape[1])]
    stamp = (
        ac[np.ix_(ys % bshape[0], ys % bshape[1])]
        - cov * pairs[np.ix_(ys % bshape[0], ys % bshape[1])]
    )
    # zero lag: sum of source**2 minus its noise part n sigma**2, whose scatter is
    # sigma**2 sqrt(2 n) (plus the source x noise cross term, 2 sigma sqrt(sum source**2))
    n_kept = float(keep.sum())
    var = float(max(cov_full[0, 0], 1e-30))
    zero = float(stamp[half, half])
    err = math.sqrt(2.0 * n_kept * var * var + 4.0 * var * max(zero, 0.0))
    return stamp, zero / max(err, 1e-30)


def _source_size(objs: np.ndarray, isophote: float) -> np.ndarray:
    """Gaussian sigma (px) of each detection from its isophotal second moments, corrected
    for the isophote's truncation: a Gaussian of peak ``R`` times the isophote keeps
    ``1 - ln R / (R - 1)`` of its variance inside it. sep deblends, so a star's neighbours
    do not inflate it (unlike a half-light radius in a crowded field)."""
    ratio = np.maximum(objs["peak"] / isophote, 2.0)
    kept = 1.0 - np.log(ratio) / (ratio - 1.0)
    return np.sqrt(np.clip(objs["a"] * objs["b"], 1e-6, None) / kept)


def _cosmic(sub: np.ndarray, objs: np.ndarray) -> np.ndarray:
    """True for detections sharper than any PSF: cosmic rays and hot pixels.

    L.A.Cosmic's test (van Dokkum 2001) at the peak pixel: the Laplacian against the fine
    structure (3x3 median minus the 7x7 median of that). A PSF of FWHM 1 px gives a ratio
    near 20, of 2 px near 4; a cosmic ray 1-3 px wide thousands (the medians remove it),
    and a noise-level fine structure when it is faint: above :data:`_SHARP_MAX` it is one.
    """
    ny, nx = sub.shape
    g = np.arange(-4, 5)
    iy = np.clip(objs["ypeak"].astype(np.int64)[:, None, None] + g[None, :, None], 0, ny - 1)
    ix = np.clip(objs["xpeak"].astype(np.int64)[:, None, None] + g[None, None, :], 0, nx - 1)
    st = sub[iy, ix].astype(np.float64)
    lap = 4.0 * st[:, 4, 4] - st[:, 3, 4] - st[:, 5, 4] - st[:, 4, 3] - st[:, 4, 5]
    # the 3x3 medians over the central 7x7 (all the 7x7 median at the peak needs), then that
    m = len(st)
    win = np.lib.stride_tricks.sliding_window_view(st, (3, 3), axis=(1, 2)).reshape(m, 7, 7, 9)
    med3 = np.partition(win, 4, axis=-1)[..., 4].reshape(m, 49)
    fine = med3[:, 24] - np.partition(med3, 24, axis=1)[:, 24]
    return lap > _SHARP_MAX * np.maximum(fine, 0.0)


def _adaptive_sizes(
    sub: np.ndarray, seg: np.ndarray, objs: np.ndarray, idx: np.ndarray, guess: np.ndarray
) -> np.ndarray:
    """Adaptive (Gaussian-weighted) sigma (px) of the detections ``idx``: the size of a
    Gaussian with their weighted second moments, which neither the wings (so it does not
    grow with brightness, unlike an isophotal size) nor the neighbours (their segmentation
    pixels are left out) inflate. ``guess`` (their isophotal sizes) sets the stamps."""
    ny, nx = sub.shape
    h = int(np.clip(math.ceil(4.0 * float(np.median(guess))), 4, 30))
    g = np.arange(-h, h + 1)
    iy = np.rint(objs["y"][idx]).astype(np.int64)[:, None, None] + g[None, :, None]
    ix = np.rint(objs["x"][idx]).astype(np.int64)[:, None, None] + g[None, None, :]
    inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    iyc, ixc = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    own = seg[iyc, ixc]
    use = inside & ((own == 0) | (own == (idx + 1)[:, None, None]))
    img = np.where(use, sub[iyc, ixc], 0.0).astype(np.float64)
    dy = iy - objs["y"][idx][:, None, None]
    dx = ix - objs["x"][idx][:, None, None]
    r2 = dx * dx + dy * dy
    half_r2 = -0.5 * r2
    s2 = np.clip(guess, 0.5, h / 2.0) ** 2
    for _ in range(30):
        w = np.exp(half_r2 / s2[:, None, None])
        w *= img
        total = w.sum(axis=(1, 2))
        new = np.where(total > 0, (w * r2).sum(axis=(1, 2)) / np.where(total > 0, total, 1.0), s2)
        new = np.clip(new, 0.05, (h / 1.5) ** 2)
        if np.allclose(new, s2, rtol=1e-4):
            s2 = new
            break
        s2 = new
    return np.sqrt(s2)


def _stellar_locus(size: np.ndarray) -> float:
    """The size of the stellar locus: among the candidates' sizes, the smallest whose
    +-15% neighbourhood holds at least max(3, a third of the most populated one),
    refined to the median of the sizes within 25% above it; NaN when no size has 3."""
    rhalf = size
    logr = np.log(rhalf)
    width = math.log(1.15)
    # how many sizes lie within the width of each (in the sorted sizes: no n x n matrix)
    ranked = np.sort(logr)
    counts = np.searchsorted(ranked, logr + width, "left") - np.searchsorted(
        ranked, logr - width, "right"
    )
    need = max(3, math.ceil(counts.max() / 3.0))
    if counts.max() < need:  # no clump of sizes: no locus
        return math.nan
    order = np.argsort(rhalf)
    first = next(i for i in order if counts[i] >= need)
    r0 = float(rhalf[first])
    return float(np.median(rhalf[(rhalf >= r0) & (rhalf <= r0 * _LOCUS_WIDTH)]))


def _shape_moments(image: np.ndarray, radius: float) -> tuple[float, float]:
    """Ellipticity ``1 - b/a`` and position angle (deg, from +x) from second moments."""
    half = image.shape[0] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    w = np.where(xx**2 + yy**2 <= radius * radius, np.clip(image, 0.0, None), 0.0)
    total = w.sum()
    if total <= 0:
        return 0.0, 0.0
    mx, my = (w * xx).sum() / total, (w * yy).sum() / total
    dx, dy = xx - mx, yy - my
    mxx = (w * dx * dx).sum() / total
    myy = (w * dy * dy).sum() / total
    mxy = (w * dx * dy).sum() / total
    eig = np.linalg.eigvalsh(np.array([[mxx, mxy], [mxy, myy]]))
    if eig[1] <= 0:
        return 0.0, 0.0
    ellipticity = 1.0 - math.sqrt(max(eig[0], 0.0) / eig[1])
    theta = 0.5 * math.degrees(math.atan2(2.0 * mxy, mxx - myy))
    return float(ellipticity), float(theta)


# --------------------------------------------------------------------------- stars


def _isolated(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    keep: np.ndarray,
    fwhm0: float,
    options: NativePsfOptions,
) -> tuple[np.ndarray, float]:
    """Detections with no neighbour brighter than ``neighbour_fraction`` of them within
    ``isolation`` FWHM. In crowded fields, where fewer than 10 candidates pass, looser
    criteria are tried in turn, down to none at all (with ``fallback``, when even the
    loosest leaves fewer than ``min_stars``: the neighbours' pixels are masked in the
    stamps anyway). Returns the mask and the radius (in FWHM) used."""
    from scipy import spatial

    tree = spatial.cKDTree(np.column_stack([x, y]))
    levels = [
        (options.isolation, options.neighbour_fraction),
        (options.isolation * 2.0 / 3.0, min(3.0 * options.neighbour_fraction, 1.0)),
        (min(1.5, options.isolation), 1.0),
    ]
    target = max(options.min_stars, 10)
    for radius, ratio in levels:
        pairs = tree.query_pairs(max(radius * fwhm0, 1.0), output_type="ndarray")
        crowded = np.zeros(len(x), dtype=bool)
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            crowded[i[flux[j] > ratio * flux[i]]] = True
            crowded[j[flux[i] > ratio * flux[j]]] = True
        if np.count_nonzero(keep & ~crowded) >= target:
            break
    if options.fallback and np.count_nonzero(keep & ~crowded) < options.min_stars:
        return np.ones(len(x), dtype=bool), 0.0
    return ~crowded, float(radius)


#: Margin (px) of the boxes whose cubic-spline coefficients :func:`_cut_stamps` computes
#: around each stamp: a pixel's coefficient feels a value d px away by 0.268**d, so 12 px
#: (as scipy pads a frame's edge for mode "nearest") match the whole frame's to 1e-7.
_SPLINE_MARGIN = 12


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights (n, 4) of the coefficients at offsets -1, 0, 1, 2 from
    ``floor(x)`` for fractional parts ``t = x - floor(x)``."""
    t2, t3 = t * t, t * t * t
    return (
        np.column_stack(
            [(1.0 - t) ** 3, 3.0 * t3 - 6.0 * t2 + 4.0, -3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0, t3]
        )
        / 6.0
    )


def _cut_stamps(
    sub: np.ndarray,
    bad: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    half: int,
    seg: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """(n, 2*half+1, 2*half+1) stamps of ``sub`` centred on the sub-pixel positions
    (cubic-spline resampling, all stars at once); NaN where a masked pixel or the frame
    edge is within reach of the spline, and, with a segmentation map ``seg`` and the
    stars' ``labels`` in it, on the other sources' pixels (grown by 1 px).

    As :func:`scipy.ndimage.map_coordinates` (``order=3, mode="nearest"``) on the whole
    frame, but the spline coefficients are computed on a box around each stamp only
    (:data:`_SPLINE_MARGIN`), and as every pixel of a stamp has the same sub-pixel
    offset, the interpolation is a separable sum of 4 x 4 shifted boxes."""
    from scipy import ndimage

    ny, nx = sub.shape
    n, size = len(xc), 2 * half + 1
    if n == 0:
        return np.zeros((0, size, size), dtype=sub.dtype)
    x0, y0 = np.floor(xc), np.floor(yc)
    wx, wy = _cubic_weights(xc - x0), _cubic_weights(yc - y0)
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    m = _SPLINE_MARGIN
    g = np.arange(-half - 1 - m, half + 3 + m)  # spline support of the stamp, plus margin
    iy, ix = y0[:, None] + g, x0[:, None] + g  # (n, size + 3 + 2 m)
    boxes = sub[np.clip(iy, 0, ny - 1)[:, :, None], np.clip(ix, 0, nx - 1)[:, None, :]]
    coef = ndimage.spline_filter1d(boxes, 3, axis=1, output=np.float64, mode="nearest")
    coef = ndimage.spline_filter1d(coef, 3, axis=2, output=np.float64, mode="nearest")
    coef = coef[:, m:-m, m:-m]  # (n, size + 3, size + 3): offset -half - 1 first
    rows = sum(wy[:, a, None, None] * coef[:, a : a + size, :] for a in range(4))
    stamps = sum(wx[:, b, None, None] * rows[:, :, b : b + size] for b in range(4))
    # a masked pixel (grown by 2 px) or the frame edge within reach of the (linear) spline
    r = np.arange(-half - 2, half + 4)  # the bilinear support, plus the growth
    ry, rx = y0[:, None] + r, x0[:, None] + r
    in_y, in_x = (ry >= 0) & (ry < ny), (rx >= 0) & (rx < nx)
    near = bad[np.clip(ry, 0, ny - 1)[:, :, None], np.clip(rx, 0, nx - 1)[:, None, :]]
    near &= in_y[:, :, None] & in_x[:, None, :]
    reach = ndimage.binary_dilation(near, structure=_CROSS, iterations=2)
    reach |= ~(in_y[:, :, None] & in_x[:, None, :])  # off the frame
    reach = reach[:, 2:-2, 2:-2].astype(np.float64)  # (n, size + 1, size + 1): offset -half first
    ty, tx = (yc - y0)[:, None, None], (xc - x0)[:, None, None]
    lost = (1.0 - ty) * ((1.0 - tx) * reach[:, :-1, :-1] + tx * reach[:, :-1, 1:]) + ty * (
        (1.0 - tx) * reach[:, 1:, :-1] + tx * reach[:, 1:, 1:]
    )
    stamps = stamps.astype(sub.dtype)
    stamps[lost > 0] = np.nan
    if seg is not None and labels is not None:  # (outside the frame: NaN already)
        grid = np.arange(-half, half + 1, dtype=np.float64)
        sy = np.clip(np.rint(yc[:, None] + grid).astype(np.int64), 0, ny - 1)
        sx = np.clip(np.rint(xc[:, None] + grid).astype(np.int64), 0, nx - 1)
        lab = seg[sy[:, :, None], sx[:, None, :]]
        other = (lab > 0) & (lab != np.asarray(labels)[:, None, None])
        stamps[ndimage.binary_dilation(other, structure=_CROSS)] = np.nan
    return stamps


@attrs.frozen(kw_only=True)
class _Stars:
    """The PSF stars found on one frame (internal)."""

    index: np.ndarray = attrs.field(eq=False)  # into the detections, by decreasing S/N
    x: np.ndarray = attrs.field(eq=False)  # sub-pixel centres (windowed centroids)
    y: np.ndarray = attrs.field(eq=False)
    stamps: np.ndarray = attrs.field(eq=False)  # normalised by their core flux
    fwhm0: float
    half: int
    isolation: float
    locus: float  # sigma (px) of the stellar locus (nan: none)
    shortfall: str  # why fewer than min_stars ("" when enough)


def _select_stars(
    sub: np.ndarray,
    bad: np.ndarray,
    seg: np.ndarray,
    objs: np.ndarray,
    noise: float,
    sat_level: float,
    raw_peak: np.ndarray,
    options: NativePsfOptions,
    fail: Callable[[int, str], Exception],
) -> _Stars:
    """The PSF stars, step by step; a step that leaves fewer than ``min_stars`` raises
    ``fail`` unless ``options.fallback`` (then the shortfall is recorded and the stars left,
    maybe none, are returned)."""
    import sep

    ny, nx = sub.shape
    shortfall = ""

    def enough(n: int, why: str) -> bool:
        nonlocal shortfall
        if n < options.min_stars:
            if not options.fallback:
                raise fail(n, why)
            shortfall = shortfall or f"only {n} {why}"
        return n > 0

    def none(fwhm0: float = 3.0, half: int = 7, isolation: float = math.nan) -> _Stars:
        return _Stars(
            index=np.zeros(0, dtype=np.int64),
            x=np.zeros(0),
            y=np.zeros(0),
            stamps=np.zeros((0, 2 * half + 1, 2 * half + 1)),
            fwhm0=fwhm0,
            half=half,
            isolation=isolation,
            locus=math.nan,
            shortfall=shortfall,
        )

    x, y, a, b = objs["x"], objs["y"], objs["a"], objs["b"]
    flux, peak = objs["flux"], objs["peak"]
    snr_peak = peak / noise
    keep = (
        ((objs["flag"] & ~sep.OBJ_MERGED) == 0)  # merged is fine, truncated is not
        & (snr_peak >= options.min_snr)
        & (raw_peak < options.saturation_fraction * sat_level)
        & (a > 0)
        & (b >= (1.0 - options.max_ellipticity) * a)
    )
    if not enough(int(keep.sum()), "bright, unsaturated and round enough"):
        return none()
    keep[keep] = ~_cosmic(sub, objs[keep])
    if not enough(int(keep.sum()), "bright, round, unsaturated, not a cosmic ray"):
        return none()

    # the candidates' sizes: the stellar locus (stars, not galaxies or cosmic rays) and the
    # first FWHM estimate
    idx = np.flatnonzero(keep)
    size = _adaptive_sizes(sub, seg, objs, idx, _source_size(objs[idx], options.threshold * noise))
    locus = _stellar_locus(size) if len(idx) >= _LOCUS_MIN else math.nan
    if math.isfinite(locus):
        on = (size >= locus / _LOCUS_WIDTH) & (size <= locus * _LOCUS_WIDTH)
        keep[idx[~on]] = False
        if not enough(int(keep.sum()), "on the stellar locus"):
            return none()
    star_size = locus if math.isfinite(locus) else float(np.median(size))
    fwhm0 = float(np.clip(2.3548 * star_size, 1.0, 30.0))
    half = options.stamp_half or int(np.clip(math.ceil(3.0 * fwhm0), 7, 25))

    isolated, isolation_used = _isolated(x, y, flux, keep, fwhm0, options)
    # the core (radius 1.5 FWHM) inside the frame and free of masked pixels; masked or
    # outside pixels further out are left out of the stack
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    rc = math.ceil(1.5 * fwhm0) + 1
    inside = (ix - rc >= 0) & (ix + rc < nx) & (iy - rc >= 0) & (iy + rc < ny)
    cand = np.flatnonzero(keep & isolated & inside)
    off = np.arange(-rc, rc + 1)
    win = bad[iy[cand, None, None] + off[None, :, None], ix[cand, None, None] + off[None, None]]
    win &= (off[:, None] ** 2 + off[None, :] ** 2 <= rc * rc)[None]
    cand = cand[~win.any(axis=(1, 2))]
    if not enough(len(cand), "isolated, core inside the frame and unmasked"):
        return none(fwhm0, half, isolation_used)
    cand = cand[np.argsort(-snr_peak[cand], kind="stable")[: options.max_stars]]

    # sub-pixel centres (windowed centroids), stamps, normalised by their core flux
    sig = np.full(len(cand), fwhm0 / 2.3548)
    xw, yw, wflag = sep.winpos(sub, x[cand], y[cand], sig, mask=bad)
    good = (wflag == 0) & (np.hypot(xw - x[cand], yw - y[cand]) < 1.5)
    cand, xw, yw = cand[good], xw[good], yw[good]
    if not enough(len(cand), "with a good centroid"):
        return none(fwhm0, half, isolation_used)
    stamps = _cut_stamps(sub, bad, xw, yw, half, seg, cand + 1)
    # normalised by the core flux (radius 1.5 FWHM); where a neighbour's pixels are masked
    # in it, by the flux on the rest over what a Gaussian of the first FWHM has there. The
    # centre (radius 0.5 FWHM) must be unmasked and three quarters of the core's light.
    grid = np.arange(-half, half + 1, dtype=np.float64)
    r2 = grid[:, None] ** 2 + grid[None, :] ** 2
    core = r2 <= (1.5 * fwhm0) ** 2
    centre = r2 <= max(0.5 * fwhm0, 1.0) ** 2
    shape = np.where(core, gaussian_profile(r2, fwhm0 * _SIGMA_PER_FWHM), 0.0)
    seen = np.isfinite(stamps)
    present = np.where(seen, shape, 0.0).sum(axis=(1, 2)) / shape.sum()
    norm = np.where(core & seen, stamps, 0.0).sum(axis=(1, 2)) / np.maximum(present, 1e-6)
    ok = (norm > 0) & (present >= 0.75) & seen[:, centre].all(axis=1)
    stamps, cand = stamps[ok] / norm[ok, None, None], cand[ok]
    if not enough(len(cand), "with an unmasked core of positive flux"):
        return none(fwhm0, half, isolation_used)
    return _Stars(
        index=cand,
        x=xw[ok],
        y=yw[ok],
        stamps=stamps,
        fwhm0=fwhm0,
        half=half,
        isolation=isolation_used,
        locus=locus,
        shortfall=shortfall,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class NativePsf(PsfBackend):
    """Measures the PSF from bright isolated stars (sep + a joint least-squares fit), with
    flagged fallbacks (fewer stars, moments, autocorrelation) when they fall short."""

    name = "native"
    Options = NativePsfOptions
    description = "sep detection, Moffat or Gaussian fitted to the PSF stars jointly"

    def check(self, options: NativePsfOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when sep is missing."""
        from oasis_native.mask import _require

        _require("psf", "sep")

    def psf(self, frame: Frame, *, options: NativePsfOptions, workdir: Path) -> Frame:
        """Return ``frame`` with ``psf``, ``fwhm``, ``snr``, ``background`` and ``noise`` set.

        Parameters
        ----------
        frame : Frame
            Pixels with weight 0 (the mask stage's output) are ignored; ``saturation``
            and ``gain`` are used when set.
        options : NativePsfOptions
        workdir : Path
            Unused (nothing is written).

        Returns
        -------
        Frame
            ``psf`` is a :class:`~oasis_core.contracts.model.PsfModel` whose image is an odd,
            unit-sum stamp (the profile, or the median stack) and whose ``params`` hold
            the fit (``alpha``/``beta`` or ``sigma``, ``ellipticity``, ``theta``...; for
            the joint fit ``fit_stars``, ``rejected_stars``, ``fit_chi2`` and the median
            stack's own ``stack_fwhm``/``stack_beta``), ``psf_source`` (``"fit"``,
            ``"moments"`` or ``"fwhm-moffat"``) and ``psf_flag`` (empty, or what fallback
            was taken and why).

        Raises
        ------
        StageError
            Every pixel masked, no sky noise, or no source detected at all; with
            ``fallback = false`` also fewer than ``min_stars`` usable stars or a fit that
            fails or ends on a bound.

        Notes
        -----
        sep's extraction pixel stack is raised to fit the frame, up to 3 million pixels,
        only when a crowded field needs it (:func:`oasis_native.sepstack.extract`).
        """
        import sep

        from oasis_core.contracts.errors import StageError

        where = f"psf backend 'native': frame {frame.name!r}"
        data = np.array(frame.data, dtype=np.float32, order="C")  # native-endian copy
        ny, nx = data.shape
        bad = ~np.isfinite(data) | (np.asarray(frame.weight) <= 0)
        if bad.all():
            raise StageError(f"{where}: every pixel is masked (weight 0)")
        # saturation: the frame's, else the data's clipping plateau (0.98 x its maximum when
        # at least 4 pixels reach it), else none (a frame's brightest star is not saturated
        # merely for being the brightest: on a cutout it may be the only star)
        from oasis_native.mask import saturation_level

        sat = saturation_level(data, ~bad, frame.saturation)
        sat_level = math.inf if sat is None else sat
        # sep leaves the masked pixels out of the background, whatever their value: any
        # finite one will do
        data[bad] = 0.0
        size = int(max(8, min(options.back_size, ny, nx)))
        bkg = sep.Background(data, mask=bad, bw=size, bh=size, fw=3, fh=3)
        background, noise = float(bkg.globalback), float(bkg.globalrms)
        # crowding inflates sep's RMS: keep the pixel-difference estimate when lower
        from oasis_core.engine.stats import sky_noise

        diff_noise = sky_noise(frame.data, ~bad, max_pixels=_NOISE_PIXELS)
        if math.isfinite(diff_noise) and 0 < diff_noise < noise:
            noise = diff_noise
        if not (math.isfinite(noise) and noise > 0):
            raise StageError(f"{where}: the sky noise is {noise} (blank or constant frame?)")
        sub = data  # (the copy above: subtracted in place)
        bkg.subfrom(sub)
        sub[bad] = 0.0
        objs, seg = sepstack.extract(
            sub,
            options.threshold,
            largest=min(data.size, 3_000_000),
            err=noise,
            mask=bad,
            minarea=5,
            segmentation_map=True,
        )

        def fail(n: int, why: str) -> StageError:
            msg = (
                f"{where}: {n} usable PSF stars ({why}), need {options.min_stars} at "
                f"threshold {options.threshold:g} sigma and min_snr {options.min_snr:g}; "
                "lower psf.native.threshold / min_snr or check the frame and its mask"
            )
            return StageError(msg, metadata={"nstars": n, "ndetected": len(objs)})

        if len(objs) < options.min_stars and not options.fallback:
            raise fail(len(objs), f"{len(objs)} detections")
        if len(objs) == 0:
            raise StageError(
                f"{where}: no source detected above {options.threshold:g} sigma, so no PSF "
                "can be measured; give the frame a FWHM (header FWHM) or lower "
                "psf.native.threshold",
                metadata={"nstars": 0, "ndetected": 0},
            )
        raw_peak = np.asarray(frame.data)[objs["ypeak"], objs["xpeak"]]
        stars = _select_stars(sub, bad, seg, objs, noise, sat_level, raw_peak, options, fail)
        cand, half, nstars = stars.index, stars.half, len(stars.index)
        few = (
            f"{_plural(nstars, 'PSF star')}, fewer than min_stars {options.min_stars} "
            f"({stars.shortfall})"
            if stars.shortfall
            else ""
        )
        # the FWHM can be neither below fwhm_min nor wider than the stamp or a quarter of
        # the frame's shorter side (a profile that size is not constrained by the data)
        hi_frame = max(min(ny, nx) / 4.0, options.fwhm_min * 1.5)
        bounds = (options.fwhm_min, max(min(float(half), hi_frame), options.fwhm_min * 1.5))
        params: dict[str, Any] = {}
        stack: np.ndarray | None = None
        if nstars:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # stack pixels with no star
                stack = np.nanmedian(stars.stamps, axis=0)
            fwhm, image, params, flags = self._from_stack(
                stack, stars, options, bounds, fail, (sub, bad, seg, noise, frame.gain)
            )
            flags = [few, *flags] if few else flags
        else:
            # the sources the frame edge does not cut and that do not saturate
            whole = ((objs["flag"] & sep.OBJ_TRUNC) == 0) & (
                raw_peak < options.saturation_fraction * sat_level
            )
            fwhm, image, params, flags = self._from_autocorrelation(
                sub, bad, seg, objs[whole], np.flatnonzero(whole) + 1, noise, stars, options, where
            )
            flags = [f"no usable PSF star ({stars.shortfall})", *flags]
        clean = (
            np.nan_to_num(stack - params.pop("sky", 0.0), nan=0.0) if stack is not None else image
        )
        ellipticity, theta = _shape_moments(clean, 2.0 * fwhm)
        if options.image == "empirical" and stack is not None:
            image = np.clip(clean, 0.0, None)
        image = image / image.sum()

        # frame S/N: median peak S/N of the brightest PSF stars (sky noise, plus the star's
        # Poisson noise when the gain is known); of the brightest unsaturated detections
        # when there is no PSF star
        if nstars:
            top = cand[: options.snr_stars]  # cand is sorted by decreasing S/N
        else:
            unsat = np.flatnonzero(raw_peak < options.saturation_fraction * sat_level)
            top = unsat[np.argsort(-objs["peak"][unsat], kind="stable")][: options.snr_stars]
        peaks = objs["peak"][top]
        ix = np.clip(np.rint(objs["x"][top]).astype(np.int64), 0, nx - 1)
        iy = np.clip(np.rint(objs["y"][top]).astype(np.int64), 0, ny - 1)
        rms_at = bkg.rms()[iy, ix]
        rms_at = np.where(rms_at > 0, rms_at, noise)
        var = rms_at**2 + (np.maximum(peaks, 0.0) / frame.gain if frame.gain else 0.0)
        snr = float(np.median(peaks / np.sqrt(var))) if len(top) else math.nan

        params.update(
            ellipticity=ellipticity,
            theta=theta,
            fwhm_guess=stars.fwhm0,
            stamp_half=half,
            ndetected=len(objs),
            psf_flag="; ".join(f for f in flags if f),
        )
        if math.isfinite(stars.isolation):
            params["isolation"] = stars.isolation
        if math.isfinite(stars.locus):
            params["locus_fwhm"] = 2.3548 * stars.locus
        psf = PsfModel(
            image=image.astype(np.float32),
            fwhm=float(fwhm),
            model=options.model,
            params=params,
            nstars=nstars,
        )
        return attrs.evolve(
            frame, psf=psf, fwhm=float(fwhm), snr=snr, background=background, noise=noise
        )

    @staticmethod
    def _from_stack(
        stack: np.ndarray,
        stars: _Stars,
        options: NativePsfOptions,
        bounds: tuple[float, float],
        fail: Callable[[int, str], Exception],
        pixels: tuple[np.ndarray, np.ndarray, np.ndarray, float, float | None],
    ) -> tuple[float, np.ndarray, dict[str, Any], list[str]]:
        """(FWHM, profile image, params, flags) from the stars: the bounded fit to the
        stack, then (``fit = "joint"``) the joint fit to the stars' own ``pixels``
        (``sub``, ``bad``, ``seg``, sky noise, gain) from there; else the profile of
        the stack's adaptive second moments."""
        nstars = len(stars.index)
        try:
            fit = _fit(stack, options.model, stars.fwhm0, bounds)
            failure = fit.pop("at_bound")
            failure = f"ended on {failure}" if failure else ""
        except (ValueError, np.linalg.LinAlgError) as err:  # least_squares on a bad stack
            fit, failure = {}, f"failed ({err})"
        if not failure:
            flags: list[str] = []
            if options.fit == "joint":
                sub, bad, seg, noise, gain = pixels
                try:
                    joint = _joint_fit(
                        sub,
                        bad,
                        seg,
                        stars,
                        options.model,
                        fit,
                        bounds,
                        noise,
                        gain,
                        options.min_stars,
                    )
                    joint_failure = joint.pop("at_bound")
                    joint_failure = f"ended on {joint_failure}" if joint_failure else ""
                except (ValueError, np.linalg.LinAlgError) as err:
                    joint, joint_failure = {}, f"failed ({err})"
                if not joint_failure:
                    stacked = {f"stack_{k}": fit[k] for k in ("fwhm", "beta") if k in fit}
                    params = {**joint, **stacked, "sky": fit["sky"], "psf_source": "fit"}
                    image = _model_image(
                        options.model, joint["fwhm"], joint.get("beta"), stars.half
                    )
                    return joint["fwhm"], image, params, []
                flags.append(
                    f"joint {options.model} fit to {_plural(nstars, 'star')} {joint_failure}: "
                    "the fit to their median stack"
                )
            image = _model_image(options.model, fit["fwhm"], fit.get("beta"), stars.half)
            return fit["fwhm"], image, {**fit, "psf_source": "fit"}, flags
        if not options.fallback:
            raise fail(nstars, f"the {options.model} fit {failure}")
        # the fallback: the profile with the stack's adaptive second moments
        target = _adaptive_size(stack)
        if not math.isfinite(target):
            raise fail(nstars, f"the {options.model} fit {failure} and the stack has no flux")

        def size_of(fwhm: float) -> float:
            return _adaptive_size(_profile(options.model, fwhm, stars.half))

        fwhm, clipped = _match_fwhm(target, size_of, bounds)
        image = _model_image(options.model, fwhm, None, stars.half)
        flag = (
            f"{options.model} fit to {_plural(nstars, 'star')} {failure}: FWHM from the "
            "stack's second moments"
        )
        if clipped:
            flag += f", clipped to {clipped}"
        params = _fallback_params(options.model, fwhm)
        params.update(psf_source="moments", sky=float(fit.get("sky", 0.0)))
        return fwhm, image, params, [flag]

    @staticmethod
    def _from_autocorrelation(
        sub: np.ndarray,
        bad: np.ndarray,
        seg: np.ndarray,
        objs: np.ndarray,
        labels: np.ndarray,
        noise: float,
        stars: _Stars,
        options: NativePsfOptions,
        where: str,
    ) -> tuple[float, np.ndarray, dict[str, Any], list[str]]:
        """(FWHM, profile image, params, flags) with no PSF star: the profile whose
        autocorrelation has the sources' autocorrelation's adaptive size."""
        import scipy.fft as sfft

        from oasis_core.contracts.errors import StageError

        ny, nx = sub.shape
        if not len(objs):
            raise StageError(
                f"{where}: no usable PSF star ({stars.shortfall}) and every source is cut "
                "by the frame edge or saturated, so no PSF can be measured; give the frame "
                "a FWHM (header FWHM) or lower psf.native.threshold"
            )
        # the footprints grown by 2 FWHM (first estimate: the isophotal sizes corrected for
        # truncation) to take in the wings of faint sources
        fwhm0 = 2.3548 * float(np.median(_source_size(objs, options.threshold * noise)))
        grow = float(np.clip(2.0 * fwhm0, 3.0, 25.0))
        half = int(np.clip(math.ceil(3.0 * fwhm0), 7, 25))
        half = max(3, min(half, (min(ny, nx) - 1) // 2))
        stamp, significance = _source_autocorrelation(
            sub, bad, seg, objs, labels, noise, grow, half
        )
        if not significance >= _AC_MIN_SNR:
            raise StageError(
                f"{where}: no usable PSF star ({stars.shortfall}) and the autocorrelation "
                f"of the {_plural(len(objs), 'source')} is too faint (S/N "
                f"{significance:.1f} < {_AC_MIN_SNR:g}), so no PSF can be measured; give the "
                "frame a FWHM (header FWHM) or lower psf.native.threshold"
            )
        target = _adaptive_size(stamp)
        if not math.isfinite(target):
            raise StageError(f"{where}: the sources' autocorrelation has no central peak")
        shape = (sfft.next_fast_len(4 * half + 2),) * 2
        model = options.model

        def size_of(fwhm: float) -> float:
            ac = _autocorrelation(_profile(model, fwhm, half), shape)
            ys = np.arange(-half, half + 1) % shape[0]
            return _adaptive_size(ac[np.ix_(ys, ys)])

        hi = max(min(float(half), min(ny, nx) / 4.0), options.fwhm_min * 1.5)
        fwhm, clipped = _match_fwhm(target, size_of, (options.fwhm_min, hi))
        image = _model_image(model, fwhm, None, half)
        flag = (
            f"{'Moffat' if model == 'moffat' else 'Gaussian'} of the FWHM from the "
            f"autocorrelation of {_plural(len(objs), 'detection')}"
        )
        if clipped:
            flag += f", clipped to {clipped}"
        params = _fallback_params(model, fwhm)
        params.update(
            psf_source=f"fwhm-{model}",
            fwhm_source="autocorrelation",
            autocorrelation_snr=significance,
        )
        return fwhm, image, params, [flag]


def _fallback_params(model: str, fwhm: float) -> dict[str, Any]:
    if model == "moffat":
        return {"alpha": _moffat_alpha(fwhm, _FALLBACK_BETA), "beta": _FALLBACK_BETA, "fwhm": fwhm}
    return {"sigma": fwhm * _SIGMA_PER_FWHM, "fwhm": fwhm}
