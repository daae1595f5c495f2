"""``oasis sim same-field``: false detections on frames where nothing varies (OasisPy's
``sim_sameField``).

From one real frame a source catalog is made (``sep``: background-subtracted detection,
Kron-aperture fluxes, i.e. SExtractor's ``FLUX_AUTO``). ``numIms`` frames of that field are
rendered with the *same sources and fluxes* but their own seeing, sky, pointing and
photometric scale, written as a new target and run through the whole pipeline. Nothing
varies on the sky, so every source kept in ``sources/filtered_sources.txt`` is a false
detection; their number per frame is the figure of merit.

Each frame ``i`` (random draws are uniform in the given intervals and reproducible from
``seed``):

* **pointing**: a rotation ``theta`` in ``[rot_min, rot_max]`` degrees about the frame centre
  ``c`` and a shift ``d`` in ``[shift_min, shift_max]`` px on each axis: a source at pixel
  ``p`` of the real frame lands at ``R(theta) (p - c) + c + d``. The header carries a TAN WCS
  that says so (``CRPIX = c + d``, ``CD = CD_0 R^-1``, ``CD_0`` the real frame's linear WCS at
  its centre, or 0.5"/px when it has none), so the frames are alignable from their pixels and
  from their WCS alike;
* **seeing**: a FWHM in ``[fwhm_min, fwhm_max]`` px;
* **sky**: a sky magnitude ``m`` in ``[bkg_mag - 1.5, bkg_mag + 1.5]`` (OasisPy's documented
  range), i.e. ``10**(-0.4 (m - zero_point))`` ADU per pixel (OasisPy's
  ``2.512**(zero_point - m)``);
* **noise**: Poisson noise in electrons with the real frame's ``GAIN`` (1 e-/ADU when its
  header has none) plus Gaussian noise of standard deviation ``noise`` ADU drawn in
  ``[sigma - 5, sigma + 5]`` (at least ``sigma / 2``), ``sigma`` the real frame's sky noise
  (``sep``'s global RMS): OasisPy's choice, which keeps the sources' S/N that of the real
  frame whatever ``bkg_mag`` says. The header's ``RDNOISE`` is that noise in electrons, so
  the pipeline's noise model is exact. Pixels are then clipped at the real frame's
  ``SATURATE`` (else 65535 ADU);
* **scale**: OasisPy's linear rescale of the finished frame, ``a * image + b`` with ``a`` in
  ``scale_mult`` and ``b`` in ``scale_add`` (a change of photometric scale and pedestal; the
  S/N is unchanged). Unlike OasisPy the rescale applies in every mode, and the header keeps
  the noise model true: ``GAIN = gain / a``, ``SATURATE = a * saturation + b``.

OasisPy also multiplied every flux by a random factor in [0, 2] per frame; the issue asks for
the *same* fluxes, so that is not done (``scale_mult`` already varies the flux scale).

Modes (the PSF the sources are drawn with):

* ``moffat`` (beta 2.5) and ``gauss``: :func:`oasis_apps.fakes.render_stamps` profiles
  sampled at pixel centres, every source at once (sources are grouped by stamp size: a
  bright star's stamp reaches out to where its profile falls below 1/20 of the sky noise);
* ``real``: the real frame's own PSF model (measured by the configured psf backend) zoomed
  to each frame's FWHM and shifted to each source's sub-pixel position by spline
  interpolation (:func:`scipy.ndimage.map_coordinates`), all sources at once;
* ``sky``: GalSim, standing in for SkyMaker (not packaged anywhere installable): a
  ``galsim.Kolmogorov`` seeing profile of the frame's FWHM, integrated over the pixels,
  drawn per source on its own stamp (GalSim draws one profile at a time), with the sky and
  ``galsim.CCDNoise`` (photon and read noise). Needs ``pip install 'oasis-dia[sims]'``.

Outputs: the target ``<simulations>/<name>_samefield_<mode>/`` (its ``data/`` holds the
rendered frames ``<name>_sf000.fits``...; every pipeline output as usual) and, in its
``samefield/`` directory, ``samefield.ecsv`` / ``samefield.txt`` (one row per frame: its
draws, its status in the run and its number of false detections), ``false_detections.png``
(a bar per frame) and ``summary.txt`` (:meth:`SameFieldResult.line`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import BackendUnavailable, InputError
from oasis_core.engine import io
from oasis_core.engine.lock import LOCK_NAME, hold, holds_targets

__all__ = [
    "MODES",
    "FrameDraw",
    "SameFieldResult",
    "draw_frames",
    "frame_psf",
    "render_frame",
    "render_sources",
    "sim_sameField",
    "sim_same_field",
    "source_catalog",
    "transform_positions",
]

log = logging.getLogger("oasis")

#: Rendering modes.
MODES = ("moffat", "gauss", "real", "sky")

#: Moffat index of the ``moffat`` mode (that of :func:`oasis_apps.fakes.render_stamps`).
MOFFAT_BETA = 2.5

#: Defaults when the real frame's header lacks them: e-/ADU, ADU.
DEFAULT_GAIN = 1.0
DEFAULT_SATURATION = 65535.0

#: Pixel scale (arcsec) of the WCS given to frames made from a frame without one.
DEFAULT_PIXEL_SCALE = 0.5

#: Half-width of the sky-magnitude interval around ``bkg_mag`` (OasisPy's documentation).
SKY_MAG_RANGE = 1.5

#: Stamps reach out to where a profile falls below this fraction of the sky noise.
FLOOR_NOISE_FRACTION = 0.05

_MAX_HALF = 128  # px: largest stamp half-width
_CHUNK_PIXELS = 4_000_000  # stamp pixels rendered at once (memory bound)
_VERSION = 2  # bump when rendering changes: old simulations are redone


# ------------------------------------------------------------------------------ results


@attrs.frozen(kw_only=True)
class SameFieldResult:
    """What :func:`sim_same_field` measured.

    Attributes
    ----------
    target : Path
        The simulated target (``<simulations>/<name>_samefield_<mode>``).
    source : Path
        The real frame the catalog was made from.
    mode : str
    n_sources : int
        Sources in the catalog (rendered in every frame).
    table : astropy.table.Table
        One row per rendered frame: ``frame``, ``fwhm``, ``rotation``, ``shift_x``,
        ``shift_y``, ``sky_mag``, ``sky`` (ADU, before the rescale), ``noise`` (ADU, the
        Gaussian part, before the rescale), ``scale``, ``offset``,
        ``status`` (``used`` or why the run left the frame out) and ``false`` (kept sources:
        all false; 0 for frames not used).
    false_per_frame : mapping
        Frame name to false detections, for the frames the pipeline used.
    directory : Path
        Where the summary files are (``<target>/samefield``).
    plot : Path or None
        ``false_detections.png``.
    """

    target: Path
    source: Path
    mode: str
    n_sources: int
    table: Any = attrs.field(eq=False, repr=False)
    false_per_frame: Mapping[str, int]
    directory: Path
    plot: Path | None = None

    @property
    def mean_false(self) -> float:
        """Mean false detections per used frame (``nan`` when no frame was used)."""
        values = list(self.false_per_frame.values())
        return float(np.mean(values)) if values else float("nan")

    @property
    def max_false(self) -> int:
        return max(self.false_per_frame.values(), default=0)

    def line(self) -> str:
        n = len(self.table)
        used = len(self.false_per_frame)
        total = sum(self.false_per_frame.values())
        return (
            f"same-field ({self.mode}): {n} frames of {self.n_sources} sources from "
            f"{self.source.name}; {used} used by the pipeline; {total} false detection(s), "
            f"{self.mean_false:.2f} per frame on average (at most {self.max_false})"
        )


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


# ------------------------------------------------------------------------------ catalog


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


# ----------------------------------------------------------------------------- geometry


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


def _linear_wcs(header: Any, shape: tuple[int, int]) -> tuple[float, float, np.ndarray]:
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


def _wcs_cards(
    shape: tuple[int, int], ra0: float, dec0: float, cd0: np.ndarray, draw: FrameDraw
) -> dict[str, Any]:
    ny, nx = shape
    t = math.radians(draw.rotation)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    cd = cd0 @ rot.T  # R^-1 = R^T
    return {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "CRVAL1": ra0,
        "CRVAL2": dec0,
        "CRPIX1": (nx + 1) / 2.0 + draw.shift_x,  # 1-based centre, moved by the shift
        "CRPIX2": (ny + 1) / 2.0 + draw.shift_y,
        "CD1_1": float(cd[0, 0]),
        "CD1_2": float(cd[0, 1]),
        "CD2_1": float(cd[1, 0]),
        "CD2_2": float(cd[1, 1]),
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
    }


# ----------------------------------------------------------------------------- draws


_WHERE = "oasis sim same-field"


def _interval(value: Any, low: str, high: str) -> tuple[float, float]:
    """``value`` as (low, high), two finite numbers in order (the shared checks: one line
    naming the parameter, its value and its range)."""
    from oasis_core.contracts.validators import finite, satisfies, show

    try:
        lo, hi = value
    except (TypeError, ValueError) as err:
        msg = f"{_WHERE}: {low}, {high} = {value!r}: must be two numbers (low, high)"
        raise InputError(msg) from err
    finite.require(lo, low, _WHERE)
    above = satisfies(
        lambda v: finite.test(v) and v >= lo, f"a finite number >= {low} ({show(lo)})"
    )
    above.require(hi, high, _WHERE)
    return float(lo), float(hi)


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


# ---------------------------------------------------------------------------- rendering


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


def _galsim() -> Any:
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
    galsim = _galsim()
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
        galsim = _galsim()
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


# --------------------------------------------------------------------------- simulation


def _resolve(location: str | Path, frame: str | Path | None) -> tuple[Path, Any]:
    """(the real frame's file, its target or None)."""
    from oasis_core.engine.pipeline import input_frames
    from oasis_core.engine.tree import find_target

    path = Path(location)
    if path.is_file():
        return path, None
    target = find_target(location)
    if frame is not None:
        f = Path(frame)
        for candidate in (f, target.data / f, target.data / f"{f}.fits"):
            if candidate.is_file():
                return candidate, target
        raise InputError(f"frame {frame!s}: no such file (in {target.data} nor as a path)")
    frames = input_frames(target)
    if not frames:
        raise InputError(f"{target.data}: no FITS frame to simulate from")
    return frames[0][1], target


def _simulations_dir(target: Any) -> Path:
    from oasis_core.engine.tree import init_root

    if target is not None and target.path.parent.name == "targets":
        return target.path.parent.parent / "simulations"
    return init_root(Path.cwd()) / "simulations"


def _header(
    source_header: Any,
    draw: FrameDraw,
    wcs: dict[str, Any],
    *,
    index: int,
    mode: str,
    source: Path,
    n_sources: int,
    gain: float,
    saturation: float,
) -> Any:
    from astropy.io import fits

    header = fits.Header()
    for key in ("OBJECT", "TELESCOP", "INSTRUME", "FILTER", "EXPTIME"):
        if key in source_header:
            header[key] = source_header[key]
    mjd0 = source_header.get("MJD-OBS")
    mjd0 = float(mjd0) if isinstance(mjd0, (int, float)) else 60000.0
    mjd = mjd0 + index / 1440.0  # one frame a minute
    from astropy.time import Time

    header["DATE-OBS"] = Time(mjd, format="mjd", scale="utc").isot
    header["MJD-OBS"] = (mjd, "MJD at start of exposure")
    header["GAIN"] = (gain / draw.scale, "e-/ADU (after the rescale)")
    header["RDNOISE"] = (draw.noise * gain, "e-")
    header["SATURATE"] = (
        float(np.float32(np.float64(saturation) * draw.scale + draw.offset)),
        "ADU, level of saturated pixels",
    )
    header["BUNIT"] = "adu"
    header.update(wcs)
    header["SFMODE"] = (mode, "same-field simulation: rendering mode")
    header["SFSOURCE"] = (source.name, "real frame the sources come from")
    header["SFNSRC"] = (n_sources, "sources rendered")
    header["SFFWHM"] = (round(draw.fwhm, 4), "FWHM [px]")
    header["SFROT"] = (round(draw.rotation, 5), "rotation about the centre [deg]")
    header["SFDX"] = (round(draw.shift_x, 4), "shift along x [px]")
    header["SFDY"] = (round(draw.shift_y, 4), "shift along y [px]")
    header["SFSKYMAG"] = (round(draw.sky_mag, 4), "sky [mag/px]")
    header["SFSKY"] = (round(draw.sky, 4), "sky [ADU/px] before the rescale")
    header["SFSCALE"] = (round(draw.scale, 6), "rescale: data = SFSCALE * image + SFOFFSET")
    header["SFOFFSET"] = (round(draw.offset, 4), "rescale offset [ADU]")
    return header


def _write_fits(path: Path, data: np.ndarray, header: Any) -> None:
    from astropy.io import fits

    with io.atomic_write(path) as tmp:
        fits.PrimaryHDU(data=data, header=header).writeto(tmp, overwrite=True)


def _prepare_target(
    sim_dir: Path, params: Mapping[str, Any], source_target: Any, registry: Any
) -> tuple[Any, bool]:
    """The simulation's target, emptied unless it holds this very simulation already
    (``configs/samefield.json``: the parameters and whether every frame was written);
    returns (target, whether its frames are current)."""
    from oasis_core.engine.config import render_config
    from oasis_core.engine.tree import Target

    marker = sim_dir / "configs" / "samefield.json"
    # the lock file and the run's scratch are this run's; anything else is a simulation's
    held = (LOCK_NAME, ".work")
    content = [p for p in sim_dir.iterdir() if p.name not in held] if sim_dir.exists() else []
    if content:
        if not marker.is_file():
            raise InputError(
                f"{sim_dir}: exists and is not a same-field simulation; remove it or move it"
            )
        done = json.loads(marker.read_text())
        if done.get("params") == json.loads(json.dumps(params)) and done.get("complete"):
            return Target(sim_dir), True
        for path in content:  # other parameters, or an interrupted rendering
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    target = Target(sim_dir).create()
    _mark(target, params, complete=False)
    user_config = source_target.config_file if source_target is not None else None
    if user_config is not None and user_config.is_file():
        io.write_text(target.config_file, user_config.read_text())
    else:
        io.write_text(target.config_file, render_config(registry))
    return target, False


def _mark(target: Any, params: Mapping[str, Any], *, complete: bool) -> None:
    text = json.dumps({"params": params, "complete": complete}, indent=1)
    io.write_text(target.configs / "samefield.json", text + "\n")


@holds_targets
def sim_same_field(
    location: str | Path,
    numIms: int = 100,
    bkg_mag: float = 22.5,
    fwhm_min: float = 3,
    fwhm_max: float = 6,
    rot_min: float = -2.5,
    rot_max: float = 2.5,
    shift_min: float = -2,
    shift_max: float = 2,
    scale_mult: tuple[float, float] = (0, 1.5),
    scale_add: tuple[float, float] = (-20, 50),
    zero_point: float = 25,
    mode: str = "moffat",
    *,
    frame: str | Path | None = None,
    seed: int = 0,
    jobs: int | None = None,
    registry: Any = None,
    reporter: Any = None,
    plot: bool = True,
) -> SameFieldResult:
    """Render ``numIms`` frames of one real frame's sources, run the pipeline, count the
    (necessarily false) detections per frame.

    Parameters
    ----------
    location : str or Path
        A target (directory or name under ``./OASIS/targets``) or a FITS frame.
    numIms : int
        Frames to render (at least 3).
    bkg_mag : float
        Mean sky brightness, mag per pixel; each frame's is drawn in ``bkg_mag`` ± 1.5.
    fwhm_min, fwhm_max : float
        FWHM interval, px.
    rot_min, rot_max : float
        Rotation interval about the frame centre, degrees.
    shift_min, shift_max : float
        Shift interval on each axis, px.
    scale_mult, scale_add : (float, float)
        Intervals of the linear rescale ``a * image + b`` of each finished frame.
    zero_point : float
        Magnitude of 1 ADU (for the sky).
    mode : str
        ``"moffat"``, ``"gauss"``, ``"real"`` or ``"sky"`` (GalSim).
    frame : str or Path, optional
        The real frame (a path, or a file name in the target's ``data/``); default: the
        target's first frame.
    seed : int
        Same seed, same frames (and a rerun resumes the pipeline).
    jobs : int, optional
        Worker processes of the pipeline.
    registry, reporter : optional
        As for :func:`oasis_core.engine.pipeline.make_context`.
    plot : bool
        Write ``false_detections.png``.

    Returns
    -------
    SameFieldResult

    Raises
    ------
    InputError
        A parameter out of range (the message names it), no frame, or no source found.
    BackendUnavailable
        Mode ``"sky"`` without GalSim.
    """
    from astropy.table import Table

    from oasis_core.contracts.validators import finite, integer, non_negative, one_of, positive
    from oasis_core.engine.outputs import usable_residuals
    from oasis_core.engine.pipeline import Reporter, make_context, run_stages
    from oasis_core.engine.plugins import Registry

    one_of(*MODES).require(mode, "mode", _WHERE)  # every argument, before any work
    integer(3).require(numIms, "numIms", _WHERE)
    integer(0).require(seed, "seed", _WHERE)
    finite.require(bkg_mag, "bkg_mag", _WHERE)
    finite.require(zero_point, "zero_point", _WHERE)
    positive.require(fwhm_min, "fwhm_min", _WHERE)
    fwhm = _interval((fwhm_min, fwhm_max), "fwhm_min", "fwhm_max")
    rotation = _interval((rot_min, rot_max), "rot_min", "rot_max")
    shift = _interval((shift_min, shift_max), "shift_min", "shift_max")
    mult = _interval(scale_mult, "scale_mult[0]", "scale_mult[1]")
    non_negative.require(mult[0], "scale_mult[0]", _WHERE)
    positive.require(mult[1], "scale_mult[1]", _WHERE)
    add = _interval(scale_add, "scale_add[0]", "scale_add[1]")
    if mode == "sky":
        _galsim()  # fail before any work
    registry = registry if registry is not None else Registry()
    reporter = reporter or Reporter()

    source_path, source_target = _resolve(location, frame)
    real = io.read_frame(source_path)
    shape = real.data.shape
    gain = real.gain if real.gain and real.gain > 0 else DEFAULT_GAIN
    saturation = real.saturation if real.saturation else DEFAULT_SATURATION
    params = {
        "version": _VERSION,
        "source": io.sha256(source_path),
        "mode": mode,
        "numIms": int(numIms),
        "bkg_mag": float(bkg_mag),
        "fwhm": fwhm,
        "rotation": rotation,
        "shift": shift,
        "scale_mult": mult,
        "scale_add": add,
        "zero_point": float(zero_point),
        "seed": int(seed),
    }
    name = source_target.name if source_target is not None else io.frame_name(source_path)
    sim_dir = (_simulations_dir(source_target) / f"{name}_samefield_{mode}").resolve()
    hold(sim_dir)  # one run per simulation, until the end
    target, current = _prepare_target(sim_dir, params, source_target, registry)
    out_dir = target.path / "samefield"
    catalog_path = out_dir / "catalog.ecsv"
    if current and catalog_path.exists():
        catalog = Table.read(catalog_path, format="ascii.ecsv")
    else:
        current = False
        catalog = source_catalog(real)
        if len(catalog) == 0:
            raise InputError(f"{source_path}: no source found to simulate from")
    draws = draw_frames(
        int(numIms),
        seed=seed,
        bkg_mag=float(bkg_mag),
        fwhm=fwhm,
        rotation=rotation,
        shift=shift,
        scale_mult=mult,
        scale_add=add,
        zero_point=float(zero_point),
        noise=float(catalog.meta["noise"]),
    )
    names = [f"{io.frame_name(source_path)}_sf{i:03d}" for i in range(len(draws))]
    if not current:
        psf = None
        if mode == "real":
            config = source_target.config_file if source_target is not None else None
            psf = frame_psf(real, registry=registry, config_file=config)
        ra0, dec0, cd0 = _linear_wcs(real.header, shape)
        with reporter.progress("render", len(draws)) as advance:
            for i, (draw, frame_name) in enumerate(zip(draws, names, strict=True)):
                data = render_frame(
                    shape,
                    catalog,
                    draw,
                    mode,
                    gain=gain,
                    saturation=saturation,
                    psf=psf,
                    seed=[int(seed), i],
                )
                header = _header(
                    real.header,
                    draw,
                    _wcs_cards(shape, ra0, dec0, cd0, draw),
                    index=i,
                    mode=mode,
                    source=source_path,
                    n_sources=len(catalog),
                    gain=gain,
                    saturation=saturation,
                )
                _write_fits(target.data / f"{frame_name}.fits", data, header)
                advance()
        io.write_table(catalog, catalog_path)
        _mark(target, params, complete=True)

    ctx = make_context(target.path, jobs=jobs, registry=registry, reporter=reporter)
    run_stages(ctx)
    good, _ = usable_residuals(ctx)
    found_path = target.stage_dir("extract") / "filtered_sources.ecsv"
    kept = Table.read(found_path, format="ascii.ecsv") if found_path.exists() else Table()
    frames_col = np.asarray(kept["frame"]).astype(str) if len(kept) else np.array([], str)
    statuses = _statuses(ctx, names, set(good))
    false = {n: int(np.sum(frames_col == n)) for n in names if statuses[n] == "used"}
    table = Table(
        {
            "frame": names,
            "fwhm": [d.fwhm for d in draws],
            "rotation": [d.rotation for d in draws],
            "shift_x": [d.shift_x for d in draws],
            "shift_y": [d.shift_y for d in draws],
            "sky_mag": [d.sky_mag for d in draws],
            "sky": [d.sky for d in draws],
            "noise": [d.noise for d in draws],
            "scale": [d.scale for d in draws],
            "offset": [d.offset for d in draws],
            "status": [statuses[n] for n in names],
            "false": [false.get(n, 0) for n in names],
        }
    )
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".4g"
    table.meta.update({"mode": mode, "source": str(source_path), "n_sources": len(catalog)})
    io.write_table(table, out_dir / "samefield.ecsv")
    io.write_table(table, out_dir / "samefield.txt")
    png = out_dir / "false_detections.png" if plot else None
    result = SameFieldResult(
        target=target.path,
        source=source_path,
        mode=mode,
        n_sources=len(catalog),
        table=table,
        false_per_frame=false,
        directory=out_dir,
        plot=png,
    )
    if png is not None:
        false_plot(result, png)
    io.write_text(out_dir / "summary.txt", result.line() + "\n")
    reporter.result(result.line())
    return result


#: OasisPy's spelling.
sim_sameField = sim_same_field


def _statuses(ctx: Any, names: Sequence[str], good: set[str]) -> dict[str, str]:
    """Per frame: ``used`` or why the run left it out."""
    from astropy.io import fits

    from oasis_core.engine.outputs import residual_path

    out = {}
    align_dir = ctx.target.stage_dir("align")
    for n in names:
        if n in good:
            out[n] = "used"
        elif (ctx.target.archive / f"{n}.fits").exists():
            out[n] = "archived by the psf stage"
        elif not (align_dir / f"{n}.fits").exists():
            out[n] = "not aligned"
        elif not residual_path(ctx, n).exists():
            out[n] = "not subtracted"
        else:
            q = fits.getheader(residual_path(ctx, n)).get("OASQ", "nan")
            out[n] = f"Q {float(q):.3f} below the floor"
    return out


def false_plot(result: SameFieldResult, path: Path) -> None:
    """PNG bar chart of the false detections per frame (frames the run used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.false_per_frame)
    values = [result.false_per_frame[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 4.0), dpi=110)
    ax.bar(np.arange(len(names)), values, color="tab:red", width=0.8)
    if names:
        ax.axhline(result.mean_false, color="0.3", ls="--", label=f"mean {result.mean_false:.2f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n.rsplit("_", 1)[-1] for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("frame")
    ax.set_ylabel("false detections (filtered sources)")
    ax.set_title(
        f"Same-field simulation ({result.mode}): {len(names)} frames, {result.n_sources} sources"
    )
    ax.set_ylim(0, max([*values, 1]) * 1.15)
    fig.tight_layout()
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
