"""The ``native`` mask backend: cosmic rays (astroscrappy), saturated stars and bleed trails.

The weight the core hands in already holds 0 on non-finite pixels and on the file's own
bad-pixel mask; those stay 0. On top of it this backend zeroes

* saturated pixels (``>= frame.saturation``), grown by a few pixels, and their bleed
  trails: the vertical runs of pixels above the noise that touch a saturated pixel;
* cosmic rays found by L.A.Cosmic (:func:`astroscrappy.detect_cosmics`) on the frame
  mirrored by a few pixels at its edges, run only in windows around the pixels sharp
  enough to hold one (:mod:`oasis_native.cosmics`: the same mask, about 10 times faster).

Frames may be sky-subtracted (background near 0, negative pixels valid), so the noise
model given to astroscrappy is not taken from the pixel values: it is the measured sky
variance (a sep background mesh) plus the Poisson variance of the sources above the sky.
This works the same whether or not the sky is still in the pixels, and whether or not the
frame's gain is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import MaskBackend, option
from oasis_core.contracts.model import Frame
from oasis_core.contracts.validators import fraction, in_range, positive
from oasis_core.engine.stats import exact_median

__all__ = ["NativeMask", "NativeMaskOptions", "saturation_level"]


@attrs.frozen(kw_only=True)
class NativeMaskOptions:
    """Options of the ``native`` mask backend (``[mask.native]``)."""

    cosmics: bool = option(True, "detect cosmic rays with astroscrappy (L.A.Cosmic)")
    sigclip: float = option(
        4.5, "L.A.Cosmic Laplacian-to-noise detection limit (sigmas)", range=positive
    )
    sigfrac: float = option(
        0.3, "fraction of sigclip used for pixels next to a cosmic ray", range=positive
    )
    objlim: float = option(
        5.0,
        "L.A.Cosmic contrast limit vs the fine-structure image; raise it if star cores are flagged",
        range=positive,
    )
    niter: int = option(4, "L.A.Cosmic iterations", range=(1, None))
    cosmic_windows: bool = option(
        True,
        "run L.A.Cosmic only in windows around the pixels sharp enough to hold a cosmic ray "
        "(the same mask as on the whole frame, about 10 times faster); false: the whole frame",
    )
    cosmic_grow: int = option(0, "grow every cosmic-ray pixel by this many pixels", range=(0, None))
    saturation_grow: int = option(
        2, "grow saturated regions by this radius (pixels)", range=(0, None)
    )
    bleed: bool = option(
        True, "also mask bleed trails (vertical runs above the noise that touch a saturated pixel)"
    )
    bleed_nsigma: float = option(
        5.0, "a bleed-trail pixel is this many sigmas above the sky", range=positive
    )
    saturation_fraction: float = option(
        0.98,
        "saturation unknown: when the data maximum is a clipping plateau, pixels above "
        "this fraction of it are saturated",
        range=in_range(0, 1, lo_open=True),
    )
    plateau_pixels: int = option(
        4,
        "saturation unknown: pixels at the data maximum that make it a clipping plateau",
        range=(1, None),
    )
    default_gain: float = option(1.0, "gain (e-/ADU) used when the frame has none", range=positive)
    back_size: int = option(
        64, "mesh size (pixels) of the sep background and noise maps", range=(1, None)
    )
    max_cosmic_fraction: float = option(
        0.05,
        "fail the frame when cosmic rays would mask more than this fraction of it",
        range=fraction,
    )


def saturation_level(
    data: np.ndarray,
    good: np.ndarray,
    saturation: float | None,
    *,
    fraction: float = 0.98,
    plateau_pixels: int = 4,
) -> float | None:
    """The level at and above which pixels count as saturated, or None.

    Parameters
    ----------
    data : ndarray
        The pixels.
    good : ndarray of bool
        Pixels to consider (finite, not already masked).
    saturation : float or None
        The frame's saturation level when known; it is returned as is.
    fraction : float
        When ``saturation`` is None and the data maximum is a clipping plateau (at least
        ``plateau_pixels`` pixels equal to it), ``fraction * max`` is returned.
    plateau_pixels : int
        See ``fraction``.

    Returns
    -------
    float or None
        None when the saturation is unknown and the data show no clipping plateau.
    """
    if saturation is not None:
        return float(saturation)
    values = data[good]
    if values.size == 0:
        return None
    top = float(values.max())
    n_top = int(np.count_nonzero(values >= top))
    if n_top >= plateau_pixels and top > exact_median(values):
        return fraction * top
    return None


def _require(stage: str, *modules: str) -> None:
    import importlib.util

    from oasis_core.contracts.errors import BackendUnavailable

    for module in modules:
        if importlib.util.find_spec(module) is None:
            msg = (
                f"{stage} backend 'native': Python package {module!r} is not installed; "
                f"install it with 'pip install {module}'"
            )
            raise BackendUnavailable(msg)


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _pixels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.nonzero`` of a 2-D mask, in the same order, several times faster on a
    large sparse one (through flat indices)."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by a disk of ``radius`` (:func:`scipy.ndimage.binary_dilation`);
    a sparse mask by writing the disk around each of its pixels, which is much faster."""
    from scipy import ndimage

    disk = _disk(radius)
    ys, xs = _pixels(mask)
    if ys.size * disk.sum() > mask.size // 4:
        return ndimage.binary_dilation(mask, structure=disk)
    dy, dx = np.nonzero(disk)
    yy = ys[:, None] + (dy - radius)[None, :]
    xx = xs[:, None] + (dx - radius)[None, :]
    inside = (yy >= 0) & (yy < mask.shape[0]) & (xx >= 0) & (xx < mask.shape[1])
    out = np.zeros(mask.shape, dtype=bool)
    out[yy[inside], xx[inside]] = True
    return out


