"""The low-order kernel: a flux scale, a shift and a background, for frames with few stars.

With too few stars to constrain a kernel's shape (small cutouts, sparse fields), the
kernel is ``K = a B + b_x dB/dx + b_y dB/dy``: ``B`` a round Gaussian (the width that
fits best, or the one matching the two FWHMs when there is no star; a unit delta when
the PSFs are alike or unknown), ``a`` the flux scale and ``b`` a sub-pixel shift (to
first order), plus a differential background polynomial (degree at most 1). It is
fitted on every usable pixel with the same clipping as the delta basis
(:mod:`oasis_ois.delta`; a star enters or leaves the fit whole), and what is fitted
depends on the stars (:mod:`oasis_ois.stars`, found in both frames):

* 3 stars or more: the scale, the shift and the background, a star whose flux is off
  the others' leaving the fit (:func:`oasis_ois.delta.deviant_objects`);
* 2 stars: the same when their flux ratios agree (the census's, within 3 sigmas and 3 %,
  and after the fit within 3 sigmas and 2 %), else the scale is 1 (neither can tell a
  flux scale from a variable);
* 1 star: the shift and the background, with the scale 1: the brightest object of a
  small frame must never be the only constraint (a transient on it would be scaled
  away);
* no star: the background alone.

The scale is then measured on the stars' fluxes (apertures of 2.5 FWHM, the fitted
background removed) and the shift and background fitted again with it: a Gaussian ``B``
cannot match Moffat wings, and a least-squares scale would trade them against the
background (and the sky's noise, in the convolved image, pulls it toward zero).

The residual is flagged by the backend (``meta["flag"]``), never masked for it.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_ois.delta import (
    MAX_PIXELS,
    DeltaFit,
    _select_pixels,
    deviant_objects,
    finish,
    object_labels,
    rejected_mask,
    star_pixels,
)
from oasis_ois.ois import (
    FWHM_PER_SIGMA,
    OisOptions,
    OisSolution,
    _degree_of,
    _Image,
    _monomials,
    _scaled_coords,
    _sliding_max,
    _spatial_convolution,
    _transform,
)
from oasis_ois.stars import Census

__all__ = ["SCALE_STARS", "WIDTHS", "base_kernel", "matching_width", "solve_low"]

#: The flux scale is fitted only with at least this many stars (two only if they agree).
SCALE_STARS = 2

#: Matching widths (px sigma) below this are a unit delta.
MIN_WIDTH = 0.3

#: The Gaussian widths (px sigma) tried when there are stars to judge them.
WIDTHS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def base_kernel(sigma: float, half: int | None = None) -> np.ndarray:
    """``B``, ``dB/dx`` and ``dB/dy`` (central differences) as kernel images ``(3, n, n)``:
    ``B`` a unit-sum round Gaussian of width ``sigma`` (px; a unit delta below
    :data:`MIN_WIDTH`) truncated at 3 sigmas, on ``n = 2 half + 1`` pixels (default
    just enough, with a pixel more for the derivatives).

    Examples
    --------
    >>> k = base_kernel(0.0)
    >>> k.shape, float(k[0].sum()), float(k[1].sum())
    ((3, 3, 3), 1.0, 0.0)
    """
    hb = math.ceil(3.0 * sigma) if sigma >= MIN_WIDTH else 0
    h = hb + 1 if half is None else max(half, hb + 1)
    u = np.arange(-h, h + 1, dtype=np.float64)
    b = np.zeros((2 * h + 1, 2 * h + 1))
    if hb == 0:
        b[h, h] = 1.0
    else:
        g = np.exp(-0.5 * (u / sigma) ** 2) * (np.abs(u) <= hb)
        b = np.outer(g, g)
        b /= b.sum()
    dx = np.zeros_like(b)
    dy = np.zeros_like(b)
    dx[:, 1:-1] = 0.5 * (b[:, 2:] - b[:, :-2])
    dy[1:-1, :] = 0.5 * (b[2:, :] - b[:-2, :])
    return np.stack([b, dx, dy])


def matching_width(fwhm_ref: float | None, fwhm_conv: float | None) -> float:
    """``sqrt(s_ref**2 - s_conv**2)`` (px sigma) of two FWHMs, 0 when either is unknown."""
    if not (fwhm_ref and fwhm_conv):
        return 0.0
    return math.sqrt(max(fwhm_ref**2 - fwhm_conv**2, 0.0)) / FWHM_PER_SIGMA


@attrs.frozen
class _LowFit:
    coef: np.ndarray
    kern: np.ndarray
    kept: np.ndarray
    chi2: float
    score: float
    sigma: float
    scale: bool
    agree: bool


def solve_low(
    science: Frame,
    template: Frame,
    sci: _Image,
    tpl: _Image,
    options: OisOptions,
    stars: Census,
    *,
    direction: str,
    sources: np.ndarray,
) -> OisSolution:
    """Subtract a prepared pair with the low-order kernel (the ``low`` kernel model).

    With stars, the Gaussian's width is the one of :data:`WIDTHS` (px sigma, up to what
    the frame allows) that fits the stars best (the least chi2 over the census stars'
    apertures, each pixel's capped at ``pixel_clip**2``, with the noise model, which
    credits a broader kernel with the template noise it smooths away: a transient,
    even on a star, weighs no more than any other pixel): one or two stars cannot measure
    FWHMs well, and a width cannot absorb a transient's flux. Without stars it is the
    width matching the two frames' FWHMs when they are known (``Frame.fwhm`` or
    measured), else none.

    Returns
    -------
    OisSolution
        ``meta["low_terms"]``: what was fitted (e.g.
        ``"shift, background (scale 1 assumed: 1 star)"``).

    Raises
    ------
    StageError
        When no pixel can enter the fit.
    """
    conv, ref = (tpl, sci) if direction == "template" else (sci, tpl)
    f_s, f_t = stars.fwhm_science or sci.fwhm, stars.fwhm_template or tpl.fwhm
    f_ref, f_conv = (f_s, f_t) if direction == "template" else (f_t, f_s)
    n = stars.n
    fit_shift = n >= 1
    db = min(options.deg_bg, 1)
    ny, nx = ref.data.shape
    h = max(2, min(math.ceil(3.0 * max(WIDTHS)) + 1, min(ny, nx) // 8))
    if fit_shift:
        widths = [w for w in WIDTHS if w < MIN_WIDTH or math.ceil(3.0 * w) + 1 <= h]
    else:
        widths = [min(matching_width(f_ref, f_conv), (h - 1) / 3.0)]
    iy, ix, wts = _select_pixels(
        ref, conv, h, sources, rejected_mask(stars, ref.data.shape), MAX_PIXELS, MAX_PIXELS
    )
    if iy.size < 16:
        msg = (
            f"subtract backend 'ois': low kernel: {iy.size} usable pixels in science "
            f"{sci.name!r} / template {tpl.name!r}"
        )
        raise StageError(msg)
    xs, ys = _scaled_coords((ny, nx))
    spec, shape = _transform(conv, h)
    y = ref.data[iy, ix].astype(np.float64)
    bg_terms = np.stack([xs[ix] ** i * ys[iy] ** j for i, j in _monomials(db)], axis=1)
    var_ref = ref.variance((iy, ix)).astype(np.float64)
    var_conv = conv.variance((iy, ix)).astype(np.float64)
    radius = max(1, round(0.5 * (f_ref or 3.0)))
    label = object_labels(stars, iy, ix, (ny, nx))
    on_stars = label >= 0
    bases = {w: base_kernel(w, h) for w in widths}
    images = {
        w: _spatial_convolution(spec, shape, b[0][None], [(0, 0)], xs, ys) for w, b in bases.items()
    }
    feats = {
        w: [images[w][iy, ix]]
        + [_spatial_convolution(spec, shape, k[None], [(0, 0)], xs, ys)[iy, ix] for k in b[1:]]
        for w, b in bases.items()
    }

    def fit(sigma: float, fit_scale: bool, scale: float = 1.0) -> _LowFit:
        base, f = bases[sigma], feats[sigma]
        columns = ([f[0]] if fit_scale else []) + (f[1:] if fit_shift else [])
        design = np.column_stack([*(c.astype(np.float64) for c in columns), bg_terms])
        target = y if fit_scale else y - scale * f[0]
        kept = np.ones(iy.size, dtype=bool)
        clipped = np.zeros((ny, nx), dtype=bool)
        active = np.ones(int(label.max()) + 1, dtype=bool)
        for iteration in range(options.max_iter + 1):
            sw = np.sqrt(wts[kept])
            coef = np.linalg.lstsq(design[kept] * sw[:, None], target[kept] * sw, rcond=None)[0]
            kern = _kernel(coef, base, fit_scale, fit_shift, scale)
            resid = target - design @ coef
            var = var_ref + float(np.sum(kern**2)) * var_conv
            z2 = resid**2 / var
            if iteration == options.max_iter:
                break
            dropped = np.zeros(0, dtype=np.int64)
            if fit_scale:  # a star off the others leaves the fit (3 or more)
                dropped = deviant_objects(label, resid, y, var, kept, active, options.sigma_clip)
                active[dropped] = False
            # with the scale fitted a star enters or leaves whole (its core fixes the
            # scale); with the scale held, a star's worst pixels may go as any others
            on_star = star_pixels(label, active) if fit_scale else np.zeros(iy.size, bool)
            bad = kept & (z2 > options.pixel_clip**2) & ~on_star
            if not bad.any() and not dropped.size:
                break
            clipped[iy[bad], ix[bad]] = True
            grown = _sliding_max(clipped, radius)[iy, ix] & ~on_star
            new = kept & (grown | np.isin(label, dropped))
            if (kept & ~new).sum() < design.shape[1] + 8:
                break
            kept &= ~new
        capped = np.minimum(z2, options.pixel_clip**2)  # a transient weighs as a star pixel
        score = float(np.sum(capped[on_stars] if on_stars.any() else capped))
        return _LowFit(
            coef=coef,
            kern=kern,
            kept=kept,
            chi2=float(np.mean(z2[kept])),
            score=score,
            sigma=sigma,
            scale=fit_scale,
            agree=not fit_scale or n != 2 or _two_agree(label, resid, y, var, label >= 0),
        )

    fit_scale = n > SCALE_STARS or (n == SCALE_STARS and _ratios_agree(stars))
    best = min((fit(w, fit_scale) for w in widths), key=lambda f: f.score)
    why = f"{n} star{'s' if n != 1 else ''}" if n else "no star"
    if n == SCALE_STARS and not fit_scale:
        why = "the 2 stars disagree"
    if not best.agree:  # two stars that disagree: neither can set the scale
        best = min((fit(w, False) for w in widths), key=lambda f: f.score)
        why = "the 2 stars disagree"
    elif best.scale:
        # the scale from the stars' fluxes: a Gaussian B cannot match Moffat wings, and
        # a least-squares scale trades them against the background
        a = _flux_scale(ref, images[best.sigma], best, bg_terms, stars, label, iy, ix, f_ref)
        if a is not None:
            best = attrs.evolve(fit(best.sigma, False, a), scale=True)
    kern, kept, coef = best.kern, best.kept, best.coef
    bg = coef[-bg_terms.shape[1] :]
    ksum = float(kern.sum())
    result = DeltaFit(
        kernels=kern[None],
        bg=np.asarray(bg, dtype=np.float64),
        deg_spatial=0,
        deg_bg=db,
        ksum=ksum,
        npix=int(kept.sum()),
        nclipped=int((~kept).sum()),
        chi2=best.chi2,
        lam=0.0,
    )
    if best.scale:
        terms = f"scale, shift, background ({why})"
    elif fit_shift:
        terms = f"shift, background (scale 1 assumed: {why})"
    else:
        terms = "background (scale 1 assumed: no star)"
    width = FWHM_PER_SIGMA * best.sigma if best.sigma >= MIN_WIDTH else 0.0
    return finish(
        science,
        template,
        sci,
        tpl,
        result,
        direction=direction,
        model="low",
        stars=stars,
        sources=sources,
        fwhm=math.hypot(f_conv or 0.0, width) or f_ref,
        meta={
            "low_terms": terms,
            "description": (
                f"low {terms}, gauss fwhm={width:.2f} px={result.npix} clip={result.nclipped}"
            ),
        },
    )


def _ratios_agree(stars: Census) -> bool:
    """Do the two usable stars' flux ratios (the census's) agree, within 3 sigmas of
    their errors and 3 %?"""
    good = np.flatnonzero(~stars.rejected)
    r, e = stars.ratio[good], stars.ratio_err[good]
    return bool(abs(r[0] - r[1]) <= 3.0 * math.hypot(e[0], e[1]) + 0.03 * abs(r.mean()))


def _two_agree(
    label: np.ndarray, resid: np.ndarray, data: np.ndarray, var: np.ndarray, kept: np.ndarray
) -> bool:
    """Do the two stars' residual fluxes (relative to their own) agree, within 3 sigmas of
    their noise and 2 %?"""
    sel = kept & (label >= 0) & (label < 2)
    lab = label[sel]
    flux = np.bincount(lab, weights=data[sel], minlength=2)
    if not np.all(flux > 0):
        return False
    d = np.bincount(lab, weights=resid[sel], minlength=2) / flux
    s = np.sqrt(np.bincount(lab, weights=var[sel], minlength=2)) / flux
    return bool(abs(d[0] - d[1]) <= 3.0 * math.hypot(s[0], s[1]) + 0.02)


def _flux_scale(
    ref: _Image,
    model: np.ndarray,
    fitted: _LowFit,
    bg_terms: np.ndarray,
    stars: Census,
    label: np.ndarray,
    iy: np.ndarray,
    ix: np.ndarray,
    fwhm: float | None,
) -> float | None:
    """The flux scale ``sum(ref - bg) / sum(B * conv)`` in apertures of 2.5 FWHM on the
    stars that stayed in the fit, the background the fit's (None when not measurable)."""
    ny, nx = ref.data.shape
    keep = np.unique(label[fitted.kept & (label >= 0)])
    good = np.flatnonzero(~stars.rejected)
    good = good[np.argsort(-stars.snr[good])][keep]
    if good.size == 0:
        return None
    r = max(3, math.ceil(2.5 * (fwhm or 3.0)))
    off = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    disk = dy**2 + dx**2 <= r * r
    yy = np.clip(stars.y[good][:, None] + dy[disk][None], 0, ny - 1)
    xx = np.clip(stars.x[good][:, None] + dx[disk][None], 0, nx - 1)
    xs, ys = _scaled_coords((ny, nx))
    bg = fitted.coef[-bg_terms.shape[1] :]
    deg = _degree_of(bg.size)
    bg_img = sum(
        c * xs[xx] ** i * ys[yy] ** j for c, (i, j) in zip(bg, _monomials(deg), strict=True)
    )
    num = float(np.sum(ref.data[yy, xx] - bg_img))
    den = float(np.sum(model[yy, xx]))
    return num / den if den > 0 and num > 0 else None


def _kernel(
    coef: np.ndarray, base: np.ndarray, fit_scale: bool, fit_shift: bool, scale: float = 1.0
) -> np.ndarray:
    """The kernel image ``a B + b_x dB/dx + b_y dB/dy`` of fitted coefficients (``a`` the
    given ``scale`` when not fitted)."""
    i = 0
    a = scale
    if fit_scale:
        a = float(coef[0])
        i = 1
    kern = a * base[0]
    if fit_shift:
        kern = kern + float(coef[i]) * base[1] + float(coef[i + 1]) * base[2]
    return kern
