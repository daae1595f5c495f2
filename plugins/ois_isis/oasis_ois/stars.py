"""The stars a kernel fit may use, and what they say about the two PSFs.

:func:`census` finds the point sources present in *both* prepared images of a pair (a
transient, in the science frame only, is never one of them), measures each star's flux
ratio science / template and rejects the stars whose ratio disagrees with the others
(variables, a transient on a star, blends that changed), so that no single object can
drive a kernel fit. From the stars that remain it measures each frame's FWHM and the
difference of the two PSFs' second moments, which says which PSF is broader in which
direction: when the science PSF is broader in one direction and narrower in another
(elongated or trailed frames), neither image can be convolved into the other and the
pair is *crossed* (see :mod:`oasis_ois.crossconv`).

The moment difference ``D = M_science - M_template`` (px**2) is the median over bright,
isolated stars of the difference of second moments weighted by the *same* Gaussian on
both frames (of the broader FWHM's width, about each frame's own centroid): the cores'
shapes, which decide whether a kernel can turn one PSF into the other, with little say
for the wings, neighbours and truncation. Its eigenvalues ``l1 >= l2`` give the rule:

* ``l2 >= -tol``: the science is at least as broad in every direction: convolve the
  template;
* ``l1 <= tol``: convolve the science;
* otherwise the pair is crossed, unless one of ``l1`` and ``-l2`` is below ``cross``:
  the PSFs then nearly nest, and the one narrower by the larger eigenvalue is convolved
  (the template when ``l1 >= -l2``);

with ``tol = CROSS_TOLERANCE`` and ``cross = CROSS_MIN`` times the template's mean
moment ``(Mxx + Myy) / 2``. A slight crossing does not pay for cross-convolution: a
one-way kernel leaves a star-aperture RMS within ~1.2 of the noise there, while
convolving both images smooths the noise by several times and not the smooth
mismatches of the PSFs' wings (Moffat betas differ from frame to frame), which then
stand out as rings around every bright star.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

from oasis_ois.ois import FWHM_PER_SIGMA, OisOptions, _bad_near, _Image, _outshone, _peaks

__all__ = [
    "CROSS_MIN",
    "CROSS_TOLERANCE",
    "Census",
    "census",
    "elliptical_gaussian",
    "major_over_mean",
    "outliers",
]

#: A PSF is narrower than the other in some direction when its second moment along that
#: direction is smaller by more than this fraction of the template's mean moment.
CROSS_TOLERANCE = 0.02

#: ... and the pair is crossed only when it is narrower in one direction and broader in
#: another both by more than this fraction.
CROSS_MIN = 0.1

#: Stars used for the moments and FWHMs: at least this peak S/N in both images.
BRIGHT_SNR = 20.0

#: At most this many stars (the brightest) enter the moments and FWHMs.
MAX_SHAPE_STARS = 200

#: Up to this many values, each is judged against the others (:func:`outliers`).
LEAVE_ONE_OUT = 60


@attrs.frozen(kw_only=True)
class Census:
    """The stars of a pair (see the module doc).

    Attributes
    ----------
    y, x : ndarray of int
        Pixel of each star's peak in the template.
    snr : ndarray
        Peak S/N, the lower of the two images'.
    ratio, ratio_err : ndarray
        Flux ratio science / template in a circular aperture (nan when not measurable)
        and its error from the noise model.
    rejected : ndarray of bool
        Stars whose ratio disagrees with the others (they enter no fit).
    fwhm_science, fwhm_template : float or None
        Median half-maximum-area FWHM (px) of the stars in each image.
    moments_science, moments_template : ndarray or None
        Median ``(Mxx, Myy, Mxy)`` (px**2) of each image's bright isolated stars, in one
        window.
    difference : ndarray or None
        Median science - template moment difference ``(dxx, dyy, dxy)``.
    radius : int
        The aperture and moment window radius (px).
    """

    y: np.ndarray = attrs.field(eq=False, repr=False)
    x: np.ndarray = attrs.field(eq=False, repr=False)
    snr: np.ndarray = attrs.field(eq=False, repr=False)
    ratio: np.ndarray = attrs.field(eq=False, repr=False)
    ratio_err: np.ndarray = attrs.field(eq=False, repr=False)
    rejected: np.ndarray = attrs.field(eq=False, repr=False)
    fwhm_science: float | None = None
    fwhm_template: float | None = None
    moments_science: np.ndarray | None = attrs.field(default=None, eq=False, repr=False)
    moments_template: np.ndarray | None = attrs.field(default=None, eq=False, repr=False)
    difference: np.ndarray | None = attrs.field(default=None, eq=False, repr=False)
    radius: int = 4
    width: float = 0.0

    def shape(self, which: str) -> np.ndarray | None:
        """The ``"science"`` or ``"template"`` PSF's intrinsic second moments (px**2):
        the weighted ones with the weight's effect undone as for a Gaussian (``s**2 =
        m w**2 / (w**2 - m)`` along each principal axis), for sizes and shapes."""
        m = self.moments_science if which == "science" else self.moments_template
        if m is None or not self.width > 0:
            return m
        mxx, myy, mxy = (float(v) for v in m)
        mean, dev = 0.5 * (mxx + myy), math.hypot(0.5 * (mxx - myy), mxy)
        theta = 0.5 * math.atan2(2.0 * mxy, mxx - myy)
        w2 = self.width**2
        l1, l2 = (min(max(v, 1e-3), 0.9 * w2) for v in (mean + dev, mean - dev))
        l1, l2 = l1 * w2 / (w2 - l1), l2 * w2 / (w2 - l2)
        c, s = math.cos(theta), math.sin(theta)
        return np.array([l1 * c * c + l2 * s * s, l1 * s * s + l2 * c * c, (l1 - l2) * c * s])

    @property
    def n(self) -> int:
        """Number of usable stars (found in both images, not rejected)."""
        return int((~self.rejected).sum())

    @property
    def eigen(self) -> tuple[float, float] | None:
        """Eigenvalues ``(l1, l2)``, ``l1 >= l2``, of the moment difference (px**2)."""
        if self.difference is None:
            return None
        dxx, dyy, dxy = (float(v) for v in self.difference)
        mean, half = 0.5 * (dxx + dyy), math.hypot(0.5 * (dxx - dyy), dxy)
        return mean + half, mean - half

    @property
    def template_moment(self) -> float:
        """The template's mean second moment ``(Mxx + Myy) / 2`` (px**2); 0 when unknown."""
        if self.moments_template is None:
            return 0.0
        return 0.5 * float(self.moments_template[0] + self.moments_template[1])

    @property
    def tolerance(self) -> float:
        """The moment tolerance of the rule (px**2); 0 without moments."""
        return CROSS_TOLERANCE * self.template_moment

    def direction(self) -> str | None:
        """``"template"``, ``"science"`` or ``"crossed"`` by the rule of the module doc;
        None without moments (fewer than one bright isolated star)."""
        eig = self.eigen
        if eig is None:
            return None
        tol = self.tolerance
        if eig[1] >= -tol:
            return "template"
        if eig[0] <= tol:
            return "science"
        if min(eig[0], -eig[1]) < CROSS_MIN * self.template_moment:
            return "template" if eig[0] >= -eig[1] else "science"
        return "crossed"

    def describe(self) -> str:
        """e.g. ``"41 stars (2 rejected), D eig +0.31/-0.22 px2"``."""
        text = f"{self.n} stars"
        if self.rejected.any():
            text += f" ({int(self.rejected.sum())} rejected)"
        eig = self.eigen
        if eig is not None:
            text += f", D eig {eig[0]:+.2f}/{eig[1]:+.2f} px2"
        return text


