"""L.A.Cosmic (:func:`astroscrappy.detect_cosmics`) run only where a cosmic ray can be.

astroscrappy runs every iteration of L.A.Cosmic over the whole frame: four median filters,
a subsampled Laplacian and two dilations per iteration, about 2 CPU-s per iteration on a
2048x2048 frame. Yet a pixel can only be flagged next to a pixel whose Laplacian is large
against the noise. :func:`detect_cosmics` uses that to give the same mask for a tenth of
the cost; apart from the search for seeds, it handles pixels as lists, not as whole-frame
masks:

1. **Seeds.** A cosmic-ray *core* needs ``S' > sigclip``, where ``S' = S - median(S)`` and
   ``S = L+ / (2 noise)``. ``S >= 0``, so ``S' <= S``; the noise is a median of the
   variance within 3 pixels, so at least the smallest variance there. ``L+``
   (astroscrappy's subsampled, clipped Laplacian, :func:`laplacian_plus`) costs a few array
   operations and the smallest variance comes from block minima: together they bound
   ``S`` from above, and the pixels where the bound exceeds ``sigclip`` hold every core.
   Most of them are the cores of stars, which L.A.Cosmic's contrast test against the
   fine structure rejects; that test and ``S' > sigclip`` are then taken at those pixels
   alone (:func:`_screen`, from the pixels within :data:`PAD`), with a margin for
   astroscrappy's float32 rounding, and the pixels that pass (the *seeds*) hold every
   core, and not many more. A flagged pixel lies within 2 pixels of a core
   (astroscrappy's two 3x3 dilations), so only the *region* of pixels within 2 of a seed
   needs deciding.
2. **Windows.** astroscrappy's decision on a pixel depends on the pixels within
   :data:`PAD` of it (median filters of 7 and 9 pixels after a 5-pixel one, and the
   Laplacian). Each connected part of the region is cut out with that margin; the pixels
   of the cut-out outside the part are handed to astroscrappy as masked, so nothing is
   flagged there, and every core that can flag a pixel of the part lies in the part. The
   cut-outs are packed side by side into one mosaic and a single astroscrappy call (one
   iteration) decides them all; cut-outs that touch the frame's edge run on their own, so
   that they see that edge as astroscrappy does on the whole frame.
3. **Iterations.** astroscrappy then cleans the flagged pixels (the mean of the pixels
   within 2 that are neither flagged nor masked: its ``meanmask`` cleaning) and runs
   again. Only cleaned pixels change, and a change reaches the decision of pixels at
   most :data:`REACH` away, through a core at most ``REACH + 2`` away; so the next
   iteration's seeds are the pixels within ``REACH + 2`` of a change that pass the same
   tests on the cleaned image (cleaned in place). The loop stops as soon as an iteration
   adds nothing (the following ones would repeat it exactly).

4. **Edges.** astroscrappy leaves a border of its median filters uncomputed (it copies
   the input there), so on its own it never flags a cosmic ray within about 4 pixels of
   the frame's edge and flags noise a few pixels further in. The frame is therefore
   mirrored (``numpy.pad(..., mode="reflect")``) by :data:`EDGE` pixels on every side
   first: a 256x256 frame's injected cosmic rays are then all caught instead of 95%,
   and the good pixels flagged fall from 0.06% to 0.01%.

The cleaning is done here the way astroscrappy does it, so the result is astroscrappy's
mask of the mirrored frame with ``cleantype="meanmask"``, ``sepmed=True`` and
``fsmode="median"``, up to float rounding and the value given to a pixel whose 5x5
neighbourhood is all flagged or masked (astroscrappy: the frame's median; here 0 for the
data, which are sky-subtracted, and the median variance).
``tests/native/test_cosmics.py`` compares them.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

__all__ = ["EDGE", "PAD", "REACH", "detect_cosmics", "laplacian_plus"]

#: Margin (pixels) a cut-out needs around the pixels it decides: astroscrappy's values are
#: those of the whole frame from this far inside a cut-out's edge on: ``S`` from 3 pixels
#: in (the noise is a 7-pixel median of the variance), ``S' = S - median7(S)`` from 3 more,
#: the fine structure from 6 (a 5-pixel median, then a 9-pixel one).
PAD = 6

#: How far (pixels) a change of the cleaned image or variance at one pixel can change the
#: next iteration's decision on another: a core's test reads the image within
#: :data:`PAD` pixels and a flagged pixel lies within 2 pixels of a core.
REACH = 8

#: Pixels of mirrored frame added on every side (see the module's docstring): beyond
#: astroscrappy's border and the reach of its decisions.
EDGE = REACH

# block size of the variance minima: a block and its neighbours cover 8 pixels or more
# around every pixel, more than the noise reads (3; 5 once the variance is cleaned)
_BLOCK = 8
_CORE = 2  # a flagged pixel lies within this many pixels of a core
_STRIP = 1 << 16  # pixels of one strip of rows in :func:`_sharp` (its arrays stay in cache)
_FINE = 6  # the core tests read the image and the variance this far (:data:`PAD`)
_CHUNK = 2048  # pixels screened at once by :func:`_screen`


def laplacian_plus(image: np.ndarray) -> np.ndarray:
    """astroscrappy's ``L+``: subsample 2x2, convolve with the Laplacian, clip at 0, rebin.

    Each of the four subpixels of pixel ``(y, x)`` sees the pixel itself on two sides and
    one horizontal and one vertical neighbour, so ``L+`` is the mean over the four
    quadrants of ``max(0, 2 d - d_h - d_v)``; outside the image counts as 0 (as in
    astroscrappy's convolution).
    """
    a = np.asarray(image, dtype=np.float32)
    ys, xs = np.indices(a.shape)
    return _laplacian_at(a, ys.ravel(), xs.ravel()).reshape(a.shape)


def _laplacian_at(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """:func:`laplacian_plus` of ``image`` at the pixels ``(ys, xs)``."""
    ny, nx = image.shape
    d = image[ys, xs]

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        inside = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
        return np.where(inside, image[np.clip(y, 0, ny - 1), np.clip(x, 0, nx - 1)], 0.0)

    dl, dr = d - at(ys, xs - 1), d - at(ys, xs + 1)
    du, dd = d - at(ys - 1, xs), d - at(ys + 1, xs)
    out = np.maximum(dl + du, 0.0)
    out += np.maximum(dr + du, 0.0)
    out += np.maximum(dl + dd, 0.0)
    out += np.maximum(dr + dd, 0.0)
    return (0.25 * out).astype(np.float32)


def _sharp(image: np.ndarray, floor: _Floor) -> tuple[np.ndarray, np.ndarray]:
    """The pixels where the cheap upper bound ``2 d - min(left, right) - min(up, down)``
    of :func:`laplacian_plus` exceeds ``floor``'s threshold (:func:`_seeds` tests ``L+``
    itself there), row-major. The bound is taken in strips of rows that stay in the
    processor's cache."""
    d = image
    ny, nx = d.shape
    step = _BLOCK * max(1, _STRIP // (_BLOCK * nx))
    found = []
    low = np.empty((step, nx), d.dtype)
    vert = np.empty((step, nx), d.dtype)
    hi = np.empty((step, nx), d.dtype)
    for r0 in range(0, ny, step):
        r1 = min(r0 + step, ny)
        h = r1 - r0
        rows = d[r0:r1]
        lo, ve, up = low[:h], vert[:h], hi[:h]
        # min(left, right), then that plus min(up, down); outside the image counts as 0
        np.minimum(rows[:, :-2], rows[:, 2:], out=lo[:, 1:-1])
        np.minimum(rows[:, 1], 0.0, out=lo[:, 0])
        np.minimum(rows[:, -2], 0.0, out=lo[:, -1])
        a, b = max(r0, 1), min(r1, ny - 1)
        np.minimum(d[a - 1 : b - 1], d[a + 1 : b + 1], out=ve[a - r0 : b - r0])
        if r0 == 0:
            np.minimum(d[1], 0.0, out=ve[0])
        if r1 == ny:
            np.minimum(d[ny - 2], 0.0, out=ve[h - 1])
        lo += ve
        np.add(rows, rows, out=up)
        up -= lo
        limit = floor.rows(r0, r1)
        if h % _BLOCK == 0:
            above = up.reshape(-1, _BLOCK, nx) > limit[:, None, :]
        else:  # the last strip, a partial block
            above = up > np.repeat(limit, _BLOCK, axis=0)[:h]
        idx = np.flatnonzero(above)
        if idx.size:
            found.append(idx + r0 * nx)
    if not found:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    return np.divmod(np.concatenate(found), nx)


def _median5(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """The elementwise median of five arrays (a network of minima and maxima)."""
    low = np.maximum(np.minimum(a, b), np.minimum(c, d))
    high = np.minimum(np.maximum(a, b), np.maximum(c, d))
    return np.maximum(np.minimum(e, low), np.minimum(np.maximum(e, low), high))


# Devillard's median networks (astroscrappy's, ``medutils.c``): the pairs put in order
_NETWORKS = {
    7: "05 03 16 24 01 35 26 23 36 45 14 13 34",
    9: "12 45 78 01 34 67 12 45 78 03 58 47 36 14 25 47 42 64 42",
}


def _median_of(arrays: list[np.ndarray]) -> np.ndarray:
    """The elementwise median of 5, 7 or 9 arrays."""
    if len(arrays) == 5:
        return _median5(*arrays)
    p = list(arrays)
    for i, j in _NETWORKS[len(p)].split():
        a, b = int(i), int(j)
        p[a], p[b] = np.minimum(p[a], p[b]), np.maximum(p[a], p[b])
    return p[len(p) // 2]


def _separable_median(values: np.ndarray, size: int) -> np.ndarray:
    """astroscrappy's separable median of ``size`` (the rows first, then the columns) of
    stacked patches ``(n, h, w)``, where it is defined: ``(n, h - size + 1, w - size + 1)``."""
    w = values.shape[2] - size + 1
    rows = _median_of([values[:, :, k : k + w] for k in range(size)])
    h = values.shape[1] - size + 1
    return _median_of([rows[:, k : k + h, :] for k in range(size)])


def _screen(
    image: np.ndarray,
    var: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    lap: np.ndarray,
    *,
    gain: float,
    sigclip: float,
    objlim: float,
) -> np.ndarray:
    """False at the pixels ``(ys, xs)`` (``lap``: their ``L+``) that cannot be cores.

    A core needs ``S' > sigclip`` and ``S' / F > objlim``, where ``S = L+ / (2 noise)``,
    ``S' = S - m7(S)``, ``noise = sqrt(m7(var))``, ``F = max((m5 - m9) / noise, 0.01)``,
    ``m5`` the 5x5 separable median of the image, ``m9`` the 9x9 one of ``m5`` and ``m7``
    the 7x7 one (astroscrappy's, with ``sepmed=True``). These read the image and the
    variance within :data:`_FINE` of the pixel, so they are computed here, in float64,
    at the pixels only, in two steps:

    1. as ``S' <= S``, the contrast test asks ``L+ > 2 objlim (m5 - m9)``, in which the
       noise cancels: cheap, and it rejects the cores of stars;
    2. the pixels left get both tests in full.

    Each test allows generously for astroscrappy's float32 rounding, so a pixel it
    rejects is no core; pixels nearer the edge than :data:`_FINE` (where astroscrappy
    copies instead of filtering) are kept.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    ny, nx = image.shape
    keep = np.ones(ys.size, dtype=bool)
    inside = np.flatnonzero((ys >= _FINE) & (ys < ny - _FINE) & (xs >= _FINE) & (xs < nx - _FINE))
    if inside.size == 0:
        return keep
    side = 2 * _FINE + 1
    image_patches = sliding_window_view(image, (side, side))
    var_patches = sliding_window_view(var, (side, side))
    g = _FINE - 3  # the 7x7 pixels whose S the median of S at the pixel reads
    for start in range(0, inside.size, _CHUNK):
        chunk = inside[start : start + _CHUNK]
        cy, cx = ys[chunk] - _FINE, xs[chunk] - _FINE
        patch = image_patches[cy, cx]
        # 1. the contrast test with S' <= S
        m5 = _separable_median(patch, 5)
        m9 = _separable_median(m5, 9)[:, 0, 0].astype(np.float64)
        m5 = m5[:, 4, 4].astype(np.float64)
        amp = np.abs(patch).max(axis=(1, 2)).astype(np.float64)
        fine = m5 - m9 - 1e-4 * (np.abs(m5) + np.abs(m9))  # a lower bound
        here = lap[chunk].astype(np.float64)
        ok = here + 1e-4 * (here + 8.0 * amp) > 2.0 * objlim * fine
        sub = np.flatnonzero(ok)
        if sub.size:
            # 2. both tests in full; in astroscrappy's units (the image times the gain)
            p = patch[sub].astype(np.float64)
            v = var_patches[cy[sub], cx[sub]].astype(np.float64)
            noise = np.sqrt(np.maximum(_separable_median(v, 7) * (gain * gain), 1e-5))
            d = p[:, g:-g, g:-g]
            dl = d - p[:, g:-g, g - 1 : -g - 1]
            dr = d - p[:, g:-g, g + 1 : side - g + 1]
            du = d - p[:, g - 1 : -g - 1, g:-g]
            dd = d - p[:, g + 1 : side - g + 1, g:-g]
            lap7 = np.maximum(dl + du, 0.0)
            lap7 += np.maximum(dr + du, 0.0)
            lap7 += np.maximum(dl + dd, 0.0)
            lap7 += np.maximum(dr + dd, 0.0)
            sig = (0.25 * gain) * lap7 / (2.0 * noise)
            med = _separable_median(sig, 7)[:, 0, 0]
            sharp = sig[:, 3, 3] - med
            sharp += 1e-4 * (sig.max(axis=(1, 2)) + 4.0 * gain * amp[sub] / noise.min(axis=(1, 2)))
            contrast = np.maximum(gain * fine[sub] / noise[:, 3, 3], 0.01) * (1.0 - 1e-4)
            ok[sub] = (sharp > sigclip) & (sharp > objlim * contrast)
        keep[chunk] = ok
    return keep


def _seeds(
    image: np.ndarray,
    var: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    floor: _Floor,
    *,
    gain: float,
    params: Mapping,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the pixels ``(ys, xs)``: those whose ``L+`` exceeds ``floor``'s threshold, and
    among them (a mask) those that :func:`_screen` keeps."""
    lap = _laplacian_at(image, ys, xs)
    sharp = lap > floor.at(ys, xs)
    ys, xs, lap = ys[sharp], xs[sharp], lap[sharp]
    keep = _screen(
        image, var, ys, xs, lap, gain=gain, sigclip=params["sigclip"], objlim=params["objlim"]
    )
    return ys, xs, keep


class _Floor:
    """The seed threshold ``2 sigclip sqrt(variance floor)``, held per block of
    :data:`_BLOCK` x :data:`_BLOCK` pixels: the variance floor of a block is the minimum of
    the variance over it and the blocks around it, a lower bound, at every pixel, of the
    variance within :data:`_BLOCK` pixels."""

    def __init__(self, var: np.ndarray, scale: float) -> None:
        nx = var.shape[1]
        rows = var[::_BLOCK].copy()
        for k in range(1, _BLOCK):
            more = var[k::_BLOCK]
            np.minimum(rows[: len(more)], more, out=rows[: len(more)])
        blocks = np.minimum.reduceat(rows, np.arange(0, nx, _BLOCK), axis=1)
        by, bx = blocks.shape
        ext = np.pad(blocks, 1, mode="edge")
        near = blocks.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(near, ext[dy : dy + by, dx : dx + bx], out=near)
        near = np.sqrt(np.maximum(near, 0.0))
        near *= scale
        #: per block
        self.blocks = near
        #: per block row and pixel column
        self.columns = np.ascontiguousarray(np.repeat(near, _BLOCK, axis=1)[:, :nx])

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """The threshold of the block rows covering image rows ``r0:r1`` (``r0`` a
        multiple of :data:`_BLOCK`), per pixel column."""
        return self.columns[r0 // _BLOCK : -(-r1 // _BLOCK)]

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """The threshold at the pixels ``(ys, xs)``."""
        return self.blocks[ys // _BLOCK, xs // _BLOCK]


def _squares(
    ys: np.ndarray, xs: np.ndarray, radius: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (with repeats) within ``radius`` (a square) of ``(ys, xs)``, in ``shape``."""
    steps = np.arange(-radius, radius + 1)
    yy = np.clip(ys[:, None, None] + steps[None, :, None], 0, shape[0] - 1)
    xx = np.clip(xs[:, None, None] + steps[None, None, :], 0, shape[1] - 1)
    yy, xx = np.broadcast_arrays(yy, xx)
    return yy.ravel(), xx.ravel()


def _pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.nonzero`` of a 2-D mask, in the same order, several times faster on a
    large sparse one (through flat indices)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a (2 radius + 1)^2 square (astroscrappy's dilations)."""
    from scipy import ndimage

    ys, xs = _pixels(mask)
    side = 2 * radius + 1
    if ys.size * side * side > mask.size // 4:
        return ndimage.maximum_filter(mask, size=side, mode="constant", cval=False)
    out = np.zeros(mask.shape, dtype=bool)
    out[_squares(ys, xs, radius, mask.shape)] = True
    return out


def _components(ys: np.ndarray, xs: np.ndarray, link: int) -> np.ndarray:
    """Label of every point: points closer than ``link`` (Chebyshev) are in one part."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = ys.size
    pairs = cKDTree(np.column_stack([ys, xs])).query_pairs(link, p=np.inf, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), bool), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _pack(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Shelf packing of rectangles into one mosaic: their corners and the mosaic's shape."""
    order = np.argsort(-heights, kind="stable")
    width = max(int(widths.max()), int(np.sqrt(float(np.sum(heights * widths))) * 1.2) + 1)
    cy = np.zeros(len(heights), int)
    cx = np.zeros(len(heights), int)
    y = x = shelf = 0
    for i in order:
        h, w = int(heights[i]), int(widths[i])
        if x + w > width:
            y, x, shelf = y + shelf, 0, 0
        cy[i], cx[i] = y, x
        x += w
        shelf = max(shelf, h)
    return cy, cx, y + shelf, width


def _one_thread() -> AbstractContextManager[Any]:
    """OpenMP limited to one thread (threadpoolctl, when installed): astroscrappy opens a
    dozen parallel regions per call, which on cut-outs of a few hundred pixels cost far
    more than they share, and much more when the other cores are busy (a 256x256 frame:
    0.04 s of L.A.Cosmic on one thread, 0.5-11 s on two). Pipeline workers run one
    thread each anyway; this is for frames masked in the main process."""
    import astroscrappy  # noqa: F401 - its OpenMP runtime loaded, for threadpoolctl to find

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="openmp")


def _lacosmic_once(
    data: np.ndarray, var: np.ndarray, inmask: np.ndarray, gain: float, params: Mapping
) -> np.ndarray:
    import astroscrappy

    crmask, _ = astroscrappy.detect_cosmics(
        np.ascontiguousarray(data, dtype=np.float32),
        inmask=np.ascontiguousarray(inmask, dtype=np.uint8),
        invar=np.ascontiguousarray(var, dtype=np.float32),
        gain=gain,
        readnoise=0.0,
        satlevel=np.inf,
        sepmed=True,
        cleantype="meanmask",
        fsmode="median",
        **{"niter": 1, **params},
    )
    return np.asarray(crmask, dtype=bool)


def _iteration(
    data: np.ndarray,
    var: np.ndarray,
    inmask: np.ndarray,
    seeds: tuple[np.ndarray, np.ndarray],
    gain: float,
    params: Mapping,
) -> tuple[np.ndarray, np.ndarray]:
    """One L.A.Cosmic iteration on the pixels within 2 of ``seeds`` (see the module's
    docstring): the flagged pixels among them."""
    ny, nx = data.shape
    sy, sx = seeds
    if sy.size == 0:
        return sy, sx
    # parts: seeds whose squares of radius 2 touch (8-connected) are in one part
    label = _components(sy, sx, 2 * _CORE + 1)
    order = np.argsort(label, kind="stable")
    sy, sx, label = sy[order], sx[order], label[order]
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    grow = _CORE + PAD
    y0 = np.maximum(np.minimum.reduceat(sy, starts) - grow, 0)
    y1 = np.minimum(np.maximum.reduceat(sy, starts) + grow + 1, ny)
    x0 = np.maximum(np.minimum.reduceat(sx, starts) - grow, 0)
    x1 = np.minimum(np.maximum.reduceat(sx, starts) + grow + 1, nx)
    part = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, sy.size]))
    edge = (y0 == 0) | (x0 == 0) | (y1 == ny) | (x1 == nx)
    found_y, found_x = [], []

    def own_mask(shape: tuple[int, int], py: np.ndarray, px: np.ndarray) -> np.ndarray:
        own = np.zeros(shape, dtype=bool)
        own[_squares(py, px, _CORE, shape)] = True
        return own

    # a part at the frame's edge alone, so that the edge is an edge for astroscrappy too
    for j in np.flatnonzero(edge):
        ys, xs = slice(y0[j], y1[j]), slice(x0[j], x1[j])
        mine = part == j
        own = own_mask((y1[j] - y0[j], x1[j] - x0[j]), sy[mine] - y0[j], sx[mine] - x0[j])
        # pixels 2 or more from the part masked: astroscrappy grows its mask by 1
        outside = ~_dilate(own, 1)
        hit = _lacosmic_once(data[ys, xs], var[ys, xs], inmask[ys, xs] | outside, gain, params)
        hy, hx = _pixels(hit & own)
        found_y.append(hy + y0[j])
        found_x.append(hx + x0[j])
    inner = np.flatnonzero(~edge)
    if inner.size:
        h, w = y1[inner] - y0[inner], x1[inner] - x0[inner]
        cy, cx, my, mx = _pack(h, w)
        m_data = np.zeros((my, mx), np.float32)
        m_var = np.ones((my, mx), np.float32)
        m_mask = np.ones((my, mx), bool)
        m_part = np.full((my, mx), -1, np.int64)
        for k, j in enumerate(inner):
            dst = (slice(cy[k], cy[k] + h[k]), slice(cx[k], cx[k] + w[k]))
            src = (slice(y0[j], y1[j]), slice(x0[j], x1[j]))
            m_data[dst] = data[src]
            m_var[dst] = var[src]
            m_mask[dst] = inmask[src]
            m_part[dst] = j
        # the seeds' squares, in mosaic coordinates (each lies PAD inside its window)
        where = np.full(len(starts), -1)
        where[inner] = np.arange(inner.size)
        k = where[part]
        mine = k >= 0
        m_own = own_mask(
            (my, mx),
            sy[mine] - y0[part[mine]] + cy[k[mine]],
            sx[mine] - x0[part[mine]] + cx[k[mine]],
        )
        m_mask |= ~_dilate(m_own, 1)
        hit = _lacosmic_once(m_data, m_var, m_mask, gain, params)
        hy, hx = _pixels(hit & m_own)
        j = m_part[hy, hx]
        k = where[j]
        found_y.append(hy - cy[k] + y0[j])
        found_x.append(hx - cx[k] + x0[j])
    return np.concatenate(found_y), np.concatenate(found_x)


_OFFSETS = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)])