def _sky_level(data: np.ndarray, bad: np.ndarray) -> float:
    """The median of the good pixels, taken on a regular grid of about 2^18 of them: a
    value for the bad pixels, which the background mesh leaves out."""
    step = max(1, int(np.sqrt(data.size / (1 << 18))))
    sample = data[::step, ::step][~bad[::step, ::step]]
    if sample.size < 1024:
        sample = data[~bad]
    return exact_median(sample)


def _bleed_trails(
    saturated: np.ndarray,
    above: np.ndarray,
    rms: np.ndarray,
    finite: np.ndarray,
    *,
    nsigma: float,
) -> np.ndarray:
    """``saturated`` and the vertical runs of pixels ``nsigma`` above the sky that touch it;
    the runs are vertical, so only the columns holding a saturated pixel are searched."""
    from scipy import ndimage

    cols = np.flatnonzero(saturated.any(axis=0))
    sat = np.take(saturated, cols, axis=1)
    high = np.take(above, cols, axis=1) >= nsigma * np.take(rms, cols, axis=1)
    high &= np.take(finite, cols, axis=1)
    high |= sat
    column = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=bool)
    runs, nruns = ndimage.label(high, structure=column)
    touched = np.zeros(nruns + 1, dtype=bool)
    touched[runs[sat]] = True
    touched[0] = False
    ys, xs = _pixels(touched[runs])
    out = np.zeros(saturated.shape, dtype=bool)
    out[ys, cols[xs]] = True
    return out


