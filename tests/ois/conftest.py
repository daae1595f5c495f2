"""Synthetic image pairs for the ``ois`` backend tests (numpy only, seeded)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from oasis_core.contracts.model import Frame, Template

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def render(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: np.ndarray | float,
    *,
    beta: float | None = 3.0,
    radius: int = 20,
) -> np.ndarray:
    """Point sources (Moffat of index ``beta``, or Gaussian when None), unit-sum stamps.

    All sources at once: a (n, 2r+1, 2r+1) stack evaluated by broadcasting and added
    with ``np.add.at``; ``fwhm`` may differ per source.
    """
    x, y, flux = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (x, y, flux))
    fwhm = np.broadcast_to(np.asarray(fwhm, dtype=np.float64), x.shape)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    off = np.arange(-radius, radius + 1)
    px = ix[:, None, None] + off[None, None, :]
    py = iy[:, None, None] + off[None, :, None]
    r2 = (px - x[:, None, None]) ** 2 + (py - y[:, None, None]) ** 2
    if beta is None:
        sigma = fwhm / FWHM_PER_SIGMA
        prof = np.exp(-0.5 * r2 / sigma[:, None, None] ** 2)
    else:
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        prof = (1.0 + r2 / alpha[:, None, None] ** 2) ** (-beta)
    prof *= (flux / prof.sum(axis=(1, 2)))[:, None, None]
    img = np.zeros(shape)
    inside = (px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])
    pyb, pxb = np.broadcast_arrays(py, px)
    np.add.at(img, (pyb[inside], pxb[inside]), prof[inside])
    return img


def make_pair(
    seed: int = 1,
    *,
    shape: tuple[int, int] = (256, 256),
    nstars: int = 110,
    fwhm_t: float = 3.0,
    fwhm_s: float | Callable[[np.ndarray, np.ndarray], np.ndarray] = 4.5,
    scale: float = 1.2,
    bg_s: float = 40.0,
    sky_s: float = 1000.0,
    sky_t: float = 300.0,
    gain: float = 4.0,
    beta: float | None = 3.0,
    transients: tuple[tuple[float, float, float], ...] = (),
    stars: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    set_fwhm: bool = False,
) -> tuple[Frame, Template]:
    """A registered science/template pair of one field, both sky-subtracted.

    The science frame has ``scale`` times the template's fluxes, a differential
    background ``bg_s`` (constant + gradient), its own seeing (``fwhm_s`` may be a
    function of x, y for a spatially varying PSF) and a sky of ``sky_s`` ADU removed
    (noise sqrt((sky + signal) / gain)); the template is deeper (sky ``sky_t``).
    ``transients`` are (x, y, flux) point sources added to the science frame only, with
    ``flux`` in the science frame's ADU.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if stars is None:
        x = rng.uniform(2, nx - 3, nstars)
        y = rng.uniform(2, ny - 3, nstars)
        flux = 10 ** rng.uniform(3.0, 4.7, nstars)
    else:
        x, y, flux = stars
    fs = fwhm_s(x, y) if callable(fwhm_s) else fwhm_s
    sci = scale * render(shape, x, y, flux, fs, beta=beta)
    if transients:
        tx, ty, tf = (np.array(a) for a in zip(*transients, strict=True))
        ft = fwhm_s(tx, ty) if callable(fwhm_s) else fwhm_s
        sci += render(shape, tx, ty, tf, ft, beta=beta)
    tpl = render(shape, x, y, flux, fwhm_t, beta=beta)
    yy, xx = np.mgrid[:ny, :nx]
    background = bg_s * (1.0 + 0.3 * (xx - nx / 2) / nx - 0.2 * (yy - ny / 2) / ny)
    sci_data = sci + background + rng.normal(0, 1, shape) * np.sqrt((sky_s + sci) / gain)
    tpl_data = tpl + rng.normal(0, 1, shape) * np.sqrt((sky_t + tpl) / gain)
    science = Frame(
        data=sci_data.astype(np.float32),
        name="sci",
        gain=gain,
        fwhm=(None if callable(fwhm_s) or not set_fwhm else fwhm_s),
    )
    template = Template(
        data=tpl_data.astype(np.float32),
        name="tpl",
        gain=gain,
        fwhm=fwhm_t if set_fwhm else None,
    )
    return science, template


@pytest.fixture(scope="session")
def pair_factory() -> Callable[..., tuple[Frame, Template]]:
    """:func:`make_pair`, as a fixture (test modules do not import conftest)."""
    return make_pair


@pytest.fixture(scope="session")
def render_sources() -> Callable[..., np.ndarray]:
    """:func:`render`, as a fixture."""
    return render