def _clean(
    data: np.ndarray,
    var: np.ndarray,
    crmask: np.ndarray,
    grown: np.ndarray,
    pixels: tuple[np.ndarray, np.ndarray],
    fill: tuple[float, float],
    out: tuple[np.ndarray, np.ndarray],
) -> None:
    """astroscrappy's ``meanmask`` cleaning of ``pixels`` (flagged, at least 2 from the
    edge): the mean of the pixels within 2 that are neither flagged nor masked. Unflagged
    pixels are never cleaned, so the mean is that of the original values."""
    ys, xs = pixels
    if ys.size == 0:
        return
    yy = ys[:, None] + _OFFSETS[None, :, 0]
    xx = xs[:, None] + _OFFSETS[None, :, 1]
    ok = ~(crmask[yy, xx] | grown[yy, xx])
    n = ok.sum(axis=1)
    for src, dst, default in zip((data, var), out, fill, strict=True):
        total = np.where(ok, src[yy, xx], 0.0).sum(axis=1, dtype=np.float64)
        dst[ys, xs] = np.where(n > 0, total / np.maximum(n, 1), default)


def detect_cosmics(
    data: np.ndarray,
    var: np.ndarray,
    inmask: np.ndarray,
    *,
    gain: float,
    sigclip: float,
    sigfrac: float,
    objlim: float,
    niter: int,
    windows: bool = True,
) -> np.ndarray:
    """Cosmic-ray mask of ``data``: astroscrappy's L.A.Cosmic, run only where it can flag.

    Parameters
    ----------
    data : ndarray
        Sky-subtracted image (ADU); masked pixels may hold anything finite.
    var : ndarray
        Its variance (ADU^2), positive.
    inmask : ndarray of bool
        Pixels never to flag nor to use for cleaning (astroscrappy's ``inmask``).
    gain : float
        e-/ADU.
    sigclip, sigfrac, objlim, niter
        As in :func:`astroscrappy.detect_cosmics`.
    windows : bool
        False: run astroscrappy on the whole (mirrored) frame instead, for the same mask
        at about ten times the cost.

    Returns
    -------
    ndarray of bool
        The flagged pixels: those astroscrappy flags on the frame mirrored by
        :data:`EDGE` pixels (``numpy.pad(..., mode="reflect")``) with
        ``cleantype="meanmask"``, ``sepmed=True``, ``fsmode="median"``, ``readnoise=0``,
        ``satlevel=inf`` and this ``invar``.
    """

    def mirrored(a: np.ndarray, dtype: type) -> np.ndarray:
        return np.pad(np.asarray(a, dtype=dtype), EDGE, mode="reflect")

    data, var = mirrored(data, np.float32), mirrored(var, np.float32)
    inmask = mirrored(inmask, bool)
    params = {"sigclip": sigclip, "sigfrac": sigfrac, "objlim": objlim}
    if windows:
        with _one_thread():
            crmask = _detect(data, var, inmask, gain=gain, params=params, niter=niter)
    else:
        crmask = _lacosmic_once(data, var, inmask, gain, {**params, "niter": niter})
    return crmask[EDGE:-EDGE, EDGE:-EDGE]


