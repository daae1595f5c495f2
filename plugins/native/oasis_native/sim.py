"""Simulated images of a star field, for tests, examples and benchmarks.

:func:`simulate_series` makes a series of frames of one field as a telescope would take
them: a power-law star field, one extended galaxy, a Moffat PSF whose width changes from
frame to frame and across the chip, a sky with a gentle gradient, Poisson and read
noise, sub-pixel pointing offsets and a small rotation per frame (each header carries a
TAN WCS consistent with the pointing), cosmic rays, hot pixels, saturated stars with
vertical bleed trails, and transients present in only a few frames. :func:`simulate_pair`
makes an already aligned science/template pair on one grid, for subtraction tests.

Everything is deterministic for a given ``seed``. The field, the detector and each frame
have their own random streams, and the transients, hot pixels and cosmic rays carry their
own noise, so switching one of them off (``cosmic_rays=False``, ``hot_pixels=False``,
``n_transients=0``) leaves every other pixel unchanged (except where a saturated star's
bleed trail meets them): subtracting the two series isolates that effect exactly.

Conventions
-----------
* Pixel coordinates are 0-based, ``x`` along the last numpy axis; pixel centres are at
  integer coordinates, and the WCS is used with ``origin=0``.
* Fluxes are total fluxes in ADU: the rendered profile of a source sums to its flux
  (profiles are truncated where they fall well below the noise and renormalised).
* A peak S/N is ``peak / sqrt(B / gain + (readnoise / gain)**2 + peak / gain)`` with ``B``
  the static signal under the source's peak (sky, galaxy and stars), all in ADU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from oasis_core.engine.headers import tan_wcs_cards

if TYPE_CHECKING:
    from astropy.io.fits import Header
    from astropy.table import Table

__all__ = ["PIXEL_SCALE", "SimSeries", "simulate_pair", "simulate_series", "write_series"]

#: Pixel scale of the simulated frames, arcsec per pixel.
PIXEL_SCALE = 0.3

_REF_AREA = 1024 * 1024
_B1 = 1.6783  # Sersic b_n for n = 1 (exponential disk)
_B4 = 7.6692  # Sersic b_n for n = 4 (de Vaucouleurs bulge)


@attrs.frozen(kw_only=True)
class SimSeries:
    """A simulated series of frames of one field, with its truth tables.

    Attributes
    ----------
    frames : list of (ndarray, astropy.io.fits.Header)
        float32 pixel data (ADU) and header of every frame, in time order.
    names : list of str
        Frame names, ``"sim_000"``, ``"sim_001"``...
    truth : astropy.table.Table
        One row per transient and frame where it is present: ``frame`` (name), ``x``,
        ``y`` (0-based pixel position in that frame), ``ra``, ``dec`` (deg), ``flux``
        (ADU, total), ``peak_snr`` (peak S/N in that frame) and ``id`` (transient id).
    stars : astropy.table.Table
        The static point sources: ``ra``, ``dec`` (deg) and ``flux`` (ADU). Its ``meta``
        holds the galaxy (``meta["galaxy"]``: ra, dec, flux, r_eff in pixels...).
    """

    frames: list[tuple[np.ndarray, Header]] = attrs.field(eq=False, repr=False)
    names: list[str]
    truth: Table = attrs.field(eq=False, repr=False)
    stars: Table = attrs.field(eq=False, repr=False)


# --------------------------------------------------------------------------- rendering


def _moffat_alpha(fwhm: np.ndarray | float, beta: float) -> np.ndarray | float:
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _moffat_stamps(
    x: np.ndarray,
    y: np.ndarray,
    fwhm: np.ndarray,
    half: int,
    *,
    beta: float,
    q: float = 1.0,
    phi: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-sum Moffat stamps of shape (n, 2*half+1, 2*half+1), all at once.

    The stamp of source ``i`` is centred on pixel ``(iy[i], ix[i])`` (the nearest pixel to
    its position) and samples the profile at the pixel centres. ``q`` is the axis ratio
    (minor/major) at position angle ``phi`` (radians, from +x towards +y); ``fwhm`` is the
    geometric mean of the two axes' FWHM.
    """
    off = np.arange(-half, half + 1, dtype=np.float64)
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    dx = (ix - x)[:, None] + off[None, :]  # (n, s) along x
    dy = (iy - y)[:, None] + off[None, :]  # (n, s) along y
    c, s = math.cos(phi), math.sin(phi)
    u = dx[:, None, :] * c + dy[:, :, None] * s  # (n, s, s): axis 1 is y, axis 2 is x
    v = dy[:, :, None] * c - dx[:, None, :] * s
    alpha2 = (np.asarray(_moffat_alpha(fwhm, beta)) ** 2)[:, None, None]
    r2 = (u * u * q + v * v / q) / alpha2
    prof = (1.0 + r2) ** (-beta)
    prof /= prof.sum(axis=(1, 2), keepdims=True)
    return prof, ix, iy