def _aperture_sums(
    im: _Image, y: np.ndarray, x: np.ndarray, r: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flux and variance of the prepared image ``im`` in a disk of radius ``r`` about
    each (y, x); the variance only where the apertures are (not a whole image)."""
    off = np.arange(-r, r + 1)
    disk = (off[:, None] ** 2 + off[None, :] ** 2) <= r * r
    iy = (y[:, None] + off)[:, :, None]
    ix = (x[:, None] + off)[:, None, :]
    return (
        (im.data[iy, ix] * disk).sum(axis=(1, 2), dtype=np.float64),
        (im.variance((iy, ix)) * disk).sum(axis=(1, 2), dtype=np.float64),
    )


def _fwhm(data: np.ndarray, y: np.ndarray, x: np.ndarray, r: int) -> float | None:
    """Median FWHM from the area above half maximum of stars peaking at (y, x)."""
    if y.size == 0:
        return None
    off = np.arange(-r, r + 1)
    st = data[(y[:, None] + off)[:, :, None], (x[:, None] + off)[:, None, :]]
    peak = st[:, r, r]
    rr = np.hypot(off[None, :], off[:, None])
    area = ((st > 0.5 * peak[:, None, None]) & (rr <= r)[None]).sum(axis=(1, 2))
    return float(np.median(2.0 * np.sqrt(area / np.pi)))


def _moments(data: np.ndarray, y: np.ndarray, x: np.ndarray, r: int, width: float) -> np.ndarray:
    """Gaussian-weighted second moments (Mxx, Myy, Mxy) of each star in a disk of radius
    r: the weight ``exp(-d**2 / (2 width**2))`` about the star's own weighted centroid
    (three passes). With one weight for both images the comparison is that of the PSFs'
    cores: for Gaussian profiles the weighted moment ``s**2 w**2 / (s**2 + w**2)`` grows
    with the width ``s``, so the sign of a difference is the true one, and the wings
    (and neighbours) weigh little."""
    off = np.arange(-r - 1, r + 2)
    st = data[(y[:, None] + off)[:, :, None], (x[:, None] + off)[:, None, :]].astype(np.float64)
    st = np.clip(st, 0.0, None)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    cx = np.zeros(y.size)
    cy = np.zeros(y.size)
    for _ in range(3):
        ux = dx[None] - cx[:, None, None]
        uy = dy[None] - cy[:, None, None]
        d2 = ux**2 + uy**2
        w = st * np.exp(-0.5 * d2 / width**2) * (d2 <= r * r)
        tot = w.sum(axis=(1, 2))
        tot = np.where(tot > 0, tot, 1.0)
        cx = cx + (w * ux).sum(axis=(1, 2)) / tot
        cy = cy + (w * uy).sum(axis=(1, 2)) / tot
    ux = dx[None] - cx[:, None, None]
    uy = dy[None] - cy[:, None, None]
    d2 = ux**2 + uy**2
    w = st * np.exp(-0.5 * d2 / width**2) * (d2 <= r * r)
    tot = np.where(w.sum(axis=(1, 2)) > 0, w.sum(axis=(1, 2)), 1.0)
    return np.stack(
        [
            (w * ux * ux).sum(axis=(1, 2)) / tot,
            (w * uy * uy).sum(axis=(1, 2)) / tot,
            (w * ux * uy).sum(axis=(1, 2)) / tot,
        ],
        axis=1,
    )


def census(sci: _Image, tpl: _Image, options: OisOptions) -> Census:
    """The stars of a prepared pair and what they say (see the module doc).

    Stars are local maxima of the template (smoothed) at least ``options.min_stamp_snr``
    sky sigmas above the sky whose 3 x 3 neighbourhood in the science is too, with no
    bad pixel within the aperture in either image and the aperture inside the frame.

    Parameters
    ----------
    sci, tpl : _Image
        The prepared science and template (:func:`oasis_ois.ois.prepare_pair`).
    options : OisOptions

    Returns
    -------
    Census
    """
    ny, nx = tpl.data.shape
    fwhm_guess = max(sci.fwhm or 3.0, tpl.fwhm or 3.0)
    r = max(3, math.ceil(1.5 * fwhm_guess))
    radius = max(2, round(fwhm_guess))
    thr = options.min_stamp_snr
    if tpl.smooth is None:
        raise ValueError("census needs the prepared images' smoothed data")
    y, x = _peaks(tpl, radius, thr)
    inside = (y >= r + 1) & (y < ny - r - 1) & (x >= r + 1) & (x < nx - r - 1)
    y, x = y[inside], x[inside]
    if y.size:
        off = np.arange(-1, 2)
        sci3 = sci.data[(y[:, None] + off)[:, :, None], (x[:, None] + off)[:, None, :]]
        ok = sci3.max(axis=(1, 2)) > thr * sci.noise
        ok &= ~sci.bad[y, x]
        y, x = y[ok], x[ok]
    if y.size:
        ok = np.ones(y.size, dtype=bool)
        for im in (sci, tpl):
            ok &= ~_bad_near(im.bad, r + 1, y, x)
        y, x = y[ok], x[ok]
    empty = np.zeros(0)
    if y.size == 0:
        return Census(
            y=y,
            x=x,
            snr=empty,
            ratio=empty,
            ratio_err=empty,
            rejected=np.zeros(0, dtype=bool),
            radius=r,
        )
    snr = np.minimum(sci.data[y, x] / sci.noise, tpl.data[y, x] / tpl.noise)
    fs, vs = _aperture_sums(sci, y, x, r)
    ft, vt = _aperture_sums(tpl, y, x, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ft > 0, fs / ft, np.nan)
        err = np.sqrt(vs / ft**2 + fs**2 * vt / ft**4)
    rejected = _reject(ratio, err, options.sigma_clip)
    good = ~rejected
    # the shapes: bright, isolated, not rejected
    bright = good & (snr >= BRIGHT_SNR)
    if not bright.any():
        bright = good
    isolated = ~_outshone(y, x, tpl.data[y, x], 2 * r)
    shape = bright & isolated
    if not shape.any():
        shape = bright
    idx = np.flatnonzero(shape)
    idx = idx[np.argsort(-snr[idx])][:MAX_SHAPE_STARS]
    fwhm_s = _fwhm(sci.data, y[idx], x[idx], r)
    fwhm_t = _fwhm(tpl.data, y[idx], x[idx], r)
    m_s = m_t = diff = None
    width = 0.0
    if idx.size:
        width = max(fwhm_s or 0.0, fwhm_t or 0.0, 2.0) / FWHM_PER_SIGMA
        ms = _moments(sci.data, y[idx], x[idx], r, width)
        mt = _moments(tpl.data, y[idx], x[idx], r, width)
        m_s, m_t = np.median(ms, axis=0), np.median(mt, axis=0)
        diff = np.median(ms - mt, axis=0)
    return Census(
        y=y,
        x=x,
        snr=snr,
        ratio=ratio,
        ratio_err=err,
        rejected=rejected,
        fwhm_science=fwhm_s,
        fwhm_template=fwhm_t,
        moments_science=m_s,
        moments_template=m_t,
        difference=diff,
        radius=r,
        width=width if idx.size else 0.0,
    )


def _reject(ratio: np.ndarray, err: np.ndarray, nsigma: float) -> np.ndarray:
    """Stars whose flux ratio is off the others' (:func:`outliers`, with a floor of 1 %
    of the median ratio), and those whose ratio cannot be measured."""
    bad = ~np.isfinite(ratio) | ~(ratio > 0)
    good = np.flatnonzero(~bad)
    if good.size < 3:
        return bad
    floor = 0.01 * float(np.median(ratio[good]))
    bad[good[outliers(ratio[good], err[good], nsigma, floor)]] = True
    return bad


def outliers(
    values: np.ndarray, errors: np.ndarray, nsigma: float, floor: float, keep: int = 3
) -> np.ndarray:
    """Indices of the values off the others': ``|v_i - median(others)|`` above ``nsigma``
    times the largest of ``errors[i]``, the others' robust spread (1.4826 MAD) and
    ``floor``.

    Up to :data:`LEAVE_ONE_OUT` values, each is judged against the *others*, so that in
    a small frame the brightest object cannot hide its own deviation in the statistics,
    and the values are removed one at a time, the most deviant first, the rest judged
    again without it, never leaving fewer than ``keep``. Beyond, all are judged against
    all at once. Fewer than 3 values: none (two cannot be told apart).

    Examples
    --------
    >>> outliers(np.array([1.0, 0.99, 1.01, 1.3]), np.full(4, 0.005), 3.0, 0.01)
    array([3])
    """
    v = np.asarray(values, dtype=np.float64)
    e = np.nan_to_num(np.asarray(errors, dtype=np.float64), nan=np.inf)
    n = v.size
    if n < 3:
        return np.zeros(0, dtype=np.int64)
    if n > LEAVE_ONE_OUT:
        med = float(np.median(v))
        spread = 1.4826 * float(np.median(np.abs(v - med)))
        scale = np.maximum(np.maximum(e, spread), floor)
        return np.flatnonzero(np.abs(v - med) > nsigma * scale)
    alive = np.arange(n)
    out: list[int] = []
    while alive.size > max(keep, 2):
        m = alive.size
        others = alive[np.where(~np.eye(m, dtype=bool))[1].reshape(m, m - 1)]
        ov = v[others]
        med = np.median(ov, axis=1)
        spread = 1.4826 * np.median(np.abs(ov - med[:, None]), axis=1)
        scale = np.maximum(np.maximum(e[alive], spread), floor)
        z = np.abs(v[alive] - med) / scale
        worst = int(np.argmax(z))
        if not z[worst] > nsigma:
            break
        out.append(int(alive[worst]))
        alive = np.delete(alive, worst)
    return np.array(sorted(out), dtype=np.int64)


def elliptical_gaussian(moments: Any, fwhm: float | None, half: int | None = None) -> np.ndarray:
    """A unit-sum elliptical Gaussian kernel with the shape (axis ratio, angle) of the
    second moments ``(Mxx, Myy, Mxy)`` and the geometric-mean FWHM ``fwhm`` (the moments'
    own size when None), on ``(2 half + 1)**2`` pixels (default 2 sigmas of the major
    axis, at least 2).

    Examples
    --------
    >>> g = elliptical_gaussian((4.0, 1.0, 0.0), 2.355)
    >>> round(float(g.sum()), 6), g.shape[0] > g.shape[1] - 1
    (1.0, True)
    """
    mxx, myy, mxy = (float(v) for v in moments)
    mean, half_d = 0.5 * (mxx + myy), math.hypot(0.5 * (mxx - myy), mxy)
    l1, l2 = max(mean + half_d, 1e-3), max(mean - half_d, 1e-3)
    theta = 0.5 * math.atan2(2.0 * mxy, mxx - myy)
    if fwhm is not None and fwhm > 0:
        s2 = (fwhm / FWHM_PER_SIGMA) ** 2
        scale = s2 / math.sqrt(l1 * l2)
        l1, l2 = l1 * scale, l2 * scale
    if half is None:
        half = max(2, math.ceil(4.0 * math.sqrt(l1)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = u[None, :], u[:, None]
    c, s = math.cos(theta), math.sin(theta)
    a = xx * c + yy * s
    b = yy * c - xx * s
    g = np.exp(-0.5 * (a * a / l1 + b * b / l2))
    return g / g.sum()


def major_over_mean(moments: Any) -> float:
    """Major / geometric-mean axis of a PSF of second moments ``(Mxx, Myy, Mxy)``; 1 when
    unknown, at most 2.

    Examples
    --------
    >>> major_over_mean((4.0, 1.0, 0.0))
    1.4142135623730951
    """
    if moments is None:
        return 1.0
    mxx, myy, mxy = (float(v) for v in moments)
    mean, dev = 0.5 * (mxx + myy), math.hypot(0.5 * (mxx - myy), mxy)
    if mean - dev <= 0:
        return 1.0
    return min(((mean + dev) / (mean - dev)) ** 0.25, 2.0)