class NativeMask(MaskBackend):
    """Masks cosmic rays, saturated stars and bleed trails, keeping the incoming weight."""

    name = "native"
    Options = NativeMaskOptions
    description = "cosmic rays (astroscrappy L.A.Cosmic), saturated stars and bleed trails"

    def check(self, options: NativeMaskOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` without sep or
        astroscrappy."""
        modules = ("sep", "astroscrappy") if options.cosmics else ("sep",)
        _require("mask", *modules)

    def mask(self, frame: Frame, *, options: NativeMaskOptions, workdir: Path) -> Frame:
        """Return ``frame`` with a new weight: 0 on cosmic rays, saturation and bleeds.

        Parameters
        ----------
        frame : Frame
            ``gain`` and ``saturation`` are used when set (see
            :func:`saturation_level` for the fallback); ``readnoise`` is not needed, the
            sky noise is measured.
        options : NativeMaskOptions
        workdir : Path
            Unused (nothing is written).

        Returns
        -------
        Frame
            With the new ``weight`` and ``meta`` entries ``n_cosmic`` (cosmic-ray pixels),
            ``n_saturated`` (pixels masked for saturation and bleeding), ``saturation``
            (level used, nan if none) and ``masked_fraction`` (weight 0 overall).

        Raises
        ------
        StageError
            When cosmic rays would mask more than ``max_cosmic_fraction`` of the frame.
        """
        import sep

        from oasis_core.contracts.errors import StageError

        data = np.array(frame.data, dtype=np.float32, order="C")  # native-endian copy
        weight = np.asarray(frame.weight, dtype=np.float32)
        finite = np.isfinite(data)
        bad = weight <= 0
        bad |= ~finite
        any_bad = bool(bad.any())
        if any_bad and bad.all():
            return attrs.evolve(
                frame,
                weight=np.zeros(data.shape, np.float32),
                meta={
                    **frame.meta,
                    "n_cosmic": 0,
                    "n_saturated": 0,
                    "saturation": float("nan"),
                    "masked_fraction": 1.0,
                },
            )

        # saturation and bleed trails
        level = saturation_level(
            data,
            ~bad,
            frame.saturation,
            fraction=options.saturation_fraction,
            plateau_pixels=options.plateau_pixels,
        )
        saturated = np.zeros(data.shape, dtype=bool)
        if level is not None:
            saturated = data >= level
            saturated &= finite
        if any_bad:
            # a level for the bad pixels, which sep leaves out (they only have to be sky)
            data[bad] = _sky_level(data, bad)
        # background and noise maps; saturated cores kept out of them
        size = int(max(8, min(options.back_size, *data.shape)))
        bkg = sep.Background(data, mask=bad | saturated, bw=size, bh=size, fw=3, fh=3)
        rms = np.asarray(bkg.rms(), dtype=np.float32)
        unusable = ~(rms > 0)
        if unusable.any():
            rms[unusable] = max(float(bkg.globalrms), 1e-6)
        above = data  # the data above the sky, in place
        above -= np.asarray(bkg.back(), dtype=np.float32)
        del data
        if saturated.any():
            if options.bleed:
                saturated = _bleed_trails(
                    saturated, above, rms, finite, nsigma=options.bleed_nsigma
                )
            if options.saturation_grow > 0:
                saturated = _grow(saturated, options.saturation_grow)

        # cosmic rays, as a list of pixels
        cy = cx = np.zeros(0, dtype=np.intp)
        if options.cosmics:
            from oasis_native.cosmics import detect_cosmics

            gain = float(frame.gain) if frame.gain else options.default_gain
            # sky variance as measured + Poisson variance of what is above the sky (ADU^2)
            var = np.maximum(above, 0.0)
            var /= gain
            var += np.square(rms, out=rms)
            del rms
            inmask = bad | saturated
            if any_bad:
                above[bad] = 0.0
            crmask = detect_cosmics(
                above,
                var,
                inmask,
                gain=gain,
                sigclip=options.sigclip,
                sigfrac=options.sigfrac,
                objlim=options.objlim,
                niter=options.niter,
                windows=options.cosmic_windows,
            )
            del var
            cy, cx = _pixels(crmask)
            keep = ~inmask[cy, cx]
            cy, cx = cy[keep], cx[keep]
            if options.cosmic_grow > 0:
                cosmic = np.zeros(above.shape, dtype=bool)
                cosmic[cy, cx] = True
                cy, cx = _pixels(_grow(cosmic, options.cosmic_grow))
                keep = ~inmask[cy, cx]
                cy, cx = cy[keep], cx[keep]
            fraction = cy.size / above.size
            if fraction > options.max_cosmic_fraction:
                msg = (
                    f"mask backend 'native': frame {frame.name!r}: cosmic rays would mask "
                    f"{fraction:.2%} of the pixels (limit {100 * options.max_cosmic_fraction:g}%); "
                    "check the frame's gain or raise mask.native.sigclip / objlim"
                )
                raise StageError(msg, metadata={"cosmic_fraction": float(fraction)})

        new_weight = np.array(weight, dtype=np.float32)
        if any_bad:
            new_weight[bad] = 0.0
            saturated &= ~bad
        new_weight[saturated] = 0.0
        new_weight[cy, cx] = 0.0
        meta: dict[str, Any] = {
            **frame.meta,
            "n_cosmic": int(cy.size),
            "n_saturated": int(np.count_nonzero(saturated)),
            "saturation": float("nan") if level is None else float(level),
            "masked_fraction": np.count_nonzero(new_weight == 0) / new_weight.size,
        }
        return attrs.evolve(frame, weight=new_weight, meta=meta)