def _add_stamps(image: np.ndarray, stamps: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> None:
    """Accumulate (n, s, s) stamps centred on (iy, ix) into ``image`` (clipped at edges)."""
    ny, nx = image.shape
    half = stamps.shape[1] // 2
    off = np.arange(-half, half + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    if not ok.any():
        return
    yy, xx = np.broadcast_arrays(yy, xx)
    np.add.at(image, (yy[ok], xx[ok]), stamps[ok])


def _render_points(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: _Psf,
    floor: float,
) -> np.ndarray:
    """Image (float64) of point sources with the frame's PSF.

    Each source's stamp extends to where its profile falls below ``floor`` ADU, at least
    3 FWHM; sources are rendered in a few groups of equal stamp size, each group at once.
    """
    image = np.zeros(shape, dtype=np.float64)
    if len(x) == 0:
        return image
    fwhm = psf.fwhm_at(x, y)
    alpha = _moffat_alpha(fwhm, psf.beta)
    # radius where flux * moffat(r) = floor
    peak = flux * (psf.beta - 1.0) / (np.pi * alpha**2)
    ratio = np.maximum(peak / floor, 1.0)
    radius = alpha * np.sqrt(np.maximum(ratio ** (1.0 / psf.beta) - 1.0, 0.0))
    hmin = max(4, math.ceil(3.0 * float(fwhm.max())))
    hmax = max(hmin, min(256, max(shape) // 2))
    levels = [h for h in (hmin, 2 * hmin, 4 * hmin, 8 * hmin) if h < hmax] + [hmax]
    group = np.searchsorted(np.asarray(levels), radius)
    group = np.minimum(group, len(levels) - 1)
    for g, half in enumerate(levels):  # a handful of stamp sizes, not a loop over stars
        sel = group == g
        if not sel.any():
            continue
        stamps, ix, iy = _moffat_stamps(
            x[sel], y[sel], fwhm[sel], half, beta=psf.beta, q=psf.q, phi=psf.phi
        )
        stamps *= flux[sel][:, None, None]
        _add_stamps(image, stamps, ix, iy)
    return image


@attrs.frozen(kw_only=True)
class _Psf:
    """Moffat PSF of one frame: FWHM at the chip centre plus a linear gradient."""

    fwhm: float
    beta: float
    q: float
    phi: float
    gx: float  # fractional FWHM change across the full chip width
    gy: float
    shape: tuple[int, int]

    def fwhm_at(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        ny, nx = self.shape
        xr = (np.asarray(x, dtype=np.float64) - (nx - 1) / 2.0) / nx
        yr = (np.asarray(y, dtype=np.float64) - (ny - 1) / 2.0) / ny
        return np.asarray(self.fwhm * (1.0 + self.gx * xr + self.gy * yr), dtype=np.float64)

    def kernel(self, x: float, y: float) -> np.ndarray:
        fwhm = self.fwhm_at(np.array([x]), np.array([y]))
        half = math.ceil(4.0 * float(fwhm[0]))
        stamps, _, _ = _moffat_stamps(
            np.array([0.0]), np.array([0.0]), fwhm, half, beta=self.beta, q=self.q, phi=self.phi
        )
        return stamps[0]


def _sersic_box(
    n: int,
    xc: float,
    yc: float,
    ix0: int,
    iy0: int,
    *,
    r_eff: float,
    q: float,
    angle: float,
    b_n: float,
    index: float,
    sub: int = 3,
) -> np.ndarray:
    """Unit-sum Sersic profile on an n x n box whose first pixel is (iy0, ix0)."""
    fine = (np.arange(n * sub) + 0.5) / sub - 0.5
    fx = ix0 + fine - xc
    fy = iy0 + fine - yc
    c, s = math.cos(angle), math.sin(angle)
    u = fx[None, :] * c + fy[:, None] * s
    v = fy[:, None] * c - fx[None, :] * s
    r = np.sqrt(u * u + (v / q) ** 2 + (0.25 / sub) ** 2)
    prof = np.exp(-b_n * (r / r_eff) ** (1.0 / index))
    prof = prof.reshape(n, sub, n, sub).mean(axis=(1, 3))
    return prof / prof.sum()


def _render_galaxy(
    shape: tuple[int, int],
    gal: dict[str, float],
    xc: float,
    yc: float,
    angle: float,
    kernel: np.ndarray,
) -> np.ndarray:
    """The galaxy (disk + bulge) convolved with ``kernel``, as a full-frame image."""
    from scipy.signal import fftconvolve

    ny, nx = shape
    kh = kernel.shape[0] // 2
    half = math.ceil(5.0 * gal["r_eff"]) + kh
    n = 2 * half + 1
    ix0 = round(xc) - half
    iy0 = round(yc) - half
    box = gal["disk_flux"] * _sersic_box(
        n, xc, yc, ix0, iy0, r_eff=gal["r_eff"], q=gal["q"], angle=angle, b_n=_B1, index=1.0
    )
    box += gal["bulge_flux"] * _sersic_box(
        n,
        xc,
        yc,
        ix0,
        iy0,
        r_eff=gal["bulge_r_eff"],
        q=gal["bulge_q"],
        angle=angle,
        b_n=_B4,
        index=4.0,
    )
    box = np.clip(fftconvolve(box, kernel, mode="same"), 0.0, None)
    image = np.zeros(shape, dtype=np.float64)
    y0, x0 = max(iy0, 0), max(ix0, 0)
    y1, x1 = min(iy0 + n, ny), min(ix0 + n, nx)
    if y1 > y0 and x1 > x0:
        image[y0:y1, x0:x1] = box[y0 - iy0 : y1 - iy0, x0 - ix0 : x1 - ix0]
    return image


def _cosmic_rays(
    shape: tuple[int, int], rng: np.random.Generator, n: int, sigma: float
) -> np.ndarray:
    """Image of ``n`` cosmic-ray hits: sharp tracks 1-5 px long, 15-250 sigma per pixel."""
    ny, nx = shape
    image = np.zeros(shape, dtype=np.float64)
    if n == 0:
        return image
    x0 = rng.uniform(0, nx - 1, n)
    y0 = rng.uniform(0, ny - 1, n)
    length = rng.integers(1, 6, n)
    angle = rng.uniform(0, np.pi, n)
    amp = sigma * np.exp(rng.uniform(np.log(15.0), np.log(250.0), n))
    t = np.arange(5)
    px = np.rint(x0[:, None] + t[None, :] * np.cos(angle)[:, None]).astype(np.int64)
    py = np.rint(y0[:, None] + t[None, :] * np.sin(angle)[:, None]).astype(np.int64)
    val = amp[:, None] * rng.uniform(0.5, 1.0, (n, 5))
    ok = (t[None, :] < length[:, None]) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    np.add.at(image, (py[ok], px[ok]), val[ok])
    return image


def _saturate(image: np.ndarray, saturation: float) -> None:
    """Clip ``image`` at ``saturation`` in place, spilling the excess charge of every
    saturated column segment up and down the column (a vertical bleed trail)."""
    from scipy import ndimage

    ny, nx = image.shape
    sat = image >= saturation
    if sat.any():
        labels, _ = ndimage.label(sat)
        r, c = np.nonzero(sat)
        key = labels[r, c].astype(np.int64) * nx + c
        uniq, inv = np.unique(key, return_inverse=True)
        excess = np.bincount(inv, weights=image[r, c] - saturation)
        rmin = np.full(len(uniq), ny, dtype=np.int64)
        rmax = np.zeros(len(uniq), dtype=np.int64)
        np.minimum.at(rmin, inv, r)
        np.maximum.at(rmax, inv, r)
        col = uniq % nx
        extra = np.floor(excess / saturation).astype(np.int64)
        up = extra // 2
        lo = np.clip(rmin - (extra - up), 0, ny)
        hi = np.clip(rmax + up + 1, 0, ny)
        run = np.zeros((ny + 1, nx), dtype=np.int64)
        np.add.at(run, (lo, col), 1)
        np.add.at(run, (hi, col), -1)
        image[np.cumsum(run, axis=0)[:ny] > 0] = saturation
    np.minimum(image, saturation, out=image)


def _observe(
    model: np.ndarray,
    gain: float,
    readnoise: float,
    rng: np.random.Generator,
    depth: float = 1.0,
) -> np.ndarray:
    """Poisson (in electrons) plus read noise; ``depth`` > 1 mimics an average of frames."""
    g = gain * depth
    electrons = rng.poisson(np.clip(model, 0.0, None) * g).astype(np.float64)
    return electrons / g + rng.normal(0.0, readnoise / (gain * math.sqrt(depth)), model.shape)


def _sigma_pix(sky: float, gain: float, readnoise: float) -> float:
    return math.sqrt(sky / gain + (readnoise / gain) ** 2)


def _peak_for_snr(snr: np.ndarray, b: np.ndarray, gain: float, readnoise: float) -> np.ndarray:
    """Peak (ADU) whose S/N over background ``b`` (ADU) is ``snr``."""
    s0 = b / gain + (readnoise / gain) ** 2
    t2 = snr * snr
    return 0.5 * (t2 / gain + np.sqrt(t2 * t2 / gain**2 + 4.0 * t2 * s0))


# --------------------------------------------------------------------------- geometry


def _wcs_header(
    shape: tuple[int, int], ra0: float, dec0: float, shift: tuple[float, float], rot_deg: float
) -> dict[str, Any]:
    """TAN WCS cards of a frame offset by ``shift`` px and rotated by ``rot_deg`` from frame 0
    (:func:`oasis_core.engine.headers.tan_wcs_cards`)."""
    scale = PIXEL_SCALE / 3600.0
    cd0 = np.array([[-scale, 0.0], [0.0, scale]])
    return tan_wcs_cards(shape, ra0, dec0, cd0, shift=shift, rotation=rot_deg)


def _make_wcs(cards: dict[str, Any]) -> Any:
    from astropy.io import fits
    from astropy.wcs import WCS

    header = fits.Header()
    header.update(cards)
    header["NAXIS"] = 2
    return WCS(header)


def _header(
    wcs_cards: dict[str, Any],
    *,
    gain: float,
    readnoise: float,
    saturation: float,
    mjd: float,
    extra: dict[str, Any],
) -> Header:
    from astropy.io import fits
    from astropy.time import Time

    header = fits.Header()
    header["OBJECT"] = ("SIMFIELD", "simulated field (oasis_native.sim)")
    header["FILTER"] = "r"
    header["EXPTIME"] = (60.0, "s")
    header["DATE-OBS"] = Time(mjd, format="mjd", scale="utc").isot
    header["MJD-OBS"] = (mjd, "MJD at start of exposure")
    header["GAIN"] = (gain, "e-/ADU")
    header["RDNOISE"] = (readnoise, "e-")
    header["SATURATE"] = (saturation, "ADU, level of saturated pixels in the data")
    header["BUNIT"] = "adu"
    for key, value in wcs_cards.items():
        header[key] = value
    for key, value in extra.items():
        header[key] = value
    return header


# --------------------------------------------------------------------------- field


@attrs.frozen(kw_only=True)
class _Field:
    ra0: float
    dec0: float
    ra: np.ndarray = attrs.field(eq=False)
    dec: np.ndarray = attrs.field(eq=False)
    flux: np.ndarray = attrs.field(eq=False)
    x0: np.ndarray = attrs.field(eq=False)  # frame-0 pixel positions
    y0: np.ndarray = attrs.field(eq=False)
    galaxy: dict[str, float] | None


def _draw_field(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    n_stars: int,
    margin: float,
    f_min: float,
    f_max: float,
    n_bright: int,
    f_bright: tuple[float, float],
    galaxy: bool,
    sigma: float,
) -> _Field:
    """Stars (dN/dF ~ F^-2 between f_min and f_max, plus n_bright very bright ones) and a
    galaxy, placed in frame-0 pixels over the chip plus ``margin``, then put on the sky."""
    ny, nx = shape
    ra0 = float(rng.uniform(20.0, 340.0))
    dec0 = float(rng.uniform(-60.0, 30.0))
    # faint to bright stars over the chip plus the margin; the very bright ones on the chip
    x0 = np.concatenate(
        [
            rng.uniform(-margin, nx - 1 + margin, n_stars),
            rng.uniform(0.05, 0.95, n_bright) * (nx - 1),
        ]
    )
    y0 = np.concatenate(
        [
            rng.uniform(-margin, ny - 1 + margin, n_stars),
            rng.uniform(0.05, 0.95, n_bright) * (ny - 1),
        ]
    )
    u = rng.uniform(0.0, 1.0, n_stars)
    flux = 1.0 / (1.0 / f_min - u * (1.0 / f_min - 1.0 / f_max))  # inverse CDF of F^-2
    bright = np.exp(rng.uniform(math.log(f_bright[0]), math.log(f_bright[1]), n_bright))
    flux = np.concatenate([flux, bright])
    gal = None
    if galaxy:
        r_eff = max(5.0, 0.025 * min(shape))
        q = float(rng.uniform(0.45, 0.7))
        h = r_eff / _B1
        disk_flux = 8.0 * sigma * 2.0 * np.pi * h * h * q  # central surface brightness 8 sigma
        gal = {
            "x0": float(rng.uniform(0.35, 0.65) * (nx - 1)),
            "y0": float(rng.uniform(0.35, 0.65) * (ny - 1)),
            "angle": float(rng.uniform(0.0, np.pi)),
            "r_eff": r_eff,
            "q": q,
            "disk_flux": float(disk_flux),
            "bulge_r_eff": 0.15 * r_eff,
            "bulge_q": float(rng.uniform(0.75, 0.95)),
            "bulge_flux": float(0.4 * disk_flux),
        }
    ref = _make_wcs(_wcs_header(shape, ra0, dec0, (0.0, 0.0), 0.0))
    ra, dec = ref.wcs_pix2world(x0, y0, 0)
    if gal is not None:
        gra, gdec = ref.wcs_pix2world([gal["x0"]], [gal["y0"]], 0)
        gal["ra"], gal["dec"] = float(gra[0]), float(gdec[0])
        gal["flux"] = gal["disk_flux"] + gal["bulge_flux"]
    return _Field(ra0=ra0, dec0=dec0, ra=ra, dec=dec, flux=flux, x0=x0, y0=y0, galaxy=gal)


def _place_transients(
    rng: np.random.Generator,
    shape: tuple[int, int],
    field: _Field,
    n: int,
    *,
    margin: float,
    fwhm_max: float,
    bright_flux: float,
    sat_flux: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Frame-0 pixel positions of ``n`` transients: inside ``margin``, away from bright
    stars (and from the columns of saturated ones), apart from each other; the first one
    on the galaxy disk when there is a galaxy."""
    ny, nx = shape
    if n == 0:
        return np.zeros(0), np.zeros(0)
    if nx - 2 * margin < 1 or ny - 2 * margin < 1:
        msg = (
            f"simulate: n_transients={n}: shape {shape} leaves no room for transients "
            f"(margin {margin:.0f} px)"
        )
        raise ValueError(msg)
    m = 4000
    cx = rng.uniform(margin, nx - 1 - margin, m)
    cy = rng.uniform(margin, ny - 1 - margin, m)
    bright = field.flux > bright_flux
    bx, by, bf = field.x0[bright], field.y0[bright], field.flux[bright]
    radius = fwhm_max * (2.0 + np.log10(bf / bright_flux))
    ddx = cx[:, None] - bx[None, :]
    ddy = cy[:, None] - by[None, :]
    near = np.hypot(ddx, ddy) < radius[None, :]
    near |= (np.abs(ddx) < 3.0 * fwhm_max) & (bf[None, :] > sat_flux)  # bleed columns
    ok = ~near.any(axis=1)
    cx, cy = cx[ok], cy[ok]
    picked_x: list[float] = []
    picked_y: list[float] = []
    gal = field.galaxy
    if gal is not None:
        # one candidate on the disk, 0.5-1.2 r_eff from the nucleus along the disk
        du = cx - gal["x0"]
        dv = cy - gal["y0"]
        c, s = math.cos(gal["angle"]), math.sin(gal["angle"])
        u = du * c + dv * s
        v = (dv * c - du * s) / gal["q"]
        r = np.hypot(u, v) / gal["r_eff"]
        on = np.flatnonzero((r > 0.5) & (r < 1.2))
        if len(on):
            picked_x.append(float(cx[on[0]]))
            picked_y.append(float(cy[on[0]]))
    sep = 6.0 * fwhm_max
    for x, y in zip(cx, cy, strict=True):  # greedy pick of n (a few) positions
        if len(picked_x) >= n:
            break
        if all(
            (x - px) ** 2 + (y - py) ** 2 > sep * sep
            for px, py in zip(picked_x, picked_y, strict=True)
        ):
            picked_x.append(float(x))
            picked_y.append(float(y))
    if len(picked_x) < n:
        msg = (
            f"simulate: only {len(picked_x)} of n_transients={n} transients fit in a "
            f"{shape} frame away from bright stars; use fewer transients or a larger shape"
        )
        raise ValueError(msg)
    return np.array(picked_x), np.array(picked_y)


def _default_n_stars(shape: tuple[int, int]) -> int:
    return round(200 + 1300 * shape[0] * shape[1] / _REF_AREA)


def _truth_table(rows: dict[str, list[Any]]) -> Table:
    from astropy.table import Table

    return Table(
        {
            "frame": np.array(rows["frame"], dtype="U32"),
            "x": np.array(rows["x"], dtype=np.float64),
            "y": np.array(rows["y"], dtype=np.float64),
            "ra": np.array(rows["ra"], dtype=np.float64),
            "dec": np.array(rows["dec"], dtype=np.float64),
            "flux": np.array(rows["flux"], dtype=np.float64),
            "peak_snr": np.array(rows["peak_snr"], dtype=np.float64),
            "id": np.array(rows["id"], dtype=np.int64),
        }
    )


def _stars_table(field: _Field) -> Table:
    from astropy.table import Table

    stars = Table({"ra": field.ra, "dec": field.dec, "flux": field.flux})
    if field.galaxy is not None:
        stars.meta["galaxy"] = {
            k: field.galaxy[k]
            for k in ("ra", "dec", "flux", "r_eff", "q", "bulge_flux", "bulge_r_eff")
        }
    return stars


def _transient_flux(
    x: np.ndarray,
    y: np.ndarray,
    snr: np.ndarray,
    psf: _Psf,
    static: np.ndarray,
    gain: float,
    readnoise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fluxes giving peak S/N ``snr`` at (x, y) over the static image, and their stamps."""
    half = math.ceil(4.0 * float(psf.fwhm_at(x, y).max()))
    stamps, ix, iy = _moffat_stamps(
        x, y, psf.fwhm_at(x, y), half, beta=psf.beta, q=psf.q, phi=psf.phi
    )
    ny, nx = static.shape
    b = static[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)]
    peak = _peak_for_snr(snr, b, gain, readnoise)
    flux = peak / stamps.max(axis=(1, 2))
    return flux, stamps * flux[:, None, None]


# --------------------------------------------------------------------------- public API


def simulate_series(
    n_frames: int = 12,
    shape: tuple[int, int] = (1024, 1024),
    *,
    seed: int = 0,
    n_stars: int | None = None,
    n_transients: int = 8,
    fwhm_range: tuple[float, float] = (2.5, 5.0),
    sky: tuple[float, float] = (200.0, 800.0),
    gain: float = 1.5,
    readnoise: float = 5.0,
    saturation: float = 60000.0,
    max_shift: float = 8.0,
    max_rotation_deg: float = 0.3,
    galaxy: bool = True,
    cosmic_rays: bool = True,
    hot_pixels: bool = True,
    sky_subtracted: bool = False,
    star_density: float | None = None,
    frame_fwhm: Sequence[float] | None = None,
    frame_ellipticity: Sequence[float] | None = None,
    frame_angle: Sequence[float] | None = None,
    variables: Sequence[tuple[float, float, Callable[[float], float]]] | None = None,
) -> SimSeries:
    """Simulate a series of frames of one field.

    Parameters
    ----------
    n_frames : int
        Number of frames.
    shape : tuple of int
        Frame shape ``(ny, nx)``.
    seed : int
        Seed of every random choice; equal seeds give identical series.
    n_stars : int, optional
        Static stars (plus a few saturated ones); default ``200 + 1300 * area / 1024**2``.
    n_transients : int
        Transients; each is present in 1-2 consecutive frames, never in a majority of
        the frames, with peak S/N between 5 and 100 (spread from faint to obvious).
    fwhm_range : tuple of float
        Range of the per-frame FWHM (pixels, at the chip centre); it also varies by a few
        per cent across the chip.
    sky : tuple of float
        Range of the per-frame sky level (ADU, at the chip centre); the sky has a gentle
        linear gradient.
    gain, readnoise : float
        e-/ADU and e-.
    saturation : float
        Saturation level (ADU); pixels are clipped there and bleed vertically.
    max_shift : float
        Largest pointing offset in x and y (pixels) of a frame from frame 0.
    max_rotation_deg : float
        Largest rotation (degrees) of a frame with respect to frame 0.
    galaxy, cosmic_rays, hot_pixels : bool
        Add the galaxy, the cosmic rays (tens per frame) and the hot pixels (the same
        detector pixels in every frame).
    sky_subtracted : bool
        Subtract the (smooth) sky model from the data; ``SATURATE`` then holds the lowest
        value a saturated pixel can have.
    star_density : float, optional
        Static stars per 100 px**2 (over the chip and the margin around it that shifts
        and rotations bring in), instead of ``n_stars``: 2 or more is a crowded field,
        where most pixels are on some star's wings.
    frame_fwhm : sequence of float, optional
        The FWHM (px, at the chip centre) of each frame, one per frame, instead of
        drawing it from ``fwhm_range`` (e.g. some frames twice the best seeing).
    frame_ellipticity : sequence of float, optional
        The PSF ellipticity ``1 - minor / major`` of each frame, in [0, 1), instead of the
        default near-round PSFs (axis ratio drawn in 0.9-1.0); ``fwhm`` is then the
        geometric mean of the two axes' FWHM (``SIMFWHM``, ``SIMQ`` = axis ratio).
    frame_angle : sequence of float, optional
        The position angle (degrees, from +x towards +y) of each frame's major axis,
        instead of a random one (``SIMPA``).
    variables : sequence of (x, y, function), optional
        Point sources whose flux changes: ``(x, y)`` their 0-based position in frame 0's
        pixels, ``function(mjd) -> flux`` (ADU, >= 0) of the frame's mid-exposure MJD.
        Each is rendered with the frame's PSF into the scene before its noise is drawn,
        so a variable's photon noise is the frame's; the fluxes used are in
        ``stars.meta["variables"]`` (one list per source, one flux per frame). They use
        no random draw: the rest of the series is the same with or without them.

        With none of the last four the series is exactly the one of earlier versions
        (the same draws, in the same order, for a given ``seed``). A crowded series of
        elongated frames, e.g. for the crowded rows of ``benchmarks/subtract.py``::

            simulate_series(8, (256, 256), star_density=2.0,
                            frame_fwhm=[3.0, 3.2, 3.4, 6.0, 6.4, 3.6, 3.5, 4.0],
                            frame_ellipticity=[0, 0, 0.1, 0, 0.1, 0.5, 0.5, 0.3],
                            frame_angle=[0, 0, 0, 0, 0, 90, 45, 0])

    Returns
    -------
    SimSeries
        The frames with their headers (``GAIN``, ``RDNOISE``, ``SATURATE``, ``EXPTIME``,
        ``FILTER``, ``DATE-OBS``, ``MJD-OBS``, ``OBJECT``, a TAN WCS and ``SIM*`` cards
        with the simulation parameters), the transient truth and the static sources.

    Raises
    ------
    ValueError
        When an argument is out of range or the transients do not fit in the frame.

    Examples
    --------
    >>> series = simulate_series(3, (128, 128), n_transients=1, seed=1)
    >>> series.names
    ['sim_000', 'sim_001', 'sim_002']
    >>> series.frames[0][0].dtype
    dtype('float32')
    """
    if n_frames < 1:
        raise ValueError(f"simulate_series: n_frames must be >= 1, got {n_frames}")
    if len(shape) != 2 or min(shape) < 32:
        raise ValueError(f"simulate_series: shape must be (ny, nx) >= 32 px, got {shape}")
    if not 0 < fwhm_range[0] <= fwhm_range[1]:
        msg = f"simulate_series: fwhm_range must be increasing and > 0, got {fwhm_range}"
        raise ValueError(msg)
    per_frame = _per_frame_psf(n_frames, frame_fwhm, frame_ellipticity, frame_angle)
    if per_frame["fwhm"] is not None:
        fwhm_range = (min(per_frame["fwhm"]), max(per_frame["fwhm"]))
    if star_density is not None and not star_density > 0:
        raise ValueError(f"simulate_series: star_density must be > 0, got {star_density}")
    shape = (int(shape[0]), int(shape[1]))
    ny, nx = shape
    root = np.random.SeedSequence(seed)
    field_seq, det_seq, frames_seq = root.spawn(3)
    frame_seqs = frames_seq.spawn(n_frames)
    frng = np.random.default_rng(field_seq)

    sky_mid = 0.5 * (sky[0] + sky[1])
    fwhm_mid = 0.5 * (fwhm_range[0] + fwhm_range[1])
    sigma_mid = _sigma_pix(sky_mid, gain, readnoise)
    pf_mid = (3.0 - 1.0) / (np.pi * _moffat_alpha(fwhm_mid, 3.0) ** 2)  # Moffat peak / flux
    f_min = 2.5 * sigma_mid / pf_mid
    f_sat = (saturation - sky_mid) / pf_mid
    n_bright = max(1, round(3 * nx * ny / _REF_AREA))
    rot_margin = math.radians(max_rotation_deg) * 0.5 * math.hypot(nx, ny)
    margin = max_shift + rot_margin + 4.0 * fwhm_range[1]
    if star_density is not None:
        n_stars = round(star_density * (nx + 2 * margin) * (ny + 2 * margin) / 100.0)
    elif n_stars is None:
        n_stars = _default_n_stars(shape)
    field = _draw_field(
        frng,
        shape,
        n_stars=n_stars,
        margin=margin,
        f_min=f_min,
        f_max=20.0 * f_sat,
        n_bright=n_bright,
        f_bright=(3.0 * f_sat, 20.0 * f_sat),
        galaxy=galaxy,
        sigma=sigma_mid,
    )

    # transients: positions on the sky, the frames they are in, target peak S/N
    t_margin = max_shift + rot_margin + 4.0 * fwhm_range[1] + 5.0
    tx0, ty0 = _place_transients(
        frng,
        shape,
        field,
        n_transients,
        margin=t_margin,
        fwhm_max=fwhm_range[1],
        bright_flux=10.0 * f_min,
        sat_flux=0.5 * f_sat,
    )
    ref = _make_wcs(_wcs_header(shape, field.ra0, field.dec0, (0.0, 0.0), 0.0))
    t_ra, t_dec = ref.wcs_pix2world(tx0, ty0, 0) if n_transients else (np.zeros(0),) * 2
    # at most 2 frames: a median template of >= 5 frames can never contain a transient
    max_present = max(1, min(2, (n_frames - 1) // 3))
    t_len = frng.integers(1, max_present + 1, n_transients)
    t_start = frng.integers(0, n_frames - t_len + 1)
    t_snr = frng.permutation(np.geomspace(6.0, 85.0, n_transients)) if n_transients else np.zeros(0)

    # detector: hot pixels at fixed positions
    drng = np.random.default_rng(det_seq)
    n_hot = max(3, round(20 * nx * ny / _REF_AREA))
    hot_y = drng.integers(0, ny, n_hot)
    hot_x = drng.integers(0, nx, n_hot)
    hot_val = np.exp(drng.uniform(math.log(500.0), math.log(20000.0), n_hot))

    mjd = 60000.0 + float(frng.uniform(0.0, 1.0))
    var_flux: list[list[float]] = [[] for _ in variables or ()]
    if variables:
        v_ra, v_dec = ref.wcs_pix2world(
            np.array([v[0] for v in variables], float),
            np.array([v[1] for v in variables], float),
            0,
        )
    yy = (np.arange(ny, dtype=np.float64) - (ny - 1) / 2.0)[:, None] / ny
    xx = (np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0)[None, :] / nx
    frames: list[tuple[np.ndarray, Any]] = []
    names: list[str] = []
    columns = ("frame", "x", "y", "ra", "dec", "flux", "peak_snr", "id")
    rows: dict[str, list[Any]] = {k: [] for k in columns}
    for k in range(n_frames):  # a loop over frames, each rendered with whole-array numpy
        geo, noise_seq, cr_seq, hot_seq, tr_seq = frame_seqs[k].spawn(5)
        grng = np.random.default_rng(geo)
        name = f"sim_{k:03d}"
        fwhm = float(grng.uniform(*fwhm_range))
        gmag, gdir = grng.uniform(0.02, 0.05), grng.uniform(0, 2 * np.pi)
        beta, q, phi = (
            float(grng.uniform(2.5, 3.5)),
            float(grng.uniform(0.9, 1.0)),
            float(grng.uniform(0, np.pi)),
        )
        # per-frame choices replace the draws after they are made: the streams stay
        if per_frame["fwhm"] is not None:
            fwhm = float(per_frame["fwhm"][k])
        if per_frame["ellipticity"] is not None:
            q = 1.0 - float(per_frame["ellipticity"][k])
        if per_frame["angle"] is not None:
            phi = math.radians(float(per_frame["angle"][k]))
        psf = _Psf(
            fwhm=fwhm,
            beta=beta,
            q=q,
            phi=phi,
            gx=gmag * math.cos(gdir),
            gy=gmag * math.sin(gdir),
            shape=shape,
        )
        sky_k = float(grng.uniform(*sky))
        sgx, sgy = grng.uniform(-0.04, 0.04, 2)
        if k == 0:
            shift, rot = (0.0, 0.0), 0.0
        else:
            shift = (
                float(grng.uniform(-max_shift, max_shift)),
                float(grng.uniform(-max_shift, max_shift)),
            )
            rot = float(grng.uniform(-max_rotation_deg, max_rotation_deg))
        if k > 0:
            mjd += float(grng.uniform(0.5, 3.0))
        cards = _wcs_header(shape, field.ra0, field.dec0, shift, rot)
        wcs = _make_wcs(cards)

        sky_map = sky_k * (1.0 + sgx * xx + sgy * yy)
        sigma = _sigma_pix(sky_k, gain, readnoise)
        sx, sy = wcs.wcs_world2pix(field.ra, field.dec, 0)
        model = sky_map + _render_points(shape, sx, sy, field.flux, psf, 0.3 * sigma)
        if variables:
            mid = mjd + 30.0 / 86400.0  # EXPTIME / 2
            vflux = np.array([max(0.0, float(fn(mid))) for _, _, fn in variables])
            for i, value in enumerate(vflux):
                var_flux[i].append(float(value))
            vx, vy = wcs.wcs_world2pix(v_ra, v_dec, 0)
            model += _render_points(shape, vx, vy, vflux, psf, 0.3 * sigma)
        if field.galaxy is not None:
            gal = field.galaxy
            gx, gy = wcs.wcs_world2pix([gal["ra"]], [gal["dec"]], 0)
            ax, ay = _axis_in_frame(ref, wcs, gal["x0"], gal["y0"], gal["angle"])
            angle = math.atan2(ay, ax)
            model += _render_galaxy(
                shape,
                gal,
                float(gx[0]),
                float(gy[0]),
                angle,
                psf.kernel(float(gx[0]), float(gy[0])),
            )
        # transients present in this frame
        here = np.flatnonzero((t_start <= k) & (k < t_start + t_len))
        if len(here):
            trx, try_ = wcs.wcs_world2pix(t_ra[here], t_dec[here], 0)
            snr = np.clip(t_snr[here] * grng.uniform(0.85, 1.15, len(here)), 5.0, 100.0)
            # model so far = the static sky + stars + galaxy under each transient
            tflux, stamps = _transient_flux(trx, try_, snr, psf, model, gain, readnoise)
            trng = np.random.default_rng(tr_seq)
            t_noisy = trng.poisson(stamps * gain) / gain
            t_ix, t_iy = np.rint(trx).astype(np.int64), np.rint(try_).astype(np.int64)
            rows["frame"] += [name] * len(here)
            rows["x"] += list(trx)
            rows["y"] += list(try_)
            rows["ra"] += list(t_ra[here])
            rows["dec"] += list(t_dec[here])
            rows["flux"] += list(tflux)
            rows["peak_snr"] += list(snr)
            rows["id"] += list(here)
        # Poisson noise of the static scene; transients, hot pixels and cosmic rays come
        # with their own noise streams, so switching them off changes no other pixel
        image = _observe(model, gain, readnoise, np.random.default_rng(noise_seq))
        if len(here):
            _add_stamps(image, t_noisy, t_ix, t_iy)
        if hot_pixels:
            hrng = np.random.default_rng(hot_seq)
            np.add.at(image, (hot_y, hot_x), hrng.poisson(hot_val * gain) / gain)
        n_cr = 0
        if cosmic_rays:
            crng = np.random.default_rng(cr_seq)
            n_cr = int(crng.poisson(10 + 40 * nx * ny / _REF_AREA))
            image += _cosmic_rays(shape, crng, n_cr, sigma)
        _saturate(image, saturation)
        sat_level = saturation
        if sky_subtracted:
            image -= sky_map
            sat_level = saturation - float(sky_map.max())
        header = _header(
            cards,
            gain=gain,
            readnoise=readnoise,
            saturation=sat_level,
            mjd=mjd,
            extra={
                "SKYSUB": (sky_subtracted, "sky level subtracted from the data"),
                "SIMSKY": (sky_k, "[ADU] simulated sky level at the chip centre"),
                "SIMFWHM": (fwhm, "[px] simulated PSF FWHM at the chip centre"),
                "SIMBETA": (psf.beta, "simulated Moffat beta"),
                "SIMQ": (psf.q, "simulated PSF axis ratio"),
                "SIMPA": (math.degrees(psf.phi), "[deg] simulated PSF major axis angle"),
                "SIMDX": (shift[0], "[px] offset from frame 0 along x"),
                "SIMDY": (shift[1], "[px] offset from frame 0 along y"),
                "SIMROT": (rot, "[deg] rotation from frame 0"),
                "SIMNCR": (n_cr, "cosmic rays added"),
                "SIMSEED": (seed, "simulation seed"),
            },
        )
        frames.append((image.astype(np.float32), header))
        names.append(name)
    truth = _truth_table(rows)
    stars = _stars_table(field)
    if variables:
        stars.meta["variables"] = var_flux
    return SimSeries(frames=frames, names=names, truth=truth, stars=stars)


def _per_frame_psf(
    n_frames: int,
    fwhm: Sequence[float] | None,
    ellipticity: Sequence[float] | None,
    angle: Sequence[float] | None,
) -> dict[str, list[float] | None]:
    """The per-frame PSF choices of :func:`simulate_series`, checked (one per frame)."""
    from oasis_core.contracts.validators import finite, in_range, positive

    out: dict[str, list[float] | None] = {}
    for key, values, check in (
        ("fwhm", fwhm, positive),
        ("ellipticity", ellipticity, in_range(0, 1, hi_open=True)),
        ("angle", angle, finite),
    ):
        if values is None:
            out[key] = None
            continue
        vals = [float(v) for v in values]
        if len(vals) != n_frames:
            msg = f"simulate_series: frame_{key} has {len(vals)} values, need n_frames={n_frames}"
            raise ValueError(msg)
        if not all(check.test(v) for v in vals):
            raise ValueError(f"simulate_series: every frame_{key} value must be {check.words()}")
        out[key] = vals
    return out


def _axis_in_frame(ref: Any, wcs: Any, x0: float, y0: float, angle: float) -> tuple[float, float]:
    """Direction in ``wcs`` pixels of the frame-0 direction ``angle`` at (x0, y0)."""
    px = np.array([x0, x0 + 10.0 * math.cos(angle)])
    py = np.array([y0, y0 + 10.0 * math.sin(angle)])
    ra, dec = ref.wcs_pix2world(px, py, 0)
    fx, fy = wcs.wcs_world2pix(ra, dec, 0)
    return float(fx[1] - fx[0]), float(fy[1] - fy[0])


def write_series(series: SimSeries, directory: str | Path) -> list[Path]:
    """Write each frame of ``series`` to ``directory/<name>.fits``.

    Parameters
    ----------
    series : SimSeries
        What :func:`simulate_series` returned.
    directory : str or Path
        Output folder; created when missing. Existing files of the same names are
        overwritten.

    Returns
    -------
    list of Path
        The written files, in frame order.
    """
    from astropy.io import fits

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (data, header) in zip(series.names, series.frames, strict=True):
        path = directory / f"{name}.fits"
        fits.PrimaryHDU(data=data, header=header).writeto(path, overwrite=True)
        paths.append(path)
    return paths


def simulate_pair(
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    fwhm_science: float = 4.0,
    fwhm_template: float = 3.0,
    n_stars: int | None = None,
    sky: float = 300.0,
    gain: float = 1.5,
    readnoise: float = 5.0,
    transients: int = 3,
    psf_gradient: float = 0.0,
    template_depth: float = 1.0,
    sky_subtracted: bool = False,
    ellipticity_science: float = 0.0,
    angle_science: float = 0.0,
    ellipticity_template: float = 0.0,
    angle_template: float = 0.0,
) -> tuple[tuple[np.ndarray, Header], tuple[np.ndarray, Header], Table]:
    """Simulate an aligned science/template pair on one pixel grid.

    Both images see the same stars and galaxy (no star saturates, no cosmic rays or hot
    pixels) through Moffat PSFs (beta 3) of different widths, circular unless an
    ellipticity is given, with a flat sky of equal level; the transients are in the
    science image only.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``.
    seed : int
        Seed of every random choice.
    fwhm_science, fwhm_template : float
        PSF FWHM (pixels) at the chip centre of each image.
    n_stars : int, optional
        Static stars; default ``200 + 1300 * area / 1024**2``.
    sky : float
        Sky level (ADU) of both images.
    gain, readnoise : float
        e-/ADU and e- of one exposure.
    transients : int
        Transients in the science image, peak S/N from 6 (faint) to 100 (obvious).
    psf_gradient : float
        Fractional FWHM change across the chip width (x), in both images: the FWHM at
        ``x`` is ``fwhm * (1 + psf_gradient * (x - xc) / nx)``.
    template_depth : float
        Template noise as an average of this many exposures (variance / depth); its
        header carries the effective ``GAIN = gain * depth`` and
        ``RDNOISE = readnoise * sqrt(depth)``.
    sky_subtracted : bool
        Subtract the sky level from both images.
    ellipticity_science, ellipticity_template : float
        PSF ellipticity ``1 - minor / major`` of each image, in [0, 1) (default round);
        the FWHM is then the geometric mean of the two axes'. E.g. 0.5 in the science
        along x and a round template of the same FWHM: the science is narrower than the
        template along y and wider along x, so neither PSF contains the other.
    angle_science, angle_template : float
        Position angle (degrees, from +x towards +y) of each image's major axis.

    Returns
    -------
    (science, science_header), (template, template_header), truth
        float32 images with headers (shared TAN WCS), and the transient truth table
        (columns as :attr:`SimSeries.truth`, ``frame`` = ``"science"``).

    Examples
    --------
    >>> (sci, sh), (tpl, th), truth = simulate_pair((128, 128), transients=1)
    >>> sci.shape == tpl.shape == (128, 128), len(truth)
    (True, 1)
    """
    if template_depth <= 0:
        raise ValueError(f"simulate_pair: template_depth must be > 0, got {template_depth}")
    if min(fwhm_science, fwhm_template) <= 0:
        raise ValueError("simulate_pair: fwhm_science and fwhm_template must be > 0")
    if not (0 <= ellipticity_science < 1 and 0 <= ellipticity_template < 1):
        msg = "simulate_pair: ellipticity_science and ellipticity_template must be in [0, 1)"
        raise ValueError(msg)
    # an elongated PSF reaches 1 / sqrt(q) times its FWHM along its major axis
    widest = max(
        fwhm_science / math.sqrt(1.0 - ellipticity_science),
        fwhm_template / math.sqrt(1.0 - ellipticity_template),
    )
    shape = (int(shape[0]), int(shape[1]))
    root = np.random.SeedSequence(seed)
    field_seq, sci_seq, tpl_seq, tr_seq = root.spawn(4)
    frng = np.random.default_rng(field_seq)
    saturation = 60000.0
    sigma = _sigma_pix(sky, gain, readnoise)
    fwhm_max = widest * (1.0 + abs(psf_gradient))
    fwhm_min = min(fwhm_science, fwhm_template) * (1.0 - min(abs(psf_gradient), 0.5))
    pf_min = 2.0 / (np.pi * _moffat_alpha(fwhm_max, 3.0) ** 2)
    pf_max = 2.0 / (np.pi * _moffat_alpha(fwhm_min, 3.0) ** 2)
    f_min = 2.5 * sigma / pf_min
    f_max = 0.5 * (saturation - sky) / pf_max  # nothing saturates
    if n_stars is None:
        n_stars = _default_n_stars(shape)
    field = _draw_field(
        frng,
        shape,
        n_stars=n_stars,
        margin=4.0 * fwhm_max,
        f_min=f_min,
        f_max=f_max,
        n_bright=0,
        f_bright=(f_max, f_max),
        galaxy=True,
        sigma=sigma,
    )
    tx, ty = _place_transients(
        frng,
        shape,
        field,
        transients,
        margin=4.0 * fwhm_max + 5.0,
        fwhm_max=fwhm_max,
        bright_flux=10.0 * f_min,
        sat_flux=np.inf,
    )
    t_snr = np.geomspace(6.0, 100.0, transients) if transients else np.zeros(0)
    cards = _wcs_header(shape, field.ra0, field.dec0, (0.0, 0.0), 0.0)
    wcs = _make_wcs(cards)
    t_ra, t_dec = wcs.wcs_pix2world(tx, ty, 0) if transients else (np.zeros(0),) * 2
    mjd = 60000.0 + float(frng.uniform(0.0, 1.0))
    gal = field.galaxy
    assert gal is not None

    def render(fwhm: float, ellipticity: float, angle: float) -> tuple[np.ndarray, _Psf]:
        psf = _Psf(
            fwhm=fwhm,
            beta=3.0,
            q=1.0 - ellipticity,
            phi=math.radians(angle),
            gx=psf_gradient,
            gy=0.0,
            shape=shape,
        )
        model = np.full(shape, sky, dtype=np.float64)
        model += _render_points(shape, field.x0, field.y0, field.flux, psf, 0.3 * sigma)
        model += _render_galaxy(
            shape, gal, gal["x0"], gal["y0"], gal["angle"], psf.kernel(gal["x0"], gal["y0"])
        )
        return model, psf

    sci_model, sci_psf = render(fwhm_science, ellipticity_science, angle_science)
    tflux = np.zeros(0)
    if transients:
        tflux, stamps = _transient_flux(tx, ty, t_snr, sci_psf, sci_model, gain, readnoise)
    tpl_model, _ = render(fwhm_template, ellipticity_template, angle_template)
    science = _observe(sci_model, gain, readnoise, np.random.default_rng(sci_seq))
    if transients:  # with their own noise stream: transients=0 changes no other pixel
        noisy = np.random.default_rng(tr_seq).poisson(stamps * gain) / gain
        _add_stamps(science, noisy, np.rint(tx).astype(np.int64), np.rint(ty).astype(np.int64))
    template = _observe(
        tpl_model, gain, readnoise, np.random.default_rng(tpl_seq), depth=template_depth
    )
    for image in (science, template):
        np.minimum(image, saturation, out=image)
        if sky_subtracted:
            image -= sky
    sat_level = saturation - sky if sky_subtracted else saturation
    common = {
        "SKYSUB": (sky_subtracted, "sky level subtracted from the data"),
        "SIMSKY": (sky, "[ADU] simulated sky level"),
        "SIMBETA": (3.0, "simulated Moffat beta"),
        "SIMGRAD": (psf_gradient, "fractional FWHM change across the chip (x)"),
        "SIMSEED": (seed, "simulation seed"),
    }
    sci_header = _header(
        cards,
        gain=gain,
        readnoise=readnoise,
        saturation=sat_level,
        mjd=mjd + 30.0,
        extra={
            **common,
            "SIMFWHM": (fwhm_science, "[px] PSF FWHM"),
            "SIMQ": (1.0 - ellipticity_science, "simulated PSF axis ratio"),
            "SIMPA": (angle_science, "[deg] simulated PSF major axis angle"),
        },
    )
    tpl_header = _header(
        cards,
        gain=gain * template_depth,
        readnoise=readnoise * math.sqrt(template_depth),
        saturation=sat_level,
        mjd=mjd,
        extra={
            **common,
            "SIMFWHM": (fwhm_template, "[px] PSF FWHM"),
            "SIMQ": (1.0 - ellipticity_template, "simulated PSF axis ratio"),
            "SIMPA": (angle_template, "[deg] simulated PSF major axis angle"),
            "SIMDEPTH": (template_depth, "template depth (exposures)"),
        },
    )
    sci_header["OBJECT"] = "SIMFIELD science"
    tpl_header["OBJECT"] = "SIMFIELD template"
    truth = _truth_table(
        {
            "frame": ["science"] * transients,
            "x": list(tx),
            "y": list(ty),
            "ra": list(t_ra),
            "dec": list(t_dec),
            "flux": list(tflux),
            "peak_snr": list(t_snr),
            "id": list(range(transients)),
        }
    )
    return (
        (science.astype(np.float32), sci_header),
        (template.astype(np.float32), tpl_header),
        truth,
    )
