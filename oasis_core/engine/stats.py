"""Robust image statistics shared by backends.

:func:`sky_noise` measures the per-pixel noise of the sky from differences of pixels two
apart, on the locally faintest parts of the image. Unlike the scatter of the pixels about
a background map, it is not inflated by crowding (in a field like ISIS's example, sep's
global RMS is six times the true sky noise) nor by gradients, and at a lag of two pixels
it is barely lowered by the correlation that resampling leaves between neighbours.
"""

from __future__ import annotations

import numpy as np

from oasis_core.contracts.numeric import exact_median

__all__ = ["box_mean", "exact_median", "local_maxima", "sky_noise"]


def local_maxima(
    image: np.ndarray, y: np.ndarray, x: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pixels ``(y, x)`` that equal the maximum of the ``(2 radius + 1)**2``
    square around them, clipped to the image: ``image == maximum_filter(image,
    2 radius + 1)`` (scipy's default ``reflect`` edges give the clipped square) at those
    pixels, in their order. The 8 neighbours are compared first, the rest of the square
    for the survivors only, so the cost goes with the candidates (the pixels above a
    threshold), not with the image.

    Examples
    --------
    >>> im = np.zeros((5, 6), np.float32)
    >>> im[1, 1], im[3, 4], im[3, 3] = 3.0, 2.0, 1.0
    >>> local_maxima(im, *np.nonzero(im > 0), 1)
    (array([1, 3]), array([1, 4]))
    """
    ny, nx = image.shape
    y, x = np.asarray(y), np.asarray(x)
    value = image[y, x]
    rings = [(1, lambda dy, dx: (dy, dx) != (0, 0))]
    if radius > 1:
        rings.append((radius, lambda dy, dx: max(abs(dy), abs(dx)) > 1))
    for r, wanted in rings:
        keep = np.ones(y.size, dtype=bool)
        rows = {dy: np.clip(y + dy, 0, ny - 1) for dy in range(-r, r + 1)}
        cols = {dx: np.clip(x + dx, 0, nx - 1) for dx in range(-r, r + 1)}
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if wanted(dy, dx):
                    keep &= image[rows[dy], cols[dx]] <= value
        y, x, value = y[keep], x[keep], value[keep]
    return y, x


#: Height (rows) of the bands :func:`sky_noise` samples with ``max_pixels``.
BAND_ROWS = 32


def box_mean(a: np.ndarray, box: int) -> np.ndarray:
    """Mean over ``box`` x ``box`` squares of the last two axes, edges repeated
    (``scipy.ndimage.uniform_filter(..., mode="nearest")`` per 2-D slice, in float32)."""
    lo, hi = box // 2, box - 1 - box // 2
    out = np.asarray(a, dtype=np.float32)
    for axis in (out.ndim - 2, out.ndim - 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (lo, hi)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        index = [slice(None)] * out.ndim
        index[axis] = slice(0, n)
        out = padded[tuple(index)].copy()
        for k in range(1, box):
            index[axis] = slice(k, k + n)
            out += padded[tuple(index)]
    return out / np.float32(box * box)


def sky_noise(
    data: np.ndarray,
    good: np.ndarray | None = None,
    *,
    lag: int = 2,
    faint_fraction: float = 0.3,
    box: int = 7,
    max_pixels: int | None = None,
    fill: float | None = None,
) -> float:
    """Robust per-pixel sky noise of ``data`` (same units), or nan when it cannot be told.

    Parameters
    ----------
    data : ndarray
        The image.
    good : ndarray of bool, optional
        Pixels to use (default: the finite ones).
    lag : int
        Distance in pixels between the two pixels of each difference (along x).
    faint_fraction : float
        Use the pixels whose local mean (a ``box`` x ``box`` average) is among this
        fraction of the faintest: the sky between the sources. Selecting on the local
        mean, not on the pixel itself, leaves the noise distribution untruncated.
    box : int
        Size of the local-mean box.
    max_pixels : int, optional
        Use at most about this many pixels: bands of :data:`BAND_ROWS` full rows spread
        evenly over larger images (the local means are taken within each band). The
        estimate is the same statistic on a regular sample of the sky; default: every
        pixel.
    fill : float, optional
        Value given to the pixels not in ``good`` for the local means (default: the
        median of the good pixels; the sky level, when known, saves computing it).

    Returns
    -------
    float
        1.4826 x MAD of (p[x] - p[x + lag]) / sqrt(2) over the selected pairs.
    """
    data = np.asarray(data, dtype=np.float32)
    if good is None:
        good = np.isfinite(data)
    ny, nx = data.shape
    bands = max_pixels is not None and data.size > max_pixels and ny > 2 * BAND_ROWS
    if bands:
        nband = max(2, min(ny // BAND_ROWS, int(max_pixels) // (BAND_ROWS * nx)))
        starts = np.linspace(0, ny - BAND_ROWS, nband).astype(int)
        rows = (starts[:, None] + np.arange(BAND_ROWS)).ravel()
        data, good = data[rows], np.asarray(good)[rows]
    good = good & np.isfinite(data)
    if good.sum() < 100 or data.shape[1] <= lag:
        return float("nan")
    if fill is None:
        fill = float(np.median(data[good]))
    filled = np.where(good, data, np.float32(fill))
    if bands:
        local = box_mean(filled.reshape(-1, BAND_ROWS, nx), box).reshape(filled.shape)
    else:
        from scipy import ndimage

        local = ndimage.uniform_filter(filled, size=box, mode="nearest")
    cut = np.quantile(local[good], faint_fraction)
    faint = good & (local <= cut)
    pair = faint[:, lag:] & faint[:, :-lag]
    if pair.sum() < 50:
        return float("nan")
    diff = (data[:, lag:] - data[:, :-lag])[pair] / np.float32(np.sqrt(2.0))
    mad = np.median(np.abs(diff - np.median(diff)))
    return float(1.4826 * mad)
