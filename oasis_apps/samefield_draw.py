"""What each frame of a same-field simulation is (:mod:`oasis_apps.samefield`): the real
frame's source catalog and PSF, and per frame its random draws (pointing, seeing, sky,
noise, rescale) and the WCS that says where it points.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.engine import io
from oasis_core.engine.headers import tan_wcs_cards

__all__ = [
    "DEFAULT_PIXEL_SCALE",
    "SKY_MAG_RANGE",
    "FrameDraw",
    "draw_frames",
    "frame_psf",
    "linear_wcs",
    "source_catalog",
    "transform_positions",
    "wcs_cards",
]

log = logging.getLogger("oasis")

#: Pixel scale (arcsec) of the WCS given to frames made from a frame without one.
DEFAULT_PIXEL_SCALE = 0.5

#: Half-width of the sky-magnitude interval around ``bkg_mag`` (OasisPy's documentation).
SKY_MAG_RANGE = 1.5


@attrs.frozen(kw_only=True)
class FrameDraw:
    """The random draws of one rendered frame (see the module docstring)."""

    fwhm: float
    rotation: float
    shift_x: float
    shift_y: float
    sky_mag: float
    scale: float
    offset: float
    noise: float = 0.0
    zero_point: float = 25.0

    @property
    def sky(self) -> float:
        """Sky per pixel in ADU before the rescale: ``10**(-0.4 (sky_mag - zero_point))``."""
        return float(10.0 ** (-0.4 * (self.sky_mag - self.zero_point)))


def source_catalog(
    frame: Any, *, thresh: float = 5.0, minarea: int = 5, back_size: int = 64
) -> Any:
    """Sources of a real frame: background-subtracted ``sep`` detection, Kron fluxes.

    Parameters
    ----------
    frame : Frame
        Its weight map (0 = bad) masks pixels.
    thresh : float
        Detection threshold in sigmas of the global background noise.
    minarea : int
        Minimum connected pixels.
    back_size : int
        Mesh size of the ``sep`` background, px.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (0-based), ``flux`` (ADU, elliptical aperture of 2.5 Kron radii, a
        1.75 px circle for sources smaller than that: SExtractor's ``FLUX_AUTO``),
        brightest first; sources with a non-positive or non-finite flux are left out.
        ``meta["noise"]`` is the frame's sky noise (ADU, ``sep``'s global RMS).
    """
    import sep
    from astropy.table import Table

    data = np.ascontiguousarray(frame.data, dtype=np.float32)
    weight = frame.weight if frame.weight is not None else np.ones_like(data)
    mask = np.ascontiguousarray(~(weight > 0) | ~np.isfinite(data))
    data = np.where(mask, 0.0, data).astype(np.float32)
    size = int(max(16, min(back_size, min(data.shape) // 2)))
    bkg = sep.Background(data, mask=mask, bw=size, bh=size)
    sub = np.ascontiguousarray(data - bkg.back(), dtype=np.float32)
    sep.set_extract_pixstack(max(300_000, data.size))
    objs = sep.extract(sub, thresh, err=bkg.globalrms, mask=mask, minarea=minarea)
    x, y = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    a, b = np.asarray(objs["a"], float), np.asarray(objs["b"], float)
    theta = np.clip(np.asarray(objs["theta"], float), -np.pi / 2, np.pi / 2)
    flux = np.full(len(x), np.nan)
    if len(x):
        good = (a > 0) & (b > 0)
        kron, _ = sep.kron_radius(sub, x, y, a, b, theta, 6.0, mask=mask)
        kron = np.where(np.isfinite(kron), kron, 0.0)
        # SExtractor's minimum: a Kron radius below 1.75 px gets a circle of that radius
        ellipse = good & (kron * np.sqrt(a * b) >= 1.75)
        if ellipse.any():
            flux[ellipse], _, _ = sep.sum_ellipse(
                sub,
                x[ellipse],
                y[ellipse],
                a[ellipse],
                b[ellipse],
                theta[ellipse],
                2.5 * kron[ellipse],
                mask=mask,
                subpix=1,
            )
        if (~ellipse).any():
            flux[~ellipse], _, _ = sep.sum_circle(
                sub, x[~ellipse], y[~ellipse], 1.75, mask=mask, subpix=1
            )
    keep = np.isfinite(flux) & (flux > 0)
    order = np.argsort(-flux[keep], kind="stable")
    table = Table({"x": x[keep][order], "y": y[keep][order], "flux": flux[keep][order]})
    table.meta["source"] = str(frame.path or frame.name)
    table.meta["noise"] = float(bkg.globalrms)
    return table


def frame_psf(frame: Any, *, registry: Any = None, config_file: Path | None = None) -> Any:
    """The PSF model of ``frame`` measured by the configured psf backend.

    Parameters
    ----------
    frame : Frame
    registry : Registry, optional
    config_file : Path, optional
        A target's ``configs/oasis.toml`` choosing the backend and its options (the
        defaults otherwise).

    Returns
    -------
    PsfModel
    """
    import tempfile

    from oasis_core.contracts.errors import StageError
    from oasis_core.engine.config import load_config
    from oasis_core.engine.plugins import Registry

    registry = registry if registry is not None else Registry()
    use_file = config_file is not None and Path(config_file).is_file()
    config = load_config(config_file if use_file else None, registry, use_config_file=use_file)
    name = config.backend("psf")
    options = config.backend_options("psf")
    backend = registry.select("psf", name, options)
    with tempfile.TemporaryDirectory(prefix="oasis-samefield-") as tmp:
        out = backend.psf(frame, options=options, workdir=Path(tmp))
    if out.psf is None:
        raise StageError(f"{frame.path or frame.name}: psf backend {name!r} returned no PSF")
    return out.psf


def transform_positions(
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    rotation: float,
    shift_x: float,
    shift_y: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Where sources at (``x``, ``y``) of the real frame land in a rendered frame:
    rotated by ``rotation`` degrees (counter-clockwise from +x towards +y) about the
    centre of a frame of ``shape``, then shifted by (``shift_x``, ``shift_y``) px."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    u, v = np.asarray(x, float) - cx, np.asarray(y, float) - cy
    return cx + c * u - s * v + shift_x, cy + s * u + c * v + shift_y


def linear_wcs(header: Any, shape: tuple[int, int]) -> tuple[float, float, np.ndarray]:
    """(ra, dec, CD) of the real frame's WCS linearised at its centre (deg, deg/px)."""
    ny, nx = shape
    wcs = io.header_wcs(header) if header is not None else None
    if wcs is not None:
        try:
            cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
            pts = np.array([[cx, cy], [cx + 1.0, cy], [cx, cy + 1.0]])
            world = wcs.all_pix2world(pts, 0)
            ra0, dec0 = float(world[0, 0]), float(world[0, 1])
            dra = (world[1:, 0] - ra0 + 180.0) % 360.0 - 180.0
            cd = np.array(
                [
                    [dra[0] * math.cos(math.radians(dec0)), dra[1] * math.cos(math.radians(dec0))],
                    [world[1, 1] - dec0, world[2, 1] - dec0],
                ]
            )
            if np.all(np.isfinite(cd)) and abs(np.linalg.det(cd)) > 0:
                return ra0, dec0, cd
        except (ValueError, ArithmeticError) as err:  # an unusable WCS: use the default
            log.warning("real frame's WCS not usable (%s); a default TAN WCS is used", err)
    scale = DEFAULT_PIXEL_SCALE / 3600.0
    return 150.0, 2.2, np.array([[-scale, 0.0], [0.0, scale]])


