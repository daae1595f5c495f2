"""Fake point sources (:mod:`oasis_apps.fakes`): their PSF stamps, their injection into a
frame, where they go and what flux they get, and magnitudes with a frame's zero point.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.contracts.errors import InputError

__all__ = [
    "APERTURE_FWHM",
    "MAX_FAKES",
    "ZERO_POINT_KEYS",
    "draw_fluxes",
    "fake_positions",
    "inject",
    "render_stamps",
    "to_flux",
    "to_mag",
    "weight_map",
    "zero_point_of",
]

#: Radius of the PSF aperture of :attr:`FakesResult.flux_5sigma`, in FWHM (the aperture the
#: catalogs' fluxes are measured in).
APERTURE_FWHM = 1.5

#: Most fakes per frame (``n_fakes``, ``oasis compare --fakes``): they are placed 3 FWHM
#: apart by a pairwise test, whose time grows as the square of their number.
MAX_FAKES = 1000

#: Header keys read for the photometric zero point, in order.
ZERO_POINT_KEYS = ("MAGZERO", "MAGZP", "ZP", "ZEROPT", "PHOTZP")


def _sigma(fwhm: float) -> float:
    return fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def render_stamps(
    dx: np.ndarray, dy: np.ndarray, fwhm: float, model: str = "moffat", beta: float = 2.5
) -> np.ndarray:
    """Unit-flux PSF stamps sampled at offsets ``dx``, ``dy`` (arrays broadcast to
    ``(n, k, k)``) from each source's centre, for a ``"moffat"`` or ``"gauss"`` profile of
    FWHM ``fwhm`` pixels; each stamp is normalised by the profile's analytic total flux,
    so flux falling outside the stamp is lost as it would be on the sky."""
    r2 = dx * dx + dy * dy
    if model in ("gauss", "gaussian"):
        s2 = _sigma(fwhm) ** 2
        return np.exp(-0.5 * r2 / s2) / (2.0 * np.pi * s2)
    if model == "moffat":
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)
    raise InputError(f"fake PSF {model!r} is not known; use 'moffat' or 'gauss'")


def inject(
    data: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    model: str = "moffat",
) -> np.ndarray:
    """A copy of ``data`` with point sources of ``flux`` ADU added at (``x``, ``y``)
    (0-based pixel centres), all at once (no loop over sources)."""
    out = np.array(data, dtype=np.float32, copy=True)
    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux))
    if x.size == 0:
        return out
    half = int(np.ceil(4.0 * fwhm)) + 2
    offs = np.arange(-half, half + 1)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    px = ix[:, None, None] + offs[None, None, :]
    py = iy[:, None, None] + offs[None, :, None]
    stamps = render_stamps(px - x[:, None, None], py - y[:, None, None], fwhm, model)
    stamps *= flux[:, None, None]
    px, py = np.broadcast_arrays(px, py)
    inside = (px >= 0) & (px < out.shape[1]) & (py >= 0) & (py < out.shape[0])
    np.add.at(out, (py[inside], px[inside]), stamps[inside].astype(np.float32))
    return out


def to_mag(flux: float | np.ndarray, zero_point: float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return zero_point - 2.5 * np.log10(flux)


def to_flux(mag: np.ndarray, zero_point: float) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - zero_point))


def zero_point_of(header: Mapping[str, Any], default: float) -> float:
    """The photometric zero point from the header (``MAGZERO``, ``MAGZP``...), else
    ``default``."""
    for key in ZERO_POINT_KEYS:
        value = header.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    return float(default)


def fake_positions(
    rng: np.random.Generator, weight: np.ndarray, n: int, fwhm: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions on unmasked pixels, away from edges and from each other."""
    from scipy import ndimage

    margin = int(np.ceil(4 * fwhm)) + 5
    # clear of masked pixels by more than the core's masked-pixel test radius (1.5 FWHM)
    usable = ndimage.binary_erosion(weight > 0, iterations=int(np.ceil(1.5 * fwhm)) + 1)
    usable[:margin] = usable[-margin:] = False
    usable[:, :margin] = usable[:, -margin:] = False
    yy, xx = np.nonzero(usable)
    if len(xx) == 0:
        raise InputError("no unmasked area left to inject fakes into")
    xs: list[float] = []
    ys: list[float] = []
    sep2 = (3.0 * fwhm) ** 2
    for _ in range(50):  # draw in batches; keep those far enough from the others
        pick = rng.integers(0, len(xx), size=4 * n)
        cx = xx[pick] + rng.uniform(-0.5, 0.5, pick.size)
        cy = yy[pick] + rng.uniform(-0.5, 0.5, pick.size)
        for px, py in zip(cx, cy, strict=True):
            if all((px - a) ** 2 + (py - b) ** 2 > sep2 for a, b in zip(xs, ys, strict=True)):
                xs.append(float(px))
                ys.append(float(py))
                if len(xs) == n:
                    return np.array(xs), np.array(ys)
    return np.array(xs), np.array(ys)


def weight_map(path: Path) -> np.ndarray:
    """The ``WEIGHT`` extension of an aligned frame or template (ones when it has none)."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        if "WEIGHT" in hdul:
            return np.asarray(hdul["WEIGHT"].data, np.float32)
        return np.ones(hdul[0].shape, np.float32)


def draw_fluxes(
    rng: np.random.Generator, n: int, mode: str, lo: float, hi: float, scale: str, zp: float
) -> np.ndarray:
    if mode == "mag":
        return to_flux(rng.uniform(min(lo, hi), max(lo, hi), n), zp)
    if scale == "log":
        lo = max(lo, 1e-3 * hi, 1e-6)
        return 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), n)
    return rng.uniform(lo, hi, n)
