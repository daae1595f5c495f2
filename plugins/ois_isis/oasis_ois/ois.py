"""Optimal Image Subtraction (Alard & Lupton 1998; Alard 2000) in numpy: ISIS's kernel
model, the preparation of a pair and the application of a kernel, which the other kernel
models share (:mod:`oasis_ois.choose` picks one per frame: ``kernel = "auto"``).

The PSF-matching kernel is the ISIS basis: Gaussians of widths ``sigma_gauss1..3`` times
the monomials ``u**p * v**q`` (``p + q <= deg_gauss_i``, ``u`` along x), on a
``(2 * half_mesh_size + 1)**2`` mesh. As in ISIS, the first function (the narrowest
Gaussian) is normalised to unit sum and every other function with a non-zero sum has
it removed (``B_k / sum(B_k) - B_0``), so the kernel sum, i.e. the photometric scale
between the two images, is the coefficient of the first function alone. Each
coefficient varies over the image as a polynomial of degree ``deg_spatial`` in the pixel
position (the kernel sum is kept constant by default, Alard 2000), and a differential
background polynomial of degree ``deg_bg`` is fitted with it.

Steps (:func:`solve`):

1. Each image: median sky (``Frame.background`` when set) and robust sky noise of the
   pixels given (or ``Frame.noise`` when that is smaller), bad pixels (weight 0,
   non-finite, at or above the saturation level, below ``pix_min``), per-pixel variance
   ``noise**2 + max(data - sky, 0) / gain``, FWHM (``Frame.fwhm`` or a quick
   half-maximum-area measurement, on the image smoothed by a unit Gaussian through its
   Fourier transform, which is kept for step 7). The sky statistics of images larger
   than :data:`STATS_PIXELS` use a regular subsample of that many pixels. The two
   images are prepared side by side in two threads.
2. Direction: ``convolve="auto"`` convolves the image with the narrower PSF.
3. Stamps: the image is cut into ``nstamps_x x nstamps_y`` cells; in each cell the
   :data:`CANDIDATES_PER_CELL` brightest unsaturated, unmasked stars (isolated ones
   first) are candidates.
4. For every candidate, the image to convolve is convolved with every raw (separable)
   basis function *on the stamp only* (1-D passes along y then x, by matrix products),
   and the stamp's normal equations are accumulated, then carried to the normalised
   basis (``T' M T``). As in ISIS (and hotpants), every stamp pixel weighs the same in
   the fit; the per-pixel variance (photon noise of the sky and of the model, read noise,
   the convolved image's variance through the kernel) only judges the stamps' chi2.
5. Each candidate's own kernel is fitted; candidates whose chi2 or kernel sum are
   ``sigma_clip`` robust sigmas off are rejected (variable stars, cosmic rays, blends).
6. The spatially varying solution is fitted globally by combining the normal equations
   of the best surviving candidate of each cell and of every other surviving isolated
   one (up to :data:`CANDIDATES_PER_CELL` per cell, like hotpants' substamps; ISIS keeps
   one star per cell: more stars pin the kernel better) with the spatial polynomials
   evaluated at the stamp centres (Alard 2000); stamps whose chi2 under the global
   solution is an outlier are dropped and the fit redone, up to ``max_iter`` times. With
   too few stamps the spatial degrees are lowered (never below 0) and the result is
   flagged.
7. The kernel is applied to the whole image exactly as a spatially varying convolution,
   ``conv(x) = sum_s P_s(x) (I * K_s)(x) + bg(x)`` with ``K_s`` the kernel's spatial
   components, by FFT (:func:`_spatial_convolution`: the image's transform from step 1,
   the kernels' by DFT matrices, one inverse transform along y per spatial term and one
   along x per power of x), so the memory stays a few image-sized arrays whatever the
   number of basis functions; the noise image's convolution runs beside it.

A series: the core hands a worker the same template object for every frame
(``tasks.worker_template``), and what depends on the template alone is made once and
kept while that object lives (:func:`_prepare`, :func:`_derived`): its preparation, peaks
and bad pixels, its variance's transform (step 7's noise), and, for an image convolved
for more than one partner (:func:`_shared`), the transforms of its moments ``xs**a ys**b
I``, with which step 7's sum is taken in the Fourier domain, one inverse transform in all
(:func:`_moment_convolution`; equal to the per-term sum to float32 rounding), and its
stamps convolved with the raw basis and their normal matrices, per position and kernel
geometry (:func:`_stamp_features`; the same values).

OpenBLAS is held to one thread during :func:`solve` (its idle workers spin and take
the second core from the fit's own threads).

The residual is always ``science - template`` in the science frame's photometric
system: when the science image is the one convolved, the difference is divided by the
kernel sum.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_core.contracts.validators import in_range, non_negative, positive
from oasis_core.engine.stats import local_maxima

__all__ = [
    "OisOptions",
    "OisSolution",
    "apply_kernel",
    "basis_kernels",
    "prepare_pair",
    "solve",
    "solve_prepared",
]

#: Stamps convolved together (one matrix product per chunk and basis Gaussian).
STAMP_CHUNK = 64

#: Stamp stars kept per cell (the best and the isolated ones enter the fit unless rejected).
CANDIDATES_PER_CELL = 3

#: A spatial polynomial of n terms needs at least this many stamps per term.
STAMPS_PER_TERM = 3

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Sky statistics use about this many pixels (a regular subsample of larger images).
STATS_PIXELS = 1 << 20

#: Zero padding (px) of each image's Fourier transform, computed once in the preparation:
#: kernels up to this half size are applied with it (larger ones transform again).
FFT_PAD = 32


@attrs.frozen(kw_only=True)
class OisOptions:
    """Options of the ``ois`` subtract backend (ISIS's names and defaults).

    The Gaussians are ``exp(-(u**2 + v**2) / (2 sigma**2))`` (Alard & Lupton 1998).

    Departures from ISIS's ``default_config``:

    * ``min_stamp_center`` (ISIS: 130 ADU above zero) and ``pix_min`` (ISIS: 10 ADU)
      assume frames that keep their sky. Here ``min_stamp_center`` is measured above the
      sky and defaults to 0, which means "``min_stamp_snr`` (10) sky sigmas" in each
      image; ``pix_min`` defaults to -inf, no lower cut (sky-subtracted frames have valid
      negative pixels). ``saturation`` defaults to 0, each frame's own level
      (``Frame.saturation``; none when that is None).
    * ``seeing_scale`` (on by default): when both FWHMs are known (``Frame.fwhm``, or
      measured), the expected matching-kernel width ``sigma_match = sqrt(s_broad**2 -
      s_narrow**2)`` (``s = FWHM / 2.355``) is computed and, when it exceeds
      ``sigma_gauss2``, the three sigmas are multiplied by ``sigma_match / sigma_gauss2``
      (hotpants' rule of thumb: the middle Gaussian about the matching width, the
      others in ISIS's proportions). ``half_mesh_size`` is raised to cover 1.5 FWHM of
      the broader image and 3 sigmas of the widest Gaussian, ``half_stamp_size`` to
      3 FWHM and to the kernel half size + 4. Nothing is ever made smaller than the
      values given, so ISIS's defaults stand for FWHMs up to ~4.5 px and pairs whose
      seeing differs little; they widen for broader or more different PSFs.
    * ``convolve="auto"``, ``sigma_clip``, ``max_iter`` and ``const_ksum`` have no ISIS
      counterpart (ISIS always convolves the reference). ``"auto"`` convolves the image
      whose PSF the other's contains, by the stars' second moments
      (:mod:`oasis_ois.stars`), else by the FWHMs.
    * ``kernel`` picks the kernel model (:mod:`oasis_ois.choose`); ``delta_half``,
      ``delta_lambda`` and ``pixel_clip`` are the delta basis's (:mod:`oasis_ois.delta`),
      which cross-convolution and the low-order kernel share.
    * ``isis_config`` names an ISIS ``default_config`` file: its values replace those of
      the options of the same names when the backend runs, with the meanings above
      (see :func:`oasis_ois.isis.apply_isis_config`). ``isis_binary`` runs ISIS's own
      ``mrj_phot`` instead of the numpy fit (see :mod:`oasis_ois.isis`).
    """

    nstamps_x: int = option(10, "stamp cells along x (ISIS nstamps_x)", range=positive)
    nstamps_y: int = option(10, "stamp cells along y (ISIS nstamps_y)", range=positive)
    half_mesh_size: int = option(
        9, "kernel half size in px, kernel is (2n+1)^2 (ISIS half_mesh_size)", range=positive
    )
    half_stamp_size: int = option(
        15, "stamp half size in px (ISIS half_stamp_size)", range=positive
    )
    deg_bg: int = option(1, "degree of the differential background polynomial", range=non_negative)
    saturation: float = option(
        0.0, "saturation level (ADU) of both images; 0: each frame's own level", range=non_negative
    )
    pix_min: float = option(
        -math.inf,
        "pixels below this value (ADU) are bad (ISIS: 10); -inf: no lower cut",
        range=in_range(-math.inf, None),
    )
    min_stamp_center: float = option(
        0.0,
        "minimum stamp star peak above sky (ADU), both images (ISIS: 130); 0: min_stamp_snr",
        range=non_negative,
    )
    min_stamp_snr: float = option(
        10.0, "minimum stamp star peak in sky sigmas in both images", range=positive
    )
    ngauss: int = option(3, "number of Gaussians in the kernel basis", range=(1, 3))
    deg_gauss1: int = option(6, "polynomial degree of the first Gaussian", range=non_negative)
    deg_gauss2: int = option(4, "polynomial degree of the second Gaussian", range=non_negative)
    deg_gauss3: int = option(2, "polynomial degree of the third Gaussian", range=non_negative)
    sigma_gauss1: float = option(0.7, "sigma (px) of the first Gaussian", range=positive)
    sigma_gauss2: float = option(1.5, "sigma (px) of the second Gaussian", range=positive)
    sigma_gauss3: float = option(2.0, "sigma (px) of the third Gaussian", range=positive)
    deg_spatial: int = option(
        2, "degree of the kernel's spatial variation polynomial", range=non_negative
    )
    convolve: str = option(
        "auto",
        "image to convolve: 'template', 'science' or 'auto' (the one with the narrower PSF)",
        choices=("auto", "template", "science"),
    )
    sigma_clip: float = option(
        3.0,
        "stamps whose chi2 or kernel sum is this many robust sigmas off are rejected",
        range=positive,
    )
    max_iter: int = option(
        5, "maximum stamp-rejection iterations of the global fit", range=non_negative
    )
    seeing_scale: bool = option(
        True,
        "widen the Gaussians, kernel and stamps to the measured seeing (never below the "
        "values above)",
    )
    const_ksum: bool = option(
        True, "keep the kernel sum (photometric scale) constant over the image (Alard 2000)"
    )
    isis_config: str = option(
        "",
        "ISIS default_config file whose values replace the options above (read when the "
        "backend runs); '' = none",
        path=True,
    )
    isis_binary: str = option(
        "",
        "ISIS mrj_phot program (name on PATH or path) to fit the kernel instead of numpy; "
        "'' = numpy",
    )
    isis_timeout: float = option(
        600.0, "seconds after which a mrj_phot run is stopped", range=positive
    )
    kernel: str = option(
        "auto",
        "kernel model: 'auto' (chosen per frame by its stars and PSFs), 'isis' (Gaussian "
        "basis on stamps), 'delta' (pixel basis on the whole image), 'cross' (both images "
        "convolved to a common PSF) or 'low' (flux scale, shift and background)",
        choices=("auto", "isis", "delta", "cross", "low"),
    )
    delta_half: int = option(
        0, "delta and cross kernels' half size in px; 0: from the two PSFs", range=non_negative
    )
    delta_lambda: float = option(
        1000.0,
        "regularisation of the delta and cross kernels (Laplacian penalty, in units of the "
        "pixels' variance); 0: none",
        range=non_negative,
    )
    pixel_clip: float = option(
        4.0,
        "delta, cross and low models: pixels this many sigmas off the model leave the fit",
        range=positive,
    )


@attrs.frozen(kw_only=True)
class OisSolution:
    """What :func:`solve` returns: the residual, its noise and weight, and the kernel.

    Attributes
    ----------
    residual, noise, weight : ndarray
        science - template in the science frame's photometric system (float32), its
        1-sigma noise (float32) and weight (float32 in [0, 1]).
    kernel : ndarray or None
        The kernel at the image centre, ``(2 * half_mesh + 1)**2``, for
        ``scipy.signal.convolve(image, kernel)``; None when ISIS's ``mrj_phot`` fitted it.
    coefficients : ndarray
        Kernel coefficients, shape ``(n_basis, n_spatial)``: coefficient of basis function
        ``k`` is ``sum_s coefficients[k, s] * P_s(x, y)``, ``P_s`` the monomials
        ``xn**i * yn**j`` (``i + j <= deg_spatial``, ordered by degree then by decreasing
        ``i``) of the coordinates ``xn, yn`` scaled to [-1, 1] over the image.
    bg_coefficients : ndarray
        Differential background polynomial coefficients (same monomials, ``deg_bg``),
        fitted after removing each image's median sky.
    direction : str
        ``"template"`` or ``"science"``: the image that was convolved.
    ksum : float
        Kernel sum at the image centre (the convolved image is multiplied by it).
    sources : ndarray of bool
        Pixels on and around the sources of either image (for noise statistics).
    meta : dict
        Stamps used and rejected, degrees, kernel geometry, FWHMs, flag...
    """

    residual: np.ndarray = attrs.field(eq=False, repr=False)
    noise: np.ndarray = attrs.field(eq=False, repr=False)
    weight: np.ndarray = attrs.field(eq=False, repr=False)
    kernel: np.ndarray | None = attrs.field(eq=False, repr=False)
    coefficients: np.ndarray = attrs.field(eq=False, repr=False)
    bg_coefficients: np.ndarray = attrs.field(eq=False, repr=False)
    direction: str
    ksum: float
    sources: np.ndarray = attrs.field(eq=False, repr=False)
    meta: dict[str, Any] = attrs.field(factory=dict)


# --------------------------------------------------------------------------- basis


def _terms(degrees: Sequence[int]) -> list[tuple[int, int, int]]:
    """Basis terms (gaussian, p, q), p the power of u (x), q of v (y); (0, 0, 0) first."""
    out = []
    for i, d in enumerate(degrees):
        for total in range(d + 1):
            for q in range(total + 1):
                out.append((i, total - q, q))
    return out


def _profiles(sigmas: Sequence[float], degrees: Sequence[int], half: int) -> list[np.ndarray]:
    """For each Gaussian, the 1-D profiles ``u**p exp(-u**2 / (2 sigma**2))``, p=0..deg."""
    u = np.arange(-half, half + 1, dtype=np.float64)
    return [
        (u[None, :] ** np.arange(d + 1)[:, None]) * np.exp(-0.5 * (u / s) ** 2)[None, :]
        for s, d in zip(sigmas, degrees, strict=True)
    ]


def _basis_transform(
    sigmas: Sequence[float], degrees: Sequence[int], half: int
) -> tuple[list[tuple[int, int, int]], np.ndarray, np.ndarray]:
    """Terms, raw 2-D basis (nb, n, n) and the matrix T with B = einsum('jk,j...', T, raw).

    B_0 = raw_0 / sum(raw_0); B_k = raw_k / sum(raw_k) - B_0 when sum(raw_k) != 0 (even p
    and q), else raw_k; then every B_k (k >= 1) is scaled to unit L2 norm.
    """
    terms = _terms(degrees)
    prof = _profiles(sigmas, degrees, half)
    raw = np.stack([np.outer(prof[i][q], prof[i][p]) for i, p, q in terms])
    nb = len(terms)
    t = np.zeros((nb, nb))
    s0 = raw[0].sum()
    t[0, 0] = 1.0 / s0
    for k, (_, p, q) in enumerate(terms[1:], start=1):
        if p % 2 == 0 and q % 2 == 0:
            t[k, k] = 1.0 / raw[k].sum()
            t[0, k] = -1.0 / s0
        else:
            t[k, k] = 1.0
    basis = np.einsum("jk,jyx->kyx", t, raw)
    norms = np.sqrt((basis[1:] ** 2).sum(axis=(1, 2)))
    t[:, 1:] /= norms[None, :]
    return terms, raw, t


def basis_kernels(sigmas: Sequence[float], degrees: Sequence[int], half: int) -> np.ndarray:
    """The normalised ISIS kernel basis, shape ``(n_basis, 2 * half + 1, 2 * half + 1)``.

    Parameters
    ----------
    sigmas, degrees : sequence
        Width (px) and polynomial degree of each Gaussian.
    half : int
        Kernel half size.

    Returns
    -------
    ndarray
        ``B[0]`` has unit sum, every other function has zero sum and unit L2 norm.

    Examples
    --------
    >>> b = basis_kernels([0.7, 1.5, 2.0], [6, 4, 2], 9)
    >>> b.shape
    (49, 19, 19)
    >>> round(float(b[0].sum()), 12), bool(np.allclose(b[1:].sum(axis=(1, 2)), 0))
    (1.0, True)
    """
    _, raw, t = _basis_transform(sigmas, degrees, half)
    return np.einsum("jk,jyx->kyx", t, raw)


def _toeplitz(profiles: np.ndarray, n_out: int, hm: int) -> np.ndarray:
    """Stacked convolution matrices: (n_filters * n_out, n_out + 2 hm), float32.

    Row ``f * n_out + x`` applied to a line of ``n_out + 2 hm`` pixels gives the
    convolution ``sum_u I(x - u) profile_f(u)`` at output pixel x (the line's pixel
    ``c`` is ``x + hm - u``).
    """
    nf = profiles.shape[0]
    c = np.arange(n_out + 2 * hm)
    u = np.arange(n_out)[:, None] + hm - c[None, :]  # (n_out, n_in)
    inside = np.abs(u) <= hm
    t = np.where(inside[None], profiles[:, np.clip(u + hm, 0, 2 * hm)], 0.0)
    return t.reshape(nf * n_out, n_out + 2 * hm).astype(np.float32)


def _raw_stamps(
    image: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    hs: int,
    hm: int,
    sigmas: Sequence[float],
    degrees: Sequence[int],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Image convolved with every *raw* basis function, on the stamps only.

    Returns float32 ``(n, n_basis, (2 hs + 1)**2)`` (``out`` when given, C-contiguous):
    stamp ``i``, function ``u**p g(u) * v**q g(v)`` (the order of :func:`_terms`), stamp
    pixels row by row. The raw basis is separable, so each stamp's patch (stamp plus the
    kernel half size) is convolved by one matrix product along y with all the ``v**q g``
    profiles of a Gaussian, then, for each ``q``, one along x with the ``u**p g`` profiles
    that ``p + q <= degree`` needs (BLAS, all the stamps of a chunk at once).
    """
    terms = _terms(degrees)
    column = {term: k for k, term in enumerate(terms)}
    h = hs + hm
    ns, rows = 2 * hs + 1, 2 * h + 1
    off = np.arange(-h, h + 1)
    mats = [_toeplitz(pr, ns, hm) for pr in _profiles(sigmas, degrees, hm)]
    n = len(cy)
    result = np.empty((n, len(terms), ns * ns), dtype=np.float32) if out is None else out
    if result.shape != (n, len(terms), ns * ns) or not result.flags.c_contiguous:
        raise ValueError(f"_raw_stamps: out must be C-contiguous {(n, len(terms), ns * ns)}")
    target = result.reshape(n, len(terms), ns, ns)  # a view

    def convolve(start: int, stop: int) -> None:
        for lo in range(start, stop, STAMP_CHUNK):
            hi = min(stop, lo + STAMP_CHUNK)
            m = hi - lo
            patches = image[
                (cy[lo:hi, None] + off)[:, :, None], (cx[lo:hi, None] + off)[:, None, :]
            ].astype(np.float32)  # (m, rows, rows): rows y, columns x
            by_y = np.ascontiguousarray(patches.transpose(1, 0, 2)).reshape(rows, m * rows)
            for i, mat in enumerate(mats):
                d = degrees[i]
                ypass = (mat @ by_y).reshape(d + 1, ns, m, rows)  # [q, y] x [stamp, x_in]
                for q in range(d + 1):
                    npq = d - q + 1  # p = 0 .. d - q
                    lines = np.ascontiguousarray(ypass[q].transpose(1, 0, 2))
                    both = lines.reshape(m * ns, rows) @ mat[: npq * ns].T
                    both = both.reshape(m, ns, npq, ns)  # [stamp, y, p, x]
                    for p in range(npq):
                        target[lo:hi, column[(i, p, q)]] = both[:, :, p, :]

    _in_two_threads(convolve, n, STAMP_CHUNK)
    return result


def _convolved_stamps(
    image: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    hs: int,
    hm: int,
    sigmas: Sequence[float],
    degrees: Sequence[int],
) -> np.ndarray:
    """Image convolved with every normalised basis function, on the stamps only.

    Returns float32 ``(n, (2 hs + 1)**2, n_basis)``: :func:`_raw_stamps` with the
    normalisation matrix of :func:`_basis_transform` applied (the fit itself applies it
    to the normal equations instead).
    """
    _, _, t = _basis_transform(sigmas, degrees, hm)
    raw = _raw_stamps(image, cy, cx, hs, hm, sigmas, degrees)
    return np.einsum("nkp,kj->npj", raw, t.astype(np.float32))


#: Stamps kept per prepared image and kernel geometry (:func:`_stamp_features`): at most
#: this many positions (a (2 hs + 1)**2 x n_basis float32 stamp, ~0.2 MB at ISIS's sizes).
STAMP_CACHE = 512


@attrs.define(eq=False)
class _StampStore:
    """Stamps of one prepared image and one kernel geometry: the image convolved with the
    raw basis (:func:`_raw_stamps`) and their unweighted normal matrices, by position."""

    feats: np.ndarray  # (STAMP_CACHE, nb, npix) float32, rows filled from 0
    grams: np.ndarray  # (STAMP_CACHE, nb + 1, nb + 1) float64
    rows: dict[int, int] = attrs.field(factory=dict)  # flat pixel index -> filled row
    used: int = 0  # rows reserved

    def reserve(self, n: int) -> tuple[int, int]:
        """The first of up to ``n`` free rows and how many (0 when the store is full)."""
        first = self.used
        self.used = min(self.feats.shape[0], first + n)
        return first, self.used - first


@attrs.define(eq=False)
class _StampCache:
    """The kernel geometries a prepared image's stamps were asked for, and the stores of
    the geometries asked for more than once (two at most, the last used kept)."""

    seen: set[tuple[Any, ...]] = attrs.field(factory=set)
    stores: dict[tuple[Any, ...], _StampStore] = attrs.field(factory=dict)

    def store(self, geometry: tuple[Any, ...], nb: int, npix: int) -> _StampStore | None:
        """The store for ``geometry``, made on its second request; None on the first."""
        if geometry not in self.seen:
            if len(self.seen) >= 64:
                self.seen.clear()
            self.seen.add(geometry)
            return None
        store = self.stores.pop(geometry, None)
        if store is None:
            while len(self.stores) >= 2:
                self.stores.pop(next(iter(self.stores)))
            # untouched rows take no memory
            store = _StampStore(
                feats=np.empty((STAMP_CACHE, nb, npix), dtype=np.float32),
                grams=np.empty((STAMP_CACHE, nb + 1, nb + 1)),
            )
        self.stores[geometry] = store  # the last used last
        return store


def _stamp_grams(feats: np.ndarray) -> np.ndarray:
    """The unweighted normal matrices of stamps (raw features + constant), float64: those
    :func:`_normal_equations` computes without weights."""
    n, _, npix = feats.shape
    return _normal_equations(feats, np.zeros((n, npix), dtype=np.float32), None)[0]


def _stamp_features(
    im: _Image,
    cy: np.ndarray,
    cx: np.ndarray,
    hs: int,
    hm: int,
    sigmas: Sequence[float],
    degrees: Sequence[int],
    *,
    keep: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`_raw_stamps` of ``im.data``: ``(feats, rows, grams)``, stamp ``i`` being
    ``feats[i]`` (``rows`` None) or ``feats[rows[i]]``, and, when known, the stamps'
    unweighted normal matrices (:func:`_stamp_grams`, one per stamp; else None).

    With ``keep`` (an image convolved for several frames: the template of a series,
    :func:`_shared`), a geometry asked for the second time (the kernel's default widths,
    frame after frame) keeps both per position (up to :data:`STAMP_CACHE`): the stamps
    of the next frames are mostly on the same stars, and are then made once and read in
    place. The values are those computed afresh (each stamp is computed alone).
    """
    nx = im.data.shape[1]
    nb, npix = len(_terms(degrees)), (2 * hs + 1) ** 2
    geometry = (hs, hm, tuple(float(v) for v in sigmas), tuple(int(d) for d in degrees))
    store = None
    if keep:
        cache = _derived(im.data, ("stamps",), _StampCache)
        with _DERIVED_LOCK:
            store = cache.store(geometry, nb, npix)
    if store is None:
        return _raw_stamps(im.data, cy, cx, hs, hm, sigmas, degrees), None, None
    flat = (cy * nx + cx).tolist()
    with _DERIVED_LOCK:
        rows = np.array([store.rows.get(p, -1) for p in flat], dtype=np.intp)
    miss = np.flatnonzero(rows < 0)
    if miss.size:
        with _DERIVED_LOCK:
            first, count = store.reserve(miss.size)
        new, rest = miss[:count], miss[count:]
        if count:  # made straight into the store's free rows
            block = store.feats[first : first + count]
            _raw_stamps(im.data, cy[new], cx[new], hs, hm, sigmas, degrees, out=block)
            store.grams[first : first + count] = _stamp_grams(block)
            rows[new] = np.arange(first, first + count)
            with _DERIVED_LOCK:
                for i in new.tolist():
                    store.rows.setdefault(flat[i], int(rows[i]))
        if rest.size:  # the store is full: those apart, and all gathered in one array
            feats = np.empty((cy.size, nb, npix), dtype=np.float32)
            grams = np.empty((cy.size, nb + 1, nb + 1))
            known = np.flatnonzero(rows >= 0)
            feats[known], grams[known] = store.feats[rows[known]], store.grams[rows[known]]
            feats[rest] = _raw_stamps(im.data, cy[rest], cx[rest], hs, hm, sigmas, degrees)
            grams[rest] = _stamp_grams(feats[rest])
            return feats, None, grams
    return store.feats, rows, store.grams[rows]


def _stamp_models(feats: np.ndarray, rows: np.ndarray | None, coef: np.ndarray) -> np.ndarray:
    """``einsum("nkp,nk->np", feats[rows], coef)`` (float32) without copying the stamps:
    chunk by chunk when ``rows`` picks them (see :func:`_stamp_features`)."""
    if rows is None:
        return np.einsum("nkp,nk->np", feats, coef)
    out = np.empty((rows.size, feats.shape[2]), dtype=np.float32)
    for lo in range(0, rows.size, STAMP_CHUNK):
        hi = min(rows.size, lo + STAMP_CHUNK)
        out[lo:hi] = np.einsum("nkp,nk->np", feats[rows[lo:hi]], coef[lo:hi])
    return out


# --------------------------------------------------------------------- preparation


def _monomials(deg: int) -> list[tuple[int, int]]:
    """(i, j) exponents of xn**i * yn**j, i + j <= deg, by degree then decreasing i."""
    return [(total - j, j) for total in range(deg + 1) for j in range(total + 1)]


def _nterms(deg: int) -> int:
    return (deg + 1) * (deg + 2) // 2


def _poly_at(deg: int, xn: np.ndarray, yn: np.ndarray) -> np.ndarray:
    """Monomials evaluated at points: (len(xn), n_terms) float64."""
    return np.stack([xn**i * yn**j for i, j in _monomials(deg)], axis=-1)


def _scaled_coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """1-D x and y coordinates scaled to [-1, 1] over the image."""
    ny, nx = shape
    xs = (np.arange(nx) - (nx - 1) / 2.0) / max((nx - 1) / 2.0, 1.0)
    ys = (np.arange(ny) - (ny - 1) / 2.0) / max((ny - 1) / 2.0, 1.0)
    return xs, ys


def _median_sorted(v: np.ndarray, lo: int, hi: int) -> float:
    """np.median of the sorted slice v[lo:hi] (not empty)."""
    n = hi - lo
    mid = lo + n // 2
    if n % 2:
        return float(v[mid])
    return (float(v[mid - 1]) + float(v[mid])) / 2.0


def _kth_deviation(v: np.ndarray, lo: int, hi: int, centre: float, k: int) -> float:
    """k-th smallest (0-based) of |v[lo:hi] - centre|, v sorted: the deviations below and
    above ``centre`` are two sorted sequences; bisect on how many come from each."""
    split = int(np.searchsorted(v[lo:hi], centre, side="left")) + lo
    na, nb = split - lo, hi - split  # below: centre - v[split - 1 - t]; above: v[split + t]

    def below(t: int) -> float:
        return centre - float(v[split - 1 - t])

    def above(t: int) -> float:
        return float(v[split + t]) - centre

    first, last = max(0, k + 1 - nb), min(k + 1, na)  # how many of the k+1 from below
    while True:
        i = (first + last) // 2
        j = k + 1 - i
        if i < na and j > 0 and above(j - 1) > below(i):
            first = i + 1
        elif i > 0 and j < nb and below(i - 1) > above(j):
            last = i - 1
        else:
            return max(below(i - 1) if i > 0 else -math.inf, above(j - 1) if j > 0 else -math.inf)


def _mad_sorted(v: np.ndarray, lo: int, hi: int, centre: float) -> float:
    """np.median(np.abs(v[lo:hi] - centre)) for a sorted v."""
    n = hi - lo
    if n % 2:
        return _kth_deviation(v, lo, hi, centre, n // 2)
    return (
        _kth_deviation(v, lo, hi, centre, n // 2 - 1) + _kth_deviation(v, lo, hi, centre, n // 2)
    ) / 2.0


def _clipped_stats(vals: np.ndarray) -> tuple[float, float]:
    """3-sigma clipped median and 1.4826 MAD of a 1-D sample (at most 400 000 values).

    Three clipping rounds (fewer when the kept set stops changing). The sample is sorted
    once: every kept set is then a slice, whose median and MAD take O(log n) each.
    """
    if vals.size == 0:
        return 0.0, float("nan")
    step = max(1, vals.size // 400_000)
    v = np.sort(vals[::step])
    lo, hi = 0, v.size
    med = _median_sorted(v, lo, hi)
    sig = 1.4826 * _mad_sorted(v, lo, hi, med)
    for _ in range(3):
        if not sig > 0:
            break
        # |v - med| < 3 sig, as a slice of the sorted sample
        new_lo = int(np.searchsorted(v, med - 3.0 * sig, side="right"))
        new_hi = int(np.searchsorted(v, med + 3.0 * sig, side="left"))
        if (new_lo, new_hi) == (lo, hi) or new_hi <= new_lo:
            break  # converged: the same pixels give the same figures
        lo, hi = new_lo, new_hi
        med = _median_sorted(v, lo, hi)
        sig = 1.4826 * _mad_sorted(v, lo, hi, med)
    return med, sig


@functools.lru_cache(maxsize=8)
def _interp_matrix(n: int, mesh: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation weights from m mesh centres to n pixels (read-only,
    made once per size)."""
    centres = (np.arange(m) + 0.5) * mesh - 0.5
    eye = np.eye(m)
    out = np.stack([np.interp(np.arange(n), centres, eye[j]) for j in range(m)], axis=1)
    out.flags.writeable = False
    return out


def _median3x3(a: np.ndarray) -> np.ndarray:
    """3 x 3 median filter, edges repeated (``ndimage.median_filter(a, 3, mode="nearest")``)."""
    ny, nx = a.shape
    p = np.pad(a, 1, mode="edge")
    return np.median(
        np.stack([p[i : i + ny, j : j + nx] for i in range(3) for j in range(3)]), axis=0
    )


def _stats_step(size: int) -> int:
    """Stride along both axes that leaves about :data:`STATS_PIXELS` pixels."""
    return max(1, int(math.sqrt(size / STATS_PIXELS)))


def _sky_stats(
    data: np.ndarray, good: np.ndarray, mesh: int = 32, *, differences: bool = True
) -> tuple[float, float]:
    """Sky level and robust sky noise of an image.

    The level is the sigma-clipped median of the good pixels. The noise is the clipped
    1.4826 MAD of the image minus a mesh background (clipped means in ``mesh``-pixel
    boxes, 3x3 median-filtered, interpolated bilinearly), so that sky gradients do not
    inflate it. With ``differences`` the pixel-difference estimate replaces it when
    lower (crowded fields); pass False for images whose noise is correlated between
    neighbouring pixels (a convolved image), where differences underestimate it.

    Images of more than :data:`STATS_PIXELS` pixels are measured on a regular subsample
    of about that many (every ``s``-th pixel along both axes, and bands of full rows for
    the pixel differences): the same statistics, at a cost that does not grow with the
    image.
    """
    from oasis_core.engine.stats import sky_noise

    step = _stats_step(data.size)
    sub = np.asarray(data[::step, ::step], dtype=np.float32)
    good_sub = good[::step, ::step]
    med, sig = _clipped_stats(sub[good_sub])
    mesh = max(2, mesh // step)  # in subsampled pixels
    ny, nx = sub.shape
    my, mx = ny // mesh, nx // mesh
    if not sig > 0:
        return med, sig
    if my < 2 or mx < 2:  # a small frame (a cutout): no mesh, its clipped MAD
        noise = sig
        if differences:
            diff_noise = sky_noise(data, good, max_pixels=STATS_PIXELS, fill=med)
            if np.isfinite(diff_noise) and 0 < diff_noise < noise:
                noise = diff_noise
        return med, noise
    crop = np.where(good_sub, sub, np.float32(np.nan))[: my * mesh, : mx * mesh]
    crop[np.abs(crop - np.float32(med)) > 3.0 * sig] = np.nan  # NaN compares False: kept
    boxes = crop.reshape(my, mesh, mx, mesh).transpose(0, 2, 1, 3).reshape(my * mx, -1)
    finite = np.isfinite(boxes)
    count = finite.sum(axis=1)
    total = np.where(finite, boxes, 0.0).sum(axis=1, dtype=np.float64)
    # mean of the clipped box (the 3-sigma clip already removed the stars)
    level = np.where(count > boxes.shape[1] // 4, total / np.maximum(count, 1), med)
    level = _median3x3(level.reshape(my, mx))
    back = _interp_matrix(ny, mesh, my) @ level @ _interp_matrix(nx, mesh, mx).T
    _, noise = _clipped_stats((sub - back.astype(np.float32))[good_sub])
    if not differences:
        return med, noise
    # in crowded fields the scatter about the background is mostly stars: take the
    # pixel-difference estimate when it is lower
    diff_noise = sky_noise(data, good, max_pixels=STATS_PIXELS, fill=med)
    if np.isfinite(diff_noise) and 0 < diff_noise < noise:
        noise = diff_noise
    return med, noise


# ------------------------------------------------------------ Fourier transforms


def _fast_len(n: int) -> int:
    """Smallest 2**a 3**b 5**c >= n: a size numpy's FFT (pocketfft) transforms fast."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _fft_shape(shape: tuple[int, int], pad: int) -> tuple[int, int]:
    """Transform size for linear convolutions with kernels of half size <= ``pad``.

    A kernel centred on the origin (wrapped) reaches ``pad`` pixels either side: with at
    least ``pad`` zeros after the image along each axis, the circular convolution is the
    linear one with zeros outside the image on the image's pixels.
    """
    return _fast_len(shape[0] + pad), _fast_len(shape[1] + pad)


def _rfft2(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-padded real transform of ``image`` on the grid ``shape``, divided by its size
    (``norm="forward"``: numpy's single-precision transforms take their fast path when
    they scale), complex64. :func:`_irfft2` inverts it up to that factor."""
    n, m = shape
    ny, nx = image.shape
    spec = np.empty((n, m // 2 + 1), dtype=np.complex64)
    # the rows padded here: numpy's own padding (n=m) takes twice as long, same values
    rows = np.empty((ny, m), dtype=np.float32)
    rows[:, :nx] = image
    rows[:, nx:] = 0.0
    np.fft.rfft(rows, axis=1, norm="forward", out=spec[:ny])
    del rows
    spec[ny:] = 0
    np.fft.fft(spec, axis=0, norm="forward", out=spec)
    return spec


def _irfft2(spec: np.ndarray, shape: tuple[int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Inverse transform (float32) cropped to ``out_shape``; ``spec`` is overwritten."""
    ny, nx = out_shape
    np.fft.ifft(spec, axis=0, out=spec)
    return np.fft.irfft(spec[:ny], n=shape[1], axis=1)[:, :nx]


@functools.lru_cache(maxsize=8)
def _dft_matrices(shape: tuple[int, int], half: int) -> tuple[np.ndarray, np.ndarray]:
    """DFT matrices of offsets -half..half: ``(N, 2h+1)`` along y and ``(2h+1, M//2+1)``
    along x (complex64, read-only, made once per grid), so that ``ey @ kernel @ ex`` is
    the transform of a (2h+1)^2 kernel centred on the origin, as :func:`_rfft2` would
    give it, at a fraction of the cost (the kernel has (2h+1)^2 non-zero pixels)."""
    n, m = shape
    u = np.arange(-half, half + 1)
    ey = np.exp((-2j * np.pi / n) * np.outer(np.arange(n), u)).astype(np.complex64)
    ex = np.exp((-2j * np.pi / m) * np.outer(u, np.arange(m // 2 + 1))).astype(np.complex64)
    ey.flags.writeable = ex.flags.writeable = False
    return ey, ex


def _gaussian_smooth(
    spec: np.ndarray, shape: tuple[int, int], out_shape: tuple[int, int]
) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(image, 1.0, mode="constant")`` (a unit Gaussian
    truncated at 4 sigma, unit sum) from the image's :func:`_rfft2` on ``shape`` (zero
    padding >= 4): its transfer function is real and separable. float32."""
    u = np.arange(-4, 5)
    w = np.exp(-0.5 * u**2)
    w /= w.sum()
    n, m = shape
    ty = (w[None, :] * np.cos((2 * np.pi / n) * np.outer(np.arange(n), u))).sum(axis=1)
    tx = (w[None, :] * np.cos((2 * np.pi / m) * np.outer(np.arange(m // 2 + 1), u))).sum(axis=1)
    work = spec * (ty * (n * m)).astype(np.float32)[:, None]  # n * m: _rfft2's scale
    work *= tx.astype(np.float32)[None, :]
    return _irfft2(work, shape, out_shape)


# ------------------------------------------------------------------------- threads


@functools.cache
def _openblas_threads() -> tuple[Any, Any] | None:
    """(get, set) of the number of threads of the OpenBLAS numpy loaded, or None (another
    BLAS, or not Linux)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes, put.restype = ctypes.c_int, [ctypes.c_int], None
                return get, put
    return None


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the block with OpenBLAS on one thread (restored after).

    The fit's matrix products are small to medium: a second BLAS thread gains little on
    them, while OpenBLAS's idle workers spin for a while after every call, taking a core
    from everything else (about 1 CPU-second per 2048 x 2048 pair). Best effort: nothing
    is changed when the BLAS is not an OpenBLAS that can be found.
    """
    controls = _openblas_threads()
    before = controls[0]() if controls is not None else 1
    if before <= 1:
        yield
        return
    controls[1](1)
    try:
        yield
    finally:
        controls[1](before)


@contextlib.contextmanager
def _side_thread(function: Any, *args: Any) -> Iterator[Any]:
    """Run ``function(*args)`` in a second thread while the block runs; yields a callable
    that returns its result (or raises its exception) once the block is done."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oasis-ois") as pool:
        future = pool.submit(function, *args)
        yield future.result
    # leaving the pool waits for the thread: an error in the block comes first


def _in_two_threads(work: Any, n: int, chunk: int) -> None:
    """``work(start, stop)`` over ``range(n)`` split in two at a multiple of ``chunk``, the
    halves side by side (one piece when there are too few chunks)."""
    half = (n // (2 * chunk)) * chunk
    if half == 0:
        work(0, n)
        return
    with _side_thread(work, half, n) as second:
        work(0, half)
    second()


# ------------------------------------------------------------------- local maxima


def _sliding_max(a: np.ndarray, radius: int) -> np.ndarray:
    """Maximum over the ``(2 radius + 1)**2`` square around each pixel, clipped to the
    image: ``scipy.ndimage.maximum_filter(a, 2 radius + 1)`` (and, for booleans, with
    ``mode="constant"`` too), by doubling windows (a few whole-array maxima per axis).
    """
    if radius <= 0:
        return a.copy()
    w = 2 * radius + 1
    fill = False if a.dtype == bool else -np.inf
    for axis in (0, 1):
        n = a.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        m = np.pad(a, pad, constant_values=fill)
        k = 1  # m[i] is the maximum over [i, i + k)
        while 2 * k <= w:
            length = m.shape[axis] - k
            lo = (slice(0, length), slice(None)) if axis == 0 else (slice(None), slice(0, length))
            hi = (
                (slice(k, length + k), slice(None))
                if axis == 0
                else (slice(None), slice(k, length + k))
            )
            m = np.maximum(m[lo], m[hi])
            k *= 2
        first = (slice(0, n), slice(None)) if axis == 0 else (slice(None), slice(0, n))
        last = (
            (slice(w - k, w - k + n), slice(None))
            if axis == 0
            else (slice(None), slice(w - k, w - k + n))
        )
        a = np.maximum(m[first], m[last])
    return a


@attrs.frozen(kw_only=True)
class _Image:
    """One input prepared for the fit (internal)."""

    name: str
    data: np.ndarray = attrs.field(eq=False, repr=False)  # float32, sky removed, bad -> 0
    smooth: np.ndarray | None = attrs.field(eq=False, repr=False)  # data * unit Gaussian
    bad: np.ndarray = attrs.field(eq=False, repr=False)  # bool
    weight: np.ndarray = attrs.field(eq=False, repr=False)  # the frame's (read-only)
    sky: float
    noise: float
    gain: float
    fwhm: float | None
    # rfft2 of data on the grid fft_shape (zero padding >= FFT_PAD)
    spectrum: np.ndarray | None = attrs.field(default=None, eq=False, repr=False)
    fft_shape: tuple[int, int] = (0, 0)
    # the variance image when the data were convolved (cross-convolution); None: model
    var: np.ndarray | None = attrs.field(default=None, eq=False, repr=False)

    def variance(self, index: Any = ...) -> np.ndarray:
        """Per-pixel variance noise**2 + max(data, 0) / gain (of data[index]), float32, or
        the image ``var`` when set."""
        if self.var is not None:
            return self.var[index]
        out = np.maximum(self.data[index], 0)  # a new array: the rest in place
        out /= np.float32(self.gain)
        out += np.float32(self.noise**2)
        return out


def _effective_gain(frame: Frame, sky: float, noise: float) -> float:
    """Gain (e-/ADU) for the source Poisson term; inf (no such term) when unknowable.

    ``frame.gain`` when set; otherwise, for a frame that keeps a sky well above its noise,
    the sky's own photon statistics sky / noise**2 (a lower bound of the gain when read
    noise contributes, so a conservative source variance); otherwise (sky-subtracted or
    calibrated frames without a gain) infinity: the noise image is the sky noise alone.
    """
    if frame.gain is not None and frame.gain > 0:
        return float(frame.gain)
    if sky > 3.0 * noise:
        return sky / noise**2
    return math.inf


# id(frame) -> (weak reference to the frame, the options and the frame's figures, _Image):
# the frames prepared and still alive (an entry goes with its frame)
_PREPARED: dict[int, tuple[Any, tuple[Any, ...], _Image]] = {}
_PREPARED_LOCK = threading.Lock()


def _prepare(frame: Frame, options: OisOptions, what: str) -> _Image:
    """``frame`` prepared for a fit (:class:`_Image`): sky removed, bad pixels, noise,
    gain, FWHM, Fourier transform. Remembered while the frame object lives, its arrays
    read-only: a worker that subtracts a series from one template is handed the same
    template object for every frame (the core keeps it per process), and prepares it
    once."""
    import weakref

    key = (options, _fwhm_key(frame, options))
    with _PREPARED_LOCK:
        entry = _PREPARED.get(id(frame))
    if entry is not None and entry[0]() is frame and entry[1] == key:
        return entry[2]
    image = _prepare_now(frame, options, what)
    for array in (image.data, image.smooth, image.bad, image.spectrum):
        if array is not None:
            array.flags.writeable = False

    def forget(_: Any, ident: int = id(frame)) -> None:
        with _PREPARED_LOCK:
            _PREPARED.pop(ident, None)

    try:
        ref = weakref.ref(frame, forget)
    except TypeError:  # a frame type without weak references: nothing to remember
        return image
    with _PREPARED_LOCK:
        _PREPARED[id(frame)] = (ref, key, image)
    return image


def _prepare_now(frame: Frame, options: OisOptions, what: str) -> _Image:
    data = np.asarray(frame.data, dtype=np.float32)
    weight = np.asarray(frame.weight)
    finite = np.isfinite(data)
    bad = ~(weight > 0)
    bad |= ~finite
    sat = options.saturation if options.saturation > 0 else frame.saturation
    if sat is not None:
        bad |= finite & (data >= sat)
    if options.pix_min > -math.inf:
        bad |= finite & (data < options.pix_min)
    del finite
    if bad.all():
        msg = f"subtract backend 'ois': {what} {frame.name!r} has no usable pixel (weight 0)"
        raise StageError(msg)
    sky, noise = _sky_stats(data, ~bad)
    if frame.background is not None:
        sky = float(frame.background)
    if frame.noise is not None and frame.noise > 0:
        # Frame.noise may predate a resampling (align), which lowers the per-pixel noise,
        # and the measurement here is inflated by starlight in crowded fields: the
        # smaller of the two is the less biased
        noise = min(float(frame.noise), noise) if noise > 0 else float(frame.noise)
    if not noise > 0:
        msg = (
            f"subtract backend 'ois': {what} {frame.name!r} has no measurable sky noise "
            "(constant image?)"
        )
        raise StageError(msg)
    gain = _effective_gain(frame, sky, noise)
    clean = np.subtract(data, np.float32(sky), dtype=np.float32)
    clean[bad] = 0.0
    # one transform serves the smoothing here and, for the image convolved, the kernel
    shape = _fft_shape(clean.shape, FFT_PAD)
    spectrum = _rfft2(clean, shape)
    smooth = _gaussian_smooth(spectrum, shape, clean.shape)
    fwhm = _cached_fwhm(frame, options)
    if fwhm is None:
        fwhm = float(frame.fwhm) if frame.fwhm else _measure_fwhm(clean, smooth, bad, noise)
        _remember_fwhm(frame, options, fwhm)
    return _Image(
        name=frame.name,
        data=clean,
        smooth=smooth,
        bad=bad,
        weight=weight,
        sky=sky,
        noise=noise,
        gain=gain,
        fwhm=fwhm,
        spectrum=spectrum,
        fft_shape=shape,
    )


# FWHMs measured by _prepare, for the optimisation candidates of the same frames:
# id(frame) -> (weak reference to the frame, the options the measurement depends on, FWHM)
_FWHM_MEMO: dict[int, tuple[Any, tuple[Any, ...], float | None]] = {}
_FWHM_MEMO_SIZE = 8
_FWHM_MEMO_LOCK = threading.Lock()


def _fwhm_key(frame: Frame, options: OisOptions) -> tuple[Any, ...]:
    return (
        options.saturation,
        options.pix_min,
        frame.saturation,
        frame.background,
        frame.noise,
        frame.fwhm,
        id(frame.data),
        id(frame.weight),
    )


def _cached_fwhm(frame: Frame, options: OisOptions) -> float | None:
    """The FWHM :func:`_prepare` measured on this very frame with these options, or None."""
    if frame.fwhm:
        return None
    with _FWHM_MEMO_LOCK:
        entry = _FWHM_MEMO.get(id(frame))
    if entry is None or entry[0]() is not frame or entry[1] != _fwhm_key(frame, options):
        return None
    return entry[2]


def _remember_fwhm(frame: Frame, options: OisOptions, fwhm: float | None) -> None:
    if frame.fwhm or fwhm is None:
        return
    import weakref

    try:
        ref = weakref.ref(frame)
    except TypeError:  # a frame type without weak references: nothing to remember
        return
    with _FWHM_MEMO_LOCK:
        while len(_FWHM_MEMO) >= _FWHM_MEMO_SIZE:
            _FWHM_MEMO.pop(next(iter(_FWHM_MEMO)))
        _FWHM_MEMO[id(frame)] = (ref, _fwhm_key(frame, options), fwhm)


def measured_fwhm(frame: Frame, options: OisOptions, what: str) -> float | None:
    """The frame's FWHM (px) as the fit uses it: ``Frame.fwhm``, else what the fit measured
    on this frame (remembered), else measured now; None when it cannot be measured."""
    if frame.fwhm:
        return float(frame.fwhm)
    fwhm = _cached_fwhm(frame, options)
    if fwhm is not None:
        return fwhm
    try:
        return _prepare(frame, options, what).fwhm
    except StageError:
        return None


# What is derived from a prepared image's arrays (its peaks, bad pixels, variance's
# transform...): (id(array), what) -> (weak reference to the array, value). The arrays of
# a prepared image are read-only and live as long as it does; the template, prepared once
# per worker, serves every frame of a series, so what depends on it alone is made once.
_DERIVED: dict[tuple[int, Any], tuple[Any, Any]] = {}
_DERIVED_LOCK = threading.RLock()  # a collected array's callback may come in
_DERIVED_SIZE = 64


def _derived(array: np.ndarray, what: tuple[Any, ...], make: Any) -> Any:
    """``make()``, remembered while ``array`` lives when it is read-only (a prepared
    image's, which :func:`_prepare` keeps): ``what`` names the value and the parameters
    it depends on besides the image. Its arrays are made read-only. Beyond
    :data:`_DERIVED_SIZE` values, the least recently used goes."""
    import weakref

    if array.flags.writeable:  # not a prepared image's: nothing to remember
        return make()
    key = (id(array), what)
    with _DERIVED_LOCK:
        entry = _DERIVED.pop(key, None)
        if entry is not None:
            _DERIVED[key] = entry  # the most recently used last
    if entry is not None and entry[0]() is array:
        return entry[1]
    value = make()
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, np.ndarray):
            item.flags.writeable = False

    def forget(ref: Any, key: tuple[int, Any] = key) -> None:
        with _DERIVED_LOCK:
            if key in _DERIVED and _DERIVED[key][0] is ref:
                del _DERIVED[key]

    ref = weakref.ref(array, forget)
    with _DERIVED_LOCK:
        while len(_DERIVED) >= _DERIVED_SIZE:
            _DERIVED.pop(next(iter(_DERIVED)))
        _DERIVED[key] = (ref, value)
    return value


def _peaks(im: _Image, radius: int, nsigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of the lightly smoothed image above nsigma sky sigmas (raw peak); the
    same search on the same prepared image is made once (the census and the stamps look
    for the same; the template's serve every frame)."""
    return _derived(
        im.data,
        ("peaks", radius, nsigma),
        lambda: _find_peaks(im.data, im.smooth, im.bad, im.noise, radius, nsigma),
    )


def _bad_near(bad: np.ndarray, half: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``_sliding_max(bad, half)[y, x]``: whether a bad pixel is within ``half`` px
    (Chebyshev, inside the image) of each point, from the bad pixels' sorted flat indices
    (made once per prepared image) rather than a whole-image dilation."""
    ny, nx = bad.shape
    flat = _derived(bad, ("bad pixels",), lambda: np.flatnonzero(bad))
    near = np.zeros(y.shape, dtype=bool)
    if flat.size == 0 or y.size == 0:
        return near
    rows = y[:, None] + np.arange(-half, half + 1)[None, :]  # (n, 2 half + 1)
    start = rows * nx + np.maximum(x - half, 0)[:, None]
    stop = rows * nx + np.minimum(x + half, nx - 1)[:, None]
    count = np.searchsorted(flat, stop, side="right") - np.searchsorted(flat, start, side="left")
    inside = (rows >= 0) & (rows < ny)
    return ((count > 0) & inside).any(axis=1)


def _find_peaks(
    data: np.ndarray,
    smooth: np.ndarray,
    bad: np.ndarray,
    noise: float,
    radius: int,
    nsigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    # a smoothed peak of a point source is >= ~40 % of its raw peak for FWHM >= 2 px
    above = smooth > 0.4 * nsigma * noise
    above &= ~bad
    y, x = np.nonzero(above)
    y, x = local_maxima(smooth, y, x, radius)
    keep = data[y, x] > nsigma * noise
    return y[keep], x[keep]


def _measure_fwhm(
    data: np.ndarray, smooth: np.ndarray, bad: np.ndarray, noise: float
) -> float | None:
    """Median FWHM of bright unsaturated stars from the area above half maximum."""
    r = 8
    ny, nx = data.shape
    y, x = _find_peaks(data, smooth, bad, noise, 3, 20.0)
    inside = (y >= r) & (y < ny - r) & (x >= r) & (x < nx - r)
    y, x = y[inside], x[inside]
    if y.size == 0:
        return None
    order = np.argsort(data[y, x])[::-1][:300]
    y, x = y[order], x[order]
    off = np.arange(-r, r + 1)
    iy, ix = (y[:, None] + off)[:, :, None], (x[:, None] + off)[:, None, :]
    ok = ~bad[iy, ix].any(axis=(1, 2))  # no masked or saturated pixel near the star
    if ok.sum() < 3:
        return None
    st = data[iy[ok], ix[ok]]
    peak = st[:, r, r]
    rr = np.hypot(off[None, :], off[:, None])
    area = ((st > 0.5 * peak[:, None, None]) & (rr <= r)[None]).sum(axis=(1, 2))
    fwhm = 2.0 * np.sqrt(area / np.pi)
    return float(np.median(fwhm))


# ------------------------------------------------------------------------- stamps


def _outshone(y: np.ndarray, x: np.ndarray, value: np.ndarray, r: int) -> np.ndarray:
    """For each point, is another point within ``r`` px (Chebyshev) brighter? Of two
    equal ones, the later is the fainter (``cKDTree.query_pairs(r, p=inf)`` pairs, the
    fainter of each marked)."""
    n = y.size
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    order = np.argsort(x, kind="stable")
    xs = x[order]
    lo = np.searchsorted(xs, xs - r, side="left")
    hi = np.searchsorted(xs, xs + r, side="right")
    # neighbours in x of each point, in chunks of about a million pairs
    start = 0
    while start < n:
        csum = np.cumsum(hi[start:] - lo[start:])
        stop = start + max(1, int(np.searchsorted(csum, 1 << 20, side="right")))
        counts = hi[start:stop] - lo[start:stop]
        a = np.repeat(np.arange(start, stop), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        b = lo[a] + (np.arange(a.size) - first)
        i, j = order[a], order[b]
        near = (i != j) & (np.abs(y[i] - y[j]) <= r)
        i, j = i[near], j[near]
        fainter = (value[i] < value[j]) | ((value[i] == value[j]) & (i > j))
        out[i[fainter]] = True
        start = stop
    return out


def _candidates(
    ref: _Image, conv: _Image, hs: int, hm: int, options: OisOptions
) -> dict[str, np.ndarray]:
    """Stamp candidates: up to CANDIDATES_PER_CELL per cell, best first."""
    ny, nx = ref.data.shape
    radius = max(2, round(max(conv.fwhm or 3.0, ref.fwhm or 3.0)))
    if options.min_stamp_center <= 0:
        thr_c = thr_r = options.min_stamp_snr
    else:
        thr_c = options.min_stamp_center / conv.noise
        thr_r = options.min_stamp_center / ref.noise
    cy, cx = _peaks(conv, radius, thr_c)
    # isolated: no brighter peak of any kind inside the stamp box
    isolated = ~_derived(
        conv.data,
        ("outshone", radius, thr_c, hs),
        lambda: _outshone(cy, cx, conv.data[cy, cx], hs),
    )
    h = hs + hm
    inside = (cy >= h) & (cy < ny - h) & (cx >= h) & (cx < nx - h)
    cy, cx, isolated = cy[inside], cx[inside], isolated[inside]
    if cy.size:
        # the star must be there in the other image too (3x3 max, for sub-pixel shifts)
        off = np.arange(-1, 2)
        ref3 = ref.data[(cy[:, None] + off)[:, :, None], (cx[:, None] + off)[:, None, :]]
        ok = ref3.max(axis=(1, 2)) > thr_r * ref.noise
        cy, cx, isolated = cy[ok], cx[ok], isolated[ok]
    if cy.size:
        # no bad pixel in the stamp (reference) or in the stamp + kernel (convolved): the
        # masks dilated by those half sizes, at the centres
        ok = np.ones(cy.size, dtype=bool)
        for im, half in ((ref, hs), (conv, h)):
            ok &= ~_bad_near(im.bad, half, cy, cx)
        cy, cx, isolated = cy[ok], cx[ok], isolated[ok]
    if cy.size == 0:
        return {"cy": cy, "cx": cx, "cell": cy, "rank": cy, "isolated": isolated}
    snr = np.minimum(conv.data[cy, cx] / conv.noise, ref.data[cy, cx] / ref.noise)
    cell = (cy * options.nstamps_y // ny) * options.nstamps_x + (cx * options.nstamps_x // nx)
    order = np.lexsort((-snr, ~isolated, cell))
    cell_sorted = cell[order]
    first = np.searchsorted(cell_sorted, cell_sorted, side="left")
    rank = np.arange(order.size) - first
    keep = order[rank < CANDIDATES_PER_CELL]
    rank = rank[rank < CANDIDATES_PER_CELL]
    return {
        "cy": cy[keep],
        "cx": cx[keep],
        "cell": cell[keep],
        "rank": rank,
        "isolated": isolated[keep],
    }


# ---------------------------------------------------------------------- the fits


def _solve_sym(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve batched symmetric systems with Jacobi scaling and a tiny ridge."""
    d = np.sqrt(np.abs(np.diagonal(m, axis1=-2, axis2=-1)))
    d = np.where(d > 0, d, 1.0)
    ms = m / (d[..., :, None] * d[..., None, :])
    ms = ms + 1e-10 * np.eye(m.shape[-1])
    try:
        sol = np.linalg.solve(ms, (b / d)[..., None])[..., 0]
    except np.linalg.LinAlgError:  # singular (degenerate stamps): minimum-norm solution
        if m.ndim == 2:
            sol = np.linalg.lstsq(ms, b / d, rcond=1e-12)[0]
        else:
            sol = np.stack(
                [np.linalg.lstsq(a, v, rcond=1e-12)[0] for a, v in zip(ms, b / d, strict=True)]
            )
    return sol / d


def _normal_equations(
    feats: np.ndarray,
    y: np.ndarray,
    var: np.ndarray | None,
    transform: np.ndarray | None = None,
    grams: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-stamp normal matrix, right-hand side and y'Wy, features + constant, float64.

    ``feats`` is ``(n, nb, npix)``, ``var`` the pixels' variances ``(n, npix)`` (weights
    ``1 / var``) or None (unit weights, as ISIS fits). With ``transform`` (``(nb, nb)``)
    the equations are those of the features ``transform.T @ feats`` (the normalised basis
    from the raw one). ``grams``: the unweighted normal matrices (``var`` None) when
    known, which are then not computed again; ``rows``: stamp ``i`` is ``feats[rows[i]]``
    (:func:`_stamp_features`).
    """
    _, nb, npix = feats.shape
    n = y.shape[0]
    if grams is not None and var is not None:
        raise ValueError("known normal matrices are the unweighted ones: var must be None")
    m = np.empty((n, nb + 1, nb + 1)) if grams is None else grams
    b = np.empty((n, nb + 1))
    yy = np.empty(n)
    chunk = 32  # chunks keep the float64 copies small (one buffer per thread, reused)

    def accumulate(start: int, stop: int) -> None:
        buffer = np.empty((min(stop - start, chunk), nb + 1, npix))
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            g = buffer[: hi - lo]
            g[:, :nb] = feats[lo:hi] if rows is None else feats[rows[lo:hi]]
            g[:, nb] = 1.0
            yw = y[lo:hi].astype(np.float64)
            if var is not None:
                sw = 1.0 / np.sqrt(var[lo:hi].astype(np.float64))  # sqrt of the weights
                g *= sw[:, None, :]
                yw *= sw
            if grams is None:
                np.matmul(g, np.swapaxes(g, 1, 2), out=m[lo:hi])
            b[lo:hi] = (g @ yw[..., None])[..., 0]
            yy[lo:hi] = (yw * yw).sum(axis=1)

    _in_two_threads(accumulate, n, chunk)
    if transform is not None:
        t = np.eye(nb + 1)
        t[:nb, :nb] = transform
        m = t.T @ m @ t
        b = b @ t
    return m, b, yy


def _stamp_chi2(
    feats: np.ndarray,
    y: np.ndarray,
    var: np.ndarray,
    coef: np.ndarray,
    transform: np.ndarray,
    sel: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Mean of (y - model)**2 / var over each stamp's pixels; the model is the features
    ``(n, nb, npix)`` (raw basis) times the normalised-basis coefficients ``coef[:, :nb]``
    (carried to the raw basis by ``transform``) plus the background ``coef[:, nb]``.
    With ``sel``, of the stamps ``sel`` (``coef`` has a row per index), read in place
    (``feats[sel]`` would copy tens of MB per call); with ``rows`` too, stamp ``i`` is
    ``feats[rows[i]]`` (:func:`_stamp_features`)."""
    nb = feats.shape[1]
    raw = (coef[:, :nb] @ transform.T).astype(np.float32)
    bg = coef[:, nb : nb + 1].astype(np.float32)
    if sel is None:
        model = np.einsum("nkp,nk->np", feats, raw) + bg
        return np.mean((y - model) ** 2 / var, axis=1)
    model = _stamp_models(feats, sel if rows is None else rows[sel], raw) + bg
    return np.mean((y[sel] - model) ** 2 / var[sel], axis=1)


def _robust_outliers(values: np.ndarray, nsigma: float, one_sided: bool) -> np.ndarray:
    med = np.median(values)
    sig = 1.4826 * np.median(np.abs(values - med))
    if not sig > 0:
        return np.zeros(values.shape, bool)
    dev = (values - med) / sig
    return dev > nsigma if one_sided else np.abs(dev) > nsigma


@attrs.frozen(kw_only=True)
class _Layout:
    """Global unknowns: kernel coefficient (k, s) pairs then background terms."""

    nb: int
    deg_spatial: int
    deg_bg: int
    const_ksum: bool

    @property
    def nsp(self) -> int:
        return _nterms(self.deg_spatial)

    @property
    def nbg(self) -> int:
        return _nterms(self.deg_bg)

    @property
    def nkern(self) -> int:
        return (self.nb - 1) * self.nsp + (1 if self.const_ksum else self.nsp)

    def expansion(self, xn: np.ndarray, yn: np.ndarray) -> np.ndarray:
        """E (n, nb + 1, U): local coefficients (kernel, bg) = E @ global unknowns."""
        n = xn.size
        p = _poly_at(self.deg_spatial, xn, yn)  # (n, nsp)
        q = _poly_at(self.deg_bg, xn, yn)
        e = np.zeros((n, self.nb + 1, self.nkern + self.nbg))
        col = 0
        for k in range(self.nb):
            if k == 0 and self.const_ksum:
                e[:, 0, 0] = 1.0
                col = 1
                continue
            e[:, k, col : col + self.nsp] = p
            col += self.nsp
        e[:, self.nb, col:] = q
        return e

    def groups(self, xn: np.ndarray, yn: np.ndarray) -> list[tuple[slice, np.ndarray]]:
        """The local coefficients that share a spatial expansion, in the order of the
        global unknowns: (slice of the local coefficients, the expansion's values at the
        points, ``(n, d)``); local coefficient ``k`` of the group is ``values @
        theta[block k]``. :meth:`expansion` is their block-diagonal matrix."""
        nb = self.nb
        p = _poly_at(self.deg_spatial, xn, yn)
        q = _poly_at(self.deg_bg, xn, yn)
        if self.const_ksum:
            return [(slice(0, 1), np.ones((xn.size, 1))), (slice(1, nb), p), (slice(nb, nb + 1), q)]
        return [(slice(0, nb), p), (slice(nb, nb + 1), q)]

    def normal(
        self, m: np.ndarray, b: np.ndarray, xn: np.ndarray, yn: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``sum_s E_s' M_s E_s`` and ``sum_s E_s' b_s`` (E: :meth:`expansion`) for the
        stamps' normal equations ``m`` (n, L, L), ``b`` (n, L), without forming E."""
        groups = self.groups(xn, yn)
        rows, rhs = [], []
        for sl_a, va in groups:
            row = []
            for sl_b, vb in groups:
                w = va[:, :, None] * vb[:, None, :]  # (n, da, db)
                blk = np.tensordot(m[:, sl_a, sl_b], w, axes=(0, 0))  # (La, Lb, da, db)
                la, lb, da, db = blk.shape
                row.append(blk.transpose(0, 2, 1, 3).reshape(la * da, lb * db))
            rows.append(row)
            rhs.append((b[:, sl_a].T @ va).reshape(-1))
        return np.block(rows), np.concatenate(rhs)

    def local(self, theta: np.ndarray, xn: np.ndarray, yn: np.ndarray) -> np.ndarray:
        """Local coefficients ``E_s @ theta`` at the points, (n, L)."""
        loc = np.empty((xn.size, self.nb + 1))
        start = 0
        for sl, v in self.groups(xn, yn):
            count = (sl.stop - sl.start) * v.shape[1]
            loc[:, sl] = v @ theta[start : start + count].reshape(-1, v.shape[1]).T
            start += count
        return loc

    def unpack(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nb, nsp) kernel coefficients and (nbg,) background coefficients."""
        coef = np.zeros((self.nb, self.nsp))
        col = 0
        for k in range(self.nb):
            if k == 0 and self.const_ksum:
                coef[0, 0] = theta[0]
                col = 1
                continue
            coef[k] = theta[col : col + self.nsp]
            col += self.nsp
        return coef, theta[col:]


def _degrees_for(n: int, deg_spatial: int, deg_bg: int) -> tuple[int, int]:
    """Highest degrees (<= requested) with at least STAMPS_PER_TERM stamps per term."""
    ds = deg_spatial
    while ds > 0 and n < STAMPS_PER_TERM * _nterms(ds):
        ds -= 1
    db = deg_bg
    while db > 0 and n < STAMPS_PER_TERM * _nterms(db):
        db -= 1
    return ds, db


def _select(cand: dict[str, np.ndarray], rejected: np.ndarray) -> np.ndarray:
    """Index of the stamps to fit, by cell then rank: of the non-rejected candidates,
    the best of each cell and every isolated one."""
    idx = np.flatnonzero(~rejected)
    if idx.size == 0:
        return idx
    order = idx[np.lexsort((cand["rank"][idx], cand["cell"][idx]))]
    cells = cand["cell"][order]
    best = np.ones(order.size, dtype=bool)
    best[1:] = cells[1:] != cells[:-1]
    return order[best | cand["isolated"][order]]


# -------------------------------------------------------------------- application


def _transform(im: _Image, half: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image's :func:`_rfft2` and its grid for kernels of half size ``half``: the one
    :func:`_prepare` made when its padding reaches the kernel."""
    ny, nx = im.data.shape
    shape, spec = im.fft_shape, im.spectrum
    if spec is None or min(shape[0] - ny, shape[1] - nx) < half:
        shape = _fft_shape((ny, nx), half)
        spec = _rfft2(im.data, shape)
    return spec, shape


def _variance_spectrum(im: _Image, shape: tuple[int, int]) -> np.ndarray:
    """:func:`_rfft2` of the image's variance on ``shape``, made once per prepared image
    (the template's serves every frame that convolves it)."""
    if im.var is not None:
        return _rfft2(im.var, shape)
    return _derived(
        im.data,
        ("variance spectrum", im.noise, im.gain, shape),
        lambda: _rfft2(im.variance(), shape),
    )


def _spatial_convolution(
    spec: np.ndarray,
    shape: tuple[int, int],
    kernels: np.ndarray,
    monomials: Sequence[tuple[int, int]],
    xs: np.ndarray,
    ys: np.ndarray,
    powers: Sequence[int] | None = None,
) -> np.ndarray:
    """``sum_s xs**i_s ys**j_s (image * kernels[s])``, the linear ('same', zeros
    outside) convolution of an image by a spatially varying kernel, float32, from the
    image's :func:`_rfft2` ``spec`` on the grid ``shape`` (padding >= the kernels' half
    size; see :func:`_transform`).

    The kernels' transforms by DFT matrices, then for each spatial term the product and
    an inverse transform along y; the terms that share a power of x are summed (times
    their power of y) before one inverse transform along x: the polynomials multiply the
    convolved image, and a function of y commutes with the transform along x. With
    ``powers``, only the terms with these powers of x (two threads share the terms).
    """
    ny, nx = ys.size, xs.size
    half = (kernels.shape[-1] - 1) // 2
    ey, ex = _dft_matrices(shape, half)
    scale = float(shape[0] * shape[1])  # _rfft2 divided the image's transform by it
    free: list[np.ndarray] = []  # buffers for one kernel's product, reused
    out: np.ndarray | None = None
    for i in sorted({i for i, _ in monomials} if powers is None else powers):
        acc: np.ndarray | None = None  # sum over j of ys**j times the y-inverse
        first: np.ndarray | None = None  # the buffer acc lives in (the first term's)
        for k, (i_k, j) in zip(kernels, monomials, strict=True):
            if i_k != i or not np.any(k):
                continue
            work = free.pop() if free else np.empty(spec.shape, dtype=np.complex64)
            np.matmul(ey, (scale * k).astype(np.complex64) @ ex, out=work)
            work *= spec
            np.fft.ifft(work, axis=0, out=work)
            part = work[:ny]
            if j:
                part *= (ys**j).astype(np.float32)[:, None]
            if acc is None:
                acc, first = part, work
            else:
                acc += part
                free.append(work)
        if acc is None or first is None:
            continue
        real = np.fft.irfft(acc, n=shape[1], axis=1)[:, :nx]
        free.append(first)
        del acc, first
        if i:
            real *= (xs**i).astype(np.float32)[None, :]
        if out is None:
            out = real
        else:
            out += real
    if out is None:
        return np.zeros((ny, nx), dtype=np.float32)
    return out


#: The moment spectra an image convolved for several frames keeps (:func:`_moment_spectra`)
#: take at most this many bytes (5 x 19 MB for a 2048^2 template and ``deg_spatial`` 2).
MOMENT_BYTES = 1 << 28


def _shared(im: _Image, partner: _Image) -> bool:
    """Whether the prepared image ``im`` was paired before with another frame than
    ``partner`` (by name: a frame convolved for cross-convolution is the same frame):
    the template of a series (every frame), not a science frame tried with several
    configurations. Records ``partner``."""
    partners = _derived(im.data, ("partners",), set)
    with _DERIVED_LOCK:
        shared = bool(partners - {partner.name})
        if len(partners) < 8:
            partners.add(partner.name)
    return shared


def _moment_spectra(
    im: _Image, spec: np.ndarray, shape: tuple[int, int], deg: int
) -> list[np.ndarray] | None:
    """The :func:`_rfft2` on ``shape`` of ``xs**a * ys**b * im.data`` for the monomials
    ``(a, b)`` of degree ``deg`` (:func:`_monomials`; ``spec``, the image's own, first),
    made once per prepared image; None when they would take more than
    :data:`MOMENT_BYTES`. See :func:`_moment_convolution`."""
    if (_nterms(deg) - 1) * spec.nbytes > MOMENT_BYTES:
        return None

    def make() -> tuple[np.ndarray, ...]:
        xs, ys = _scaled_coords(im.data.shape)
        out = [spec]
        for a, b in _monomials(deg)[1:]:
            moment = im.data * (ys**b).astype(np.float32)[:, None]
            moment *= (xs**a).astype(np.float32)[None, :]
            out.append(_rfft2(moment, shape))
        return tuple(out)

    return list(_derived(im.data, ("moment spectra", shape, deg), make))


def _moment_kernels(
    kernels: np.ndarray, monomials: Sequence[tuple[int, int]], image_shape: tuple[int, int]
) -> np.ndarray:
    """The kernels ``L_ab`` with ``sum_s P_s (I * K_s) = sum_ab (xs**a ys**b I) * L_ab``.

    A monomial of the output pixel's coordinates is one of the input pixel's shifted by
    the kernel offset ``(u, v)``: ``xs(x) = xs(x - u) + u / sx`` (``sx`` the scale of
    :func:`_scaled_coords`), so by the binomial theorem ``xs**i ys**j (I * K)`` is the sum
    over ``a <= i``, ``b <= j`` of ``C(i, a) C(j, b) (xs**a ys**b I) * (K (u / sx)**(i - a)
    (v / sy)**(j - b))``, exactly (a linear convolution, zeros outside the image).
    """
    ny, nx = image_shape
    half = (kernels.shape[-1] - 1) // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    u = off / max((nx - 1) / 2.0, 1.0)  # along x (columns)
    v = off / max((ny - 1) / 2.0, 1.0)  # along y (rows)
    index = {m: k for k, m in enumerate(monomials)}
    out = np.zeros(kernels.shape, dtype=np.float64)
    for kernel, (i, j) in zip(kernels, monomials, strict=True):
        for a in range(i + 1):
            for b in range(j + 1):
                weight = math.comb(i, a) * math.comb(j, b)
                out[index[(a, b)]] += (
                    weight * kernel * (v ** (j - b))[:, None] * (u ** (i - a))[None, :]
                )
    return out


def _moment_convolution(
    spectra: Sequence[np.ndarray],
    shape: tuple[int, int],
    kernels: np.ndarray,
    out_shape: tuple[int, int],
) -> np.ndarray:
    """``sum_k (M_k * kernels[k])`` of the moment images ``M_k`` whose :func:`_rfft2` are
    ``spectra`` (:func:`_moment_spectra`, :func:`_moment_kernels`): the spatially varying
    convolution of :func:`_spatial_convolution` summed in the Fourier domain, one
    inverse transform in all, float32."""
    ny, nx = out_shape
    half = (kernels.shape[-1] - 1) // 2
    ey, ex = _dft_matrices(shape, half)
    scale = float(shape[0] * shape[1])  # _rfft2 divided the image's transform by it
    acc: np.ndarray | None = None
    work = np.empty(spectra[0].shape, dtype=np.complex64)
    for spec, k in zip(spectra, kernels, strict=True):
        if not np.any(k):
            continue
        np.matmul(ey, (scale * k).astype(np.complex64) @ ex, out=work)
        work *= spec
        if acc is None:
            acc, work = work, np.empty(spectra[0].shape, dtype=np.complex64)
        else:
            acc += work
    del work
    if acc is None:
        return np.zeros((ny, nx), dtype=np.float32)
    np.fft.ifft(acc, axis=0, out=acc)
    return np.fft.irfft(acc[:ny], n=shape[1], axis=1)[:, :nx]


def _share_powers(monomials: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The powers of x of the model's terms for this thread and for the side thread,
    which also convolves the noise (about a forward transform and a term more): largest
    first, each to the less loaded thread (cost: terms + half a term for the inverse
    transform along x)."""
    count: dict[int, int] = {}
    for i, _ in monomials:
        count[i] = count.get(i, 0) + 1
    load = [0.0, 2.8]  # this thread, the side thread (the noise's transforms)
    shares: list[list[int]] = [[], []]
    for i in sorted(count, key=lambda p: -count[p]):
        k = 0 if load[0] <= load[1] else 1
        shares[k].append(i)
        load[k] += count[i] + 0.5
    return shares[0], shares[1]


def _effective_geometry(
    options: OisOptions, fwhm_ref: float | None, fwhm_conv: float | None
) -> tuple[list[float], list[int], int, int, float | None]:
    """Gaussian sigmas, degrees, kernel and stamp half sizes after seeing scaling."""
    sigmas = [options.sigma_gauss1, options.sigma_gauss2, options.sigma_gauss3][: options.ngauss]
    degrees = [options.deg_gauss1, options.deg_gauss2, options.deg_gauss3][: options.ngauss]
    hm, hs = options.half_mesh_size, options.half_stamp_size
    sigma_match = None
    if options.seeing_scale and fwhm_ref and fwhm_conv:
        s_ref, s_conv = fwhm_ref / FWHM_PER_SIGMA, fwhm_conv / FWHM_PER_SIGMA
        sigma_match = math.sqrt(max(s_ref**2 - s_conv**2, 0.0))
        # ISIS's middle Gaussian is meant to be about the matching kernel's width
        scale = max(1.0, sigma_match / options.sigma_gauss2)
        sigmas = [s * scale for s in sigmas]
        hm = max(hm, math.ceil(max(1.5 * fwhm_ref, 3.0 * max(sigmas))))
        hs = max(hs, math.ceil(3.0 * max(fwhm_ref, fwhm_conv)), hm + 4)
    return sigmas, degrees, hm, hs, sigma_match


def _direction(options: OisOptions, sci: _Image, tpl: _Image) -> str:
    """The image to convolve: ``options.convolve``, or for "auto" the narrower PSF's."""
    if options.convolve != "auto":
        return options.convolve
    if sci.fwhm and tpl.fwhm and sci.fwhm < 0.97 * tpl.fwhm:
        return "science"
    return "template"


def _check_shapes(science: Frame, template: Frame) -> None:
    if science.shape != template.shape:
        msg = (
            f"subtract backend 'ois': science {science.name!r} has shape {science.shape}, "
            f"template {template.name!r} has {template.shape}; align them first"
        )
        raise StageError(msg)


def solve(science: Frame, template: Frame, options: OisOptions) -> OisSolution:
    """Fit the ISIS kernel between two registered frames and subtract them.

    Parameters
    ----------
    science, template : Frame
        Registered frames of the same shape. Used fields: ``data``, ``weight``, ``name``,
        ``gain`` (see below), ``saturation``, ``fwhm``, ``background`` (measured when
        None) and ``noise`` (an upper bound of the noise measured on the pixels given).
        Without a gain, a frame that keeps its sky gets sky / noise**2 and a
        sky-subtracted one no source Poisson term.
    options : OisOptions

    Returns
    -------
    OisSolution

    Raises
    ------
    StageError
        If the frames differ in shape, an image has no usable pixel or no stamp star.
    """
    with _single_threaded_blas():
        sci, tpl = prepare_pair(science, template, options)
        return solve_prepared(science, template, sci, tpl, options)


def prepare_pair(science: Frame, template: Frame, options: OisOptions) -> tuple[_Image, _Image]:
    """The two frames prepared for a fit (step 1 of :func:`solve`), side by side in two
    threads (numpy releases the GIL on whole arrays): sky removed, bad pixels, noise,
    gain, FWHM, Fourier transform.

    Raises
    ------
    StageError
        If the frames differ in shape or an image has no usable pixel.
    """
    _check_shapes(science, template)
    with _side_thread(_prepare, template, options, "template") as template_result:
        sci = _prepare(science, options, "science")
    return sci, template_result()


def solve_prepared(
    science: Frame,
    template: Frame,
    sci: _Image,
    tpl: _Image,
    options: OisOptions,
    *,
    direction: str | None = None,
) -> OisSolution:
    """:func:`solve` on frames :func:`prepare_pair` prepared (BLAS threads already set);
    ``direction`` ("template" or "science") replaces the options' choice."""
    if direction is None:
        direction = _direction(options, sci, tpl)
    conv, ref = (tpl, sci) if direction == "template" else (sci, tpl)
    sigmas, degrees, hm, hs, sigma_match = _effective_geometry(options, ref.fwhm, conv.fwhm)
    ny, nx = ref.data.shape
    if min(ny, nx) < 2 * (hs + hm) + 1:
        hs = max(2, (min(ny, nx) - 1) // 2 - hm - 1)

    cand = _candidates(ref, conv, hs, hm, options)
    # what the rest needs of the smoothed images and of the reference's transform: the
    # source mask; free the rest before the whole-image convolutions
    sources = _source_mask(ref, conv)
    ref = attrs.evolve(ref, smooth=None, spectrum=None)
    conv = attrs.evolve(conv, smooth=None)
    sci, tpl = (ref, conv) if direction == "template" else (conv, ref)
    ncand = cand["cy"].size
    if ncand == 0:
        msg = (
            f"subtract backend 'ois': no usable stamp star in science {sci.name!r} / template "
            f"{tpl.name!r} (stars must be unsaturated, unmasked and "
            f"{options.min_stamp_snr:g} sigma in both); lower subtract.ois.min_stamp_snr "
            "or check the weight maps"
        )
        raise StageError(msg)

    # ---- stamp features and per-stamp normal equations
    cy, cx = cand["cy"], cand["cx"]
    # (n, nb, npix): stamp i is feats[i], or feats[rows[i]] (the template's, kept)
    feats, rows, grams = _stamp_features(
        conv, cy, cx, hs, hm, sigmas, degrees, keep=_shared(conv, ref)
    )
    _, _, to_basis = _basis_transform(sigmas, degrees, hm)  # normalised = raw @ to_basis
    off = np.arange(-hs, hs + 1)
    iy = (cy[:, None] + off)[:, :, None]
    ix = (cx[:, None] + off)[:, None, :]
    y = ref.data[iy, ix].reshape(ncand, -1)
    nb = feats.shape[1]
    # The kernel is fitted as ISIS (and hotpants) fit it: every stamp pixel weighs the same
    # (ISIS's build_matrix0 sums the products of the convolved basis images unweighted). The
    # per-pixel variance, stars' photon noise included, only judges the stamps (chi2).
    # Weighting the fit by it gives the stars' cores, where the kernel's shape shows, little
    # say against the stamps' many sky pixels, on which the template's noise through the
    # kernel (sum K**2 times its variance) rewards broad kernels: near-delta kernels (similar
    # seeing) came out too broad, leaving a residual on every bright star.
    m, b, _ = _normal_equations(feats, y, None, to_basis, grams, rows)
    del grams
    local = _solve_sym(m, b)
    raw_coef = (local[:, :nb] @ to_basis.T).astype(np.float32)
    model = _stamp_models(feats, rows, raw_coef) + local[:, nb : nb + 1].astype(np.float32)
    basis = basis_kernels(sigmas, degrees, hm)
    gram = np.einsum("kyx,jyx->kj", basis, basis)
    k2 = np.einsum("nk,kj,nj->n", local[:, :nb], gram, local[:, :nb])  # sum of K**2
    # each stamp's variance from its model (data-based variances are biased low)
    var_conv = conv.variance((iy, ix)).reshape(ncand, -1)
    var = np.float32(ref.noise**2) + np.maximum(model, 0) / np.float32(ref.gain)
    var += k2[:, None].astype(np.float32) * var_conv
    chi2_local = np.mean((y - model) ** 2 / var, axis=1)
    rejected = _robust_outliers(chi2_local, options.sigma_clip, one_sided=True)
    rejected |= _robust_outliers(local[:, 0], options.sigma_clip, one_sided=False)

    xs, ys = _scaled_coords((ny, nx))
    xn, yn = xs[cx], ys[cy]

    # ---- global fit with stamp rejection; lower the degrees if stamps are too few
    ds, db = _degrees_for(_select(cand, rejected).size, options.deg_spatial, options.deg_bg)
    while True:
        layout = _Layout(nb=nb, deg_spatial=ds, deg_bg=db, const_ksum=options.const_ksum)
        for iteration in range(options.max_iter + 1):
            sel = _select(cand, rejected)
            if sel.size == 0:
                break
            big_m, big_b = layout.normal(m[sel], b[sel], xn[sel], yn[sel])
            theta = _solve_sym(big_m, big_b)
            loc = layout.local(theta, xn[sel], yn[sel])
            chi2 = _stamp_chi2(feats, y, var, loc, to_basis, sel, rows)
            if iteration == options.max_iter:
                break
            out = _robust_outliers(chi2, options.sigma_clip, one_sided=True)
            if not out.any() or sel.size - out.sum() < 1:
                break
            rejected[sel[out]] = True
        nsel = sel.size
        if nsel == 0:
            msg = (
                f"subtract backend 'ois': every stamp star was rejected in science "
                f"{sci.name!r} / template {tpl.name!r}; check the inputs are registered"
            )
            raise StageError(msg)
        ds_new, db_new = _degrees_for(nsel, ds, db)
        if (ds_new, db_new) == (ds, db):
            break
        ds, db = ds_new, db_new

    coef, bg_coef = layout.unpack(theta)
    kernel_center = np.einsum("k,kyx->yx", coef[:, 0], basis)  # P_s(0, 0) = [1, 0, ...]
    ksum = float(coef[0, 0])

    # ---- apply to the whole image
    del feats, rows, var, var_conv, model
    monomials = _monomials(ds)
    kernels = np.einsum("ks,kyx->syx", coef[:, : len(monomials)], basis)
    ksum_img: np.ndarray | float = ksum
    if not options.const_ksum:
        for s, (i, j) in enumerate(monomials):
            if s > 0 and coef[0, s] != 0:
                ksum_img = ksum_img + coef[0, s] * np.outer(ys**j, xs**i)
    residual, noise, weight = apply_kernel(
        ref,
        conv,
        direction=direction,
        kernels=kernels,
        bg_coef=bg_coef,
        deg_bg=db,
        ksum_img=ksum_img,
        inputs=tuple(getattr(template, "inputs", ()) or ()),
        science_name=sci.name,
    )

    # constant of the differential background in the frames' own levels:
    # unconvolved - K * convolved = bg_total at the image centre
    bg_total = float(bg_coef[0]) + ref.sky - ksum * conv.sky
    flag = ""
    if (ds, db) != (options.deg_spatial, options.deg_bg) or nsel < STAMPS_PER_TERM:
        flag = f"few stamps: {nsel}"
    meta: dict[str, Any] = {
        "nstamps": int(nsel),
        "nrejected": int(rejected.sum()),
        "ncandidates": int(ncand),
        "ksum": ksum,
        "deg_spatial": ds,
        "deg_bg": db,
        "half_mesh": hm,
        "half_stamp": hs,
        "sigmas": ",".join(f"{s:.3g}" for s in sigmas),
        "bg": bg_total,
        # the residual's PSF is the unconvolved image's
        "fwhm": float("nan") if ref.fwhm is None else ref.fwhm,
        "fwhm_science": float("nan") if sci.fwhm is None else sci.fwhm,
        "fwhm_template": float("nan") if tpl.fwhm is None else tpl.fwhm,
        "chi2": float(np.median(chi2)),
    }
    if sigma_match is not None:
        meta["sigma_match"] = sigma_match
    if flag:
        meta["flag"] = flag
    return OisSolution(
        residual=residual,
        noise=noise,
        weight=weight,
        kernel=kernel_center.astype(np.float32),
        coefficients=coef,
        bg_coefficients=np.asarray(bg_coef, dtype=np.float64),
        direction=direction,
        ksum=ksum,
        sources=sources,
        meta=meta,
    )


def apply_kernel(
    ref: _Image,
    conv: _Image,
    *,
    direction: str,
    kernels: np.ndarray,
    bg_coef: np.ndarray,
    deg_bg: int,
    ksum_img: np.ndarray | float,
    inputs: Sequence[str] = (),
    science_name: str = "",
    ref_psf: np.ndarray | None = None,
    science_variance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve ``conv`` by a spatially varying kernel and subtract: residual, noise, weight.

    Step 7 of :func:`solve`, shared by every kernel model of the backend.
    ``conv(x) = sum_s P_s(x) (I * K_s)(x) + bg(x)`` with ``K_s = kernels[s]`` the kernel's
    spatial components (the monomials of :func:`_monomials`, ``len(kernels)`` of them)
    and ``bg`` the polynomial ``bg_coef`` of degree ``deg_bg``, by FFT
    (:func:`_spatial_convolution`; for an image convolved for several frames, the
    template of a series, from the transforms of its moments, one inverse transform in
    all: :func:`_moment_convolution`, the same to float32 rounding); the noise image's
    convolution (the convolved image's variance through the kernel squared at the
    centre, its transform kept with the image) runs beside it.

    Parameters
    ----------
    ref, conv : _Image
        The image not convolved and the one convolved.
    direction : str
        ``"template"`` (``conv`` is the template: residual = ref - model) or
        ``"science"`` (residual = (model - ref) / ksum, in the science's system).
    kernels : ndarray
        ``(n_spatial, 2h + 1, 2h + 1)``.
    bg_coef : ndarray
        Differential background coefficients (monomials of degree ``deg_bg``).
    ksum_img : float or ndarray
        The kernel sum (an image when it varies over the field).
    inputs, science_name : sequence of str, str
        The template's input frames and the science's name: when the science is one of
        them, its covariance with the template is removed from the noise.
    ref_psf, science_variance : ndarray, optional
        For a reference that was itself convolved (cross-convolution): the kernel it was
        convolved with and the science's own variance, for the covariance; default none
        (a unit delta) and the variance of the science image given.

    Returns
    -------
    residual, noise, weight : ndarray
        float32 images.
    """
    ny, nx = ref.data.shape
    xs, ys = _scaled_coords((ny, nx))
    ds_monomials = _monomials(_degree_of(len(kernels)))
    hm = (kernels.shape[-1] - 1) // 2
    kernel_center = kernels[0]
    ksum = float(kernel_center.sum())
    # the model's terms and the noise (the convolved image's variance through the
    # kernel squared at the centre) in two threads of about equal work
    mine, theirs = _share_powers(ds_monomials)
    spec, shape = _transform(conv, hm)
    noise_kernel = (kernel_center**2)[None]
    # an image convolved for many frames (the template) keeps the transforms of its
    # moments: the model is then one inverse transform (the noise's beside it)
    moments = None
    if len(kernels) > 1 and spec is conv.spectrum and _shared(conv, ref):
        moments = _moment_spectra(conv, spec, shape, _degree_of(len(kernels)))
    if moments is not None:
        theirs = []

    def side(spec: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        var_spec = _variance_spectrum(conv, shape)
        var_conv = _spatial_convolution(var_spec, shape, noise_kernel, [(0, 0)], xs, ys)
        del var_spec
        part = None
        if theirs:
            part = _spatial_convolution(spec, shape, kernels, ds_monomials, xs, ys, theirs)
        return var_conv, part

    with _side_thread(side, spec) as side_result:
        if moments is not None:
            model_img = _moment_convolution(
                moments, shape, _moment_kernels(kernels, ds_monomials, (ny, nx)), (ny, nx)
            )
        else:
            model_img = _spatial_convolution(spec, shape, kernels, ds_monomials, xs, ys, mine)
    var_conv_img, part = side_result()
    if part is not None:
        model_img += part
    del part, side_result, spec
    if not np.isscalar(ksum_img):
        var_conv_img *= (np.asarray(ksum_img) / ksum) ** 2
    noise2 = ref.variance()
    if ref.var is not None:  # the image's own variance: not to be changed
        noise2 = noise2.copy()
    noise2 += np.maximum(var_conv_img, 0, out=var_conv_img)
    scratch = var_conv_img  # free now: the background's terms are made in it
    del var_conv_img
    # the background polynomial, one pass per power of x: sum_i xs**i (sum_j c_ij ys**j)
    by_power: dict[int, np.ndarray] = {}
    for c, (i, j) in zip(bg_coef, _monomials(deg_bg), strict=True):
        by_power[i] = by_power.get(i, 0.0) + c * ys**j
    for i, column in by_power.items():
        column32 = np.asarray(column, dtype=np.float32)[:, None]
        if i:
            model_img += np.multiply(column32, (xs**i).astype(np.float32)[None, :], out=scratch)
        else:
            model_img += column32
    del scratch
    if science_name and science_name in inputs:
        # The science frame is one of the N frames stacked into the template, so its noise
        # is partly in the template too: Cov(S(x), T(x)) = var_S(x) / N (exact for the
        # mean, and for the median of Gaussian samples, by Basu's theorem). Through the
        # kernels (K on the template, P on a cross-convolved science, a unit delta
        # otherwise) that is sum(P K) var_S / N, counted twice in var(P*S - K*T).
        if science_variance is None:
            science_variance = (ref if direction == "template" else conv).variance()
        delta = np.ones((1, 1))
        overlap = _centred_overlap(kernel_center, delta if ref_psf is None else ref_psf)
        cov = (2.0 * max(overlap, 0.0) / len(inputs)) * science_variance
        noise2 = np.maximum(noise2 - cov, 0.25 * noise2)
    if direction == "template":
        residual = ref.data - model_img  # science - K*template (skies removed, refit by bg)
        noise = np.sqrt(noise2, out=noise2)
    else:
        residual = model_img - ref.data
        residual /= np.asarray(ksum_img, dtype=np.float32)
        noise = np.sqrt(noise2, out=noise2)
        noise /= np.abs(np.asarray(ksum_img, dtype=np.float32))
    weight = _residual_weight(ref, conv, hm)
    return (
        residual.astype(np.float32, copy=False),
        noise.astype(np.float32, copy=False),
        weight,
    )


def _centred_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` of two odd square kernels centred on each other (sizes may differ)."""
    h = min(a.shape[0], b.shape[0]) // 2
    ca, cb = a.shape[0] // 2, b.shape[0] // 2
    return float(
        np.sum(
            a[ca - h : ca + h + 1, ca - h : ca + h + 1]
            * b[cb - h : cb + h + 1, cb - h : cb + h + 1]
        )
    )


def _degree_of(nterms: int) -> int:
    """The polynomial degree with ``nterms`` monomials (1 -> 0, 3 -> 1, 6 -> 2...)."""
    deg = 0
    while _nterms(deg) < nterms:
        deg += 1
    if _nterms(deg) != nterms:
        raise ValueError(f"{nterms} is not the number of monomials of any degree")
    return deg


def _source_mask(ref: _Image, conv: _Image) -> np.ndarray:
    """Pixels within ~FWHM of a 3-sigma (after 1-px Gaussian smoothing) source."""
    # smoothing white noise with a unit Gaussian divides its std by 2 sqrt(pi)
    factor = 1.0 / (2.0 * math.sqrt(math.pi))
    src = np.zeros(ref.data.shape, dtype=bool)
    for im in (ref, conv):
        src |= im.smooth > 3.0 * factor * im.noise
    return _sliding_max(src, round(max(ref.fwhm or 3.0, conv.fwhm or 3.0)))


def _residual_weight(ref: _Image, conv: _Image, hm: int) -> np.ndarray:
    """min of the two weights; 0 where the reference is bad, within hm of a bad pixel of
    the convolved image (the kernel reaches it) and within hm of the edges."""
    w = np.minimum(ref.weight, conv.weight)
    np.copyto(w, 0.0, where=ref.bad)
    if conv.bad.any():
        grown = _derived(conv.bad, ("grown", hm), lambda: _sliding_max(conv.bad, hm))
        np.copyto(w, 0.0, where=grown)
    w[:hm], w[-hm:], w[:, :hm], w[:, -hm:] = 0.0, 0.0, 0.0, 0.0
    return np.clip(w, 0, 1, out=w).astype(np.float32, copy=False)