def wcs_cards(
    shape: tuple[int, int], ra0: float, dec0: float, cd0: np.ndarray, draw: FrameDraw
) -> dict[str, Any]:
    """The frame's TAN WCS: the real frame's, moved and rotated as ``draw`` says."""
    return tan_wcs_cards(
        shape, ra0, dec0, cd0, shift=(draw.shift_x, draw.shift_y), rotation=draw.rotation
    )


def draw_frames(
    n: int,
    *,
    seed: int = 0,
    bkg_mag: float = 22.5,
    fwhm: tuple[float, float] = (3.0, 6.0),
    rotation: tuple[float, float] = (-2.5, 2.5),
    shift: tuple[float, float] = (-2.0, 2.0),
    scale_mult: tuple[float, float] = (0.0, 1.5),
    scale_add: tuple[float, float] = (-20.0, 50.0),
    zero_point: float = 25.0,
    noise: float = 0.0,
) -> list[FrameDraw]:
    """``n`` frames' random draws, uniform in each interval, reproducible from ``seed``.

    ``noise`` is the real frame's sky noise (ADU); each frame's Gaussian noise is drawn in
    ``[noise - 5, noise + 5]``, at least ``noise / 2`` (OasisPy's ``std ± 5``). A
    multiplicative scale drawn below 1 % of the interval's top is raised to it (a scale of
    0 would leave a blank frame).
    """
    rng = np.random.default_rng([int(seed), 7207])
    lo_a, hi_a = scale_mult
    a = rng.uniform(lo_a, hi_a, n)
    return [
        FrameDraw(
            fwhm=float(f),
            rotation=float(r),
            shift_x=float(sx),
            shift_y=float(sy),
            sky_mag=float(m),
            scale=float(max(s, 0.01 * hi_a)),
            offset=float(o),
            noise=float(e),
            zero_point=float(zero_point),
        )
        for f, r, sx, sy, m, s, o, e in zip(
            rng.uniform(*fwhm, n),
            rng.uniform(*rotation, n),
            rng.uniform(*shift, n),
            rng.uniform(*shift, n),
            rng.uniform(bkg_mag - SKY_MAG_RANGE, bkg_mag + SKY_MAG_RANGE, n),
            a,
            rng.uniform(*scale_add, n),
            rng.uniform(max(noise - 5.0, 0.5 * noise), noise + 5.0, n),
            strict=True,
        )
    ]
