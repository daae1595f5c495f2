"""Native combine backend: weighted median (or sigma-clipped weighted mean) of aligned
frames, pixel by pixel, vectorised over the frame axis.

Weighted median
    At each pixel the values are sorted along the frame axis and the cumulative weight is
    compared with half the total: the median is the value where the cumulative weight
    reaches half, or the mean of the two values around it when it lands exactly on half
    (so equal weights give :func:`numpy.median`). Weight-0 values never count.

Sigma-clipped weighted mean (``method = "mean"``)
    Starts from the weighted median; values farther than ``clip`` sigmas from the current
    centre are rejected, where, as in SWarp's ``CLIPPED`` mode, sigma combines the frame's
    sky ``noise``, the Poisson noise ``(centre - background) / gain`` (when the gain is
    known) and ``clip_ampfrac x (centre - background)``, which keeps the star cores of
    frames with different seeing; the rest are averaged with weights
    ``weight / noise**2``.

Template properties
    * ``weight``: sum of the input weights over N (the fraction of frames that contribute
      when weights are 0/1); 0 where no frame has data.
    * ``gain``: effective gain of the combination, ``N**2 / sum(1 / gain_i)`` (``N gain``
      for equal gains) for a mean, times ``2/pi`` for a median (a median of N Gaussian
      values has ``pi/2`` times the variance of their mean). None unless every input has
      a gain.
    * ``readnoise``: the read noise in electrons at that effective gain,
      ``sqrt(sum((rn_i/gain_i)**2)) / N * gain_eff`` (times ``sqrt(pi/2)`` for a median).
    * ``saturation``: the smallest input saturation; ``background``: median of the inputs'
      backgrounds (else measured); ``noise``: measured robustly on the result; ``fwhm``:
      median of the inputs' fwhm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import CombineBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, Template
from oasis_core.contracts.validators import non_negative, positive
from oasis_core.engine.stacking import (
    frame_background,
    frame_noise,
    median_or_none,
    stack_template,
)

__all__ = ["NativeCombine", "NativeCombineOptions", "weighted_median"]

_METHODS = ("median", "mean")
_CHUNK = 1 << 22  # values per block (frames x pixels) processed at once
_THREADS = 2  # blocks combined at once (threads), at most one per core


@attrs.frozen(kw_only=True)
class NativeCombineOptions:
    """Options of the native combine backend."""

    method: str = option(
        "median", "median (weighted median) or mean (sigma-clipped weighted mean)", choices=_METHODS
    )
    clip: float = option(3.0, "rejection threshold in sigmas (method = mean)", range=positive)
    clip_iters: int = option(3, "clipping iterations (method = mean)", range=(0, None))
    clip_ampfrac: float = option(
        0.3,
        "fraction of the source amplitude added to sigma so that seeing differences "
        "are not clipped (SWarp's CLIP_AMPFRAC; method = mean)",
        range=non_negative,
    )


class NativeCombine(CombineBackend):
    """Weighted median / clipped mean of aligned frames with numpy."""

    name = "native"
    Options = NativeCombineOptions
    description = "weighted median or sigma-clipped weighted mean (numpy)"

    def check(self, options: Any) -> None:
        """Accept: numpy only."""

    def combine(
        self, frames: Sequence[Frame], *, options: NativeCombineOptions, workdir: Path
    ) -> Template:
        """Return the template of ``frames`` (aligned, on one grid and flux scale).

        Parameters
        ----------
        frames : sequence of Frame
            The aligned frames; their weight maps say which pixels count.
        options : NativeCombineOptions
        workdir : Path
            Unused.

        Returns
        -------
        Template
            See the module docstring for its ``weight``, ``gain``, ``readnoise``...

        Raises
        ------
        StageError
            When no frame is given or the shapes differ.
        """
        return _combine(frames, options)


def weighted_median(
    values: np.ndarray, weights: np.ndarray, axis: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted median along ``axis`` and the total weight.

    Parameters
    ----------
    values, weights : ndarray
        Same shape; weights >= 0 (0 = ignore the value).
    axis : int

    Returns
    -------
    median, total : ndarray
        The median (undefined, the first sorted value, where ``total`` is 0) and the sum
        of the weights.

    Examples
    --------
    >>> v = np.array([1.0, 2.0, 10.0, 20.0])
    >>> float(weighted_median(v, np.array([1.0, 1.0, 1.0, 1.0]))[0])
    6.0
    >>> float(weighted_median(v, np.array([1.0, 1.0, 0.0, 1.0]))[0])
    2.0
    """
    values = np.moveaxis(values, axis, 0)
    weights = np.moveaxis(weights, axis, 0)
    order = np.argsort(values, axis=0, kind="stable")
    v = np.take_along_axis(values, order, axis=0)
    w = np.take_along_axis(weights, order, axis=0).astype(np.float64)
    cum = np.cumsum(w, axis=0)
    total = cum[-1]
    half = 0.5 * total
    tol = 1e-9 * total
    lo = np.argmax(cum >= half - tol, axis=0)[None]
    hi = np.argmax(cum > half + tol, axis=0)[None]
    med = 0.5 * (np.take_along_axis(v, lo, axis=0)[0] + np.take_along_axis(v, hi, axis=0)[0])
    return med, total


