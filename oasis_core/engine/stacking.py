"""What every combine backend reports about its stack, computed once for all of them.

A template's header, sky noise, FWHM, effective gain and read noise and saturation follow
from its inputs and from how they were combined, whatever program combined them:

* ``gain``: ``N**2 / sum(1 / gain_i)`` (``N gain`` for equal gains) for a mean, times
  ``2/pi`` for a median (a median of N Gaussian values has ``pi/2`` times the variance of
  their mean); None unless every input has a gain or for other statistics;
* ``readnoise``: ``sqrt(sum((rn_i/gain_i)**2)) / N * gain`` (times ``sqrt(pi/2)`` for a
  median), in electrons at that effective gain;
* ``saturation``: the lowest of the inputs'; ``fwhm``: their median; ``noise``: the
  stack's own sky noise (sep's global background RMS, a MAD on tiny images).

And one property of a stack that the core checks on every residual
(:func:`incomplete_sources`, applied by
:func:`oasis_core.engine.subtraction.judge_residual`): where frames are missing from the
stack (their pixels masked) over a source that their seeing changes by more than
:data:`HOLE_SNR` times the template's sky noise (:func:`psf_change` of the inputs; the
core computes the mask once, when it combines, for every combine backend:
``Template.holes``; without the inputs' seeing, a source brighter than
:data:`INCOMPLETE_SNR` times that noise where more than :data:`HOLE_FRACTION` of the
frames are missing), the template is a stack of other frames than around it, with their
PSF. A star that saturates in the sharpest frames is, in the template, the median of the
broader ones only (about 10 % fainter at its core in a simulated night), which no kernel
matched on the rest of the template reproduces: every residual keeps a star-shaped
excess there (issue 14), so the residuals get weight 0 there (and within a FWHM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oasis_core.contracts.model import Frame, Template

__all__ = [
    "INCOMPLETE_SNR",
    "frame_background",
    "frame_noise",
    "incomplete_sources",
    "median_or_none",
    "psf_change",
    "stack_template",
]

#: Template pixels at least this many times its sky noise above its local sky, where the
#: stack misses frames, are not used (:func:`incomplete_sources`): the missing frames
#: would move a star's pixel by a fraction of its signal (about a tenth at the core for
#: seeing that varies by a few tenths of a pixel), more than the noise from here up.
INCOMPLETE_SNR = 10.0


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the known, finite ``values``; None when there is none."""
    known = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(known)) if known else None


