"""L.A.Cosmic (:func:`astroscrappy.detect_cosmics`) run only where a cosmic ray can be.

astroscrappy runs every iteration of L.A.Cosmic over the whole frame: four median filters,
a subsampled Laplacian and two dilations per iteration, about 2 CPU-s per iteration on a
2048x2048 frame. Yet a pixel can only be flagged next to a pixel whose Laplacian is large
against the noise. :func:`detect_cosmics` uses that to give the same mask for a tenth of
the cost:

1. **Seeds.** A cosmic-ray *core* needs ``S' > sigclip``, where ``S' = S - median(S)`` and
   ``S = L+ / (2 noise)``. ``S >= 0``, so ``S' <= S``; the noise is a median of the
   variance within 3 pixels, so at least the smallest variance there. ``L+``
   (astroscrappy's subsampled, clipped Laplacian, :func:`laplacian_plus`) costs a few array
   operations and the smallest variance comes from block minima: together they bound
   ``S`` from above, and the pixels where the bound exceeds ``sigclip`` (the *seeds*)
   hold every core. A flagged pixel lies within 2 pixels of a core (astroscrappy's two
   3x3 dilations), so only the *region* of pixels within 2 of a seed needs deciding.
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
   bound on the cleaned image. The loop stops as soon as an iteration adds nothing (the
   following ones would repeat it exactly).

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


def _sharp(image: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels where :func:`laplacian_plus` exceeds ``threshold``: computed exactly only
    where its cheap upper bound ``2 d - min(left, right) - min(up, down)`` does."""
    d = image
    low = np.empty_like(d)  # min(left, right), then that plus min(up, down)
    np.minimum(d[:, :-2], d[:, 2:], out=low[:, 1:-1])
    low[:, 0] = np.minimum(d[:, 1], 0.0)
    low[:, -1] = np.minimum(d[:, -2], 0.0)
    vert = np.empty_like(d)
    np.minimum(d[:-2], d[2:], out=vert[1:-1])
    vert[0] = np.minimum(d[1], 0.0)
    vert[-1] = np.minimum(d[-2], 0.0)
    low += vert
    del vert
    hi = d + d
    hi -= low
    ys, xs = np.nonzero(hi > threshold)
    keep = _laplacian_at(d, ys, xs) > threshold[ys, xs]
    return ys[keep], xs[keep]


def _variance_floor(var: np.ndarray) -> np.ndarray:
    """A lower bound, at every pixel, of the variance within :data:`_BLOCK` pixels: the
    minimum over the pixel's block and the blocks around it."""
    ny, nx = var.shape
    by, bx = -(-ny // _BLOCK), -(-nx // _BLOCK)
    padded = np.pad(var, ((0, by * _BLOCK - ny), (0, bx * _BLOCK - nx)), mode="edge")
    blocks = padded.reshape(by, _BLOCK, bx, _BLOCK).min(axis=(1, 3))
    ext = np.pad(blocks, 1, mode="edge")
    near = blocks.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            np.minimum(near, ext[dy : dy + by, dx : dx + bx], out=near)
    tiles = np.broadcast_to(near[:, None, :, None], (by, _BLOCK, bx, _BLOCK))
    return tiles.reshape(by * _BLOCK, bx * _BLOCK)[:ny, :nx]


def _squares(
    ys: np.ndarray, xs: np.ndarray, radius: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (with repeats) within ``radius`` (a square) of ``(ys, xs)``, in ``shape``."""
    steps = np.arange(-radius, radius + 1)
    yy = np.clip(ys[:, None, None] + steps[None, :, None], 0, shape[0] - 1)
    xx = np.clip(xs[:, None, None] + steps[None, None, :], 0, shape[1] - 1)
    yy, xx = np.broadcast_arrays(yy, xx)
    return yy.ravel(), xx.ravel()


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a (2 radius + 1)^2 square (astroscrappy's dilations)."""
    from scipy import ndimage

    ys, xs = np.nonzero(mask)
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
        hy, hx = np.nonzero(hit & own)
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
        hy, hx = np.nonzero(hit & m_own)
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
    """:func:`detect_cosmics` on the mirrored frame."""
    ny, nx = data.shape
    crmask = np.zeros(data.shape, dtype=bool)
    # S <= L+ / (2 sqrt(variance floor)); a margin for float rounding
    threshold = np.sqrt(np.maximum(_variance_floor(var), 0.0))
    threshold *= 2.0 * params["sigclip"] * (1.0 - 1e-4)
    grown = _dilate(inmask, 1)  # astroscrappy's own mask: the input mask grown by 1
    sy, sx = _sharp(data, threshold)
    good = ~grown[sy, sx]
    sharp0 = np.zeros(data.shape, dtype=bool)
    sharp0[sy[good], sx[good]] = True
    new = _iteration(data, var, inmask, (sy[good], sx[good]), gain, params)
    crmask[new] = True
    clean = var_clean = None
    fill = (0.0, float(np.median(var[::_BLOCK, ::_BLOCK])))
    for _ in range(1, niter):
        if new[0].size == 0:
            break
        if clean is None:
            clean, var_clean = data.copy(), var.copy()
        # cleaned now: the new pixels, and flagged pixels whose mean loses a neighbour;
        # astroscrappy cleans none within 2 of the edge
        cy, cx = _squares(*new, 2, data.shape)
        keep = crmask[cy, cx] & (cy >= 2) & (cy < ny - 2) & (cx >= 2) & (cx < nx - 2)
        changed = np.zeros(data.shape, dtype=bool)
        changed[cy[keep], cx[keep]] = True
        cy, cx = np.nonzero(changed)
        _clean(data, var, crmask, grown, (cy, cx), fill, (clean, var_clean))
        # seeds: within REACH + 2 of a change and sharp on the cleaned image; L+ differs
        # from the first iteration's only next to a cleaned (flagged) pixel
        near = np.zeros(data.shape, dtype=bool)
        near[_squares(*np.nonzero(crmask), 1, data.shape)] = True
        reach = np.zeros(data.shape, dtype=bool)
        reach[_squares(cy, cx, REACH + _CORE, data.shape)] = True
        sy, sx = np.nonzero(reach & (sharp0 | near) & ~grown)
        keep = _laplacian_at(clean, sy, sx) > threshold[sy, sx]
        found = _iteration(clean, var_clean, inmask, (sy[keep], sx[keep]), gain, params)
        fresh = ~crmask[found]
        new = (found[0][fresh], found[1][fresh])
        crmask[new] = True
    return crmask
