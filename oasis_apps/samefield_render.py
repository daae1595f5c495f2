"""Rendering the frames of a same-field simulation (:mod:`oasis_apps.samefield`): the
catalog's sources drawn with an analytic profile (``moffat``, ``gauss``), the real
frame's PSF (``real``) or GalSim (``sky``), on a sky with noise, clipped and rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from oasis_apps.samefield_draw import FrameDraw, transform_positions
from oasis_core.contracts.errors import BackendUnavailable, InputError

__all__ = [
    "DEFAULT_GAIN",
    "DEFAULT_SATURATION",
    "FLOOR_NOISE_FRACTION",
    "MODES",
    "MOFFAT_BETA",
    "import_galsim",
    "render_frame",
    "render_sources",
]

#: Rendering modes.
MODES = ("moffat", "gauss", "real", "sky")

#: Moffat index of the ``moffat`` mode (that of :func:`oasis_apps.fakes.render_stamps`).
MOFFAT_BETA = 2.5

#: Defaults when the real frame's header lacks them: e-/ADU, ADU.
DEFAULT_GAIN = 1.0
DEFAULT_SATURATION = 65535.0

#: Stamps reach out to where a profile falls below this fraction of the sky noise.
FLOOR_NOISE_FRACTION = 0.05

_MAX_HALF = 128  # px: largest stamp half-width
_CHUNK_PIXELS = 4_000_000  # stamp pixels rendered at once (memory bound)


def _moffat_alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _reach(flux: np.ndarray, fwhm: float, mode: str, floor: float) -> np.ndarray:
    """Radius (px) where each source's profile falls to ``floor`` ADU."""
    if mode == "gauss":
        s2 = (fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))) ** 2
        peak = flux / (2.0 * math.pi * s2)
        return np.sqrt(2.0 * s2 * np.log(np.maximum(peak / floor, 1.0)))
    # Moffat; a Kolmogorov profile's wings fall like a Moffat of beta 11/6
    beta = MOFFAT_BETA if mode == "moffat" else 11.0 / 6.0
    alpha = _moffat_alpha(fwhm, beta)
    peak = flux * (beta - 1.0) / (math.pi * alpha**2)
    ratio = np.maximum(peak / floor, 1.0)
    return alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))


