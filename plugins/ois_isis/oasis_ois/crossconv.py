"""Cross-convolution: both images convolved toward a common PSF.

When neither PSF contains the other (elongated or trailed frames: the science narrower
than the template in one direction and wider in another), no kernel turns one image into
the other, and one-way convolution leaves a dipole on every star. As SFFT's
cross-convolution does (Hu et al. 2022), each image is then convolved toward the common
PSF ``P_S * P_T``: the science by a model of the template's PSF ``K_t`` (an elliptical
Gaussian with the template stars' shape and FWHM, :func:`oasis_ois.stars.
elliptical_gaussian`), and the template by a fitted kernel ``K_s`` (the delta basis,
:mod:`oasis_ois.delta`) with ``K_s * T = K_t * S``, which always exists: ``K_s`` is about
the science's PSF times the flux scale. The residual ``K_t * S - K_s * T`` stays in the
science frame's flux scale (``K_t`` has unit sum), its noise image is propagated through
both kernels (``var_S * K_t**2 + var_T * K_s**2``), and its PSF is ``P_S * K_t``, about
``sqrt(FWHM_S**2 + FWHM_T**2)`` wide (``meta["fwhm"]``, the ``FWHM`` card).
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_ois.delta import (
    delta_degree,
    delta_half,
    finish,
    fit_delta,
    outer_half,
    rejected_mask,
)
from oasis_ois.ois import (
    FWHM_PER_SIGMA,
    OisOptions,
    OisSolution,
    _Image,
    _rfft2,
    _scaled_coords,
    _sliding_max,
    _spatial_convolution,
    _transform,
)
from oasis_ois.stars import Census, elliptical_gaussian, major_over_mean

__all__ = ["convolve_image", "solve_cross", "template_psf"]


def template_psf(stars: Census, tpl: _Image) -> np.ndarray:
    """The kernel ``K_t`` the science is convolved with: an elliptical Gaussian of the
    template stars' shape and FWHM (a round one of the template's FWHM when the shape is
    unknown).

    Raises
    ------
    StageError
        When the template has no measurable FWHM.
    """
    fwhm = stars.fwhm_template or tpl.fwhm
    if not fwhm:
        msg = f"subtract backend 'ois': cross kernel: no measurable PSF in template {tpl.name!r}"
        raise StageError(msg)
    moments = stars.shape("template")
    if moments is None:
        s2 = (fwhm / FWHM_PER_SIGMA) ** 2
        moments = (s2, s2, 0.0)
    return elliptical_gaussian(moments, fwhm)


def convolve_image(im: _Image, kernel: np.ndarray, name: str | None = None) -> _Image:
    """``im`` convolved by a constant ``kernel`` (FFT, zeros outside), with its variance
    image convolved by ``kernel**2`` and its bad pixels grown by the kernel's half size."""
    ny, nx = im.data.shape
    half = (kernel.shape[0] - 1) // 2
    xs, ys = _scaled_coords((ny, nx))
    spec, shape = _transform(im, half)
    data = _spatial_convolution(spec, shape, kernel[None], [(0, 0)], xs, ys)
    var = _spatial_convolution(
        _rfft2(im.variance(), shape), shape, (kernel**2)[None], [(0, 0)], xs, ys
    )
    bad = _sliding_max(im.bad, half) if im.bad.any() else im.bad
    data[bad] = 0.0
    var = np.maximum(var, np.float32(im.noise**2 * float(np.sum(kernel**2))))
    return attrs.evolve(
        im,
        name=name or im.name,
        data=data,
        smooth=None,
        bad=bad,
        noise=im.noise * math.sqrt(float(np.sum(kernel**2))),
        spectrum=None,
        fft_shape=(0, 0),
        var=var,
    )


def solve_cross(
    science: Frame,
    template: Frame,
    sci: _Image,
    tpl: _Image,
    options: OisOptions,
    stars: Census,
    *,
    sources: np.ndarray,
) -> OisSolution:
    """Subtract a prepared pair by cross-convolution (the ``cross`` kernel model).

    Parameters
    ----------
    science, template : Frame
    sci, tpl : _Image
        The pair prepared (:func:`oasis_ois.ois.prepare_pair`).
    options : OisOptions
    stars : Census
        The pair's stars (the template's PSF shape, the spatial degree, the stars kept
        out of the fit).
    sources : ndarray of bool
        Pixels on sources.

    Returns
    -------
    OisSolution
        Direction ``"template"``, ``meta["cross_psf"]``
        the science's kernel (``"gauss fwhm=3.10 q=0.93 pa=12"``).
    """
    k_t = template_psf(stars, tpl)
    ref = convolve_image(sci, k_t)
    f_s = stars.fwhm_science or sci.fwhm or stars.fwhm_template or tpl.fwhm
    f_t = stars.fwhm_template or tpl.fwhm
    f_ref = math.hypot(f_s or 0.0, f_t or 0.0) or None
    # K_s is about the science's PSF: its half size from the science's width (the
    # matching width of sqrt(f_s**2 + f_t**2) onto f_t), elongation included
    elong = major_over_mean(stars.shape("science"))
    core = delta_half(options, f_ref, f_t, elong)
    half = outer_half(options, core, f_s, elong, ref.data.shape)
    core = min(core, half)
    ds = delta_degree(stars.n, options.deg_spatial)
    db = options.deg_bg
    g_half = (k_t.shape[0] - 1) // 2
    grown = _sliding_max(sources, g_half)
    fit = fit_delta(
        ref,
        tpl,
        options,
        half=half,
        core=core,
        deg_spatial=ds,
        deg_bg=db,
        sources=grown,
        exclude=rejected_mask(stars, ref.data.shape),
        clip_radius=max(1, round(0.5 * (f_ref or 3.0))),
        stars=stars,
    )
    m = stars.shape("template")
    shape = ""
    if m is not None:
        mean, dev = 0.5 * float(m[0] + m[1]), math.hypot(0.5 * float(m[0] - m[1]), float(m[2]))
        q = math.sqrt(max(mean - dev, 1e-6) / max(mean + dev, 1e-6))
        pa = math.degrees(0.5 * math.atan2(2.0 * float(m[2]), float(m[0] - m[1])))
        shape = f" q={q:.2f} pa={pa:.0f}"
    cross_psf = f"gauss fwhm={f_t:.2f}{shape}"
    return finish(
        science,
        template,
        sci,
        tpl,
        fit,
        direction="template",
        model="cross",
        stars=stars,
        sources=grown,
        fwhm=f_ref,
        ref=ref,
        ref_psf=k_t,
        meta={"cross_psf": cross_psf},
    )
