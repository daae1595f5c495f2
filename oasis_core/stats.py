"""Robust image statistics shared by backends.

:func:`sky_noise` measures the per-pixel noise of the sky from differences of pixels two
apart, on the locally faintest parts of the image. Unlike the scatter of the pixels about
a background map, it is not inflated by crowding (in a field like ISIS's example, sep's
global RMS is six times the true sky noise) nor by gradients, and at a lag of two pixels
it is barely lowered by the correlation that resampling leaves between neighbours.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sky_noise"]


def sky_noise(
    data: np.ndarray,
    good: np.ndarray | None = None,
    *,
    lag: int = 2,
    faint_fraction: float = 0.3,
    box: int = 7,
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

    Returns
    -------
    float
        1.4826 x MAD of (p[x] - p[x + lag]) / sqrt(2) over the selected pairs.
    """
    from scipy import ndimage

    data = np.asarray(data, dtype=np.float32)
    if good is None:
        good = np.isfinite(data)
    good = good & np.isfinite(data)
    if good.sum() < 100 or data.shape[1] <= lag:
        return float("nan")
    filled = np.where(good, data, np.float32(np.median(data[good])))
    local = ndimage.uniform_filter(filled, size=box, mode="nearest")
    cut = np.quantile(local[good], faint_fraction)
    faint = good & (local <= cut)
    pair = faint[:, lag:] & faint[:, :-lag]
    if pair.sum() < 50:
        return float("nan")
    diff = (data[:, lag:] - data[:, :-lag])[pair] / np.float32(np.sqrt(2.0))
    mad = np.median(np.abs(diff - np.median(diff)))
    return float(1.4826 * mad)