def _detect(
    data: np.ndarray,
    var: np.ndarray,
    inmask: np.ndarray,
    *,
    gain: float,
    params: Mapping,
    niter: int,
) -> np.ndarray:
    """:func:`detect_cosmics` on the mirrored frame; ``data`` and ``var`` are cleaned in
    place. Pixels are handled as lists (flat indices): only the seed search reads the
    whole frame."""
    ny, nx = data.shape
    shape = data.shape
    crmask = np.zeros(shape, dtype=bool)
    # S <= L+ / (2 sqrt(variance floor)); a margin for float rounding
    floor = _Floor(var, 2.0 * params["sigclip"] * (1.0 - 1e-4))
    grown = _dilate(inmask, 1)  # astroscrappy's own mask: the input mask grown by 1
    flat_grown = grown.ravel()
    sy, sx = _sharp(data, floor)
    good = ~grown[sy, sx]
    sy, sx, fine = _seeds(data, var, sy[good], sx[good], floor, gain=gain, params=params)
    sharp0 = sy * nx + sx  # sorted; L+ changes only next to a cleaned pixel
    new = _iteration(data, var, inmask, (sy[fine], sx[fine]), gain, params)
    crmask[new] = True
    flagged = [new[0] * nx + new[1]]
    fill = (0.0, float(np.median(var[::_BLOCK, ::_BLOCK])))
    for _ in range(1, niter):
        if new[0].size == 0:
            break
        # cleaned now: the new pixels, and flagged pixels whose mean loses a neighbour;
        # astroscrappy cleans none within 2 of the edge. Unflagged pixels are never
        # cleaned, so the cleaning reads the same values in place.
        cy, cx = _squares(*new, 2, shape)
        keep = crmask[cy, cx] & (cy >= 2) & (cy < ny - 2) & (cx >= 2) & (cx < nx - 2)
        cy, cx = np.divmod(np.unique(cy[keep] * nx + cx[keep]), nx)
        _clean(data, var, crmask, grown, (cy, cx), fill, (data, var))
        # seeds: within REACH + 2 of a change and sharp on the cleaned image; L+ differs
        # from the first iteration's only next to a cleaned (flagged) pixel
        near_y, near_x = _squares(*np.divmod(np.concatenate(flagged), nx), 1, shape)
        candidates = np.union1d(sharp0, near_y * nx + near_x)
        reach = np.zeros(shape, dtype=bool)
        reach[_squares(cy, cx, REACH + _CORE, shape)] = True
        candidates = candidates[reach.ravel()[candidates] & ~flat_grown[candidates]]
        sy, sx = np.divmod(candidates, nx)
        sy, sx, fine = _seeds(data, var, sy, sx, floor, gain=gain, params=params)
        found = _iteration(data, var, inmask, (sy[fine], sx[fine]), gain, params)
        fresh = ~crmask[found]
        new = (found[0][fresh], found[1][fresh])
        crmask[new] = True
        flagged.append(new[0] * nx + new[1])
    return crmask