def _combine(series: Sequence[Frame], options: NativeCombineOptions) -> Template:
    if not len(series):
        raise StageError("combine: no frame to combine")
    # frames on disk (the core's FrameSeries): read by blocks of rows, each frame's
    # figures from its description; frames in memory: sliced
    described = getattr(series, "described", None)
    frames = described() if described is not None else list(series)
    rows_of = getattr(series, "rows", None)
    if rows_of is None:

        def rows_of(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
            return (
                np.stack([np.asarray(f.data[start:stop]) for f in frames]),
                np.stack([np.asarray(f.weight[start:stop]) for f in frames]),
            )

    shape = frames[0].shape
    for f in frames[1:]:
        if f.shape != shape:
            raise StageError(
                f"combine: frame {f.name!r} has shape {f.shape}, "
                f"frame {frames[0].name!r} has {shape}; align the frames first"
            )
    n = len(frames)
    ny, nx = shape
    mean = options.method == "mean"
    noise = np.array([frame_noise(f) for f in frames], np.float64)[:, None, None]
    backs = np.array([frame_background(f) for f in frames], np.float64)[:, None, None]
    inv_gain = np.array([1.0 / f.gain if f.gain else 0.0 for f in frames], np.float64)[
        :, None, None
    ]
    background = median_or_none([f.background for f in frames])
    fill = background if background is not None else 0.0

    out = np.empty(shape, np.float32)
    wout = np.empty(shape, np.float32)
    rows = max(1, _CHUNK // max(1, n * nx))

    def block(r0: int) -> None:  # blocks of rows bound the memory (n x rows x nx)
        sl = slice(r0, min(ny, r0 + rows))
        d, w = (np.asarray(a, np.float64) for a in rows_of(sl.start, sl.stop))
        w = np.where(np.isfinite(d), np.clip(w, 0.0, 1.0), 0.0)
        d = np.where(w > 0, d, 0.0)
        centre, total = weighted_median(d, w)
        if mean:
            signal = centre[None] - backs
            sigma = np.sqrt(
                noise**2
                + np.clip(signal, 0.0, None) * inv_gain
                + (options.clip_ampfrac * signal) ** 2
            )
            use = w
            for _ in range(max(1, options.clip_iters)):
                use = w * (np.abs(d - centre[None]) <= options.clip * sigma)
                wv = use / noise**2  # weight map x inverse variance of the frame
                wsum = np.sum(wv, axis=0)
                centre = np.where(
                    wsum > 0, np.sum(wv * d, axis=0) / np.where(wsum > 0, wsum, 1.0), centre
                )
            total = np.sum(use, axis=0)
        out[sl] = np.where(total > 0, centre, fill)
        wout[sl] = total / n

    starts = range(0, ny, rows)
    threads = min(_THREADS, len(os.sched_getaffinity(0)), len(starts))
    if threads > 1:  # numpy's sorts and sums release the GIL: blocks side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(block, starts):
                pass
    else:
        for r0 in starts:
            block(r0)

    return stack_template(
        frames,
        out,
        wout,
        statistic="mean" if mean else "median",
        cards={"COMBTYPE": (options.method, "combination method (oasis native)")},
        meta={"combine_method": options.method},
    )
