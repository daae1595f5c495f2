"""Quality figures of a residual (difference image).

A perfect subtraction leaves pure noise. For two images that keep their Poisson
statistics, every residual pixel is the difference of two Poisson variables, i.e. it
follows a Skellam distribution of mean ``mu_S - mu_T`` and variance ``mu_S + mu_T``; at the
counts of real images (hundreds of photo-electrons of sky or more) the Skellam
distribution is, by the central limit theorem, indistinguishable from a Gaussian of the
same mean and variance. Once the residual is *normalised*,

    z = (R - median(R)) / sigma,

with ``sigma`` the 1-sigma noise image of the residual (sqrt(B_S + B_T) in Poisson units
for frames that keep their sky, OasisPy's normalisation), the ideal residual is therefore a
unit Gaussian whatever the sky levels, the gains or whether the frames were
sky-subtracted. The two figures here compare the normalised residual with that ideal:

* :func:`q_value`: OasisPy's quality figure ``Q = 1 / (1 + chi2 / N_pix)``, with ``chi2``
  Pearson's chi-square between the histogram of ``z`` and the unit-Gaussian counts.
  ``Q`` is close to 1 for a noise-limited residual and falls towards 0 as the residual
  departs from noise (wrong noise level, unsubtracted stars, structure).
* :func:`normalized_noise`: the robust standard deviation (1.4826 MAD) of ``z`` away from
  sources; 1 for a residual whose noise image is right.

Q judges the residual's pixels against their noise, one by one; it cannot tell a residual
whose every star is left at a third of its flux (a kernel whose sum, the flux scale, is
wrong) from a good one when the stars are few and the sky fills the frame (a DECam
cutout with six such stars had Q 0.975). :func:`star_flux_left` measures that directly:
the residual's flux at the template's brightest stars, as a fraction of their flux.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from oasis_core.engine.stats import box_mean, local_maxima
from oasis_core.engine.stats import exact_median as _median

__all__ = [
    "MIN_PIXELS",
    "StarFluxLeft",
    "bright_stars",
    "normalized_noise",
    "q_value",
    "source_footprint",
    "star_aperture_rms",
    "star_flux_left",
]

#: Fewer usable pixels than this and the figures are ``nan``.
MIN_PIXELS = 100

#: Half-width, in sigmas, of the histogram range of :func:`q_value` (OasisPy's ``(-5, 5)``).
Q_RANGE = 5.0

#: Histogram bins whose expected count is below this are merged into their neighbour
#: towards the centre (Pearson's test needs expected counts of about 5 or more).
MIN_EXPECTED = 5.0


def _normalised_pixels(
    residual: np.ndarray,
    noise: np.ndarray,
    weight: np.ndarray,
    exclude: np.ndarray | None,
) -> np.ndarray:
    """The 1-D array of z = (R - median) / noise over the usable pixels."""
    residual = np.asarray(residual)
    noise = np.asarray(noise)
    weight = np.asarray(weight)
    if residual.shape != noise.shape or residual.shape != weight.shape:
        msg = (
            f"quality: residual {residual.shape}, noise {noise.shape} and weight "
            f"{weight.shape} must have the same shape"
        )
        raise ValueError(msg)
    good = (weight > 0) & np.isfinite(residual) & np.isfinite(noise) & (noise > 0)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != residual.shape:
            msg = f"quality: exclude has shape {exclude.shape}, residual has {residual.shape}"
            raise ValueError(msg)
        good &= ~exclude
    r = residual[good]
    if r.size < MIN_PIXELS:
        return r[:0].astype(np.float64)
    z = np.subtract(r, _median(r), dtype=np.float64)
    z /= noise[good]
    return z


def q_value(
    residual: np.ndarray,
    noise: np.ndarray,
    weight: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    bins: int | None = None,
) -> float:
    """OasisPy's quality figure Q = 1 / (1 + chi2 / N_pix) of a residual.

    The usable pixels (``weight > 0``, finite residual and noise, ``noise > 0``, not in
    ``exclude``) are normalised to z = (R - median(R)) / noise and histogrammed on
    ``bins`` equal bins spanning [-5, 5] sigma, the two end bins extended to infinity so
    that every pixel counts. The expected count of each bin is that of an ideal residual,
    pure noise: for normalised pixels a unit Gaussian, the large-count limit of the Skellam
    distribution of the difference of two Poisson images. ``chi2`` is Pearson's
    chi-square ``sum((O - E)**2 / E)`` after merging tail bins whose expected count is
    below 5 into their inner neighbour, and ``N_pix`` the number of pixels used.

    For pure noise ``chi2`` is about the number of bins, so Q is within ~1e-3 of 1; a
    residual whose scatter is 1.2x (1.5x) its noise image gives Q of about 0.9 (0.5 for
    16 000 pixels, 0.35 for a million: finer bins resolve the tails better).
    OasisPy divides ``chi2`` by the 99.5 % quantile of the chi-square distribution with
    ``N_pix - 3`` degrees of freedom, which equals ``N_pix`` to within a few percent for
    any real image; it also ignores pixels beyond 5 sigma, which we keep in the end bins.

    Parameters
    ----------
    residual : ndarray
        The residual image (ADU).
    noise : ndarray
        Its 1-sigma noise image (ADU), same shape.
    weight : ndarray
        Its weight map; pixels with ``weight <= 0`` are not used.
    exclude : ndarray of bool, optional
        Further pixels not to use (e.g. around bright sources).
    bins : int, optional
        Number of histogram bins over [-5, 5]; default Sturges' ``int(log2(N_pix) + 1)``
        (OasisPy's choice).

    Returns
    -------
    float
        Q in (0, 1], or ``nan`` when fewer than :data:`MIN_PIXELS` pixels are usable.

    Raises
    ------
    ValueError
        If the arrays do not have the same shape or ``bins`` is below 3.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> r = rng.normal(0.0, 10.0, (128, 128))
    >>> sigma, w = np.full(r.shape, 10.0), np.ones(r.shape)
    >>> q_value(r, sigma, w) > 0.99
    True
    >>> q_value(1.5 * r, sigma, w) < 0.6
    True
    """
    z = _normalised_pixels(residual, noise, weight, exclude)
    n = z.size
    if n < MIN_PIXELS:
        return float("nan")
    if bins is None:
        bins = int(math.log2(n) + 1)
    if bins < 3:
        msg = f"q_value: bins={bins} is too small; use at least 3"
        raise ValueError(msg)
    edges = np.linspace(-Q_RANGE, Q_RANGE, bins + 1)
    # equal bins given as a count and a range take numpy's fast path (same counts)
    np.clip(z, -Q_RANGE, Q_RANGE, out=z)
    observed = np.histogram(z, bins=bins, range=(-Q_RANGE, Q_RANGE))[0].astype(np.float64)
    # the unit Gaussian's CDF at the edges (scipy.special.ndtr, without importing scipy)
    cdf = np.array([0.5 * math.erfc(-e / math.sqrt(2.0)) for e in edges])
    cdf[0], cdf[-1] = 0.0, 1.0
    expected = n * np.diff(cdf)
    # The expected counts rise monotonically from each end towards the centre, so the
    # bins to merge are runs at both ends: fold them into the first bin with E >= 5.
    big = np.flatnonzero(expected >= MIN_EXPECTED)
    if big.size == 0:
        return float("nan")
    lo, hi = big[0], big[-1]
    expected[lo] += expected[:lo].sum()
    observed[lo] += observed[:lo].sum()
    expected[hi] += expected[hi + 1 :].sum()
    observed[hi] += observed[hi + 1 :].sum()
    o, e = observed[lo : hi + 1], expected[lo : hi + 1]
    chi2 = float(np.sum((o - e) ** 2 / e))
    return 1.0 / (1.0 + chi2 / n)


def normalized_noise(
    residual: np.ndarray,
    noise: np.ndarray,
    weight: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
) -> float:
    """Robust standard deviation (1.4826 MAD) of the normalised residual.

    z = (R - median(R)) / noise over the pixels with ``weight > 0``, finite values and
    ``noise > 0``, outside ``exclude``. It is 1 when the noise image describes the
    residual's scatter; above 1 the subtraction left structure or the noise image is
    too low, below 1 the noise image is too high.

    Parameters
    ----------
    residual, noise, weight : ndarray
        The residual (ADU), its 1-sigma noise image (ADU) and its weight map.
    exclude : ndarray of bool, optional
        Pixels not to use, typically those on and around sources.

    Returns
    -------
    float
        The robust standard deviation of z, or ``nan`` when fewer than
        :data:`MIN_PIXELS` pixels are usable.

    Raises
    ------
    ValueError
        If the arrays do not have the same shape.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> r = rng.normal(0.0, 3.0, (128, 128))
    >>> round(normalized_noise(r, np.full(r.shape, 3.0), np.ones(r.shape)), 1)
    1.0
    """
    z = _normalised_pixels(residual, noise, weight, exclude)
    if z.size < MIN_PIXELS:
        return float("nan")
    z -= _median(z)
    np.abs(z, out=z)
    return float(1.4826 * _median(z))


def bright_stars(
    image: np.ndarray, *, nsigma: float = 50.0, peak_max: float = 30000.0
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ``(x, y)`` of the bright, unsaturated, unflagged stars of ``image`` (a
    template), on which :func:`star_aperture_rms` is measured: sep's detections at
    ``nsigma`` times the sky noise over its default background mesh, peak below
    ``peak_max`` above the sky, no sep flag (blends, truncated)."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    back = sep.Background(data)
    objects = sep.extract(data - back.back(), nsigma, err=back.globalrms)
    objects = objects[(objects["peak"] < peak_max) & (objects["flag"] == 0)]
    return np.asarray(objects["x"]), np.asarray(objects["y"])


def star_aperture_rms(
    residual: np.ndarray,
    noise: np.ndarray,
    weight: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius: float,
) -> float:
    """Normalised RMS of the residual inside apertures on stars: the standard figure of
    subtraction quality (1.0 is noise-limited).

    For each star the RMS of z = R / noise over the pixels within ``radius`` of (x, y)
    (weight > 0) is taken; the figure is the median over the stars. Stars whose aperture
    touches a masked pixel or the edge are skipped. Vectorised over stars.

    Parameters
    ----------
    residual, noise, weight : ndarray
        The residual, its 1-sigma noise image and its weight map.
    x, y : array_like
        0-based positions of bright, unsaturated stars (from the template).
    radius : float
        Aperture radius in pixels (about the FWHM).

    Returns
    -------
    float
        The median RMS, or ``nan`` when no star is usable.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r = rng.normal(size=(64, 64))
    >>> xs, ys = np.array([20.0, 40.0]), np.array([20.0, 40.0])
    >>> 0.6 < star_aperture_rms(r, np.ones(r.shape), np.ones(r.shape), xs, ys, 4.0) < 1.4
    True
    """
    residual = np.asarray(residual, dtype=np.float64)
    ny, nx = residual.shape
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = (dx**2 + dy**2) <= radius**2
    xs = np.rint(np.asarray(x, float)).astype(int)
    ys = np.rint(np.asarray(y, float)).astype(int)
    ok = (xs >= r) & (xs < nx - r) & (ys >= r) & (ys < ny - r)
    xs, ys = xs[ok], ys[ok]
    if xs.size == 0:
        return float("nan")
    iy = ys[:, None, None] + dy[None]
    ix = xs[:, None, None] + dx[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = residual[iy, ix] / np.asarray(noise, np.float64)[iy, ix]
    good = (np.asarray(weight)[iy, ix] > 0) & np.isfinite(z)
    usable = (good | ~inside[None]).all(axis=(1, 2))
    if not usable.any():
        return float("nan")
    z2 = np.where(inside[None], z, 0.0) ** 2
    rms = np.sqrt(z2[usable].sum(axis=(1, 2)) / inside.sum())
    return float(np.median(rms))


def source_footprint(template: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Pixels on and around the template's sources (more than one robust sigma above its
    median after a 3 px box smoothing, grown by 7 px), which a background figure such as
    :func:`normalized_noise`'s ``exclude`` leaves out; None when fewer than
    :data:`MIN_PIXELS` pixels are good or the template is flat."""
    from scipy import ndimage

    data = np.asarray(template, np.float32)
    good = (np.asarray(weight) > 0) & np.isfinite(data)
    if good.sum() < MIN_PIXELS:
        return None
    med = float(np.median(data[good]))
    sigma = float(1.4826 * np.median(np.abs(data[good] - med)))
    if not sigma > 0:
        return None
    smooth = ndimage.uniform_filter(np.where(good, data, med), size=3)
    return np.asarray(ndimage.maximum_filter(smooth > med + sigma, size=7))


class StarFluxLeft(NamedTuple):
    """What :func:`star_flux_left` measured.

    Attributes
    ----------
    fraction : float
        The median over the stars of the residual's flux in each star's aperture over the
        star's flux (signed: negative when the residual took too much away); ``nan``
        without a usable star.
    n : int
        Stars measured.
    x, y : ndarray
        Their 0-based positions.
    fractions : ndarray
        Each star's fraction.
    scale : float
        The science / template flux ratio used to put the template's fluxes in the
        residual's (the science frame's) photometric system.
    """

    fraction: float
    n: int
    x: np.ndarray
    y: np.ndarray
    fractions: np.ndarray
    scale: float


#: The sky level and noise of :func:`star_flux_left` come from a regular sample of about
#: this many good pixels (a quarter of a 2048x2048 frame): the same statistics.
SKY_SAMPLE = 1 << 20


def _sample(data: np.ndarray, good: np.ndarray) -> np.ndarray:
    values = data[good]
    return values[:: max(1, values.size // SKY_SAMPLE)]


def _sky_and_sigma(data: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    values = _sample(data, good)
    med = _median(values)
    return med, float(1.4826 * _median(np.abs(values - med)))


def _template_stars(
    tpl: np.ndarray, template_weight: np.ndarray | None, template_sky: float | None, ri: int
) -> tuple[np.ndarray, float, float, np.ndarray, np.ndarray] | None:
    """What :func:`star_flux_left` takes of the template alone: its good pixels, sky and
    sky noise, and its stars (the local maxima of the 3 x 3 mean, ``ri`` px from the
    edges); None when it has too few good pixels or no noise. Remembered for the last
    read-only template (the core's, the same for every frame of a series)."""
    import weakref

    arrays = (tpl,) if template_weight is None else (tpl, template_weight)
    frozen = all(isinstance(a, np.ndarray) and not a.flags.writeable for a in arrays)
    key = (tuple(id(a) for a in arrays), template_sky, ri)
    if (
        frozen
        and _TEMPLATE_STARS[0] == key
        and all(ref() is a for ref, a in zip(_TEMPLATE_STARS[1], arrays, strict=True))
    ):
        return _TEMPLATE_STARS[2]
    ny, nx = tpl.shape
    good_t = np.isfinite(tpl)
    if template_weight is not None:
        good_t &= np.asarray(template_weight) > 0
    found = None
    if good_t.sum() >= MIN_PIXELS:
        sky, sigma = _sky_and_sigma(tpl, good_t)
        if template_sky is not None and np.isfinite(template_sky):
            sky = float(template_sky)
        if sigma > 0:
            # the 3 x 3 mean (scipy's uniform_filter: its reflected edge is the edge pixel)
            smooth = box_mean(np.where(good_t, tpl - np.float32(sky), np.float32(0)), 3)
            py, px = local_maxima(smooth, *np.nonzero(smooth > 5 * sigma / 3), ri)
            inside = (px >= ri) & (px < nx - ri) & (py >= ri) & (py < ny - ri)
            found = (good_t, sky, sigma, py[inside], px[inside])
    if frozen:
        _TEMPLATE_STARS[:] = [key, [weakref.ref(a) for a in arrays], found]
    return found


#: The last read-only template :func:`_template_stars` measured: (key, weak references to
#: its pixels and weight, what it found).
_TEMPLATE_STARS: list[Any] = [None, [], None]


def star_flux_left(
    residual: np.ndarray,
    weight: np.ndarray,
    template: np.ndarray,
    *,
    fwhm: float,
    template_weight: np.ndarray | None = None,
    template_sky: float | None = None,
    science: np.ndarray | None = None,
    science_sky: float | None = None,
    scale: float = 1.0,
    saturation: float | None = None,
    max_stars: int = 10,
    min_snr: float = 50.0,
) -> StarFluxLeft:
    """The fraction of their flux that the template's brightest stars left in the residual.

    A subtraction whose kernel has the wrong sum (the photometric scale) leaves every star
    at the same fraction of its flux, of the opposite sign to the error, however well the
    kernel's shape matches the PSFs; a right one leaves a few percent at most (the PSF's
    variation, registration errors, a variable star among them).

    The stars are the template's local maxima (3 x 3 box-smoothed, each the brightest
    within its aperture), the ``max_stars`` brightest whose aperture (radius 2 ``fwhm``)
    lies inside the frame, holds no pixel with ``weight <= 0`` (in the residual) or bad
    in the template, no pixel at 90 % of ``saturation`` and whose flux is ``min_snr``
    times the sky noise of the aperture. For each, the residual's sum over the aperture
    (its median removed) is divided by the template's (its sky removed) times ``scale``.

    Parameters
    ----------
    residual, weight : ndarray
        The residual (science - template, in the science frame's photometric system) and
        its weight map.
    template : ndarray
        The template on the residual's grid.
    fwhm : float
        The residual's PSF FWHM (px).
    template_weight : ndarray, optional
        The template's weight map (pixels ``<= 0`` are bad); default all good.
    template_sky, science_sky : float, optional
        Sky levels to remove; default the median of the good pixels.
    science : ndarray, optional
        The science frame on the same grid: the flux scale is then measured, the median
        over the stars of the science's aperture flux over the template's, and replaces
        ``scale`` (so that a kernel's wrong scale cannot hide itself).
    scale : float
        The science / template flux ratio when ``science`` is not given.
    saturation : float, optional
        The template's saturation level.
    max_stars : int
        At most this many stars, the brightest.
    min_snr : float
        The faintest star's flux in units of its aperture's sky noise in the template.

    Returns
    -------
    StarFluxLeft

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> yy, xx = np.mgrid[:96, :96]
    >>> stars = [(20, 30), (70, 25), (50, 70), (30, 75)]
    >>> psf = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 4.5) for x, y in stars)
    >>> tpl = 1e4 * psf + rng.normal(0, 10, psf.shape)
    >>> res = -3e3 * psf + rng.normal(0, 10, psf.shape)  # a kernel sum 30 % low
    >>> left = star_flux_left(res, np.ones(psf.shape), tpl, fwhm=3.5)
    >>> left.n, round(left.fraction, 2)
    (4, -0.3)
    """

    res = np.asarray(residual, dtype=np.float32)
    tpl = np.asarray(template, dtype=np.float32)
    ny, nx = tpl.shape
    r = max(2.0 * float(fwhm), 2.0) if np.isfinite(fwhm) and fwhm > 0 else 6.0
    ri = math.ceil(r)
    empty = StarFluxLeft(float("nan"), 0, np.zeros(0), np.zeros(0), np.zeros(0), float(scale))
    good_r = (np.asarray(weight) > 0) & np.isfinite(res)
    if good_r.sum() < MIN_PIXELS or min(ny, nx) <= 2 * ri:
        return empty
    found = _template_stars(tpl, template_weight, template_sky, ri)
    if found is None:
        return empty
    good_t, sky, sigma, py, px = found
    if px.size == 0:
        return empty
    dy, dx = np.mgrid[-ri : ri + 1, -ri : ri + 1]
    disk = dx**2 + dy**2 <= r * r
    iy, ix = py[:, None] + dy[disk][None], px[:, None] + dx[disk][None]
    usable = (good_r[iy, ix] & good_t[iy, ix]).all(axis=1)
    if saturation is not None and np.isfinite(saturation) and saturation > 0:
        usable &= tpl[iy, ix].max(axis=1) < 0.9 * float(saturation)
    t_flux = (tpl[iy, ix] - sky).sum(axis=1, dtype=np.float64)
    usable &= t_flux > min_snr * sigma * math.sqrt(disk.sum())
    order = np.flatnonzero(usable)
    order = order[np.argsort(-t_flux[order])][: max(int(max_stars), 1)]
    if order.size == 0:
        return empty
    iy, ix, t_flux = iy[order], ix[order], t_flux[order]
    if science is not None:
        sci = np.asarray(science, dtype=np.float32)
        s_good = np.isfinite(sci)
        s_sky = _sky_and_sigma(sci, s_good)[0] if science_sky is None else float(science_sky)
        ratios = (np.where(s_good[iy, ix], sci[iy, ix], s_sky) - s_sky).sum(
            axis=1, dtype=np.float64
        ) / t_flux
        scale = float(np.median(ratios))
    if not (np.isfinite(scale) and scale > 0):
        return empty
    r_flux = (res[iy, ix] - _median(_sample(res, good_r))).sum(axis=1, dtype=np.float64)
    fractions = r_flux / (scale * t_flux)
    return StarFluxLeft(
        fraction=float(np.median(fractions)),
        n=int(fractions.size),
        x=px[order].astype(np.float64),
        y=py[order].astype(np.float64),
        fractions=fractions,
        scale=float(scale),
    )
