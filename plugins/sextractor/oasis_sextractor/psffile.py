"""PSFEx ``.psf`` files: reading one, evaluating it at a position, writing one from a stamp.

A PSFEx model is a FITS binary table ``PSF_DATA`` with one row and one column,
``PSF_MASK``, of shape ``(PSFAXIS3, PSFAXIS2, PSFAXIS1)``: one image per term of a
polynomial in the context variables (``POLNAMEi``, usually ``X_IMAGE`` and ``Y_IMAGE``,
1-based SExtractor pixels), each scaled as ``(value - POLZEROi) / POLSCALi``. The images are
sampled every ``PSF_SAMP`` image pixels, centred on pixel ``PSFAXIS // 2``.

Terms follow PSFEx's ordering: exponent vectors with the first variable's exponent running
fastest, keeping those whose total degree within each group (``POLGRPi``) is at most that
group's ``POLDEGj``; for ``X_IMAGE, Y_IMAGE`` of degree 2 that is 1, x, x², y, xy, y².
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

__all__ = [
    "PsfexModel",
    "measure_fwhm",
    "polynomial_exponents",
    "read_psfex",
    "write_psfex",
]


@attrs.frozen(kw_only=True)
class PsfexModel:
    """A PSFEx model read from a ``.psf`` file.

    Attributes
    ----------
    basis : ndarray
        ``(nterms, ny, nx)`` images, one per polynomial term.
    names : tuple of str
        Context variables (``POLNAMEi``).
    zero, scale : tuple of float
        ``POLZEROi`` and ``POLSCALi``.
    groups : tuple of int
        Group (1-based) of each variable (``POLGRPi``).
    degrees : tuple of int
        Degree of each group (``POLDEGj``).
    sampling : float
        ``PSF_SAMP``: PSF pixel step in image pixels.
    fwhm : float
        ``PSF_FWHM`` (image pixels), nan when absent.
    loaded, accepted : int
        Stars PSFEx loaded and kept (``LOADED``, ``ACCEPTED``).
    chi2 : float
        PSFEx's final reduced chi2 (``CHI2``).
    """

    basis: np.ndarray = attrs.field(eq=False, repr=False)
    names: tuple[str, ...] = ()
    zero: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    groups: tuple[int, ...] = ()
    degrees: tuple[int, ...] = ()
    sampling: float = 1.0
    fwhm: float = float("nan")
    loaded: int = 0
    accepted: int = 0
    chi2: float = float("nan")

    @property
    def degree(self) -> int:
        """The highest degree of the spatial variation (0 for a constant PSF)."""
        return max(self.degrees, default=0)

    def evaluate(self, x: float, y: float) -> np.ndarray:
        """The PSF at the 1-based SExtractor position (``x``, ``y``), at the model's
        sampling and as stored (not normalised).

        Context variables named ``X*_IMAGE`` / ``Y*_IMAGE`` take ``x`` / ``y``; any other
        takes its mean value (``POLZERO``).
        """
        if not self.names:
            return np.array(self.basis[0], dtype=np.float64)
        values = []
        for name, zero, scale in zip(self.names, self.zero, self.scale, strict=True):
            upper = name.strip().upper()
            if upper.endswith("_IMAGE") and upper.startswith("X"):
                values.append((x - zero) / scale)
            elif upper.endswith("_IMAGE") and upper.startswith("Y"):
                values.append((y - zero) / scale)
            else:
                values.append(0.0)
        exps = polynomial_exponents(self.groups, self.degrees)
        terms = np.prod(np.power(np.asarray(values)[None, :], exps), axis=1)
        return np.tensordot(terms, np.asarray(self.basis, np.float64), axes=1)

    def image(self, x: float, y: float) -> np.ndarray:
        """The PSF at (``x``, ``y``) (1-based) on the image's pixel grid: resampled when
        ``sampling`` is not 1 (cubic spline, odd size, centred), normalised to unit sum.

        Raises
        ------
        ValueError
            When the PSF sums to zero or less.
        """
        from scipy import ndimage

        stamp = self.evaluate(x, y)
        if abs(self.sampling - 1.0) > 1e-6:
            cy, cx = stamp.shape[0] // 2, stamp.shape[1] // 2
            half = max(1, math.floor(min(cy, cx) * self.sampling))
            grid = np.arange(-half, half + 1, dtype=np.float64) / self.sampling
            yy, xx = np.meshgrid(cy + grid, cx + grid, indexing="ij")
            stamp = ndimage.map_coordinates(stamp, [yy, xx], order=3, mode="constant")
        total = float(stamp.sum())
        if not (math.isfinite(total) and total > 0):
            raise ValueError(f"the PSFEx model sums to {total}")
        return stamp / total


def polynomial_exponents(groups: tuple[int, ...], degrees: tuple[int, ...]) -> np.ndarray:
    """Exponents ``(nterms, nvars)`` of PSFEx's polynomial terms, in PSFEx's order.

    Parameters
    ----------
    groups : tuple of int
        Group (1-based) of each variable.
    degrees : tuple of int
        Degree of each group.

    Returns
    -------
    ndarray of int

    Examples
    --------
    >>> polynomial_exponents((1, 1), (2,)).tolist()
    [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [0, 2]]
    """
    n = len(groups)
    if n == 0:
        return np.zeros((1, 0), dtype=np.int64)
    top = max(degrees, default=0)
    rows = []
    # itertools.product varies the last position fastest: reverse to make the first fastest
    for combo in itertools.product(range(top + 1), repeat=n):
        exps = combo[::-1]
        totals = [0] * len(degrees)
        for e, g in zip(exps, groups, strict=True):
            totals[g - 1] += e
        if all(t <= d for t, d in zip(totals, degrees, strict=True)):
            rows.append(exps)
    return np.asarray(rows, dtype=np.int64)


def read_psfex(path: Path) -> PsfexModel:
    """Read a PSFEx ``.psf`` file.

    Parameters
    ----------
    path : Path

    Returns
    -------
    PsfexModel

    Raises
    ------
    OSError, KeyError, ValueError
        When the file is not a PSFEx model or its terms do not match its polynomial.
    """
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        hdu = hdul["PSF_DATA"]
        h = hdu.header
        basis = np.array(hdu.data["PSF_MASK"][0], dtype=np.float64)
    if basis.ndim == 2:
        basis = basis[None]
    naxis = int(h.get("POLNAXIS", 0))
    names = tuple(str(h[f"POLNAME{i}"]).strip() for i in range(1, naxis + 1))
    zero = tuple(float(h[f"POLZERO{i}"]) for i in range(1, naxis + 1))
    scale = tuple(float(h[f"POLSCAL{i}"]) for i in range(1, naxis + 1))
    groups = tuple(int(h.get(f"POLGRP{i}", 1)) for i in range(1, naxis + 1))
    ngroup = int(h.get("POLNGRP", max(groups, default=0)))
    degrees = tuple(int(h[f"POLDEG{j}"]) for j in range(1, ngroup + 1)) if naxis else ()
    nterms = len(polynomial_exponents(groups, degrees)) if naxis else 1
    if basis.shape[0] != nterms:
        msg = f"{Path(path).name}: {basis.shape[0]} PSF_MASK planes for {nterms} polynomial terms"
        raise ValueError(msg)
    return PsfexModel(
        basis=basis,
        names=names,
        zero=zero,
        scale=scale,
        groups=groups,
        degrees=degrees,
        sampling=float(h.get("PSF_SAMP", 1.0)),
        fwhm=float(h.get("PSF_FWHM", float("nan"))),
        loaded=int(h.get("LOADED", 0)),
        accepted=int(h.get("ACCEPTED", 0)),
        chi2=float(h.get("CHI2", float("nan"))),
    )


def write_psfex(path: Path, image: np.ndarray, fwhm: float) -> None:
    """Write a constant PSF stamp as a PSFEx model SExtractor can read (``PSF_NAME``).

    Parameters
    ----------
    path : Path
    image : ndarray
        The PSF on the image's pixel grid (odd size, centred); stored normalised to unit
        sum, ``PSF_SAMP = 1``, ``POLNAXIS = 0`` (no spatial variation).
    fwhm : float
        FWHM in pixels (``PSF_FWHM``).
    """
    from astropy.io import fits

    stamp = np.asarray(image, dtype=np.float64)
    stamp = (stamp / stamp.sum()).astype(np.float32)
    ny, nx = stamp.shape
    column = fits.Column(
        name="PSF_MASK", format=f"{stamp.size}E", dim=f"({nx}, {ny}, 1)", array=stamp[None, None]
    )
    table = fits.BinTableHDU.from_columns([column], name="PSF_DATA")
    cards: list[tuple[str, Any, str]] = [
        ("LOADED", 1, "Number of loaded sources"),
        ("ACCEPTED", 1, "Number of accepted sources"),
        ("CHI2", 1.0, "Final reduced chi2"),
        ("POLNAXIS", 0, "Number of context parameters"),
        ("POLNGRP", 0, "Number of context groups"),
        ("PSF_FWHM", float(fwhm), "PSF FWHM in image pixels"),
        ("PSF_SAMP", 1.0, "Sampling step of the PSF data in image pixels"),
        ("PSFNAXIS", 3, "Dimensionality of the PSF data"),
        ("PSFAXIS1", nx, "Number of element along this axis"),
        ("PSFAXIS2", ny, "Number of element along this axis"),
        ("PSFAXIS3", 1, "Number of element along this axis"),
    ]
    for key, value, comment in cards:
        table.header[key] = (value, comment)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path, overwrite=True)


def measure_fwhm(image: np.ndarray) -> tuple[float, float]:
    """FWHM and Moffat beta of a PSF stamp from a least-squares Moffat fit.

    Parameters
    ----------
    image : ndarray
        Odd-sized stamp centred on the PSF.

    Returns
    -------
    fwhm, beta : float
        nan when the fit fails.
    """
    from scipy.optimize import least_squares

    stamp = np.asarray(image, dtype=np.float64)
    half_y, half_x = stamp.shape[0] // 2, stamp.shape[1] // 2
    yy, xx = np.meshgrid(
        np.arange(stamp.shape[0]) - half_y, np.arange(stamp.shape[1]) - half_x, indexing="ij"
    )
    z = stamp.ravel()
    xx, yy = xx.ravel().astype(np.float64), yy.ravel().astype(np.float64)
    amp0 = float(stamp.max())
    if not (math.isfinite(amp0) and amp0 > 0):
        return float("nan"), float("nan")
    # first guess: the radius of a disc holding the pixels above half maximum
    area = float(np.count_nonzero(stamp >= 0.5 * amp0))
    fwhm0 = max(2.0 * math.sqrt(area / math.pi), 1.0)
    beta0 = 3.0
    alpha0 = fwhm0 / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))

    def resid(p: np.ndarray) -> np.ndarray:
        r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
        return p[0] * (1.0 + r2 / (p[3] * p[3])) ** (-p[4]) + p[5] - z

    lo = [0.0, -2.0, -2.0, 0.05, 1.01, -np.inf]
    hi = [np.inf, 2.0, 2.0, 10.0 * max(half_x, half_y, 1), 50.0, np.inf]
    p0 = np.clip([amp0, 0.0, 0.0, alpha0, beta0, 0.0], np.add(lo, 1e-6), np.subtract(hi, 1e-6))
    try:
        res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
    except ValueError:
        return float("nan"), float("nan")
    alpha, beta = float(res.x[3]), float(res.x[4])
    return 2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0), beta