def frame_noise(frame: Frame) -> float:
    """The frame's sky noise: ``Frame.noise``, else a MAD of its good pixels, else 1."""
    if frame.noise is not None and np.isfinite(frame.noise) and frame.noise > 0:
        return float(frame.noise)
    data = np.asarray(frame.data)
    good = (np.asarray(frame.weight) > 0) & np.isfinite(data)
    values = data[good][:: max(1, int(good.sum()) // 200_000)]  # a subsample is plenty
    if values.size == 0:
        return 1.0
    mad = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    return mad if mad > 0 else 1.0


def frame_background(frame: Frame) -> float:
    """The frame's sky level: ``Frame.background``, else its ``meta["sky_median"]`` (a
    :meth:`~oasis_core.engine.products.FrameSeries.described` frame's), else the median of
    its good pixels, else 0."""
    if frame.background is not None and np.isfinite(frame.background):
        return float(frame.background)
    known = frame.meta.get("sky_median")
    if isinstance(known, (int, float)) and np.isfinite(known):
        return float(known)
    data = np.asarray(frame.data)
    good = (np.asarray(frame.weight) > 0) & np.isfinite(data)
    return float(np.median(data[good])) if good.any() else 0.0


def _stack_noise(data: np.ndarray, good: np.ndarray) -> float | None:
    if not good.any():
        return None
    if min(data.shape) >= 32:
        import sep

        image = np.ascontiguousarray(np.where(good, data, np.median(data[good])), np.float32)
        box = int(max(8, min(64, data.shape[0] // 2, data.shape[1] // 2)))
        rms = float(sep.Background(image, mask=~good, bw=box, bh=box).globalrms)
        if np.isfinite(rms) and rms > 0:
            return rms
    values = data[good]
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _effective_gain(frames: Sequence[Frame], statistic: str | None) -> tuple[Any, Any]:
    if statistic not in ("mean", "median") or not all(f.gain for f in frames):
        return None, None
    n = len(frames)
    factor = np.pi / 2.0 if statistic == "median" else 1.0
    g = np.array([f.gain for f in frames], float)
    gain = float(n**2 / np.sum(1.0 / g) / factor)
    readnoise = None
    if all(f.readnoise is not None for f in frames):
        rn = np.array([f.readnoise for f in frames], float)
        readnoise = float(np.sqrt(factor * np.sum((rn / g) ** 2)) / n * gain)
    return gain, readnoise


def stack_template(
    frames: Sequence[Frame],
    data: np.ndarray,
    weight: np.ndarray,
    *,
    statistic: str | None,
    cards: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Template:
    """The :class:`Template` of ``data``/``weight`` stacked from ``frames``.

    Parameters
    ----------
    statistic : {"mean", "median"} or None
        How the pixels were combined (sets the effective gain and read noise; None: not
        known, no gain).
    cards : mapping
        Header cards to add (e.g. the method); the header is the first frame's plus
        ``NCOMBINE`` and one ``HISTORY`` line per input.
    meta : mapping
        Recorded as the template's ``meta``, after ``ncombine`` and ``frac_no_data``.
    """
    from astropy.io import fits

    good = np.asarray(weight) > 0
    names = tuple(f.name for f in frames)
    first = frames[0].header
    header = first.copy() if isinstance(first, fits.Header) else fits.Header(dict(first or {}))
    header["NCOMBINE"] = (len(frames), "number of frames combined")
    for key, value in cards.items():
        header[key] = value
    for name in names:
        header.add_history(f"oasis combine input: {name}")
    gain, readnoise = _effective_gain(frames, statistic)
    saturations = [f.saturation for f in frames if f.saturation is not None]
    background = median_or_none([f.background for f in frames])
    if background is None and good.any():
        background = float(np.median(data[good]))
    return Template(
        data=data,
        weight=weight,
        header=header,
        name="template",
        inputs=names,
        background=background,
        noise=_stack_noise(np.asarray(data), good),
        fwhm=median_or_none([f.fwhm for f in frames]),
        gain=gain,
        readnoise=readnoise,
        saturation=float(min(saturations)) if saturations else None,
        meta={"ncombine": len(frames), "frac_no_data": float(1.0 - good.mean()), **meta},
    )


#: How far (px) :func:`incomplete_sources` looks for the full coverage around a pixel.
HOLE_RADIUS = 8
#: The share of the frames a template pixel must miss to count as a hole: 3 of 5 frames
#: (a star saturated in the sharpest two) change a median stack's PSF; 13 of 14 (a
#: cosmic ray masked in one frame) do not.
HOLE_FRACTION = 0.25


#: A template pixel where frames are missing is a hole when the missing frames' seeing
#: changes it by more than this many times the template's sky noise
#: (``|psf_change| x (data - sky)``): a residual keeps about that excess at the pixel,
#: and the master residual stacks it from every residual.
HOLE_SNR = 2.0


def psf_change(frames: Sequence[Frame]) -> np.ndarray | None:
    """For a stack of ``frames``, the relative change of a star's peak at each pixel that
    the frames missing there make (0 where every frame has data): a star's peak in frame
    ``i`` goes as ``1 / fwhm_i**2`` (same flux), the stack's peak as their median (the
    frames there, against all of them). A star saturated in the sharpest frames, stacked
    from the broader ones alone, is fainter at its core by this much, which no kernel
    fitted on the rest of the template reproduces; a cosmic ray masked in a frame of
    typical seeing changes little. None when a frame's FWHM is not known or there is
    one frame.

    Parameters
    ----------
    frames : sequence of Frame
        The stack's inputs, on its grid; a frame has data where its weight is positive and
        its pixel finite. Each is read once (a :class:`~oasis_core.engine.products.
        FrameSeries` reads them one at a time).
    """
    # a FrameSeries says what each frame is without reading its pixels
    described = frames.described() if hasattr(frames, "described") else frames
    fwhms = np.array([f.fwhm if f.fwhm else np.nan for f in described], float)
    if len(frames) < 2 or not (np.isfinite(fwhms).all() and (fwhms > 0).all()):
        return None
    shape = described[0].shape
    count = np.zeros(shape, np.int16)
    packed = []  # each frame's coverage, a bit a pixel: one pass over frames read lazily
    for frame in frames:  # one frame at a time
        has = (np.asarray(frame.weight) > 0) & np.isfinite(np.asarray(frame.data))
        count += has
        packed.append(np.packbits(has.ravel()))
        del frame, has
    change = np.zeros(shape, np.float32)
    where = np.flatnonzero((count > 0) & (count < len(frames)))  # few: holes and edges
    peak = 1.0 / fwhms**2
    full = float(np.median(peak))
    chunk = max(1, (1 << 22) // len(frames))
    for lo in range(0, where.size, chunk):
        idx = where[lo : lo + chunk]
        present = np.stack([(bits[idx >> 3] >> (7 - (idx & 7))) & 1 for bits in packed]) > 0
        values = np.where(present, peak[:, None], np.nan)
        change.ravel()[idx] = np.nanmedian(values, axis=0) / full - 1.0
    return change


def incomplete_sources(
    template: Frame, *, change: np.ndarray | None = None, snr: float = INCOMPLETE_SNR
) -> np.ndarray:
    """The template's pixels whose stack misses frames over a source: weight below the
    full stack's (the coverage's grey closing over ``2 HOLE_RADIUS + 1`` px, so a hole is
    filled and the dither's edges stay where they are) by at least half a frame, where
    the missing frames' seeing changes the source by more than :data:`HOLE_SNR` times
    the template's sky noise (``|change| x (data - sky)``, ``change`` the inputs'
    :func:`psf_change`; the sky a sep background mesh of 64 px, the median on tiny
    images). Without ``change``: by more than :data:`HOLE_FRACTION` of the full weight,
    at least ``snr`` times the sky noise above the sky.

    Parameters
    ----------
    template : Template or Frame
        A stack whose weight is the share of the frames behind each pixel (a frame
        whose weights are 0 or 1 has no hole but its masked pixels, which are not good).
    snr : float
        The threshold, in the template's sky noise (``template.noise``, else measured).

    Returns
    -------
    ndarray of bool
        Where the template is not one stack with the rest of it (see the module doc).
    """
    data = np.asarray(template.data, np.float32)
    weight = np.asarray(template.weight, np.float32)
    good = (weight > 0) & np.isfinite(data)
    out = np.zeros(data.shape, bool)
    if good.sum() < 100:
        return out
    # a hole in the coverage (a saturated core, a cosmic ray masked in some frames), not
    # the dither's edges: the full weight is the coverage's grey closing, which fills
    # holes narrower than 2 HOLE_RADIUS + 1 px and leaves steps where they are (every
    # frame's edge is one; on a small dithered series they cross most sources)
    from scipy.ndimage import grey_closing

    full = grey_closing(np.where(good, weight, 0), size=2 * HOLE_RADIUS + 1)
    n = len(getattr(template, "inputs", ()) or ())
    seeing = change is not None and np.shape(change) == data.shape and n > 1
    if seeing:  # any frame missing, weighed by what its seeing does there
        partial = good & (weight < full - 0.5 / n) & (np.asarray(change) != 0)
    else:
        partial = good & (weight < full * (1.0 - HOLE_FRACTION))
    if not partial.any():
        return out
    noise = template.noise
    if noise is None or not (np.isfinite(noise) and noise > 0):
        noise = _stack_noise(data, good)
    if noise is None or not noise > 0:
        return out
    sky = _local_sky(data, good)
    if seeing:
        return partial & (np.abs(change) * (data - sky) > HOLE_SNR * noise)
    return partial & (data - sky > snr * noise)


def _local_sky(data: np.ndarray, good: np.ndarray) -> np.ndarray | float:
    """The sky under every pixel: a sep background mesh (64 px boxes, fewer on small
    images) of the good pixels; their median on images under 32 px."""
    if min(data.shape) < 32:
        return float(np.median(data[good]))
    import sep

    image = np.ascontiguousarray(np.where(good, data, np.median(data[good])), np.float32)
    box = int(max(8, min(64, data.shape[0] // 2, data.shape[1] // 2)))
    return np.asarray(sep.Background(image, mask=~good, bw=box, bh=box).back(), np.float32)
