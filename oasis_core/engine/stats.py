"""Robust image statistics shared by backends.

:func:`sky_noise` measures the per-pixel noise of the sky from differences of pixels two
apart, on the locally faintest parts of the image. Unlike the scatter of the pixels about
a background map, it is not inflated by crowding (in a field like ISIS's example, sep's
global RMS is six times the true sky noise) nor by gradients, and at a lag of two pixels
it is barely lowered by the correlation that resampling leaves between neighbours.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["exact_median", "sky_noise"]


def exact_median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D array of finite values, exactly, at a fraction of the cost
    for large arrays: the middle values are selected within a bracket taken from a
    sorted sample (a few whole-array comparisons instead of a copy and a partition)."""
    n = values.size
    if n < 1 << 16:
        return float(np.median(values.astype(np.float64, copy=False)))
    k_lo, k_hi = (n - 1) // 2, n // 2
    sample = np.sort(values[:: max(1, n // 16384)])
    m = sample.size
    # the sample median's rank scatters by sqrt(m) / 2 about the population's: +-5 of it
    reach = int(2.5 * math.sqrt(m)) + 2
    lo = sample[max(m // 2 - reach, 0)]
    hi = sample[min(m // 2 + reach, m - 1)]
    below = int(np.count_nonzero(values < lo))
    inside = values[(values >= lo) & (values <= hi)]
    if not below <= k_lo or not below + inside.size > k_hi:  # the bracket missed
        return float(np.median(values.astype(np.float64, copy=False)))
    kth = [k_lo - below, k_hi - below]
    part = np.partition(inside, kth)
    return float(np.mean(part[kth], dtype=np.float64))


#: Height (rows) of the bands :func:`sky_noise` samples with ``max_pixels``.
BAND_ROWS = 32


def _box_mean(a: np.ndarray, box: int) -> np.ndarray:
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
        local = _box_mean(filled.reshape(-1, BAND_ROWS, nx), box).reshape(filled.shape)
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
