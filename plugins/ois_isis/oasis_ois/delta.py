"""The delta-function kernel basis (Bramich 2008), fitted over the whole image.

As in DanDIA and pyDIA, the kernel is a free pixel array: one coefficient per kernel
pixel, ``(2 h + 1)**2`` of them, with no Gaussian widths to choose, which is what crowded
fields, odd and elongated PSFs need. The basis is Bramich's: the central pixel's delta
``d_0`` and ``d_uv - d_0`` for every other pixel, so that the first coefficient is the
kernel sum (the photometric scale) and the others sum to zero. Each coefficient may vary
over the image as a polynomial of degree ``ds`` in the scaled pixel position (Bramich
et al. 2013; the kernel sum kept constant unless ``const_ksum`` is off) and a
differential background polynomial of degree ``db`` is fitted with it.

The fit (:func:`fit_delta`):

1. **Pixels.** Every pixel on a source (in either image) that is good in the reference,
   whose kernel footprint in the convolved image is good and that lies ``h`` px inside
   the frame, except around stars the census rejected (variables, transients on stars;
   :mod:`oasis_ois.stars`). Above :data:`MAX_PIXELS` they are subsampled on a regular
   stride, each weighted by its inverse sampling rate, so that the equations are those of
   all of them. Sky pixels enter only when the sources leave too few: there the
   convolved image's noise alone, uncorrelated with the reference's, would pull the
   kernel toward zero (errors in the variables), a bias that grows with their number.
2. **Normal equations** from shifted copies of the convolved image: the pixels'
   ``(n, n_groups)`` matrix ``F`` of the shifted values ``C(x - u)`` summed over each
   group of kernel pixels is gathered (float32; a 2 x 2 or 3 x 3 block is one value of
   the image's block sums), and ``F' diag(w m) F`` accumulated by chunks of pixels in
   float64 for every product ``m`` of two spatial monomials (the distinct products only;
   symmetric rank-k updates, two threads), then carried to Bramich's basis and
   assembled. As in ISIS every pixel weighs the same (only the sampling weights):
   weighting by the variance gives the sky, where the template's noise rewards smooth
   kernels, too much say against the stars' cores.
3. **Regularisation** (Becker et al. 2012; Bramich et al. 2016): ``lambda * |L k|**2``
   with ``L`` the 5-point Laplacian of each spatial term's kernel image (zero outside),
   weighed against chi2: ``lambda = delta_lambda`` times the pixels' typical variance
   (the fit's pixels weigh 1), so that noise does not make a jagged kernel while the
   stars' signal, however bright, decides its shape.
4. **Clipping.** The pixels farther than ``pixel_clip`` sigmas from the model (the noise
   model: the reference's variance plus the convolved image's through the kernel) and
   their neighbours within a PSF half-width are removed (their contribution subtracted
   from the equations), and so are the stars whose flux in the residual is off the
   other stars' (:func:`deviant_objects`: a transient on a star makes its star the
   odd one even when the fit followed it), and the fit redone, up to ``max_iter``
   times: transients, variables and cosmic rays never drive the kernel. The pixels of
   the census's stars still in the fit are never clipped one by one
   (:func:`star_pixels`): a star enters or leaves the fit whole, because its core,
   where every kernel leaves its largest mismatch, is also what fixes the kernel's sum.

:func:`solve_delta` runs it on a prepared pair and applies the kernel to the whole
image (:func:`oasis_ois.ois.apply_kernel`).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_ois.ois import (
    FWHM_PER_SIGMA,
    OisOptions,
    OisSolution,
    _Image,
    _monomials,
    _nterms,
    _scaled_coords,
    _sliding_max,
    _solve_sym,
    apply_kernel,
)
from oasis_ois.stars import Census, major_over_mean, outliers

__all__ = [
    "MAX_PIXELS",
    "STARS_PER_TERM",
    "DeltaFit",
    "delta_degree",
    "delta_half",
    "deviant_objects",
    "fit_delta",
    "kernel_groups",
    "object_labels",
    "outer_half",
    "solve_delta",
    "star_pixels",
]

#: At most about this many pixels enter the normal equations (sampled above it).
MAX_PIXELS = 60_000

#: Pixels gathered per chunk of the normal equations.
CHUNK = 4096

#: A spatial polynomial of n terms needs at least this many stars per term.
STARS_PER_TERM = 10

#: The delta kernel varies at most linearly over the frame: its equations grow with the
#: square of the spatial terms (well-populated frames whose PSF varies more are ISIS's).
MAX_DEGREE = 1

#: Kernel core half sizes (single pixels) are kept between these (px).
MIN_HALF, MAX_CORE = 3, 8

#: The kernel's blocks reach this many FWHMs of the reference's major axis (Moffat wings).
WING_FWHM = 2.5

#: ... but no farther than this (px).
MAX_HALF = 20


@attrs.frozen(kw_only=True)
class DeltaFit:
    """A fitted delta-basis kernel (internal to the backend's models).

    Attributes
    ----------
    kernels : ndarray
        ``(n_spatial, 2h + 1, 2h + 1)`` raw kernel images of the spatial terms.
    bg : ndarray
        Differential background coefficients.
    deg_spatial, deg_bg : int
    ksum : float
        Kernel sum at the image centre.
    npix, nclipped : int
        Pixels in the equations and clipped out of them.
    chi2 : float
        Mean squared normalised residual of the pixels kept.
    lam : float
        The regularisation weight used.
    core : int
        Half size of the core of single kernel pixels (the rest is in blocks).
    """

    kernels: np.ndarray = attrs.field(eq=False, repr=False)
    bg: np.ndarray = attrs.field(eq=False, repr=False)
    deg_spatial: int
    deg_bg: int
    ksum: float
    npix: int
    nclipped: int
    chi2: float
    lam: float
    core: int = 0


def delta_half(
    options: OisOptions, fwhm_ref: float | None, fwhm_conv: float | None, elongation: float = 1.0
) -> int:
    """The half size of the kernel's core of single pixels: ``options.delta_half`` when
    set, else ``max(2 sigma_match, FWHM_ref / 2) * elongation + 1`` (``sigma_match`` the
    width of the Gaussian between the two FWHMs, ``elongation`` the reference's major /
    mean axis), between :data:`MIN_HALF` and :data:`MAX_CORE`.

    Examples
    --------
    >>> delta_half(OisOptions(), 6.0, 3.0)
    6
    """
    if options.delta_half > 0:
        return int(options.delta_half)
    f_ref = fwhm_ref or 4.0
    f_conv = fwhm_conv or f_ref
    sm = math.sqrt(max(f_ref**2 - f_conv**2, 0.0)) / FWHM_PER_SIGMA
    half = math.ceil(max(2.0 * sm, 0.5 * f_ref) * elongation + 1.0)
    return int(min(max(half, MIN_HALF), MAX_CORE))


def outer_half(
    options: OisOptions,
    core: int,
    fwhm_ref: float | None,
    elongation: float,
    shape: tuple[int, int],
) -> int:
    """The kernel's full half size: the core when ``delta_half`` is set, else far enough
    for a Moffat-like PSF's wings (``WING_FWHM`` times the reference's major-axis FWHM),
    at most :data:`MAX_HALF` and a tenth of the frame's smaller side (the residual is
    masked within the half size of the edges: a 63 px cutout keeps 80 % of its pixels);
    never below the core, which is kept within that tenth too (but not below 2)."""
    small = max(2, min(shape) // 10)
    core = min(core, small)
    if options.delta_half > 0:
        return core
    wings = math.ceil(WING_FWHM * (fwhm_ref or 4.0) * elongation)
    return int(max(core, min(wings, MAX_HALF, small)))


def kernel_groups(core: int, half: int) -> np.ndarray:
    """Group of each kernel pixel, ``((2 half + 1)**2,)`` row by row: every pixel of
    Chebyshev radius <= ``core`` on its own, 2 x 2 blocks out to ``2 core``, 3 x 3
    blocks beyond (the wings need no pixel resolution), -1 for the corners beyond the
    circle of radius ``half + 1/2`` (outside the kernel). Groups are numbered in order
    of their first pixel.

    Examples
    --------
    >>> g = kernel_groups(1, 3)
    >>> g.size, int(g.max()) + 1 < g.size, int(g.min())
    (49, True, -1)
    """
    u = np.arange(-half, half + 1)
    uu, vv = np.meshgrid(u, u)
    rho = np.maximum(np.abs(uu), np.abs(vv))
    outside = (uu**2 + vv**2 > (half + 0.5) ** 2) & (rho > core)
    size = np.where(rho <= core, 1, np.where(rho <= 2 * core, 2, 3))
    zone = np.where(rho <= core, 0, np.where(rho <= 2 * core, 1, 2))
    key = np.stack([zone, np.floor_divide(vv, size), np.floor_divide(uu, size)], -1).reshape(-1, 3)
    # singles keep their own pixel as key
    single = (zone == 0).ravel()
    key[single, 1:] = np.stack([vv.ravel()[single], uu.ravel()[single]], -1)
    inside = ~outside.ravel()
    _, first, inverse = np.unique(key[inside], axis=0, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    out = np.full(key.shape[0], -1, dtype=np.int64)
    out[inside] = rank[inverse.ravel()]
    return out


def delta_degree(nstars: int, requested: int) -> int:
    """Highest spatial degree, at most the one requested and :data:`MAX_DEGREE`, with
    :data:`STARS_PER_TERM` stars per term.

    Examples
    --------
    >>> delta_degree(100, 2), delta_degree(25, 2), delta_degree(5, 2)
    (1, 0, 0)
    """
    ds = min(requested, MAX_DEGREE)
    while ds > 0 and nstars < STARS_PER_TERM * _nterms(ds):
        ds -= 1
    return ds


def _grid(half: int) -> np.ndarray:
    """Chebyshev radius of each kernel pixel, ``(2 half + 1, 2 half + 1)``."""
    u = np.arange(-half, half + 1)
    return np.maximum(np.abs(u)[:, None], np.abs(u)[None, :])


def _laplacian(half: int) -> np.ndarray:
    """5-point Laplacian on the kernel grid (zero outside), ``(nk, nk)``."""
    n = 2 * half + 1
    nk = n * n
    lap = -4.0 * np.eye(nk)
    idx = np.arange(nk).reshape(n, n)
    for a, b in (
        (idx[:, :-1], idx[:, 1:]),
        (idx[:, 1:], idx[:, :-1]),
        (idx[:-1], idx[1:]),
        (idx[1:], idx[:-1]),
    ):
        lap[a.ravel(), b.ravel()] = 1.0
    return lap


def _to_basis(sizes: np.ndarray, centre: int) -> np.ndarray:
    """T with group values = T @ c: ``c[centre]`` is the kernel sum, ``c[j]`` (j !=
    centre) the coefficient of ``group_j - size_j d_centre`` (Bramich's basis)."""
    t = np.eye(sizes.size)
    t[centre, :] = -sizes
    t[centre, centre] = 1.0
    return t


def _select_pixels(
    ref: _Image,
    conv: _Image,
    half: int,
    sources: np.ndarray,
    exclude: np.ndarray | None,
    max_pixels: int,
    min_pixels: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows, columns and sampling weights for the equations (step 1): the sources'
    pixels (at most ``max_pixels``, sampled), and sky pixels only up to ``min_pixels``
    in all."""
    ny, nx = ref.data.shape
    valid = ~ref.bad
    if conv.bad.any():
        valid &= ~_sliding_max(conv.bad, half)
    valid[:half] = valid[ny - half :] = False
    valid[:, :half] = valid[:, nx - half :] = False
    if exclude is not None:
        valid &= ~exclude
    on = valid & sources
    off = valid & ~sources
    n_on, n_off = int(on.sum()), int(off.sum())
    if n_on + n_off == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    # the sky only as far as the sources leave too few pixels: on the sky the convolved
    # image's noise, uncorrelated with the reference's, pulls the kernel toward zero
    # (the bias of errors in the variables), the more so the more sky pixels there are
    budget_on = max_pixels
    budget_off = max(min_pixels - n_on, 0)
    rows, cols, wts = [], [], []
    for mask, count, budget in ((on, n_on, budget_on), (off, n_off, budget_off)):
        if count == 0 or budget == 0:
            continue
        y, x = np.nonzero(mask)
        if count > budget:
            step = count / budget
            take = np.floor(np.arange(budget) * step).astype(np.int64)
            y, x = y[take], x[take]
        rows.append(y)
        cols.append(x)
        wts.append(np.full(y.size, count / y.size))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(wts)


def _signal_weight(conv: _Image, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """``c**2 / (c**2 + (3 s)**2)``: ``c`` the convolved image's 3 x 3 mean at each pixel
    and ``s`` its noise (``noise / 3``): about 1 on stars, about 0 on the sky. The
    convolved image's noise biases the kernel toward zero where it is comparable to the
    signal (errors in the variables); these weights leave the kernel to the pixels whose
    signal is well above that noise."""
    ny, nx = conv.data.shape
    c = np.zeros(iy.size)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            c += conv.data[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)]
    c /= 9.0
    s2 = conv.noise**2  # (3 * noise / 3)**2
    return c * c / (c * c + s2)


def _box_sums(image: np.ndarray, size: int) -> np.ndarray:
    """``B[p, q] = sum(image[p - dv, q - du] for dv, du in [0, size))`` (zero outside),
    float32 from float64 sums: the sum over a ``size x size`` block of kernel pixels whose
    smallest offsets are ``(v, u)`` is ``B[y - v, x - u]``."""
    b = np.asarray(image, dtype=np.float64)
    for axis in (0, 1):
        acc = b.copy()
        for shift in range(1, size):
            if axis == 0:
                acc[shift:] += b[:-shift]
            else:
                acc[:, shift:] += b[:, :-shift]
        b = acc
    return b.astype(np.float32)


def _features(
    image: np.ndarray, iy: np.ndarray, ix: np.ndarray, half: int, groups: np.ndarray
) -> np.ndarray:
    """``(n, n_groups)`` float32: the shifted copies of ``image`` summed over each group of
    kernel pixels (a group's feature is the image convolved by its indicator).

    A single pixel's feature is one shifted value; a group that fills an aligned square
    block (the 2 x 2 and 3 x 3 blocks of :func:`kernel_groups`) is one value of the
    image's block sums (:func:`_box_sums`); only the partial blocks (cut by the zones or
    the circle) sum their pixels' values. One gather of a value per group and pixel.
    """
    nx = image.shape[1]
    n = 2 * half + 1
    off = np.arange(-half, half + 1)
    v_of = np.repeat(off, n)  # kernel pixel k = (v, u), row by row
    u_of = np.tile(off, n)
    ng = int(groups.max()) + 1
    flat = iy.astype(np.int64) * nx + ix
    single = np.asarray(image, dtype=np.float32).ravel()
    boxes: dict[int, np.ndarray] = {}
    # column by column (Fortran order): each a gather of whole-image values at one shift
    out = np.empty((iy.size, ng), dtype=np.float32, order="F")
    for g in range(ng):
        members = np.flatnonzero(groups == g)
        v, u = v_of[members], u_of[members]
        side = int(v.max() - v.min()) + 1
        if members.size == 1:
            np.take(single, flat - (int(v[0]) * nx + int(u[0])), out=out[:, g], mode="clip")
        elif side * side == members.size and int(u.max() - u.min()) + 1 == side:
            if side not in boxes:
                boxes[side] = _box_sums(image, side).ravel()
            shift = int(v.min()) * nx + int(u.min())
            np.take(boxes[side], flat - shift, out=out[:, g], mode="clip")
        else:  # a block cut by a zone boundary or the circle: its pixels one by one
            acc = np.zeros(iy.size, dtype=np.float64)
            for vm, um in zip(v, u, strict=True):
                acc += single[flat - (int(vm) * nx + int(um))]
            out[:, g] = acc
    return out


class _Equations:
    """Accumulated data term of the normal equations (step 2)."""

    def __init__(self, nk: int, ds: int, db: int) -> None:
        self.nk, self.ds, self.db = nk, ds, db
        deg = max(2 * ds, ds + db, 2 * db)
        self.monos = _monomials(deg)
        self.index = {m: i for i, m in enumerate(self.monos)}
        self.n_g = _nterms(2 * ds)  # F' diag(w m) F for these monomials
        self.n_h = _nterms(ds + db)
        self.g = np.zeros((self.n_g, nk, nk))
        self.h = np.zeros((self.n_h, nk))  # F' (w m)
        self.hh = np.zeros(len(self.monos))  # sum w m
        self.rk = np.zeros((_nterms(ds), nk))  # F' (w P_s y)
        self.rb = np.zeros(_nterms(db))  # sum w P_b y

    def add(
        self, f: np.ndarray, w: np.ndarray, mono: np.ndarray, y: np.ndarray, sign: float = 1.0
    ) -> None:
        """Add (or with ``sign=-1`` remove) pixels: features ``f`` (n, nk), weights ``w``,
        monomial values ``mono`` (n, n_monos), data ``y``; float32 products of
        :data:`CHUNK` pixels summed in float64, the chunks shared by two threads.

        Each ``F' diag(w m) F`` is a difference of two symmetric products (a BLAS rank-k
        update, half a general product's work): ``A' A`` over the pixels where ``w m > 0``
        (``A`` the rows scaled by ``sqrt(w m)``) minus ``B' B`` over those where it is
        negative."""
        from oasis_ois.ois import _in_two_threads

        nsp, nbg = _nterms(self.ds), _nterms(self.db)
        parts: dict[int, tuple[np.ndarray, ...]] = {}

        def accumulate(start: int, stop: int) -> None:
            g = np.zeros_like(self.g)
            h = np.zeros_like(self.h)
            hh = np.zeros_like(self.hh)
            rk = np.zeros_like(self.rk)
            rb = np.zeros_like(self.rb)
            for lo in range(start, stop, CHUNK):
                sl = slice(lo, min(lo + CHUNK, stop))
                fc, wc, mc, yc = f[sl], w[sl], mono[sl], y[sl]
                wm64 = wc[:, None] * mc
                wm = wm64.astype(np.float32)
                for i in range(self.n_g):
                    col = wm[:, i]
                    for rows, scale in ((col > 0, 1.0), (col < 0, -1.0)):
                        if rows.any():
                            a = fc[rows] * np.sqrt(scale * col[rows])[:, None]
                            g[i] += scale * (a.T @ a).astype(np.float64)
                h += (wm[:, : self.n_h].T @ fc).astype(np.float64)
                hh += wm64.sum(axis=0)
                wy = (wc * yc)[:, None] * mc[:, : max(nsp, nbg)]
                rk += (wy[:, :nsp].astype(np.float32).T @ fc).astype(np.float64)
                rb += wy[:, :nbg].sum(axis=0)
            parts[start] = (g, h, hh, rk, rb)

        _in_two_threads(accumulate, f.shape[0], CHUNK)
        for start in sorted(parts):  # a fixed order: the same sums whichever thread ends first
            g, h, hh, rk, rb = parts[start]
            self.g += sign * g
            self.h += sign * h
            self.hh += sign * hh
            self.rk += sign * rk
            self.rb += sign * rb


def _layout(nk: int, centre: int, nsp: int, const_ksum: bool) -> tuple[np.ndarray, np.ndarray]:
    """(basis function, spatial term) of each kernel unknown: the kernel sum first (one
    unknown when constant), then every other function for each spatial term."""
    others = np.array([j for j in range(nk) if j != centre])
    ks, ss = [], []
    for s in range(nsp):
        if s == 0 or not const_ksum:
            ks.append(np.array([centre]))
            ss.append(np.array([s]))
        ks.append(others)
        ss.append(np.full(others.size, s))
    return np.concatenate(ks), np.concatenate(ss)


def _congruence(g: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``T' G_m T`` for each matrix of ``g`` (m, nk, nk). Bramich's ``T``
    (:func:`_to_basis`) is the identity but for one row ``c``, ``T = I + e_c d'``: then
    ``G T = G + G e_c d'`` and ``T' (G T) = G T + d e_c' G T``, two rank-one updates
    instead of two matrix products per ``m``."""
    eye = np.eye(t.shape[0])
    rows = np.flatnonzero(np.any(t != eye, axis=1))
    if rows.size != 1 or t[rows[0], rows[0]] != 1.0:
        return t.T[None] @ g @ t[None]
    c = int(rows[0])
    d = t[c] - eye[c]
    gt = g + g[:, :, c, None] * d[None, None, :]
    return gt + d[None, :, None] * gt[:, c, None, :]


def _assemble(
    eq: _Equations,
    t: np.ndarray,
    reg: np.ndarray,
    lam: float,
    layout: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The full normal matrix and right-hand side in Bramich's basis (steps 2-3)."""
    k_idx, s_idx = layout
    sp = _monomials(eq.ds)
    bgm = _monomials(eq.db)
    gb = _congruence(eq.g, t)  # T' G_m T
    hb = eq.h @ t  # (n_h, nk)
    rkb = eq.rk @ t
    prod = np.array(
        [[eq.index[(a[0] + b[0], a[1] + b[1])] for b in sp] for a in sp], dtype=np.int64
    )
    m_kk = gb[prod[s_idx[:, None], s_idx[None, :]], k_idx[:, None], k_idx[None, :]]
    # regularisation: each spatial term's own kernel image
    same = s_idx[:, None] == s_idx[None, :]
    m_kk += lam * np.where(same, reg[k_idx[:, None], k_idx[None, :]], 0.0)
    kb = np.array([[eq.index[(a[0] + b[0], a[1] + b[1])] for b in bgm] for a in sp])
    m_kb = hb[kb[s_idx], k_idx[:, None]]  # (U_k, nbg)
    bb = np.array([[eq.index[(a[0] + b[0], a[1] + b[1])] for b in bgm] for a in bgm])
    m_bb = eq.hh[bb]
    big = np.block([[m_kk, m_kb], [m_kb.T, m_bb]])
    rhs = np.concatenate([rkb[s_idx, k_idx], eq.rb])
    return big, rhs


def _solve_spd(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a symmetric positive (semi-)definite system by Cholesky after Jacobi scaling
    (a third of an LU's work); a singular one by :func:`oasis_ois.ois._solve_sym`."""
    from scipy.linalg import solve_triangular

    d = np.sqrt(np.abs(np.diagonal(m)))
    d = np.where(d > 0, d, 1.0)
    ms = m / np.outer(d, d)
    ms[np.diag_indices_from(ms)] += 1e-10
    try:
        low = np.linalg.cholesky(ms)  # numpy's BLAS: the one held to a thread in the fit
    except np.linalg.LinAlgError:
        return _solve_sym(m, b)
    half = solve_triangular(low, b / d, lower=True, check_finite=False)
    return solve_triangular(low.T, half, lower=False, check_finite=False) / d


def fit_delta(
    ref: _Image,
    conv: _Image,
    options: OisOptions,
    *,
    half: int,
    deg_spatial: int,
    deg_bg: int,
    sources: np.ndarray,
    core: int | None = None,
    exclude: np.ndarray | None = None,
    clip_radius: int = 2,
    stars: Census | None = None,
    ksum: float | None = None,
) -> DeltaFit:
    """Fit ``ref ~ K * conv + bg`` with the delta basis (see the module doc).

    Parameters
    ----------
    ref, conv : _Image
        Prepared images (sky removed, bad pixels set to 0 and flagged).
    options : OisOptions
        ``delta_lambda``, ``pixel_clip``, ``max_iter``, ``const_ksum``.
    half, deg_spatial, deg_bg : int
        Kernel half size and the polynomial degrees.
    sources : ndarray of bool
        Pixels on sources (sampled apart from the sky).
    core : int, optional
        Half size of the core of single pixels (:func:`kernel_groups`); default ``half``
        (every pixel its own).
    exclude : ndarray of bool, optional
        Pixels never to use (around rejected stars).
    clip_radius : int
        Clipped pixels take their neighbours within this radius with them.
    stars : Census, optional
        The pair's stars: after each fit, a star whose flux in the residual is off the
        others' (more than ``sigma_clip`` times its noise, or the stars' robust spread
        if larger) leaves the fit with its aperture (:func:`deviant_objects`), so that
        a transient on a star, however bright, never bends the kernel.
    ksum : float, optional
        Hold the kernel sum (the flux scale) at this value, constant over the image
        (with too few stars to tell a flux scale from a variable one).

    Raises
    ------
    StageError
        When too few pixels can enter the fit.
    """
    n = 2 * half + 1
    groups = kernel_groups(half if core is None else min(core, half), half)
    ng = int(groups.max()) + 1
    inside = groups >= 0
    sizes = np.bincount(groups[inside]).astype(np.float64)
    centre = int(groups[(n * n) // 2])
    ny, nx = ref.data.shape
    iy, ix, wts = _select_pixels(ref, conv, half, sources, exclude, MAX_PIXELS, 8 * ng)
    if iy.size < 4 * ng:
        msg = (
            f"subtract backend 'ois': delta kernel: {iy.size} usable pixels for a "
            f"{n}x{n} kernel in science/template {ref.name!r}/{conv.name!r}"
        )
        raise StageError(msg)
    wts = wts * _signal_weight(conv, iy, ix)
    xs, ys = _scaled_coords((ny, nx))
    eq = _Equations(ng, deg_spatial, deg_bg)
    xn, yn = xs[ix], ys[iy]
    mono = np.stack([xn**i * yn**j for i, j in eq.monos], axis=1)
    y_all = ref.data[iy, ix].astype(np.float64)
    feats = _features(conv.data, iy, ix, half, groups)
    eq.add(feats, wts, mono, y_all)
    t = _to_basis(sizes, centre)
    members = np.zeros((n * n, ng))
    members[np.flatnonzero(inside), groups[inside]] = 1.0
    lap_t = _laplacian(half) @ members @ t
    reg = lap_t.T @ lap_t
    # the blocks of the wings (beyond the core) are also pulled toward zero: far from the
    # stars' cores they are little constrained, and noise there bends the kernel's shape
    wing = (members.T @ (np.abs(_grid(half)) > (half if core is None else core)).ravel()) > 0
    ridge = np.diag(np.where(wing, sizes, 0.0))
    reg = reg + t.T @ ridge @ t
    nsp = _nterms(deg_spatial)
    nbg = _nterms(deg_bg)
    layout = _layout(ng, centre, nsp, options.const_ksum or ksum is not None)
    var_ref = ref.variance((iy, ix))
    var_conv = conv.variance((iy, ix))
    # the penalty weighs against chi2 (Becker et al. 2012): with unit pixel weights its
    # weight is lambda times the pixels' typical variance
    lam = options.delta_lambda * float(np.median(var_ref + var_conv))
    kept = np.ones(iy.size, dtype=bool)
    clipped_img = np.zeros((ny, nx), dtype=bool)
    label = object_labels(stars, iy, ix, (ny, nx))
    active = np.ones(int(label.max()) + 1, dtype=bool)
    for iteration in range(options.max_iter + 1):
        big, rhs = _assemble(eq, t, reg, lam, layout)
        if ksum is None:
            theta = _solve_spd(big, rhs)
        else:  # the kernel sum (unknown 0, constant) given: solve for the others
            theta = np.concatenate([[ksum], _solve_spd(big[1:, 1:], rhs[1:] - big[1:, 0] * ksum)])
        coef = np.zeros((nsp, ng))
        coef[layout[1], layout[0]] = theta[: layout[0].size]
        values = coef @ t.T  # (nsp, ng): each group's value, by spatial term
        bg = theta[layout[0].size :]
        model = np.einsum("ns,ns->n", feats @ values.T.astype(np.float32), mono[:, :nsp])
        model += mono[:, :nbg] @ bg
        k2 = float(np.sum(values[0] ** 2 * sizes))
        var = var_ref + k2 * var_conv
        z2 = (y_all - model) ** 2 / var
        chi2 = float(np.mean(z2[kept]))
        if iteration == options.max_iter:
            break
        dropped = deviant_objects(
            label, y_all - model, y_all, var, kept, active, options.sigma_clip
        )
        active[dropped] = False
        on_star = star_pixels(label, active)
        bad = kept & (z2 > options.pixel_clip**2) & ~on_star
        if not bad.any() and not dropped.size:
            break
        bad = _worst(bad, z2, int(kept.sum()) // (4 * (2 * clip_radius + 1) ** 2))
        clipped_img[iy[bad], ix[bad]] = True
        grown = _sliding_max(clipped_img, clip_radius) if clip_radius > 0 else clipped_img
        new = kept & ((grown[iy, ix] & ~on_star) | np.isin(label, dropped))
        if kept.sum() - new.sum() < 4 * ng:
            break
        sel = np.flatnonzero(new)
        eq.add(feats[sel], wts[sel], mono[sel], y_all[sel], -1.0)
        kept &= ~new
    kernels = np.where(inside, values[:, np.maximum(groups, 0)], 0.0).reshape(nsp, n, n)
    return DeltaFit(
        kernels=kernels,
        bg=np.asarray(bg, dtype=np.float64),
        deg_spatial=deg_spatial,
        deg_bg=deg_bg,
        ksum=float(kernels[0].sum()),
        npix=int(kept.sum()),
        nclipped=int((~kept).sum()),
        chi2=chi2,
        lam=lam,
        core=half if core is None else min(core, half),
    )


def _worst(bad: np.ndarray, z2: np.ndarray, budget: int) -> np.ndarray:
    """``bad`` restricted to its ``budget`` largest ``z2`` (a fit far off at first, e.g.
    pulled by a bright transient, loses its worst pixels first and is judged again)."""
    idx = np.flatnonzero(bad)
    if idx.size <= budget:
        return bad
    out = np.zeros_like(bad)
    out[idx[np.argsort(-z2[idx])[: max(budget, 1)]]] = True
    return out


def object_labels(
    stars: Census | None, iy: np.ndarray, ix: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """For each fit pixel, the index of the census star whose aperture holds it (the
    brightest when apertures overlap), -1 for none."""
    label = np.full(iy.size, -1, dtype=np.int64)
    if stars is None or stars.n == 0:
        return label
    good = np.flatnonzero(~stars.rejected)
    good = good[np.argsort(-stars.snr[good])]
    r = stars.radius
    off = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    disk = dy**2 + dx**2 <= r * r
    dy, dx = dy[disk], dx[disk]
    image = np.full(shape, -1, dtype=np.int64)
    ny, nx = shape
    for rank, i in enumerate(good[::-1]):  # the brightest painted last: they win overlaps
        yy, xx = stars.y[i] + dy, stars.x[i] + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        image[yy[inside], xx[inside]] = len(good) - 1 - rank
    return image[iy, ix]


def star_pixels(label: np.ndarray, active: np.ndarray) -> np.ndarray:
    """The fit pixels in the aperture of a star still in the fit (``label >= 0`` and
    ``active``): pixel clipping leaves them alone, a star enters or leaves the fit whole
    (:func:`deviant_objects`).

    The bright stars' cores are where every real kernel leaves its largest mismatch
    (a tenth of a pixel of misregistration, the PSF's variation over the field: several
    sigmas at a bright core) and they are also what fixes the kernel's sum, the flux
    scale: clipped for that mismatch, they leave the sum to the stars' wings and the
    regularisation, which pull it toward zero (a DECam frame sharper than its template
    came out at 0.75 instead of 1.0).

    Examples
    --------
    >>> star_pixels(np.array([-1, 0, 1, 1]), np.array([True, False])).tolist()
    [False, True, False, False]
    """
    on = label >= 0
    out = np.zeros(label.shape, dtype=bool)
    out[on] = active[label[on]]
    return out


def deviant_objects(
    label: np.ndarray,
    resid: np.ndarray,
    data: np.ndarray,
    var: np.ndarray,
    kept: np.ndarray,
    active: np.ndarray,
    nsigma: float,
) -> np.ndarray:
    """The objects (labels, :func:`object_labels`) whose flux in the residual is off the
    others': ``d_i``, the residual over the object's pixels relative to its flux, judged
    by :func:`oasis_ois.stars.outliers` (its noise ``s_i``, the others' spread, a floor
    of 0.2 %); the most deviant first, at most a tenth of the objects (at least one)
    per call. Nothing with fewer than 3 active objects: two cannot be told apart."""
    sel = kept & (label >= 0)
    n_obj = active.size
    if n_obj == 0 or not sel.any():
        return np.zeros(0, dtype=np.int64)
    lab = label[sel]
    flux = np.bincount(lab, weights=data[sel], minlength=n_obj)
    res = np.bincount(lab, weights=resid[sel], minlength=n_obj)
    noise = np.sqrt(np.bincount(lab, weights=var[sel], minlength=n_obj))
    ok = active & (flux > 0) & (noise > 0)
    if ok.sum() < 3:
        return np.zeros(0, dtype=np.int64)
    idx = np.flatnonzero(ok)
    d = res[idx] / flux[idx]
    s = noise[idx] / flux[idx]
    out = outliers(d, s, nsigma, 0.002)
    out = out[np.argsort(-np.abs(d[out] - np.median(d)))]
    return idx[out[: max(1, idx.size // 10)]]  # the rest judged again after the refit


def solve_delta(
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
    """Subtract a prepared pair with the delta basis (the ``delta`` kernel model).

    Parameters
    ----------
    science, template : Frame
        The frames (names, the template's inputs).
    sci, tpl : _Image
        Them prepared (:func:`oasis_ois.ois.prepare_pair`).
    options : OisOptions
    stars : Census
        The pair's stars: their number sets the spatial degree, the rejected ones are
        kept out of the fit.
    direction : str
        The image convolved, ``"template"`` or ``"science"``.
    sources : ndarray of bool
        Pixels on sources (:func:`oasis_ois.ois._source_mask`).

    Returns
    -------
    OisSolution
        ``meta["description"]`` starts with ``"delta "``.
    """
    conv, ref = (tpl, sci) if direction == "template" else (sci, tpl)
    fwhm_ref = stars.fwhm_science if direction == "template" else stars.fwhm_template
    fwhm_conv = stars.fwhm_template if direction == "template" else stars.fwhm_science
    elong = _elongation(stars)
    core = delta_half(options, fwhm_ref or ref.fwhm, fwhm_conv or conv.fwhm, elong)
    half = outer_half(options, core, fwhm_ref or ref.fwhm, elong, ref.data.shape)
    core = min(core, half)
    ds = delta_degree(stars.n, options.deg_spatial)
    db = options.deg_bg
    fit = fit_delta(
        ref,
        conv,
        options,
        half=half,
        core=core,
        deg_spatial=ds,
        deg_bg=db,
        sources=sources,
        exclude=rejected_mask(stars, ref.data.shape),
        clip_radius=max(1, round(0.5 * (fwhm_ref or 3.0))),
        stars=stars,
    )
    return finish(
        science,
        template,
        sci,
        tpl,
        fit,
        direction=direction,
        model="delta",
        stars=stars,
        sources=sources,
        fwhm=fwhm_ref or ref.fwhm,
    )


def rejected_mask(stars: Census, shape: tuple[int, int]) -> np.ndarray | None:
    """Pixels within the aperture radius of the stars the census rejected, or None."""
    if not stars.rejected.any():
        return None
    mask = np.zeros(shape, dtype=bool)
    mask[stars.y[stars.rejected], stars.x[stars.rejected]] = True
    return _sliding_max(mask, stars.radius)


def _elongation(stars: Census) -> float:
    """Major / mean axis of the more elongated of the two PSFs (1 when unknown)."""
    return max(major_over_mean(stars.shape("science")), major_over_mean(stars.shape("template")))


def finish(
    science: Frame,
    template: Frame,
    sci: _Image,
    tpl: _Image,
    fit: DeltaFit,
    *,
    direction: str,
    model: str,
    stars: Census,
    sources: np.ndarray,
    fwhm: float | None,
    ref: _Image | None = None,
    ref_psf: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> OisSolution:
    """Apply a fitted kernel to the whole image and wrap the result (shared by the delta,
    cross and low models); ``ref`` replaces the unconvolved image (cross-convolution)."""
    conv = tpl if direction == "template" else sci
    if ref is None:
        ref = sci if direction == "template" else tpl
    residual, noise, weight = apply_kernel(
        ref,
        conv,
        direction=direction,
        kernels=fit.kernels,
        bg_coef=fit.bg,
        deg_bg=fit.deg_bg,
        ksum_img=fit.ksum,
        inputs=tuple(getattr(template, "inputs", ()) or ()),
        science_name=science.name,
        ref_psf=ref_psf,
        science_variance=None if ref_psf is None else sci.variance(),
    )
    half = (fit.kernels.shape[-1] - 1) // 2
    info: dict[str, Any] = {
        "nstars": stars.n,
        "nstars_rejected": int(stars.rejected.sum()),
        "npix": fit.npix,
        "nclipped": fit.nclipped,
        "ksum": fit.ksum,
        "deg_spatial": fit.deg_spatial,
        "deg_bg": fit.deg_bg,
        "half_mesh": half,
        "lambda": fit.lam,
        "bg": float(fit.bg[0]) + ref.sky - fit.ksum * conv.sky if fit.bg.size else 0.0,
        "fwhm": _nan_none(fwhm),
        "fwhm_science": _nan_none(stars.fwhm_science or sci.fwhm),
        "fwhm_template": _nan_none(stars.fwhm_template or tpl.fwhm),
        "chi2": fit.chi2,
        "description": (
            f"{model} hk={fit.core}/{half} ds={fit.deg_spatial} db={fit.deg_bg} "
            f"px={fit.npix} clip={fit.nclipped} {stars.describe()}"
        ),
    }
    info.update(meta or {})
    return OisSolution(
        residual=residual,
        noise=noise,
        weight=weight,
        kernel=fit.kernels[0].astype(np.float32),
        coefficients=fit.kernels.reshape(fit.kernels.shape[0], -1).T.copy(),
        bg_coefficients=fit.bg,
        direction=direction,
        ksum=fit.ksum,
        sources=sources,
        meta=info,
    )


def _nan_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)
