"""The ``hotpants`` subtract backend: Andrew Becker's HOTPANTS program, run as a subprocess.

HOTPANTS (High Order Transform of PSF ANd Template Subtraction,
https://github.com/acbecker/hotpants) fits Alard's spatially varying kernel on stamps and
writes the difference image, its noise image and the kernel solution. This module writes
the two frames (and their masks and noise images) as FITS in the backend's ``workdir``,
maps the options and the frames' measured properties to hotpants' command-line flags,
runs the program and turns its outputs into a :class:`~oasis_core.contracts.model.Residual`.

What the backend passes to hotpants
-----------------------------------
``-il``/``-tl`` (lower valid level)
    hotpants' default, 0, marks every pixel at or below zero as bad: on a sky-subtracted
    frame that is half the sky, and hotpants then masks nearly the whole output and still
    exits 0. The level is therefore taken from the data: ``min(median, 1st percentile) -
    lower_nsigma x noise`` (the frame's sky noise), far below any sky pixel whatever the
    sky level (in a crowded field the median sits well above the sky).
``-iu``/``-tu``, ``-iuk``/``-tuk`` (upper valid levels, of the data and of stamp stars)
    ``upper`` when set, else the frame's saturation (``Frame.saturation``), else just
    above the frame's brightest good pixel (no cut; hotpants' default 25000 ADU would
    mask the cores of bright stars on deep frames). The same level bounds the stamp
    stars (``-iuk``/``-tuk``, which otherwise stay at hotpants' 25000 whatever ``-iu``).
``-ig -ir -tg -tr``
    ``Frame.gain`` / ``Frame.readnoise``. Without a gain, a frame that keeps its sky gets
    its photon-statistics gain ``sky / noise**2`` (else 1); without a read noise, the
    one that makes hotpants' noise model ``|data| / gain + (rn / gain)**2`` equal the
    measured sky noise at the sky level. With ``noise_images`` (the default) hotpants
    uses the noise images below instead and these only document the frames.
``-ini``/``-tni`` (noise images, ``noise_images``)
    1-sigma images ``sqrt(noise**2 / weight + max(data - sky, 0) / gain)``: the measured
    sky noise (right for sky-subtracted frames and stacks, where hotpants' own model,
    built from the pixel values, misses the sky) plus the sources' photon noise.
``-imi``/``-tmi`` (input masks)
    Pixels of weight 0 are written as mask value 128 (hotpants' ``FLAG_INPUT_ISBAD`` bit,
    the only bit of an input mask that excludes a pixel from the stamps and the
    convolution and masks the output; any other non-zero value is merely recorded).
    Their data are replaced by the frame's median in the copy hotpants reads, since
    hotpants still convolves masked pixels into their neighbours.
``-c`` (image to convolve)
    ``auto``: the frame with the narrower PSF (``Frame.fwhm``, or its PSF model's), as
    ``t`` (template) or ``i`` (the science image); hotpants' own trial of both (``b``)
    when a FWHM is unknown.
``-n`` (photometric normalisation)
    ``i`` by default: the residual is in the science frame's flux scale, whichever image
    was convolved (the :class:`Residual` contract).
``-ng``, ``-r``, ``-rss``
    The Gaussian basis (hotpants' ``3 6 0.70 4 1.50 2 3.00`` unless ``ng`` is set, its
    sigmas widened in proportion when the matching kernel ``sqrt(s_broad**2 -
    s_narrow**2)``, ``s = FWHM / 2.355``, is wider than the middle Gaussian), the kernel
    half width (2.5 x the larger FWHM and 3 sigmas of the widest Gaussian; 10 without
    FWHMs) and the stamp half width (1.5 x the kernel half width, at least 15).
``-ko -bgo -nsx -nsy -nss -ft``, ``extra``
    As the options say; ``extra`` is appended verbatim.
``-oni -oki``
    Output noise image and kernel table (the kernel at the image centre is rebuilt
    from it and checked against hotpants' ``KSUM00``).

What comes back
---------------
The difference image is ``science - K * template`` (or ``(K * science - template) /
ksum`` when the science image is convolved), in the science frame's flux scale with
``-n i``: a transient in the science frame is positive. hotpants writes the noise image
as a 1-sigma image (the square root of the summed variances, scaled like the
difference). Pixels at hotpants' fill value (``MASKVAL``, 1e-30: the kernel half width
along the edges, bad and saturated pixels and their convolution footprint) and pixels
where either input weight is 0 get weight 0. When the science frame is one of the
template's inputs, the noise they share is taken out of the noise image (as the ``ois``
backend does, ``template_covariance``).

``meta`` records the numbers hotpants prints or writes to the output header:
``nstamps`` (stamps left after its sigma clipping, from ``N out of M stamps remain``),
``nstamps_built``, ``ksum`` (``KSUM00``), ``x2nrm`` (``X2NRM00``: mean (diff/noise)**2 of
the good pixels) and ``nx2nrm``, ``dmean``/``dsige``/``dsig`` (mean and standard
deviation of the difference, mean of the noise image; ``DMEAN00``, ``DSIGE00``,
``DSIG00``), ``sssig``/``ssscat`` and ``fsig``/``fscat`` (the stamps' figure of merit
before and after the fit), ``convolved`` (``CONVOL00``), ``photnorm``, ``fscale``
(science / template flux ratio), ``bg`` (the differential background at the centre),
``noise_ratio`` (hotpants' empirical / expected noise), ``version``, ``masked_fraction``,
``nnoise``, ``q``, the choices made (``convolve``, ``ng``, ``r``, ``rss``, ``ko``),
``hotpants_seconds``, ``command`` (the command line, with file names relative to the
workdir) and ``flag`` when the result is not to be trusted: hotpants fitted no kernel,
kept fewer stamps than ``min_stamps``, or masked more than ``max_masked`` of the output
(hotpants exits 0 in all these cases).

Too few stamps for the kernel's spatial terms make hotpants' fit degenerate (it then
returns a wild kernel and a residual full of structure): with ``lower_ko`` the backend
runs hotpants a second time with the highest ``-ko`` the surviving stamps constrain
(``ko_requested`` records the first) and says so in ``flag``.

Small frames
------------
hotpants looks for stamp stars only where a whole substamp (``2 rss + 1`` px) clears a
border of ``rss + r`` px, in a grid of stamps of ``size / nsx - (2 r + 1)`` px, and fits
one star per stamp: on a cutout (63 x 63 px, a few stars) its defaults leave no place for
a star, it fits no kernel, masks every pixel and still exits 0. A frame narrower than
:data:`SMALL_SIDE` (160 px, where hotpants' default border eats half of it) is therefore
done in two runs (:func:`small_frame_layout`):

* the frames' FWHMs are measured from their bright sources, and replace the frames' own
  when those are unknown, or more than 30 % off the width of 3 sources or more (a PSF
  fitted on the two or three stars of a cutout can be; ``meta["fwhm_source"]``:
  ``frame`` or ``measured`` for each);
* the kernel half width ``r`` is cut to an eighth of the frame (at least 4 px) and the
  substamp half width ``rss`` set to ``max(r + 1, 1.5 r)``, at most a quarter of the
  frame (explicit ``r``/``rss`` options are kept);
* the backend chooses the stamp stars: sources above ``ft`` sky sigmas in both frames
  (``ft`` is halved, down to 5, until 3 are found), point-like (a galaxy may host the
  transient), unsaturated, whose substamp holds no masked pixel; a source whose science
  / template flux ratio disagrees with the others' (a transient or a variable) is left
  out, so that it never drives the fit; so is the frame's central object while another
  star is left (a cutout is centred on its target, which may be a transient or host
  one);
* the kernel is fitted on a mosaic (:data:`FIT_FILES`) holding each star's cell (its
  substamp and the kernel's reach, from both frames) in a stamp of its own, the centres
  given to hotpants (``-ssf``, ``-afssc 0``), with ``-ko 0 -bgo 0`` (one kernel and one
  background for the frame) and the Gaussians of the basis at their widths (at most
  ``r / 2``) but degrees 2, 2 and 0 (13 basis functions instead of hotpants' 49, which a
  few stars cannot constrain; unless ``ng`` is set);
* with ``convolve = "auto"`` and FWHMs within 10 % of each other (from a few stars, the
  narrower may be either), the whole small-frame subtraction is done in both directions
  and the better by the honest Q kept (``choice_convolve`` in ``meta``; hotpants' own
  ``-c b`` kept a kernel of Q 0.14 on an ISIS cutout where the other way gives 0.85);
* after the fit, a star whose residual stands out from the others' is left out and the
  kernel refitted once (:func:`deviant_star`: extra flux, a transient on a star); then,
  while 3 stars or more remain, the star whose substamp the kernel fits far worse than
  the others' (:func:`clipped_star`: a blend, a core the other stars do not share) is
  clipped and the kernel refitted;
* the second run applies that kernel to the frame itself (``-ki``), padded by ``2 r``
  masked pixels so that hotpants loses only ``r`` px along the edges;
* a low-order kernel is fitted on the same stars as well (:func:`_low_basis`: one
  Gaussian of degree 1 at the matching width, i.e. a flux scale, a shift and the
  background: what one star or a few blended ones constrain) and applied the same way;
  the backend keeps the full basis unless the low-order residual's Q away from its new
  sources (:func:`honest_q`, which a bright transient does not decide) is higher by
  more than :data:`Q_MARGIN`; ``meta["choice_kernel"]`` (shown in
  ``residuals/log.txt``), ``kernel_model``, ``q_honest`` and the header card ``HPKERN``
  say which and why, and a kept Q below :data:`POOR_Q` is flagged (``HPFLAG``, logged);
* the residual's PSF FWHM (``meta["fwhm"]``, the header's ``FWHM``: the width the
  core's filters and the extraction assume) is the convolved frame's broadened by the
  kernel kept (:func:`matched_fwhm`), not the wider of two FWHMs measured on a few
  sources, one of which may be a galaxy.

With no usable star at all, hotpants fits its kernel on a reference star drawn in both
mosaics: a Gaussian of each frame's FWHM, of the same flux in both; the kernel is then the
one matching the two PSFs with a flux ratio of 1 and the differential background the
difference of the sky levels, and the residual is flagged (``meta["fallback"]``). With
one frame's FWHM only (a cutout whose template holds no source), the other is taken
equal (a kernel of a flux ratio and a background, said in the fallback); without either
the backend says so in one line (a :class:`~oasis_core.contracts.errors.StageError`) instead.
``meta`` records the choices: ``small_frame``, ``stamp_stars`` (stars given),
``stamp_ft``, ``stamp_rejected``, ``stamp_dropped``, ``stamp_central``,
``stamp_clipped``, ``mosaic`` (its side), ``nsx``/``nsy``, ``r``, ``rss``, ``ko``,
``bgo``, ``ng``, ``fit_command``, ``choice_stamps`` and ``choice_kernel`` (sentences,
shown in ``residuals/log.txt``), ``kernel_model``, ``q_honest`` and
``q_honest_<other model>``; fewer than 3 stamp stars are flagged (``few stamps``).
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import SubtractBackend, option
from oasis_core.contracts.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.contracts.model import Frame, KernelSolution, Residual, Template
from oasis_core.contracts.validators import in_range, non_negative, positive, satisfies
from oasis_core.engine.programs import run_program

__all__ = [
    "FILES",
    "FIT_FILES",
    "SMALL_SIDE",
    "HotpantsOptions",
    "HotpantsOutput",
    "HotpantsSubtract",
    "SmallLayout",
    "clipped_star",
    "hotpants_arguments",
    "kernel_image",
    "matched_fwhm",
    "parse_stderr",
    "read_hotpants_output",
    "small_frame_layout",
]

#: hotpants' own Gaussian basis (its ``-ng`` default).
DEFAULT_NG = "3 6 0.70 4 1.50 2 3.00"

#: The mask value hotpants reads as "bad input pixel" (its ``FLAG_INPUT_ISBAD`` bit).
MASK_BAD = 128

#: hotpants' default fill value of masked output pixels (``-fi``).
FILL_VALUE = 1.0e-30

#: File names the backend uses in its workdir (hotpants runs with the workdir as its
#: current directory, so the command line holds only these names).
FILES: Mapping[str, str] = {
    "science": "science.fits",
    "template": "template.fits",
    "science_mask": "science_mask.fits",
    "template_mask": "template_mask.fits",
    "science_noise": "science_noise.fits",
    "template_noise": "template_noise.fits",
    "output": "diff.fits",
    "noise": "diff_noise.fits",
    "kernel": "kernel.fits",
    "stamps": "stamps.xy",
}

#: The files of a small frame's fitting run (on the mosaic of its stars' cells); it writes
#: the kernel (``FILES["kernel"]``) that the run on the frame itself applies (``-ki``).
FIT_FILES: Mapping[str, str] = {
    **FILES,
    "science": "fit_science.fits",
    "template": "fit_template.fits",
    "science_mask": "fit_science_mask.fits",
    "template_mask": "fit_template_mask.fits",
    "science_noise": "fit_science_noise.fits",
    "template_noise": "fit_template_noise.fits",
    "output": "fit_diff.fits",
    "noise": "fit_diff_noise.fits",
}

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

BUILD_HINT = (
    "build it from https://github.com/acbecker/hotpants (needs cfitsio, e.g. "
    "`apt-get install libcfitsio-dev`; then `make`, with -fcommon added to COPTS for "
    "gcc >= 10) and put `hotpants` on PATH or set subtract.hotpants.binary"
)

# ------------------------------------------------------------------------ options


def _parse_ng(text: str) -> tuple[tuple[int, float], ...]:
    """``"3 6 0.70 4 1.50 2 3.00"`` -> ((6, 0.7), (4, 1.5), (2, 3.0)); ValueError if bad."""
    tokens = text.split()
    try:
        n = int(tokens[0])
        if n < 1 or len(tokens) != 1 + 2 * n:
            raise ValueError
        pairs = tuple((int(tokens[1 + 2 * i]), float(tokens[2 + 2 * i])) for i in range(n))
    except (ValueError, IndexError):
        msg = (
            f"subtract.hotpants: ng must be 'N deg1 sigma1 ... degN sigmaN' "
            f"(e.g. {DEFAULT_NG!r}), got {text!r}"
        )
        raise ValueError(msg) from None
    if any(d < 0 or not 0 < s < math.inf for d, s in pairs):
        msg = f"subtract.hotpants: ng degrees must be >= 0 and sigmas > 0, got {text!r}"
        raise ValueError(msg)
    return pairs


def _valid_ng(text: str) -> bool:
    return not text.strip() or bool(_parse_ng(text))


def _valid_extra(text: str) -> bool:
    shlex.split(text)  # ValueError (an unclosed quote...) when not
    return True


@attrs.frozen(kw_only=True)
class HotpantsOptions:
    """Options of the ``hotpants`` subtract backend (hotpants' flag in brackets).

    0 or ``""`` means "derived from the frames" wherever the help says so (TOML has no
    null); see the module docstring for the rules.
    """

    binary: str = option("hotpants", "the hotpants program: a name on PATH or a path")
    timeout: float = option(
        900.0, "seconds before hotpants is stopped (a StageError); 0: no limit", range=non_negative
    )
    convolve: str = option(
        "auto",
        "image to convolve [-c]: 't' template, 'i' science, 'b' hotpants decides, 'auto' "
        "the narrower PSF ('b' if a FWHM is unknown)",
        choices=("auto", "t", "i", "b"),
    )
    normalize: str = option(
        "i",
        "flux scale of the residual [-n]: 'i' the science frame's (the residual contract), "
        "'t' the template's, 'u' the unconvolved image's",
        choices=("i", "t", "u"),
    )
    ng: str = option(
        "",
        f"Gaussian basis 'N deg1 sigma1 ...' [-ng]; '': '{DEFAULT_NG}', widened for broad "
        "matching kernels",
        check=satisfies(
            _valid_ng,
            "'' or 'N deg1 sigma1 ... degN sigmaN' (N >= 1 pairs, degrees >= 0, sigmas > 0)",
        ),
    )
    r: int = option(
        0,
        "kernel half width in px [-r]; 0: 2.5 x the larger FWHM, >= 3 widest sigmas (10 "
        "if unknown)",
        range=non_negative,
    )
    rss: int = option(
        0, "stamp half width in px [-rss], >= r; 0: max(15, 1.5 r)", range=non_negative
    )
    ko: int = option(2, "spatial order of the kernel variation [-ko]", range=non_negative)
    bgo: int = option(1, "spatial order of the differential background [-bgo]", range=non_negative)
    nsx: int = option(
        10, "stamps along x [-nsx] (hotpants lowers it on small images)", range=positive
    )
    nsy: int = option(10, "stamps along y [-nsy]", range=positive)
    nss: int = option(3, "substamp (star) candidates per stamp [-nss]", range=positive)
    ft: float = option(
        20.0,
        "stamp star threshold in sky sigmas [-ft] (hotpants halves it once if short)",
        range=positive,
    )
    upper: float = option(
        0.0,
        "upper valid level (ADU) [-iu -tu]; 0: each frame's saturation (no cut if unknown)",
        range=non_negative,
    )
    lower_nsigma: float = option(
        10.0,
        "lower valid level [-il -tl] = median - this x sky noise (not hotpants' 0)",
        range=positive,
    )
    noise_images: bool = option(
        True,
        "pass noise images from the measured sky noise [-ini -tni]; false: hotpants' "
        "|data|/gain model",
    )
    template_covariance: bool = option(
        True,
        "take the noise shared with a template that contains the science frame out of the "
        "noise image",
    )
    min_stamps: int = option(
        0,
        "flag the residual when fewer stamps survive; 0: (ko+1)(ko+2)/2",
        range=non_negative,
    )
    lower_ko: bool = option(
        True,
        "refit with a lower -ko when fewer stamps survive than its (ko+1)(ko+2)/2 spatial terms",
    )
    max_masked: float = option(
        0.5,
        "flag the residual when hotpants masks more than this fraction of it",
        range=in_range(0, 1, lo_open=True),
    )
    extra: str = option(
        "",
        "further hotpants arguments, appended verbatim (e.g. '-ks 3 -kfm 0.995')",
        check=satisfies(_valid_extra, "a shell-style argument string (quotes closed)"),
    )


# ------------------------------------------------------------------ preparation


@attrs.frozen(kw_only=True)
class _Prepared:
    """One frame as hotpants will see it (internal)."""

    data: np.ndarray = attrs.field(eq=False, repr=False)  # bad pixels -> median
    mask: np.ndarray = attrs.field(eq=False, repr=False)  # int16, MASK_BAD where bad
    variance: np.ndarray = attrs.field(eq=False, repr=False)  # 1-sigma**2 (ADU**2)
    median: float
    sky: float
    noise: float
    lower: float
    upper: float
    gain: float
    readnoise: float
    fwhm: float | None


def _fwhm(frame: Frame) -> float | None:
    value = frame.fwhm if frame.fwhm else (frame.psf.fwhm if frame.psf is not None else None)
    if value is None or not np.isfinite(value) or value <= 0:
        return None
    return float(value)


def _prepare(frame: Frame, options: HotpantsOptions, what: str) -> _Prepared:
    """Levels, gain, noise and the arrays hotpants reads, for one frame."""
    from oasis_core.engine.stats import sky_noise

    data = np.asarray(frame.data, dtype=np.float32)
    weight = np.asarray(frame.weight, dtype=np.float32)
    bad = ~np.isfinite(data) | ~(weight > 0)
    if (~bad).sum() < 100:
        msg = (
            f"subtract backend 'hotpants': {what} {frame.name!r} has fewer than 100 usable "
            "pixels (weight > 0)"
        )
        raise StageError(msg)
    good = data[~bad]
    median = float(np.median(good))
    sky = float(frame.background) if frame.background is not None else median
    measured = sky_noise(data, ~bad)
    if not (np.isfinite(measured) and measured > 0):
        measured = float(1.4826 * np.median(np.abs(good - median)))
    noise = measured
    if frame.noise is not None and np.isfinite(frame.noise) and frame.noise > 0:
        # Frame.noise may predate a resampling, which lowers the per-pixel noise, and a
        # measurement is inflated by starlight in crowded fields: take the smaller
        noise = min(float(frame.noise), measured) if measured > 0 else float(frame.noise)
    if not (np.isfinite(noise) and noise > 0):
        msg = (
            f"subtract backend 'hotpants': {what} {frame.name!r} has no measurable sky "
            "noise (constant image?)"
        )
        raise StageError(msg)
    # below the sky, not the median: in a crowded field the median sits well above it
    lower = min(median, float(np.percentile(good, 1))) - options.lower_nsigma * noise
    brightest = float(good.max())
    if options.upper > 0:
        upper = float(options.upper)
    elif (
        frame.saturation is not None
        and np.isfinite(frame.saturation)
        and frame.saturation > median + noise
    ):
        upper = float(frame.saturation)
    else:
        upper = brightest + max(noise, 1e-3 * abs(brightest))
    # photon-statistics gain: the frame's, else the sky's own (a frame keeping its sky)
    if frame.gain is not None and np.isfinite(frame.gain) and frame.gain > 0:
        gain_eff = float(frame.gain)
    elif sky > 3.0 * noise:
        gain_eff = sky / noise**2
    else:
        gain_eff = math.inf
    gain = gain_eff if math.isfinite(gain_eff) else 1.0
    if frame.readnoise is not None and np.isfinite(frame.readnoise) and frame.readnoise >= 0:
        readnoise = float(frame.readnoise)
    else:  # the read noise that makes hotpants' model give the measured sky noise
        readnoise = gain * math.sqrt(max(noise**2 - max(sky, 0.0) / gain, 0.0))
    clean = np.where(bad, np.float32(median), data).astype(np.float32)
    w = np.where(bad, np.float32(1.0), np.clip(weight, 1e-6, None)).astype(np.float32)
    variance = np.float32(noise**2) / w
    if math.isfinite(gain_eff):
        variance = variance + np.maximum(clean - np.float32(sky), 0) / np.float32(gain_eff)
    return _Prepared(
        data=clean,
        mask=np.where(bad, MASK_BAD, 0).astype(np.int16),
        variance=variance.astype(np.float32),
        median=median,
        sky=sky,
        noise=noise,
        lower=lower,
        upper=upper,
        gain=gain,
        readnoise=readnoise,
        fwhm=_fwhm(frame),
    )


def _fmt(value: float) -> str:
    """A number as hotpants' sscanf("%f") reads it, without float noise."""
    return f"{float(value):.7g}"


@attrs.frozen(kw_only=True)
class _Plan:
    """The command line and the choices behind it (internal)."""

    args: tuple[str, ...]
    convolve: str
    ng: str
    r: int
    rss: int


def _kernel_shape(
    fwhm_s: float | None, fwhm_t: float | None, options: HotpantsOptions
) -> tuple[str, int, int]:
    """The ``-ng`` basis, kernel half width ``r`` and stamp half width ``rss``."""
    fwhms = [f for f in (fwhm_s, fwhm_t) if f is not None]
    known = len(fwhms) == 2
    if options.ng.strip():
        basis = _parse_ng(options.ng)
    else:
        basis = _parse_ng(DEFAULT_NG)
        if known:
            s_broad, s_narrow = max(fwhms) / FWHM_PER_SIGMA, min(fwhms) / FWHM_PER_SIGMA
            s_match = math.sqrt(max(s_broad**2 - s_narrow**2, 0.0))
            middle = basis[len(basis) // 2][1]
            if s_match > middle:
                basis = tuple((d, s * s_match / middle) for d, s in basis)
    ng = " ".join([str(len(basis))] + [f"{d} {s:.3f}" for d, s in basis])
    widest = max(s for _, s in basis)
    if options.r > 0:
        r = int(options.r)
    elif known:
        r = max(math.ceil(2.5 * max(fwhms)), math.ceil(3.0 * widest))
    else:
        r = max(10, math.ceil(3.0 * widest))
    rss = int(options.rss) if options.rss > 0 else max(15, math.ceil(1.5 * r))
    if rss < r:
        msg = (
            f"subtract.hotpants: rss ({rss}) must be >= the kernel half width r ({r}); "
            "raise rss or set it to 0"
        )
        raise ConfigError(msg)
    return ng, r, rss


# ------------------------------------------------------------------ small frames

#: Stamp stars the small-frame layout looks for before it stops lowering its threshold.
_WANTED_STARS = 3

#: The lowest stamp-star threshold (sky sigmas) of the small-frame layout.
_MIN_FT = 5.0

#: At most this many stamps per axis on a small frame.
_MAX_NS = 4


@attrs.frozen(kw_only=True)
class SmallLayout:
    """How a small frame is given to hotpants (see "Small frames" in the module doc).

    Attributes
    ----------
    r, rss : int
        hotpants' ``-r`` and ``-rss``.
    ns : int
        Stamps along each axis of the mosaic the kernel is fitted on (``-nsx``, ``-nsy``).
    side : int
        The mosaic's side (px).
    stars : tuple of (int, int)
        The stamp stars (x, y), 0-based pixels of the frame, brightest first (none when
        the kernel is fitted on a reference star).
    centres : tuple of (int, int)
        Where each star's cell (or the reference star) sits in the mosaic.
    ft : float
        The threshold (sky sigmas, both frames) the stars were found at.
    rejected : int
        Stars left out because their science / template flux ratio disagreed.
    fwhm_source : str
        Where the FWHMs come from: ``"frame"`` (the frames' own), ``"measured"`` (from
        their bright sources here) or ``"unknown"``, for each frame.
    fwhms : tuple of float
        The science and template FWHMs used.
    reference : bool
        The kernel is fitted on a reference star drawn from ``fwhms`` (no stamp star).
    dropped : tuple of (int, int)
        Stamp stars left out after a first fit because their residual stood out from the
        others' (a transient or a variable on a star: :func:`deviant_star`).
    central : tuple of (int, int)
        The frame's central object, left out of the stamp stars (a cutout's target may
        be a transient or host one: :func:`_without_central`).
    clipped : tuple of (int, int)
        Stamp stars left out because the kernel fitted on them all leaves their substamps
        far worse than the others' (:func:`clipped_star`: a blend, a PSF the others do
        not share).
    """

    r: int
    rss: int
    ns: int
    side: int
    stars: tuple[tuple[int, int], ...]
    centres: tuple[tuple[int, int], ...]
    ft: float
    rejected: int
    fwhm_source: str
    fwhms: tuple[float, float] = (0.0, 0.0)
    reference: bool = False
    dropped: tuple[tuple[int, int], ...] = ()
    central: tuple[tuple[int, int], ...] = ()
    clipped: tuple[tuple[int, int], ...] = ()

    @property
    def half(self) -> int:
        """Half width of a star's cell: its substamp and the kernel's reach."""
        return self.rss + self.r + 1

    def choice(self) -> str:
        """The choice in a sentence (``meta["choice_stamps"]``)."""
        if self.reference:
            return (
                f"small frame: no stamp star; kernel fitted on a reference star of FWHM "
                f"{self.fwhms[0]:.2f} (science) and {self.fwhms[1]:.2f} (template), flux "
                f"ratio 1; r {self.r}, rss {self.rss}"
            )
        dropped = (
            f" ({len(self.dropped)} more left out: residual off the others')"
            if self.dropped
            else ""
        )
        central = " (the central object left out: a cutout's target)" if self.central else ""
        clipped = (
            f" ({len(self.clipped)} clipped: fit far worse than the others')"
            if self.clipped
            else ""
        )
        return (
            f"small frame: {len(self.stars)} stamp star(s) above {self.ft:g} sigma, one "
            f"per stamp{dropped}{central}{clipped}; r {self.r}, rss {self.rss}, ko 0, bgo 0"
        )


#: Frames narrower than this (px) are small (see "Small frames" in the module doc): with
#: hotpants' default kernel and substamp half widths (10 and 15 px) its border eats half.
SMALL_SIDE = 4 * (2 * 15 + 10)


def _is_small(shape: tuple[int, int]) -> bool:
    """Is the frame too small for hotpants' own stamp grid (:data:`SMALL_SIDE`)?"""
    return min(shape) < SMALL_SIDE


def _background(prep: _Prepared, bad: np.ndarray) -> np.ndarray:
    """The frame minus its median, bad pixels at 0, C-contiguous float64 (for sep)."""
    work = np.asarray(prep.data, np.float64) - prep.median
    work[bad] = 0.0
    return np.ascontiguousarray(work)


def _detect(work: np.ndarray, noise: float, bad: np.ndarray) -> Any:
    import sep

    try:
        return sep.extract(work, 3.0, err=noise, mask=bad, minarea=5)
    except Exception:  # sep raises a bare Exception on buffer overflows
        return sep.extract(work, 5.0, err=noise, mask=bad, minarea=5)


def _object_fwhm(work: np.ndarray, bad: np.ndarray, x: int, y: int, noise: float) -> float | None:
    """The FWHM of the source at (x, y): its half-maximum area above the median of its
    cutout's border (so that a crowded field's sky counts as sky), as the diameter of a
    disc; None near an edge or a masked pixel, or for a peak below 5 sigma."""
    ny, nx = work.shape
    half = 6
    if not (half <= x < nx - half and half <= y < ny - half):
        return None
    box = np.s_[y - half : y + half + 1, x - half : x + half + 1]
    if bad[box].any():
        return None
    cut = work[box]
    border = np.concatenate([cut[0], cut[-1], cut[1:-1, 0], cut[1:-1, -1]])
    cut = cut - float(np.median(border))
    peak = float(cut[half - 1 : half + 2, half - 1 : half + 2].max())
    if peak <= 5 * noise:
        return None
    return 2.0 * math.sqrt(float((cut >= peak / 2).sum()) / math.pi)


def _measured_fwhm(work: np.ndarray, noise: float, bad: np.ndarray) -> tuple[float | None, int]:
    """A frame's FWHM from its bright sources (:func:`_object_fwhm`): the lower third of
    them (blends and galaxies widen the others), and how many were measured."""
    objs = _detect(work, noise, bad)
    objs = objs[objs["peak"] > 10 * noise]
    widths = [
        w
        for obj in objs
        if (w := _object_fwhm(work, bad, round(float(obj["x"])), round(float(obj["y"])), noise))
        is not None
    ]
    if not widths:
        return None, 0
    return float(np.percentile(widths, 33)), len(widths)


def _stars(
    frames: Sequence[tuple[_Prepared, np.ndarray, np.ndarray]],
    searched: Sequence[int],
    rss: int,
    radius: float,
    ft: float,
) -> tuple[list[tuple[int, int]], int]:
    """Stamp stars: sources above ``ft`` sky sigmas in every frame, point-like in the
    template (at most 1.5 times its FWHM wide: a galaxy may host the transient), whose
    substamp (``2 rss + 1`` px) lies inside the frames, holds no masked pixel and no pixel
    at the upper valid level; those whose science / template flux ratio disagrees with
    the others' are dropped (a transient adds light to the science frame only). Returns
    the stars, brightest first, and the number dropped."""
    import sep

    (sci, s_work, s_bad), (tpl, t_work, t_bad) = frames
    ny, nx = s_work.shape
    found = []
    for index in searched:
        prep, work, bad = frames[index]
        objs = _detect(work, prep.noise, bad)
        for obj in objs:
            found.append((round(float(obj["x"])), round(float(obj["y"]))))
    found = list(dict.fromkeys(found))
    if not found:
        return [], 0
    xs = np.array([f[0] for f in found], float)
    ys = np.array([f[1] for f in found], float)
    inside = (xs >= rss) & (xs < nx - rss) & (ys >= rss) & (ys < ny - rss)
    xs, ys = xs[inside], ys[inside]
    keep = []
    for x, y in zip(xs.astype(int), ys.astype(int), strict=True):
        box = np.s_[y - rss : y + rss + 1, x - rss : x + rss + 1]
        ok = True
        if tpl.fwhm:  # stars only: a galaxy (or a blend) may host the transient
            width = _object_fwhm(t_work, t_bad, x, y, tpl.noise)
            ok = width is not None and width <= 1.5 * tpl.fwhm
        for prep, work, bad in frames:
            peak = float(work[y - 1 : y + 2, x - 1 : x + 2].max())
            too_faint = peak < ft * prep.noise
            if bad[box].any() or too_faint or float(prep.data[box].max()) >= prep.upper:
                ok = False
        if ok:
            keep.append((x, y))
    if not keep:
        return [], 0
    # merge sources closer than a substamp half width: keep the brightest
    kx = np.array([k[0] for k in keep], float)
    ky = np.array([k[1] for k in keep], float)
    flux_s, err_s, _ = sep.sum_circle(s_work, kx, ky, radius, err=sci.noise, mask=s_bad)
    flux_t, err_t, _ = sep.sum_circle(t_work, kx, ky, radius, err=tpl.noise, mask=t_bad)
    order = np.argsort(-np.asarray(flux_t))
    chosen: list[int] = []
    for i in order:
        if all(math.hypot(kx[i] - kx[j], ky[i] - ky[j]) > rss for j in chosen):
            chosen.append(int(i))
    idx = np.array(chosen, int)
    fs, ft_, es, et = flux_s[idx], flux_t[idx], err_s[idx], err_t[idx]
    positive = (fs > 0) & (ft_ > 0)
    idx, fs, ft_, es, et = idx[positive], fs[positive], ft_[positive], es[positive], et[positive]
    if len(idx) == 0:
        return [], 0
    ratio = fs / ft_
    sigma = ratio * np.hypot(es / fs, et / ft_)
    good = np.ones(len(idx), bool)
    if len(idx) >= 3:
        for _ in range(5):
            m = float(np.median(ratio[good]))
            mad = 1.4826 * float(np.median(np.abs(ratio[good] - m)))
            tol = np.maximum(np.maximum(3 * mad, 0.1 * abs(m)), 3 * sigma)
            new = np.abs(ratio - m) <= tol
            if not new.any() or (new == good).all():
                break
            good = new
    elif len(idx) == 2:
        lo, hi = np.argsort(ratio)
        if ratio[hi] - ratio[lo] > max(0.1 * ratio[lo], 3 * math.hypot(sigma[lo], sigma[hi])):
            good[hi] = False  # a transient brightens; a lone pair cannot say more
    stars = [(int(kx[i]), int(ky[i])) for i in idx[good]]
    return stars, int((~good).sum())


def _without_central(
    stars: Sequence[tuple[int, int]], shape: tuple[int, int], fwhm: float
) -> tuple[list[tuple[int, int]], tuple[tuple[int, int], ...]]:
    """The stamp stars without the frame's central object, and that object (if left out).

    A cutout is centred on its target: a transient there, or the galaxy or star hosting
    one, adds light to the science frame only, and as a stamp star it drives the kernel to
    absorb it (the flux-ratio and residual checks cannot tell with a few stars). So a star
    within ``max(3, 2 FWHM)`` px of the centre is not used while another star is left
    (it is still subtracted: the kernel applies to the whole frame)."""
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    reach = max(3.0, 2.0 * fwhm)
    central = tuple(s for s in stars if math.hypot(s[0] - cx, s[1] - cy) <= reach)
    others = [s for s in stars if s not in central]
    if central and others:
        return others, central
    return list(stars), ()


def _stamp_width(canvas: int, ns: int, r: int) -> int:
    """hotpants' stamp width ``fwStamp`` for a canvas side and ``ns`` stamps."""
    width = canvas // ns - (2 * r + 1)
    return width - 1 if width % 2 == 0 else width


def _mosaic_grid(n: int, r: int, rss: int) -> tuple[int, int, list[tuple[int, int]]]:
    """A mosaic of ``n`` cells, one per stamp of hotpants' grid: (stamps per axis, side,
    cell centres in stamp order). A centre given to hotpants (``-ssf``) is taken in stamp
    ``k`` when ``k W / ns + r + 1 < c < k W / ns + fwStamp - r - 2``, and its substamp
    must clear hotpants' border of ``rss + r`` px."""
    ns = max(1, math.ceil(math.sqrt(n)))
    period = 2 * rss + 4 * r + 5
    while True:
        side = ns * period
        width = _stamp_width(side, ns, r)
        axis = []
        for k in range(ns):
            start = k * side // ns
            end = min(start + width - 1, side - 1)
            lo = max(start + r + 2, 2 * rss + r + 1)  # in the window, clear of the border
            hi = min(end - r - 2, side - 2 * rss - r - 2)
            axis.append(min(max(start + width // 2, lo), hi) if lo <= hi else -1)
        spaced = all(b - a > 2 * (rss + r + 1) for a, b in itertools.pairwise(axis))
        if min(axis) >= 0 and spaced:
            break
        period += 1
    centres = [(axis[i % ns], axis[i // ns]) for i in range(n)]
    return ns, side, centres


def _gaussian_star(size: int, sigma: float, flux: float) -> np.ndarray:
    """A ``size`` x ``size`` Gaussian star of ``flux`` at the central pixel (pixel-
    integrated by 5 x 5 subsampling)."""
    sub = 5
    u = (np.arange(size * sub) + 0.5) / sub - size / 2.0
    g = np.exp(-(u**2) / (2.0 * sigma**2))
    image = np.outer(g, g).reshape(size, sub, size, sub).sum(axis=(1, 3))
    return (image * (flux / image.sum())).astype(np.float32)


def _cell(array: np.ndarray, x: int, y: int, half: int, fill: float) -> np.ndarray:
    """The ``2 half + 1`` square of ``array`` centred on (x, y), ``fill`` off the frame."""
    ny, nx = array.shape
    out = np.full((2 * half + 1, 2 * half + 1), fill, dtype=array.dtype)
    y0, y1 = max(y - half, 0), min(y + half + 1, ny)
    x0, x1 = max(x - half, 0), min(x + half + 1, nx)
    out[y0 - (y - half) : y1 - (y - half), x0 - (x - half) : x1 - (x - half)] = array[y0:y1, x0:x1]
    return out


def _mosaic(
    layout: SmallLayout, sci: _Prepared, tpl: _Prepared, noise_images: bool
) -> dict[str, np.ndarray]:
    """The images of the fitting run: each star's cell of both frames at its place in the
    mosaic (or the reference star), masked sky elsewhere."""
    side, half = layout.side, layout.half
    frames = {"science": sci, "template": tpl}
    images: dict[str, np.ndarray] = {}
    for key, prep in frames.items():
        images[key] = np.full((side, side), prep.median, np.float32)
        images[f"{key}_mask"] = np.full((side, side), MASK_BAD, np.int16)
        if noise_images:
            images[f"{key}_noise"] = np.full((side, side), prep.noise, np.float32)
    if layout.reference:
        sigmas = [f / FWHM_PER_SIGMA for f in layout.fwhms]
        peaks = [
            min(1000.0 * p.noise, 0.5 * (p.upper - p.median)) * 2.0 * math.pi * sg**2
            for p, sg in zip((sci, tpl), sigmas, strict=True)
        ]
        flux = max(min(peaks), 0.0)
        (cx, cy) = layout.centres[0]
        block = np.s_[cy - half : cy + half + 1, cx - half : cx + half + 1]
        for key, sigma in zip(frames, sigmas, strict=True):
            images[key][block] += _gaussian_star(2 * half + 1, sigma, flux)
            images[f"{key}_mask"][block] = 0
        return images
    for (x, y), (cx, cy) in zip(layout.stars, layout.centres, strict=True):
        block = np.s_[cy - half : cy + half + 1, cx - half : cx + half + 1]
        for key, prep in frames.items():
            images[key][block] = _cell(prep.data, x, y, half, prep.median)
            images[f"{key}_mask"][block] = _cell(prep.mask, x, y, half, MASK_BAD)
            if noise_images:
                images[f"{key}_noise"][block] = _cell(
                    np.sqrt(prep.variance), x, y, half, prep.noise
                )
    return images


def _small_layout(
    science: Frame,
    template: Frame,
    sci: _Prepared,
    tpl: _Prepared,
    options: HotpantsOptions,
    where: str,
) -> tuple[SmallLayout, _Prepared, _Prepared] | None:
    """The layout of a small frame (None for a frame hotpants' own grid serves), with
    the prepared frames given the FWHMs it measured when they had none.

    Raises
    ------
    StageError
        When no source can serve as a stamp star.
    """
    if not _is_small(science.shape):
        return None
    s_bad = np.asarray(sci.mask) != 0
    t_bad = np.asarray(tpl.mask) != 0
    s_work, t_work = _background(sci, s_bad), _background(tpl, t_bad)
    # the frames' FWHMs, checked against (or replaced by) those of their bright sources:
    # a PSF fit on the two or three stars of a cutout can be far off
    sources = []
    fwhms_used = []
    for prep, work, bad in ((sci, s_work, s_bad), (tpl, t_work, t_bad)):
        measured, count = _measured_fwhm(work, prep.noise, bad)
        given = prep.fwhm
        trusted = measured is not None and count >= _WANTED_STARS
        if given is not None and (not trusted or abs(given / measured - 1) <= 0.3):
            sources.append("frame")
            fwhms_used.append(given)
        else:
            sources.append("measured" if measured is not None else "unknown")
            fwhms_used.append(measured)
    source = ", ".join(dict.fromkeys(sources))
    sci, tpl = attrs.evolve(sci, fwhm=fwhms_used[0]), attrs.evolve(tpl, fwhm=fwhms_used[1])
    fwhms = [f for f in (sci.fwhm, tpl.fwhm) if f]
    fwhm = max(fwhms) if fwhms else 3.0
    _, r_seeing, _ = _kernel_shape(sci.fwhm, tpl.fwhm, options)
    side = min(science.shape)
    r = int(options.r) if options.r > 0 else min(r_seeing, max(4, side // 8))
    if options.rss > 0:
        rss = int(options.rss)
    else:
        rss = min(max(r + 1, math.ceil(1.5 * r)), max(r + 1, side // 4))
    convolve = _direction(sci, tpl, options)
    searched = {"t": (1,), "i": (0,)}.get(convolve, (0, 1))
    frames = ((sci, s_work, s_bad), (tpl, t_work, t_bad))
    ft = float(options.ft)
    ladder = [ft]
    while ladder[-1] / 2 >= _MIN_FT:
        ladder.append(ladder[-1] / 2)
    if ladder[-1] > _MIN_FT:
        ladder.append(_MIN_FT)
    stars: list[tuple[int, int]] = []
    rejected = 0
    for level in ladder:
        stars, rejected = _stars(frames, searched, rss, 2.0 * fwhm, level)
        ft = level
        if len(stars) >= _WANTED_STARS:
            break
    if not stars:
        if sci.fwhm is None and tpl.fwhm is None:
            msg = (
                f"{where}: no source can be a kernel stamp star in the "
                f"{science.shape[0]}x{science.shape[1]} frame (none above {ft:g} sky sigmas "
                f"in both frames, unsaturated and at least {rss} px from the edges and "
                "masked pixels) and the frames' FWHMs are unknown, so hotpants cannot fit "
                "a kernel here; give the frames a FWHM header card or use the ois or zogy "
                "backend"
            )
            raise StageError(msg)
        if sci.fwhm is None or tpl.fwhm is None:  # one known: the other taken equal
            known = sci.fwhm or tpl.fwhm
            which = "science" if sci.fwhm is None else "template"
            sci, tpl = attrs.evolve(sci, fwhm=known), attrs.evolve(tpl, fwhm=known)
            source = f"{source}; the {which} FWHM unknown, taken as the other's"
        return _reference_layout(sci, tpl, r, rss, ft, rejected, source), sci, tpl
    stars, central = _without_central(stars, science.shape, fwhm)
    stars = stars[: _MAX_NS**2]
    ns, side, centres = _mosaic_grid(len(stars), r, rss)
    layout = SmallLayout(
        r=r,
        rss=rss,
        ns=ns,
        side=side,
        stars=tuple(stars),
        centres=tuple(centres),
        ft=ft,
        rejected=rejected,
        fwhm_source=source,
        fwhms=(float(sci.fwhm or 0.0), float(tpl.fwhm or 0.0)),
        central=central,
    )
    return layout, sci, tpl


#: A stamp star whose residual after the first fit is this many robust sigmas off the
#: other stars' (and this many noise sigmas from zero) is left out and the kernel refitted.
DEVIANT_SIGMA = 3.0


def deviant_star(
    residual: np.ndarray, noise: np.ndarray, bad: np.ndarray, layout: SmallLayout
) -> int | None:
    """The stamp star whose residual stands out after a fit on the mosaic, or None.

    The kernel is a least-squares compromise between the stamp stars: a transient (or a
    variable) on one of them leaves its cell with a residual of one sign and the others
    with the opposite one, even where the flux-ratio check let it through (blends, a few
    stars). Each star's significance ``z`` is the residual summed within its FWHM over
    the noise of that sum; the star farthest from the others' median is deviant when it
    is more than :data:`DEVIANT_SIGMA` robust sigmas (1.4826 MAD, at least 1) off it and
    more than :data:`DEVIANT_SIGMA` from zero. Needs 4 stars (3 remain for the refit)."""
    if layout.reference or len(layout.stars) < 4:
        return None
    radius = max(2, round(max(layout.fwhms)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = xx**2 + yy**2 <= radius**2
    z = []
    for cx, cy in layout.centres[: len(layout.stars)]:
        box = np.s_[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1]
        good = disc & ~bad[box] & np.isfinite(residual[box]) & (noise[box] > 0)
        if good.sum() < disc.sum() // 2:
            z.append(np.nan)
            continue
        z.append(float(residual[box][good].sum() / np.sqrt((noise[box][good] ** 2).sum())))
    values = np.asarray(z)
    if not np.isfinite(values).all():
        return None
    median = float(np.median(values))
    scale = max(1.0, 1.4826 * float(np.median(np.abs(values - median))))
    worst = int(np.argmax(np.abs(values - median)))
    off = abs(values[worst] - median)
    if off > DEVIANT_SIGMA * scale and abs(values[worst]) > DEVIANT_SIGMA:
        return worst
    return None


#: A stamp star whose substamp's mean (residual / noise)**2 after the fit is more than this
#: many times the median of the other stars' is clipped and the kernel refitted.
CLIP_FACTOR = 3.0


def clipped_star(
    residual: np.ndarray, noise: np.ndarray, bad: np.ndarray, layout: SmallLayout
) -> int | None:
    """The stamp star to clip after a fit on the mosaic, or None.

    :func:`deviant_star` catches a star with extra (or missing) flux; a star whose profile
    the others' kernel cannot match (a blend, a core broadened or saturated in one frame)
    leaves a residual of both signs, summing to little, that drags the least-squares
    kernel towards it. Each star's figure is the mean ``(residual / noise)**2`` over its
    substamp; the worst is clipped when it exceeds :data:`CLIP_FACTOR` times the median
    of the others' (at least 1). Keeps 2 stars at least (the fit then has a second
    opinion)."""
    if layout.reference or len(layout.stars) < 3:
        return None
    chi2 = []
    for cx, cy in layout.centres[: len(layout.stars)]:
        box = np.s_[cy - layout.rss : cy + layout.rss + 1, cx - layout.rss : cx + layout.rss + 1]
        good = ~bad[box] & np.isfinite(residual[box]) & (noise[box] > 0)
        if good.sum() < good.size // 2:
            chi2.append(np.nan)
            continue
        chi2.append(float(np.mean((residual[box][good] / noise[box][good]) ** 2)))
    values = np.asarray(chi2)
    if not np.isfinite(values).all():
        return None
    worst = int(np.argmax(values))
    rest = np.delete(values, worst)
    if values[worst] > CLIP_FACTOR * max(1.0, float(np.median(rest))):
        return worst
    return None


def _without_star(layout: SmallLayout, index: int, field: str) -> SmallLayout:
    """``layout`` without its star ``index``, recorded in ``field`` (``dropped``,
    ``clipped``), the mosaic laid out again."""
    stars = layout.stars[:index] + layout.stars[index + 1 :]
    ns, side, centres = _mosaic_grid(len(stars), layout.r, layout.rss)
    changes: dict[str, Any] = {field: (*getattr(layout, field), layout.stars[index])}
    return attrs.evolve(layout, stars=stars, ns=ns, side=side, centres=tuple(centres), **changes)


def _reference_layout(
    sci: _Prepared, tpl: _Prepared, r: int, rss: int, ft: float, rejected: int, source: str
) -> SmallLayout:
    """The layout fitting the kernel on a reference star drawn from the frames' FWHMs."""
    ns, side, centres = _mosaic_grid(1, r, rss)
    return SmallLayout(
        r=r,
        rss=rss,
        ns=ns,
        side=side,
        stars=(),
        centres=tuple(centres),
        ft=ft,
        rejected=rejected,
        fwhm_source=source,
        fwhms=(float(sci.fwhm or 0.0), float(tpl.fwhm or 0.0)),
        reference=True,
    )


def small_frame_layout(
    science: Frame, template: Template, options: HotpantsOptions | None = None
) -> SmallLayout | None:
    """How the backend lays a small frame out for hotpants (None for a frame of ordinary
    size): see "Small frames" in the module docstring.

    Raises
    ------
    oasis_core.contracts.errors.StageError
        When no source of the frames can serve as a stamp star.
    """
    options = options or HotpantsOptions()
    sci = _prepare(science, options, "science frame")
    tpl = _prepare(template, options, "template")
    where = f"subtract backend 'hotpants': {science.name!r}"
    found = _small_layout(science, template, sci, tpl, options, where)
    return None if found is None else found[0]


def _direction(sci: _Prepared, tpl: _Prepared, options: HotpantsOptions) -> str:
    """hotpants' ``-c``: the option, or for ``auto`` the frame with the narrower PSF."""
    if options.convolve != "auto":
        return options.convolve
    if sci.fwhm is not None and tpl.fwhm is not None:
        return "t" if tpl.fwhm <= sci.fwhm else "i"
    return "b"


#: The degrees of hotpants' three Gaussians on a small frame (its own are 6, 4, 2): a
#: handful of stars constrain 13 basis functions, not 49.
_SMALL_DEGREES = (2, 2, 0)


def _small_basis(ng: str, r: int) -> str:
    """``ng`` with the degrees of :data:`_SMALL_DEGREES`, the sigmas at most ``r / 2``
    (the kernel holds two sigmas of each Gaussian)."""
    pairs = _parse_ng(ng)
    if len(pairs) != len(_SMALL_DEGREES):
        return ng
    low = [(min(d, k), min(sg, r / 2.0)) for (d, sg), k in zip(pairs, _SMALL_DEGREES, strict=True)]
    return " ".join([str(len(low))] + [f"{d} {sg:.3f}" for d, sg in low])


def _plan(
    sci: _Prepared,
    tpl: _Prepared,
    options: HotpantsOptions,
    files: Mapping[str, str],
    layout: SmallLayout | None = None,
) -> _Plan:
    convolve = _direction(sci, tpl, options)
    ng, r, rss = _kernel_shape(sci.fwhm, tpl.fwhm, options)
    ko, bgo, nsx, nsy, nss, ft = (
        options.ko,
        options.bgo,
        options.nsx,
        options.nsy,
        options.nss,
        options.ft,
    )
    if layout is not None:  # the fitting run on the mosaic: one star per stamp, no more
        r, rss, ko, bgo, nsx, nsy, nss = layout.r, layout.rss, 0, 0, layout.ns, layout.ns, 1
        if not options.ng.strip():
            ng = _small_basis(ng, r)
        ft = 0.01  # the stars are given: hotpants only checks a pixel of each is above it
    args: list[str] = [
        "-inim", files["science"],
        "-tmplim", files["template"],
        "-outim", files["output"],
        "-oni", files["noise"],
        "-oki", files["kernel"],
        "-imi", files["science_mask"],
        "-tmi", files["template_mask"],
    ]  # fmt: skip
    if options.noise_images:
        args += ["-ini", files["science_noise"], "-tni", files["template_noise"]]
    args += [
        "-il", _fmt(sci.lower), "-iu", _fmt(sci.upper), "-iuk", _fmt(sci.upper),
        "-tl", _fmt(tpl.lower), "-tu", _fmt(tpl.upper), "-tuk", _fmt(tpl.upper),
        "-ig", _fmt(sci.gain), "-ir", _fmt(sci.readnoise),
        "-tg", _fmt(tpl.gain), "-tr", _fmt(tpl.readnoise),
        "-ng", *ng.split(),
        "-r", str(r), "-rss", str(rss),
        "-ko", str(ko), "-bgo", str(bgo),
        "-nsx", str(nsx), "-nsy", str(nsy), "-nss", str(nss),
        "-ft", _fmt(ft),
        "-c", convolve, "-n", options.normalize,
        "-v", "0",
    ]  # fmt: skip
    if layout is not None:
        args += ["-ssf", files["stamps"], "-afssc", "0"]
    args += shlex.split(options.extra)
    return _Plan(args=tuple(args), convolve=convolve, ng=ng, r=r, rss=rss)


def _apply_plan(sci: _Prepared, tpl: _Prepared, options: HotpantsOptions, fitted: _Plan) -> _Plan:
    """The run on a small frame itself, applying the kernel fitted on its mosaic (``-ki``;
    the basis, half width and direction come from the kernel file)."""
    files = FILES
    args: list[str] = [
        "-inim", files["science"],
        "-tmplim", files["template"],
        "-outim", files["output"],
        "-oni", files["noise"],
        "-imi", files["science_mask"],
        "-tmi", files["template_mask"],
    ]  # fmt: skip
    if options.noise_images:
        args += ["-ini", files["science_noise"], "-tni", files["template_noise"]]
    args += [
        "-il", _fmt(sci.lower), "-iu", _fmt(sci.upper),
        "-tl", _fmt(tpl.lower), "-tu", _fmt(tpl.upper),
        "-ig", _fmt(sci.gain), "-ir", _fmt(sci.readnoise),
        "-tg", _fmt(tpl.gain), "-tr", _fmt(tpl.readnoise),
        "-ki", files["kernel"], "-n", options.normalize,
        "-v", "0",
    ]  # fmt: skip
    return attrs.evolve(fitted, args=tuple(args))


def hotpants_arguments(
    science: Frame,
    template: Template,
    options: HotpantsOptions | None = None,
    *,
    files: Mapping[str, str] = FILES,
) -> list[str]:
    """The hotpants arguments (without the program name) for one pair.

    Parameters
    ----------
    science, template : Frame
        The registered pair (``weight``, ``fwhm``, ``gain``, ``readnoise``, ``saturation``,
        ``background`` and ``noise`` are used when set).
    options : HotpantsOptions, optional
    files : mapping, optional
        File names to put on the command line (default :data:`FILES`).

    Returns
    -------
    list of str

    Raises
    ------
    oasis_core.contracts.errors.StageError
        If a frame has no usable pixel or no measurable noise, or a small frame no stamp
        star and no FWHMs (see :func:`small_frame_layout`; for a small frame the
        arguments are those of the fitting run, on :data:`FIT_FILES`).
    oasis_core.contracts.errors.ConfigError
        If ``rss`` is below the kernel half width.

    Examples
    --------
    >>> import numpy as np
    >>> from oasis_core.contracts.model import Frame, Template
    >>> rng = np.random.default_rng(0)
    >>> sci = Frame(data=rng.normal(0, 10, (64, 64)), fwhm=4.0, name="s")
    >>> tpl = Template(data=rng.normal(0, 5, (64, 64)), fwhm=3.0)
    >>> args = hotpants_arguments(sci, tpl)
    >>> args[args.index("-c") + 1], args[args.index("-n") + 1]
    ('t', 'i')
    """
    options = options or HotpantsOptions()
    sci = _prepare(science, options, "science frame")
    tpl = _prepare(template, options, "template")
    where = f"subtract backend 'hotpants': {science.name!r}"
    found = _small_layout(science, template, sci, tpl, options, where)
    if found is None:
        return list(_plan(sci, tpl, options, files).args)
    layout, sci, tpl = found
    fit_files = FIT_FILES if files is FILES else files
    return list(_plan(sci, tpl, options, fit_files, layout).args)


# ------------------------------------------------------------------ the outputs


@attrs.frozen(kw_only=True)
class HotpantsOutput:
    """What hotpants wrote for one pair, read back.

    Attributes
    ----------
    data, noise : ndarray
        The difference image and its 1-sigma noise image (float32).
    bad : ndarray of bool
        Pixels hotpants masked (at its fill value ``MASKVAL``, or non-finite, or with no
        noise).
    header : astropy.io.fits.Header
        The output header.
    meta : mapping
        The parsed keywords and counts (see the module docstring).
    solution : ndarray or None
        The kernel solution vector of region 0 (hotpants' ``-oki`` table).
    kernel : ndarray or None
        The kernel at the image centre, rebuilt from ``solution``; None when that could
        not be done or its sum disagrees with ``KSUM00``.
    """

    data: np.ndarray = attrs.field(eq=False, repr=False)
    noise: np.ndarray = attrs.field(eq=False, repr=False)
    bad: np.ndarray = attrs.field(eq=False, repr=False)
    header: Any = attrs.field(eq=False, repr=False)
    meta: Mapping[str, float | int | str | bool] = attrs.field(factory=dict)
    solution: np.ndarray | None = attrs.field(eq=False, repr=False, default=None)
    kernel: np.ndarray | None = attrs.field(eq=False, repr=False, default=None)


#: Keywords of hotpants' output header (region 00) -> meta names and types.
_KEYWORDS: Mapping[str, tuple[str, type]] = {
    "KSUM00": ("ksum", float),
    "X2NRM00": ("x2nrm", float),
    "NX2NRM00": ("nx2nrm", int),
    "DMEAN00": ("dmean", float),
    "DSIGE00": ("dsige", float),
    "DSIG00": ("dsig", float),
    "SSSIG00": ("sssig", float),
    "SSSCAT00": ("ssscat", float),
    "FSIG00": ("fsig", float),
    "FSCAT00": ("fscat", float),
    "NSCALO00": ("nscalo", float),
    "CONVOL00": ("convolved", str),
    "PHOTNORM": ("photnorm", str),
    "NREGION": ("nregion", int),
    "SOFTVERS": ("version", str),
}

_REMAIN_RE = re.compile(r"(\d+)\s+out of\s+(\d+)\s+stamps remain")
_BUILT_RE = re.compile(r"^\s*(\d+)(?:\s+and\s+(\d+))?\s+stamps built", re.MULTILINE)
_RATIO_RE = re.compile(r"Emperical / Expected Noise for GOOD pixels = ([-+0-9.eEinfa]+)")


def _number(value: Any, kind: type) -> float | int | str | None:
    try:
        out = kind(str(value).strip())
    except (TypeError, ValueError):
        return None
    if isinstance(out, float) and not math.isfinite(out):
        return None
    return out  # type: ignore[no-any-return]


def parse_stderr(text: str) -> dict[str, int | float]:
    """Counts hotpants prints: ``nstamps`` (the last ``N out of M stamps remain``),
    ``nstamps_built`` and the empirical/expected noise ratio ``noise_ratio``."""
    out: dict[str, int | float] = {}
    remain = _REMAIN_RE.findall(text)
    if remain:
        out["nstamps"] = int(remain[-1][0])
        out["nstamps_built"] = int(remain[-1][1])
    else:
        built = _BUILT_RE.findall(text)
        if built:
            counts = [int(c) for c in built[-1] if c]
            out["nstamps_built"] = min(counts)
    ratio = _RATIO_RE.findall(text)
    if ratio:
        value = _number(ratio[-1], float)
        if isinstance(value, float):
            out["noise_ratio"] = value
    return out


def kernel_image(
    solution: np.ndarray,
    basis: Sequence[tuple[int, float]],
    half_width: int,
    ko: int,
    *,
    xf: float = 0.0,
    yf: float = 0.0,
) -> np.ndarray:
    """hotpants' convolution kernel at a point, rebuilt from its solution vector.

    The basis is Alard's: for each Gaussian ``exp(-u**2 / (2 sigma**2))`` of degree ``d``,
    the products ``G(u) u**i * G(v) v**j`` for ``i + j <= d``; the even-even ones are
    normalised to unit sum and, but for the very first, have the first subtracted (so
    only the first carries flux). The coefficient of the first is constant, the others
    vary as polynomials of order ``ko`` in the region coordinates ``xf, yf`` (-1 to 1,
    0 at the centre); ``solution[1]`` is the first coefficient, then ``(ko+1)(ko+2)/2``
    polynomial terms per basis function (x powers outer, y powers inner).

    Parameters
    ----------
    solution : ndarray
        The solution vector (hotpants' ``-oki`` table column ``Region0``).
    basis : sequence of (degree, sigma)
    half_width : int
        Kernel half width (``-r``).
    ko : int
        Spatial order (``-ko``).
    xf, yf : float
        Position in hotpants' region coordinates.

    Returns
    -------
    ndarray
        (2 r + 1, 2 r + 1) float64 kernel, axis 0 along y, for convolution.
    """
    u = np.arange(-half_width, half_width + 1, dtype=np.float64)
    vectors: list[np.ndarray] = []
    for degree, sigma in basis:
        g = np.exp(-(u**2) / (2.0 * sigma**2))
        for i in range(degree + 1):
            for j in range(degree - i + 1):
                fx, fy = g * u**i, g * u**j
                if i % 2 == 0 and j % 2 == 0:
                    vec = np.outer(fy / fy.sum(), fx / fx.sum())
                    if vectors:
                        vec = vec - vectors[0]
                else:
                    vec = np.outer(fy, fx)
                vectors.append(vec)
    nterms = (ko + 1) * (ko + 2) // 2
    needed = 2 + (len(vectors) - 1) * nterms
    if len(solution) < needed:
        msg = f"kernel solution has {len(solution)} terms, the basis needs {needed}"
        raise ValueError(msg)
    poly = np.array(
        [xf**ix * yf**iy for ix in range(ko + 1) for iy in range(ko - ix + 1)], dtype=np.float64
    )
    kernel = float(solution[1]) * vectors[0]
    for n, vec in enumerate(vectors[1:]):
        start = 2 + n * nterms
        kernel = kernel + float(np.dot(solution[start : start + nterms], poly)) * vec
    return kernel


def _basis_from_header(header: Any) -> tuple[tuple[int, float], ...] | None:
    try:
        n = int(header["NGAUSS"])
        return tuple(
            (int(header[f"DGAUSS{k}"]), float(header[f"SGAUSS{k}"])) for k in range(1, n + 1)
        )
    except (KeyError, ValueError, TypeError):
        return None


def read_hotpants_output(
    directory: Path, *, stderr: str = "", files: Mapping[str, str] = FILES
) -> HotpantsOutput:
    """Read hotpants' difference image, noise image and kernel table from ``directory``.

    Parameters
    ----------
    directory : Path
        Where hotpants wrote them (the backend's workdir).
    stderr : str
        hotpants' standard error (stamp counts are only printed there).
    files : mapping
        File names (default :data:`FILES`).

    Returns
    -------
    HotpantsOutput

    Raises
    ------
    FileNotFoundError
        If the difference image or the noise image is missing.
    """
    from astropy.io import fits

    directory = Path(directory)
    with fits.open(directory / files["output"], memmap=False) as hdul:
        header = hdul[0].header.copy()
        data = np.array(hdul[0].data, dtype=np.float32)
    with fits.open(directory / files["noise"], memmap=False) as hdul:
        noise = np.array(hdul[0].data, dtype=np.float32)
    if noise.shape != data.shape:
        msg = f"hotpants noise image has shape {noise.shape}, difference image {data.shape}"
        raise ValueError(msg)
    fill = _number(header.get("MASKVAL", FILL_VALUE), float)
    fill = FILL_VALUE if fill is None else float(fill)
    bad = ~np.isfinite(data) | ~np.isfinite(noise) | (noise <= 0) | (data == np.float32(fill))
    meta: dict[str, float | int | str | bool] = {}
    for key, (name, kind) in _KEYWORDS.items():
        if key in header:
            value = _number(header[key], kind)
            if value is not None:
                meta[name] = value
    meta.update(parse_stderr(stderr))
    meta["masked_fraction"] = round(float(bad.mean()), 6)
    solution = kernel = None
    kpath = directory / files["kernel"]
    if kpath.exists():
        with fits.open(kpath, memmap=False) as hdul:
            if len(hdul) > 1 and hdul[1].data is not None and len(hdul[1].columns):
                solution = np.array(hdul[1].data.field(0), dtype=np.float64)
                khdr = hdul[1].header
                basis = _basis_from_header(khdr)
                half = (int(khdr.get("FWKERN", 0)) - 1) // 2
                ko = int(khdr.get("CKORDER", -1))
                if basis and half > 0 and ko >= 0:
                    try:
                        kernel = kernel_image(solution, basis, half, ko)
                    except ValueError:
                        kernel = None
                ksum = meta.get("ksum")
                if kernel is not None and (
                    not isinstance(ksum, float)
                    or abs(kernel.sum() - ksum) > 1e-3 * max(1.0, abs(ksum))
                ):
                    kernel = None  # not the kernel hotpants used: do not pretend
                if kernel is not None and basis is not None:
                    # the constant term of the differential background follows the kernel's
                    bg_index = 2 + (_nbasis(basis) - 1) * (ko + 1) * (ko + 2) // 2
                    if bg_index < len(solution):
                        meta["bg"] = float(solution[bg_index])
    return HotpantsOutput(
        data=data,
        noise=noise,
        bad=bad,
        header=header,
        meta=meta,
        solution=solution,
        kernel=kernel,
    )


def _nbasis(basis: Sequence[tuple[int, float]]) -> int:
    """Number of basis functions: (d + 1)(d + 2) / 2 per Gaussian of degree d."""
    return sum((d + 1) * (d + 2) // 2 for d, _ in basis)


# ------------------------------------------------------------------ the backend


def _last_line(*texts: str) -> str:
    """The last non-empty line of the first text that has one."""
    for text in texts:
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:300]
    return "(no output)"


def _short(command: Sequence[str], limit: int = 1000) -> str:
    text = shlex.join(command)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(value: Any) -> float | int | str | bool:
    if isinstance(value, bool | str | int):
        return value
    return float(value)


def _terms(ko: int) -> int:
    """Spatial polynomial terms of order ``ko``: (ko + 1)(ko + 2) / 2."""
    return (ko + 1) * (ko + 2) // 2


def _run(
    program: str,
    plan: _Plan,
    workdir: Path,
    where: str,
    timeout: float,
    shape: tuple[int, int],
    files: Mapping[str, str] = FILES,
    written: Sequence[str] = ("output", "noise", "kernel"),
) -> tuple[HotpantsOutput, str, float]:
    """Run hotpants once in ``workdir``; return its output, the command shown, seconds.
    ``written`` are the keys of ``files`` it writes (removed first: a stale output is no
    output)."""
    for key in written:
        (workdir / files[key]).unlink(missing_ok=True)
    shown = _short(["hotpants", *plan.args])
    start = time.perf_counter()
    proc = run_program(
        [program, *plan.args],
        cwd=workdir,
        where=where,
        label="hotpants",
        timeout=timeout,
        shown=shown,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        msg = (
            f"{where}: hotpants exited with code {proc.returncode}: "
            f"{_last_line(proc.stderr, proc.stdout)!r}"
        )
        raise StageError(msg, metadata={"command": shown, "returncode": proc.returncode})
    missing = [files[k] for k in ("output", "noise") if not (workdir / files[k]).exists()]
    if missing:
        msg = (
            f"{where}: hotpants exited 0 but wrote no {' or '.join(missing)}: "
            f"{_last_line(proc.stderr, proc.stdout)!r}"
        )
        raise StageError(msg, metadata={"command": shown})
    try:
        out = read_hotpants_output(workdir, stderr=proc.stderr, files=files)
    except (OSError, ValueError) as err:
        msg = f"{where}: cannot read hotpants' output ({err})"
        raise StageError(msg) from err
    if out.data.shape != shape:
        msg = f"{where}: hotpants wrote a {out.data.shape} image for a {shape} frame"
        raise StageError(msg)
    return out, shown, seconds


def _with_layout(residual: Residual, layout: SmallLayout, options: HotpantsOptions) -> Residual:
    """Record the small-frame choices in ``meta`` (and flag a fit on fewer than
    :data:`_WANTED_STARS` stars)."""
    meta = dict(residual.meta)
    meta.update(
        small_frame=True,
        stamp_stars=len(layout.stars),
        stamp_ft=float(layout.ft),
        stamp_rejected=layout.rejected,
        stamp_dropped=len(layout.dropped),
        stamp_central=len(layout.central),
        stamp_clipped=len(layout.clipped),
        mosaic=layout.side,
        nsx=layout.ns,
        nsy=layout.ns,
        ko=0,
        bgo=0,
        fwhm_source=layout.fwhm_source,
        choice_stamps=layout.choice(),
    )
    fwhms = [f for f in layout.fwhms if f > 0]
    if fwhms:  # the residual's PSF: the broader one, as the layout found it
        meta["fwhm"] = float(max(fwhms))
    convolved = layout.fwhms[1] if meta.get("direction") == "template" else layout.fwhms[0]
    image = residual.kernel.image if residual.kernel is not None else None
    matched = matched_fwhm(image, convolved) if image is not None and convolved > 0 else None
    if matched is not None:  # the kernel fitted says better than a few stars' widths
        meta["fwhm"] = matched
        meta["fwhm_source"] = f"{layout.fwhm_source}; residual's from the kernel"
    if layout.reference:
        meta["fallback"] = (
            "no stamp star: hotpants' kernel fitted on a reference star drawn from the "
            "frames' FWHMs, flux ratio 1 assumed"
            + ("; " + layout.fwhm_source.split("; ", 1)[1] if "; " in layout.fwhm_source else "")
        )
    residual = attrs.evolve(residual, meta=meta)
    if not layout.reference and len(layout.stars) < _WANTED_STARS:
        residual = _add_flag(
            residual, f"few stamps: {len(layout.stars)} stamp star(s) in a small frame"
        )
    return residual


def _add_flag(residual: Residual, text: str) -> Residual:
    """``residual`` with ``text`` added to its flag (``meta["flag"]`` and ``HPFLAG``)."""
    flag = "; ".join(f for f in (str(residual.meta.get("flag") or ""), text) if f)
    header = residual.header.copy() if residual.header is not None else None
    if header is not None:
        header["HPFLAG"] = (flag[:40], "not to be trusted")
    return attrs.evolve(residual, meta={**residual.meta, "flag": flag}, header=header)


#: A small frame's kernel whose honest Q (:func:`honest_q`) is below this is flagged.
POOR_Q = 0.5


def _low_basis(layout: SmallLayout) -> str | None:
    """The low-order basis of a small frame's second fit: one Gaussian of degree 1, i.e.
    a kernel of a fixed shape (the matching width ``sqrt(|s1**2 - s2**2|)`` of the two
    FWHMs, ``s = FWHM / 2.3548``, between 0.5 px and ``r / 2``) scaled (the flux ratio)
    and shifted (its two first-order terms), plus the background: 4 numbers, which a
    single star or a few blended ones constrain, where the full basis (13) follows their
    blends and noise. None for the reference star (its kernel is already that)."""
    if layout.reference:
        return None
    s1, s2 = (f / FWHM_PER_SIGMA for f in layout.fwhms)
    width = math.sqrt(abs(s1**2 - s2**2)) if s1 > 0 and s2 > 0 else 0.5
    width = min(max(width, 0.5), layout.r / 2.0)
    return f"1 1 {width:.3f}"


def honest_q(residual: Residual, template: Frame) -> float:
    """Q of ``residual`` away from its new sources (:func:`oasis_core.engine.subtraction.
    new_sources`: significant where the template has nothing): how well the template's
    content was subtracted, which a bright transient must not decide (it weighs the same
    in every candidate's residual, or more in one that leaves it whole). nan when no
    pixel is usable."""
    from oasis_core.engine.quality import q_value
    from oasis_core.engine.subtraction import new_sources

    if not (residual.weight > 0).any():
        return float("nan")
    fwhm = residual.meta.get("fwhm")
    fwhm = float(fwhm) if isinstance(fwhm, int | float) and fwhm > 0 else 3.0
    exclude = new_sources(residual, template, fwhm)
    return float(q_value(residual.data, residual.noise, residual.weight, exclude=exclude))


#: A later small-frame kernel candidate replaces an earlier one only when its honest Q is
#: higher by more than this (the full basis, hotpants' own model, is tried first).
Q_MARGIN = 0.01

#: What each small-frame kernel candidate is, for ``meta["choice_kernel"]``.
_MODELS = {
    "full": "full basis",
    "low-order": "low-order (flux scale, shift, background)",
}


def _choose_kernel(
    tried: Sequence[tuple[str, Residual]], template: Frame, seconds: float
) -> Residual:
    """The small frame's residual of the better kernel by :func:`honest_q` (a later
    candidate must beat an earlier one by :data:`Q_MARGIN`), with the choice in ``meta``
    (``kernel_model``, ``q_honest``, the others' ``q_honest_<model>``,
    ``choice_kernel``) and the ``HPKERN`` card; flagged when even that Q is below
    :data:`POOR_Q`."""
    scored = [(label, res, honest_q(res, template)) for label, res in tried]
    best = 0
    for i, (_, _, q) in enumerate(scored):
        kept = scored[best][2]
        if np.isfinite(q) and not (np.isfinite(kept) and q <= kept + Q_MARGIN):
            best = i
    label, residual, q = scored[best]
    others = [(lab, oq) for i, (lab, _, oq) in enumerate(scored) if i != best]
    versus = "; ".join(f"{_MODELS[lab]} {oq:.3f}" for lab, oq in others)
    sentence = f"{_MODELS[label]}, honest Q {q:.3f}" + (f" (vs {versus})" if versus else "")
    meta: dict[str, Any] = {
        **residual.meta,
        "kernel_model": label,
        "q_honest": round(q, 4) if np.isfinite(q) else "nan",
        "choice_kernel": sentence,
        "hotpants_seconds": round(seconds, 3),
    }
    for lab, oq in others:
        meta[f"q_honest_{lab.replace('-', '_')}"] = round(oq, 4) if np.isfinite(oq) else "nan"
    header = residual.header.copy() if residual.header is not None else None
    if header is not None:
        header["HPKERN"] = (label, "hotpants kernel model kept (small frame)")
    residual = attrs.evolve(residual, meta=meta, header=header)
    if not (np.isfinite(q) and q >= POOR_Q):
        residual = _add_flag(residual, f"poor fit: honest Q {q:.3f} (< {POOR_Q:g})")
    return residual


def matched_fwhm(kernel: np.ndarray, fwhm: float) -> float | None:
    """The FWHM of a frame's PSF of ``fwhm`` convolved with ``kernel``: second moments
    add under convolution, so ``sigma**2 = (fwhm / 2.3548)**2 + var(kernel)`` (the
    kernel's variance about its centroid, per axis; negative for a kernel that sharpens).

    On a small frame the frames' FWHMs come from a few sources, one of them perhaps a
    galaxy; the kernel, fitted on the stamp stars, says how the convolved frame's PSF
    was changed, which sets the residual's PSF (the width the core's filters and the
    extraction's matched filter assume). None when the kernel carries no positive flux
    or the result is not a positive width above half the frame's."""
    k = np.asarray(kernel, np.float64)
    total = float(k.sum())
    if not (np.isfinite(total) and total > 0):
        return None
    hy, hx = k.shape[0] // 2, k.shape[1] // 2
    yy, xx = np.mgrid[-hy : k.shape[0] - hy, -hx : k.shape[1] - hx]
    mx, my = float((k * xx).sum()) / total, float((k * yy).sum()) / total
    var = float((k * ((xx - mx) ** 2 + (yy - my) ** 2)).sum()) / total / 2.0
    sigma2 = (fwhm / FWHM_PER_SIGMA) ** 2 + var
    if not (np.isfinite(sigma2) and sigma2 > (0.5 * fwhm / FWHM_PER_SIGMA) ** 2):
        return None
    return float(FWHM_PER_SIGMA * math.sqrt(sigma2))


class HotpantsSubtract(SubtractBackend):
    """Becker's HOTPANTS, run as an external program (see the module docstring).

    Residual cards written to the header (a copy of the science header): ``Q``,
    ``NNOISE``, ``NSTAMPS``, ``KSUM``, ``FSCALE`` (science / template flux ratio),
    ``X2NRM``, ``KHALF`` (kernel half width), ``CONVOLVE`` (the image convolved),
    ``HPKERN`` on a small frame (the kernel model kept: ``full`` or ``low-order``) and
    ``HPFLAG`` when the result is flagged.
    """

    name = "hotpants"
    auto_priority = 20
    Options = HotpantsOptions
    description = "Becker's HOTPANTS program (external; github.com/acbecker/hotpants)"
    #: the frames' FWHMs choose the image to convolve, the kernel size and the basis
    needs_psf = True

    def _program(self, options: HotpantsOptions) -> str:
        found = shutil.which(options.binary)
        if found is None:
            what = "not found" if "/" in options.binary else "not on PATH"
            msg = f"subtract backend 'hotpants': program {options.binary!r} {what}; {BUILD_HINT}"
            raise BackendUnavailable(msg)
        return str(Path(found).resolve())

    def check(self, options: HotpantsOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when hotpants is
        missing."""
        self._program(options)

    def candidates(
        self, science: Frame, template: Template, *, options: HotpantsOptions
    ) -> list[HotpantsOptions]:
        """Option sets the core tries in turn while Q stays below ``q_ceiling``.

        ``options`` first; then the stamp threshold ``ft`` halved (more stamp stars on
        sparse or small frames); then a kernel 1.4 times wider (``r``; ``rss`` follows),
        for wings the first kernel did not reach. On a small frame only ``options``: its
        layout already lowers ``ft`` and sizes the kernel to the frame.
        """
        if _is_small(science.shape):  # the layout lowers ft and sizes the kernel
            return [options]
        _, r, _ = _kernel_shape(_fwhm(science), _fwhm(template), options)
        wider = math.ceil(1.4 * r)
        return [
            options,
            attrs.evolve(options, ft=options.ft / 2),
            attrs.evolve(options, r=wider, rss=options.rss if options.rss >= wider else 0),
        ]

    def subtract(
        self, science: Frame, template: Template, *, options: HotpantsOptions, workdir: Path
    ) -> Residual:
        """Run hotpants on the pair and return science - K * template.

        Parameters
        ----------
        science, template : Frame
            Registered frames of the same shape.
        options : HotpantsOptions
        workdir : Path
            Scratch directory: the inputs and outputs of hotpants are written there.

        Returns
        -------
        Residual
            In the science frame's flux scale (``normalize='i'``), with hotpants' noise
            image, a weight map, Q, the kernel and ``meta`` (see the module docstring).

        Raises
        ------
        oasis_core.contracts.errors.BackendUnavailable
            If the program is missing.
        oasis_core.contracts.errors.StageError
            If the frames differ in shape, hotpants fails, times out or writes no output.
        """
        from astropy.io import fits

        program = self._program(options)
        where = f"subtract backend 'hotpants': {science.name!r}"
        if science.shape != template.shape:
            msg = f"{where}: science {science.shape} and template {template.shape} differ in shape"
            raise StageError(msg)
        sci = _prepare(science, options, "science frame")
        tpl = _prepare(template, options, "template")
        found = _small_layout(science, template, sci, tpl, options, where)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        arrays = {
            "science": sci.data,
            "template": tpl.data,
            "science_mask": sci.mask,
            "template_mask": tpl.mask,
        }
        if options.noise_images:
            arrays["science_noise"] = np.sqrt(sci.variance)
            arrays["template_noise"] = np.sqrt(tpl.variance)
        if found is not None:
            layout, sci, tpl = found
            options = attrs.evolve(options, ko=0, bgo=0)
            pad = 2 * layout.r  # masked: hotpants then loses only r px along the edges
            for key, array in arrays.items():
                fill = MASK_BAD if key.endswith("mask") else float(np.median(array))
                padded = np.pad(array, pad, mode="constant", constant_values=fill)
                fits.PrimaryHDU(padded).writeto(workdir / FILES[key], overwrite=True)
            return self._small(science, template, sci, tpl, options, layout, program, workdir)
        for key, array in arrays.items():
            fits.PrimaryHDU(array).writeto(workdir / FILES[key], overwrite=True)

        plan = _plan(sci, tpl, options, FILES)
        shape = science.shape
        out, shown, seconds = _run(program, plan, workdir, where, options.timeout, shape)
        requested_ko = options.ko
        nstamps = out.meta.get("nstamps")
        if (
            options.lower_ko
            and options.ko > 0
            and isinstance(nstamps, int)
            and 0 < nstamps < _terms(options.ko)
        ):
            # too few stamps for the spatial terms: the fit is degenerate, so refit with
            # the highest spatial order the surviving stamps constrain
            ko = max(k for k in range(options.ko) if _terms(k) <= nstamps)
            options = attrs.evolve(options, ko=ko)
            plan = _plan(sci, tpl, options, FILES)
            out, shown, more = _run(program, plan, workdir, where, options.timeout, shape)
            seconds += more
            out = attrs.evolve(
                out,
                meta={
                    **out.meta,
                    "ko_requested": requested_ko,
                    "lowered": f"few stamps: {nstamps} for ko={requested_ko}; ko lowered to {ko}",
                },
            )
        return self._residual(science, template, sci, options, plan, out, shown, seconds)

    def _small(
        self,
        science: Frame,
        template: Template,
        sci: _Prepared,
        tpl: _Prepared,
        options: HotpantsOptions,
        layout: SmallLayout,
        program: str,
        workdir: Path,
    ) -> Residual:
        """A small frame: fit the kernel on the mosaic of its stars (the full basis and the
        low-order one), apply each to the frame and keep the better by the honest Q; with
        ``convolve = "auto"`` and FWHMs within 10 % of each other, in both directions
        (see "Small frames" in the module doc)."""
        close = (
            options.convolve == "auto"
            and sci.fwhm is not None
            and tpl.fwhm is not None
            and abs(float(sci.fwhm) / float(tpl.fwhm) - 1.0) < 0.1
        )
        if not close:
            return self._small_one(science, template, sci, tpl, options, layout, program, workdir)
        done: list[Residual] = []
        errors: list[StageError] = []
        for way in ("t", "i"):  # in turn in one workdir: each residual is read into memory
            way_options = attrs.evolve(options, convolve=way)
            try:
                done.append(
                    self._small_one(
                        science, template, sci, tpl, way_options, layout, program, workdir
                    )
                )
            except StageError as err:
                errors.append(err)
        if not done:
            raise errors[0]
        qs = [float(r.meta.get("q_honest", "nan")) for r in done]
        best = int(np.argmax([q if np.isfinite(q) else -np.inf for q in qs]))
        others = "; ".join(f"{q:.3f}" for i, q in enumerate(qs) if i != best)
        choice = f"honest Q {qs[best]:.3f} (vs {others or 'none'})"
        return attrs.evolve(done[best], meta={**done[best].meta, "choice_convolve": choice})

    def _small_one(
        self,
        science: Frame,
        template: Template,
        sci: _Prepared,
        tpl: _Prepared,
        options: HotpantsOptions,
        layout: SmallLayout,
        program: str,
        workdir: Path,
    ) -> Residual:
        """One small-frame subtraction in the direction ``options`` gives."""
        where = f"subtract backend 'hotpants': {science.name!r}"
        layout, fitted, seconds = self._fit_stars(sci, tpl, options, layout, program, workdir)
        fit_out, _, fit_shown = fitted
        tried: list[tuple[str, Residual]] = []
        if "ksum" in fit_out.meta:
            residual, more = self._apply(
                science, template, sci, tpl, options, layout, fitted, program, workdir
            )
            seconds += more
            tried.append(("full", residual))
        low = _low_basis(layout)
        if low is not None:  # the model a few (blended) stars constrain
            low_options = attrs.evolve(options, ng=low)
            low_fit, more = self._fit_mosaic(sci, tpl, low_options, layout, program, workdir)
            seconds += more
            if "ksum" in low_fit[0].meta:
                residual, more = self._apply(
                    science, template, sci, tpl, options, layout, low_fit, program, workdir
                )
                seconds += more
                tried.append(("low-order", residual))
        if not tried:
            msg = (
                f"{where}: hotpants fitted no kernel on the {len(layout.stars)} stamp "
                f"star(s) of the {science.shape[0]}x{science.shape[1]} frame "
                f"({_last_line(fit_out.header.get('HISTORY', '') or '')}); use the ois or "
                "zogy backend"
            )
            raise StageError(msg, metadata={"command": fit_shown})
        return _choose_kernel(tried, template, seconds)

    def _fit_stars(
        self,
        sci: _Prepared,
        tpl: _Prepared,
        options: HotpantsOptions,
        layout: SmallLayout,
        program: str,
        workdir: Path,
    ) -> tuple[SmallLayout, tuple[HotpantsOutput, _Plan, str], float]:
        """The full small-frame basis fitted on the layout's stars: on the reference star
        when hotpants keeps none, without a star whose residual stands out
        (:func:`deviant_star`)."""
        fitted, seconds = self._fit_mosaic(sci, tpl, options, layout, program, workdir)
        if "ksum" not in fitted[0].meta and not layout.reference and all(layout.fwhms):
            # hotpants kept none of the stars: fall back on the reference star
            layout = _reference_layout(
                sci, tpl, layout.r, layout.rss, layout.ft, layout.rejected, layout.fwhm_source
            )
            fitted, more = self._fit_mosaic(sci, tpl, options, layout, program, workdir)
            seconds += more
        checks = ((deviant_star, "dropped"), *[(clipped_star, "clipped")] * _MAX_NS**2)
        for check, field in checks:  # a transient on a star once; then clip the worst
            out0 = fitted[0]
            if "ksum" not in out0.meta:
                break
            worst = check(out0.data, out0.noise, out0.bad, layout)
            if worst is None:
                if check is deviant_star:
                    continue
                break
            first = layout
            layout = _without_star(layout, worst, field)
            refit, more = self._fit_mosaic(sci, tpl, options, layout, program, workdir)
            seconds += more
            if "ksum" in refit[0].meta:
                fitted = refit
                continue
            # the kernel file is the failed refit's: fit the previous set again, stop
            layout = first
            fitted, more = self._fit_mosaic(sci, tpl, options, layout, program, workdir)
            seconds += more
            break
        return layout, fitted, seconds

    def _apply(
        self,
        science: Frame,
        template: Template,
        sci: _Prepared,
        tpl: _Prepared,
        options: HotpantsOptions,
        layout: SmallLayout,
        fitted: tuple[HotpantsOutput, _Plan, str],
        program: str,
        workdir: Path,
    ) -> tuple[Residual, float]:
        """Apply the kernel just fitted on the mosaic (``FILES["kernel"]``) to the padded
        frame; return the residual (its ``meta`` with the layout's choices) and the
        seconds hotpants took."""
        from astropy.io import fits

        where = f"subtract backend 'hotpants': {science.name!r}"
        fit_out, fit_plan, fit_shown = fitted
        pad = 2 * layout.r
        ny, nx = science.shape[0] + 2 * pad, science.shape[1] + 2 * pad
        kernel_file = workdir / FILES["kernel"]
        with fits.open(kernel_file, mode="update") as hdul:  # the region hotpants applies it to
            hdul[0].header["REGION00"] = f"[1:{nx},1:{ny}]"
        plan = _apply_plan(sci, tpl, options, fit_plan)
        written = ("output", "noise")  # not the kernel: this run reads it
        out, shown, seconds = _run(
            program, plan, workdir, where, options.timeout, (ny, nx), written=written
        )
        inner = np.s_[pad : ny - pad, pad : nx - pad]
        bad = np.ascontiguousarray(out.bad[inner])
        out = attrs.evolve(
            out,
            data=np.ascontiguousarray(out.data[inner]),
            noise=np.ascontiguousarray(out.noise[inner]),
            bad=bad,
            meta={**out.meta, "masked_fraction": round(float(bad.mean()), 6)},
        )
        counts = {k: fit_out.meta[k] for k in ("nstamps", "nstamps_built") if k in fit_out.meta}
        out = attrs.evolve(out, meta={**out.meta, **counts, "fit_command": fit_shown})
        residual = self._residual(science, template, sci, options, plan, out, shown, seconds)
        return _with_layout(residual, layout, options), seconds

    def _fit_mosaic(
        self,
        sci: _Prepared,
        tpl: _Prepared,
        options: HotpantsOptions,
        layout: SmallLayout,
        program: str,
        workdir: Path,
    ) -> tuple[tuple[HotpantsOutput, _Plan, str], float]:
        """Write the mosaic and its stamp list; run hotpants on it (it writes the kernel)."""
        from astropy.io import fits

        for key, array in _mosaic(layout, sci, tpl, options.noise_images).items():
            fits.PrimaryHDU(array).writeto(workdir / FIT_FILES[key], overwrite=True)
        lines = [f"{x + 1} {y + 1}" for x, y in layout.centres]
        (workdir / FIT_FILES["stamps"]).write_text("\n".join(lines) + "\n")
        plan = _plan(sci, tpl, options, FIT_FILES, layout)
        where = "subtract backend 'hotpants' (kernel fit on the stamp stars)"
        side = (layout.side, layout.side)
        out, shown, seconds = _run(
            program, plan, workdir, where, options.timeout, side, files=FIT_FILES
        )
        return (out, plan, shown), seconds

    def _residual(
        self,
        science: Frame,
        template: Template,
        sci: _Prepared,
        options: HotpantsOptions,
        plan: _Plan,
        out: HotpantsOutput,
        command: str,
        seconds: float,
    ) -> Residual:
        from astropy.io import fits

        from oasis_core.engine.quality import normalized_noise, q_value, source_footprint

        meta: dict[str, float | int | str | bool] = dict(out.meta)
        convolved = str(meta.get("convolved", "")).upper()
        if convolved not in ("TEMPLATE", "IMAGE"):
            convolved = "TEMPLATE" if plan.convolve != "i" else "IMAGE"
        direction = "template" if convolved == "TEMPLATE" else "science"
        photnorm = str(meta.get("photnorm", options.normalize)).strip() or options.normalize
        ksum = meta.get("ksum")
        ksum_f = float(ksum) if isinstance(ksum, float) and ksum != 0 else float("nan")
        fscale = ksum_f if direction == "template" else 1.0 / ksum_f

        weight = np.minimum(
            np.asarray(science.weight, np.float32), np.asarray(template.weight, np.float32)
        )
        weight = np.clip(np.where(out.bad, np.float32(0), weight), 0, 1).astype(np.float32)
        data = np.where(out.bad, np.float32(0), out.data).astype(np.float32)
        noise = np.where(out.bad, np.float32(0), out.noise).astype(np.float32)

        # the noise the science frame shares with a template it is part of
        inputs = tuple(getattr(template, "inputs", ()) or ())
        if options.template_covariance and science.name in inputs and out.kernel is not None:
            k = out.kernel
            k0 = max(float(k[k.shape[0] // 2, k.shape[1] // 2]), 0.0)
            divided = (direction == "template" and photnorm == "t") or (
                direction == "science" and photnorm == "i"
            )
            scale2 = 1.0 / ksum_f**2 if divided and math.isfinite(ksum_f) else 1.0
            cov = np.float32(2.0 * k0 * scale2 / len(inputs)) * sci.variance
            noise2 = noise.astype(np.float32) ** 2
            noise = np.sqrt(np.maximum(noise2 - cov, 0.25 * noise2)).astype(np.float32)
            meta["covariance_k0"] = round(k0, 6)

        q = q_value(data, noise, weight)
        nnoise = normalized_noise(
            data, noise, weight, exclude=source_footprint(template.data, weight)
        )
        nstamps = meta.get("nstamps")
        min_stamps = options.min_stamps or _terms(options.ko)
        flags = []
        if "lowered" in meta:
            flags.append(str(meta.pop("lowered")))
        if "ksum" not in meta:
            flags.append("hotpants fitted no kernel (no KSUM00 in its output: no usable stamp)")
        elif isinstance(nstamps, int) and nstamps < min_stamps:
            flags.append(f"few stamps: {nstamps} (< {min_stamps})")
        masked = float(meta["masked_fraction"])
        if masked > options.max_masked:
            flags.append(
                f"hotpants masked {100 * masked:.0f}% of the pixels (fill value); check the "
                "valid levels (-il/-tl, -iu/-tu) and the input masks"
            )
        meta.update(
            direction=direction,
            photnorm=photnorm,
            fscale=float(fscale),
            q=float(q),
            nnoise=float(nnoise),
            r=plan.r,
            rss=plan.rss,
            ko=options.ko,
            ng=plan.ng,
            convolve=plan.convolve,
            hotpants_seconds=round(seconds, 3),
            command=command,
        )
        fwhms = [f for f in (_fwhm(science), _fwhm(template)) if f]
        if fwhms:
            meta["fwhm"] = float(max(fwhms))
        if flags:
            meta["flag"] = "; ".join(flags)

        header = fits.Header()
        if isinstance(science.header, fits.Header):
            header = science.header.copy()
        else:
            header.update(dict(science.header))
        cards: list[tuple[str, Any, str]] = [
            ("Q", q, "OasisPy quality figure of the residual"),
            ("NNOISE", nnoise, "robust std of the normalised residual"),
            ("NSTAMPS", nstamps, "hotpants stamps kept in the kernel fit"),
            ("KSUM", ksum, "hotpants kernel sum (KSUM00)"),
            ("FSCALE", fscale, "science / template flux ratio"),
            ("X2NRM", meta.get("x2nrm"), "hotpants mean (diff/noise)**2, good pixels"),
            ("KHALF", plan.r, "hotpants kernel half width (px)"),
            ("CONVOLVE", direction, "image convolved by the hotpants kernel"),
        ]
        if flags:
            cards.append(("HPFLAG", str(meta["flag"])[:40], "not to be trusted"))
        for key, value, comment in cards:
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            header[key] = (_clean(value) if value is not None else None, comment)

        kmeta_keys = ("nstamps", "nstamps_built", "ksum", "fscale", "bg", "r", "rss", "ng")
        kernel = KernelSolution(
            image=None if out.kernel is None else out.kernel.astype(np.float32),
            coefficients=out.solution,
            direction=direction,
            meta={k: meta[k] for k in kmeta_keys if k in meta}
            | {"ko": options.ko, "bgo": options.bgo},
        )
        return Residual(
            data=data,
            noise=noise,
            weight=weight,
            header=header,
            name=science.name,
            science=science.name,
            template=template.name,
            q=float(q),
            kernel=kernel,
            params={**attrs.asdict(options), "command": command},
            meta=meta,
        )
