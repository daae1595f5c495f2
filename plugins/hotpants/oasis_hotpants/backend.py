"""The ``hotpants`` subtract backend: Andrew Becker's HOTPANTS program, run as a subprocess.

HOTPANTS (High Order Transform of PSF ANd Template Subtraction,
https://github.com/acbecker/hotpants) fits Alard's spatially varying kernel on stamps and
writes the difference image, its noise image and the kernel solution. This module writes
the two frames (and their masks and noise images) as FITS in the backend's ``workdir``,
maps the options and the frames' measured properties to hotpants' command-line flags,
runs the program and turns its outputs into a :class:`~oasis_core.model.Residual`.

What the backend passes to hotpants
-----------------------------------
``-il``/``-tl`` (lower valid level)
    hotpants' default, 0, marks every pixel at or below zero as bad: on a sky-subtracted
    frame that is half the sky, and hotpants then masks nearly the whole output and still
    exits 0. The level is therefore taken from the data: ``median - lower_nsigma x noise``
    (the frame's sky noise), far below any sky pixel whatever the sky level.
``-iu``/``-tu`` (upper valid level)
    ``upper`` when set, else the frame's saturation (``Frame.saturation``), else just
    above the frame's brightest good pixel (no cut; hotpants' default 25000 ADU would
    mask the cores of bright stars on deep frames).
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
"""

from __future__ import annotations

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

from oasis_core.backends import SubtractBackend, option
from oasis_core.errors import BackendUnavailable, ConfigError, StageError
from oasis_core.model import Frame, KernelSolution, Residual, Template
from oasis_core.programs import run_program
from oasis_core.validators import in_range, non_negative, positive, satisfies

__all__ = [
    "FILES",
    "HotpantsOptions",
    "HotpantsOutput",
    "HotpantsSubtract",
    "hotpants_arguments",
    "kernel_image",
    "parse_stderr",
    "read_hotpants_output",
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
    from oasis_core.stats import sky_noise

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
    lower = median - options.lower_nsigma * noise
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


def _plan(
    sci: _Prepared, tpl: _Prepared, options: HotpantsOptions, files: Mapping[str, str]
) -> _Plan:
    # image to convolve
    if options.convolve != "auto":
        convolve = options.convolve
    elif sci.fwhm is not None and tpl.fwhm is not None:
        convolve = "t" if tpl.fwhm <= sci.fwhm else "i"
    else:
        convolve = "b"
    ng, r, rss = _kernel_shape(sci.fwhm, tpl.fwhm, options)
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
        "-il", _fmt(sci.lower), "-iu", _fmt(sci.upper),
        "-tl", _fmt(tpl.lower), "-tu", _fmt(tpl.upper),
        "-ig", _fmt(sci.gain), "-ir", _fmt(sci.readnoise),
        "-tg", _fmt(tpl.gain), "-tr", _fmt(tpl.readnoise),
        "-ng", *ng.split(),
        "-r", str(r), "-rss", str(rss),
        "-ko", str(options.ko), "-bgo", str(options.bgo),
        "-nsx", str(options.nsx), "-nsy", str(options.nsy), "-nss", str(options.nss),
        "-ft", _fmt(options.ft),
        "-c", convolve, "-n", options.normalize,
        "-v", "0",
    ]  # fmt: skip
    args += shlex.split(options.extra)
    return _Plan(args=tuple(args), convolve=convolve, ng=ng, r=r, rss=rss)


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
    oasis_core.errors.StageError
        If a frame has no usable pixel or no measurable noise.
    oasis_core.errors.ConfigError
        If ``rss`` is below the kernel half width.

    Examples
    --------
    >>> import numpy as np
    >>> from oasis_core.model import Frame, Template
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
    return list(_plan(sci, tpl, options, files).args)


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
) -> tuple[HotpantsOutput, str, float]:
    """Run hotpants once in ``workdir``; return its output, the command shown, seconds."""
    for key in ("output", "noise", "kernel"):
        (workdir / FILES[key]).unlink(missing_ok=True)  # a stale output is no output
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
    missing = [FILES[k] for k in ("output", "noise") if not (workdir / FILES[k]).exists()]
    if missing:
        msg = (
            f"{where}: hotpants exited 0 but wrote no {' or '.join(missing)}: "
            f"{_last_line(proc.stderr, proc.stdout)!r}"
        )
        raise StageError(msg, metadata={"command": shown})
    try:
        out = read_hotpants_output(workdir, stderr=proc.stderr)
    except (OSError, ValueError) as err:
        msg = f"{where}: cannot read hotpants' output ({err})"
        raise StageError(msg) from err
    if out.data.shape != shape:
        msg = f"{where}: hotpants wrote a {out.data.shape} image for a {shape} frame"
        raise StageError(msg)
    return out, shown, seconds


class HotpantsSubtract(SubtractBackend):
    """Becker's HOTPANTS, run as an external program (see the module docstring).

    Residual cards written to the header (a copy of the science header): ``Q``,
    ``NNOISE``, ``NSTAMPS``, ``KSUM``, ``FSCALE`` (science / template flux ratio),
    ``X2NRM``, ``KHALF`` (kernel half width), ``CONVOLVE`` (the image convolved) and
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
        """Raise :class:`~oasis_core.errors.BackendUnavailable` when hotpants is missing."""
        self._program(options)

    def candidates(
        self, science: Frame, template: Template, *, options: HotpantsOptions
    ) -> list[HotpantsOptions]:
        """Option sets the core tries in turn while Q stays below ``q_ceiling``.

        ``options`` first; then the stamp threshold ``ft`` halved (more stamp stars on
        sparse or small frames); then a kernel 1.4 times wider (``r``; ``rss`` follows),
        for wings the first kernel did not reach.
        """
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
        oasis_core.errors.BackendUnavailable
            If the program is missing.
        oasis_core.errors.StageError
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
        plan = _plan(sci, tpl, options, FILES)

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        images = {
            "science": sci.data,
            "template": tpl.data,
            "science_mask": sci.mask,
            "template_mask": tpl.mask,
        }
        if options.noise_images:
            images["science_noise"] = np.sqrt(sci.variance)
            images["template_noise"] = np.sqrt(tpl.variance)
        for key, array in images.items():
            fits.PrimaryHDU(array).writeto(workdir / FILES[key], overwrite=True)

        out, shown, seconds = _run(program, plan, workdir, where, options.timeout, science.shape)
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
            out, shown, more = _run(program, plan, workdir, where, options.timeout, science.shape)
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

        from oasis_core.quality import normalized_noise, q_value

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
        nnoise = normalized_noise(data, noise, weight, exclude=_sources(template, weight))
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


def _sources(template: Frame, weight: np.ndarray) -> np.ndarray | None:
    """Pixels on and around the template's sources (excluded from ``nnoise``)."""
    from scipy import ndimage

    data = np.asarray(template.data, np.float32)
    good = (weight > 0) & np.isfinite(data)
    if good.sum() < 100:
        return None
    med = float(np.median(data[good]))
    sigma = float(1.4826 * np.median(np.abs(data[good] - med)))
    if not sigma > 0:
        return None
    smooth = ndimage.uniform_filter(np.where(good, data, med), size=3)
    return ndimage.maximum_filter(smooth > med + sigma, size=7)