def _half_sizes(
    flux: np.ndarray, fwhm: float, mode: str, floor: float, shape: tuple[int, int]
) -> np.ndarray:
    """Stamp half-width per source: a few sizes (3 FWHM, doubling), so that sources can be
    rendered in groups of equal stamp size."""
    hmin = max(4, math.ceil(3.0 * fwhm))
    hmax = max(hmin, min(_MAX_HALF, max(shape) // 2))
    levels = [h for h in (hmin, 2 * hmin, 4 * hmin, 8 * hmin, 16 * hmin) if h < hmax] + [hmax]
    group = np.searchsorted(np.asarray(levels), _reach(flux, fwhm, mode, floor))
    return np.asarray(levels)[np.minimum(group, len(levels) - 1)]


def _accumulate(image: np.ndarray, stamps: np.ndarray, px: np.ndarray, py: np.ndarray) -> None:
    """Add stamps whose pixels sit at (``py``, ``px``) (broadcastable) into ``image``."""
    ny, nx = image.shape
    px, py = np.broadcast_arrays(px, py)
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    flat = (py[inside] * nx + px[inside]).astype(np.int64)
    image += np.bincount(flat, weights=stamps[inside], minlength=ny * nx).reshape(ny, nx)


def _visible(x: np.ndarray, y: np.ndarray, half: np.ndarray, shape: tuple[int, int]) -> Any:
    ny, nx = shape
    return (x > -half - 1) & (x < nx + half) & (y > -half - 1) & (y < ny + half)


def _render_analytic(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    mode: str,
    half: np.ndarray,
) -> None:
    from oasis_apps.fakes import render_stamps

    for h in np.unique(half):  # a handful of stamp sizes, not a loop over sources
        sel = np.flatnonzero(half == h)
        offs = np.arange(-h, h + 1)
        step = max(1, _CHUNK_PIXELS // offs.size**2)
        for start in range(0, sel.size, step):
            idx = sel[start : start + step]
            ix, iy = np.rint(x[idx]).astype(int), np.rint(y[idx]).astype(int)
            px = ix[:, None, None] + offs[None, None, :]
            py = iy[:, None, None] + offs[None, :, None]
            stamps = render_stamps(px - x[idx, None, None], py - y[idx, None, None], fwhm, mode)
            stamps *= flux[idx, None, None]
            _accumulate(image, stamps, px, py)


def _render_real(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    psf: Any,
) -> None:
    """The PSF stamp zoomed by ``fwhm / psf.fwhm`` and shifted to each source (cubic
    spline), each stamp renormalised to unit sum, every source at once (in chunks)."""
    from scipy import ndimage

    kernel = np.asarray(psf.image, float)
    centre = (np.asarray(kernel.shape, float) - 1.0) / 2.0
    zoom = float(fwhm) / float(psf.fwhm)
    coeffs = ndimage.spline_filter(kernel, order=3, mode="constant")
    h = math.ceil(max(centre) * zoom) + 1
    offs = np.arange(-h, h + 1)
    keep = np.flatnonzero(_visible(x, y, np.full(x.shape, h), image.shape))
    step = max(1, _CHUNK_PIXELS // offs.size**2)
    for start in range(0, keep.size, step):
        idx = keep[start : start + step]
        ix, iy = np.rint(x[idx]).astype(int), np.rint(y[idx]).astype(int)
        px = ix[:, None, None] + offs[None, None, :]
        py = iy[:, None, None] + offs[None, :, None]
        u = centre[1] + (px - x[idx, None, None]) / zoom
        v = centre[0] + (py - y[idx, None, None]) / zoom
        u, v = np.broadcast_arrays(u, v)
        stamps = ndimage.map_coordinates(
            coeffs, [v.ravel(), u.ravel()], order=3, mode="constant", cval=0.0, prefilter=False
        ).reshape(u.shape)
        np.clip(stamps, 0.0, None, out=stamps)
        total = stamps.sum(axis=(1, 2), keepdims=True)
        stamps *= flux[idx, None, None] / np.where(total > 0, total, 1.0)
        _accumulate(image, stamps, px, py)


def import_galsim() -> Any:
    try:
        import galsim
    except ImportError as err:
        raise BackendUnavailable("mode 'sky' needs GalSim: pip install 'oasis-dia[sims]'") from err
    return galsim


def _render_galsim(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    half: np.ndarray,
) -> None:
    galsim = import_galsim()
    canvas = galsim.ImageD(image, xmin=1, ymin=1, copy=False)  # a view: drawn into image
    profile = galsim.Kolmogorov(fwhm=float(fwhm))
    # GalSim draws one profile per call: the loop over sources cannot be avoided
    for xi, yi, fi, hi in zip(x, y, flux, half, strict=True):
        size = 2 * int(hi) + 1
        stamp = profile.withFlux(float(fi)).drawImage(
            nx=size, ny=size, scale=1.0, center=galsim.PositionD(xi + 1.0, yi + 1.0)
        )
        overlap = stamp.bounds & canvas.bounds
        if overlap.isDefined():
            canvas[overlap] += stamp[overlap]


def render_sources(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    mode: str = "moffat",
    *,
    psf: Any = None,
    floor: float = 0.1,
) -> np.ndarray:
    """A noiseless image (float64, ADU) of point sources, without sky.

    Parameters
    ----------
    shape : (ny, nx)
    x, y : array
        0-based positions (sources off the frame contribute their wings).
    flux : array
        Total fluxes, ADU.
    fwhm : float
        PSF FWHM, px.
    mode : str
        ``"moffat"``, ``"gauss"``, ``"real"`` (``psf`` zoomed to ``fwhm``) or ``"sky"``
        (GalSim Kolmogorov, pixel-integrated).
    psf : PsfModel, optional
        The PSF model for ``"real"``.
    floor : float
        Each source's stamp reaches out to where its profile falls below ``floor`` ADU
        (between 3 FWHM and 128 px); flux beyond is lost, as on the sky.

    Returns
    -------
    ndarray
    """
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is not known; use one of {', '.join(MODES)}")
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise InputError(f"fwhm must be positive, got {fwhm!r}")
    image = np.zeros(shape, dtype=np.float64)
    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux))
    if x.size == 0:
        return image
    if mode == "real":
        if psf is None:
            raise InputError("mode 'real' needs the frame's PSF model (psf=...)")
        _render_real(image, x, y, flux, fwhm, psf)
        return image
    half = _half_sizes(flux, fwhm, mode, max(float(floor), 1e-12), shape)
    vis = _visible(x, y, half, shape)
    x, y, flux, half = x[vis], y[vis], flux[vis], half[vis]
    if mode == "sky":
        _render_galsim(image, x, y, flux, fwhm, half)
    else:
        _render_analytic(image, x, y, flux, fwhm, mode, half)
    return image


def render_frame(
    shape: tuple[int, int],
    catalog: Any,
    draw: FrameDraw,
    mode: str = "moffat",
    *,
    gain: float = DEFAULT_GAIN,
    saturation: float = DEFAULT_SATURATION,
    psf: Any = None,
    seed: Sequence[int] | int = 0,
) -> np.ndarray:
    """One observed frame (float32, ADU): the catalog's sources moved by ``draw``'s
    pointing, drawn with its FWHM, on its sky, with Poisson noise (``gain``) and Gaussian
    noise of ``draw.noise`` ADU (read noise ``gain * draw.noise`` e-), clipped at
    ``saturation`` and rescaled by ``draw.scale`` and ``draw.offset``.

    Parameters
    ----------
    shape : (ny, nx)
    catalog : Table
        ``x``, ``y``, ``flux`` in the real frame's pixels.
    draw : FrameDraw
    mode : str
        See :func:`render_sources`.
    gain, saturation : float
        e-/ADU and ADU (of the frame before the rescale).
    psf : PsfModel, optional
        For ``"real"``.
    seed : int or sequence of int
        Seeds the noise.

    Returns
    -------
    ndarray
    """
    x, y = transform_positions(
        np.asarray(catalog["x"], float),
        np.asarray(catalog["y"], float),
        shape,
        draw.rotation,
        draw.shift_x,
        draw.shift_y,
    )
    sky = draw.sky
    readnoise = draw.noise * gain
    sigma = math.sqrt(sky / gain + draw.noise**2)
    model = render_sources(
        shape,
        x,
        y,
        np.asarray(catalog["flux"], float),
        draw.fwhm,
        mode,
        psf=psf,
        floor=FLOOR_NOISE_FRACTION * sigma,
    )
    model += sky
    rng = np.random.default_rng(seed)
    if mode == "sky":
        galsim = import_galsim()
        image = galsim.ImageD(model, xmin=1, ymin=1, copy=False)
        noise = galsim.CCDNoise(
            galsim.BaseDeviate(int(rng.integers(1, 2**31 - 1))),
            sky_level=0.0,  # the sky is in the image already
            gain=float(gain),
            read_noise=float(readnoise),
        )
        image.addNoise(noise)
        observed = model
    else:
        electrons = rng.poisson(np.clip(model, 0.0, None) * gain).astype(np.float64)
        observed = electrons / gain + rng.normal(0.0, readnoise / gain, shape)
    np.minimum(observed, saturation, out=observed)
    return (observed * draw.scale + draw.offset).astype(np.float32)
