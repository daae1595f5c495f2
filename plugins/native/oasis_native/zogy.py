"""The ``zogy`` subtract backend: Zackay, Ofek & Gal-Yam (2016) proper image subtraction.

Whole-array FFTs (:mod:`scipy.fft`, real transforms, single precision) of the aligned
science image ``N`` and reference ``R`` (sky removed, pixels masked in either frame set
to the sky in both), with their PSF models ``P_n``, ``P_r`` (the frames' unit-sum stamps,
padded to the FFT size and centred on the origin), their sky noise ``sigma_n``,
``sigma_r`` and the flux zero points ``F_r = 1`` and ``F_n = beta``, the science /
reference flux ratio. Products below are of Fourier transforms;
``den2 = sigma_n**2 |P_r|**2 + beta**2 sigma_r**2 |P_n|**2``:

* the proper difference ``D = (P_r N - beta P_n R) / sqrt(den2)``, white noise of unit
  variance when the sky noise dominates;
* its flux normalisation ``F_D = beta / sqrt(sigma_n**2 + beta**2 sigma_r**2)`` and PSF
  ``P_D = beta P_r P_n / (F_D sqrt(den2))`` (unit sum);
* the score ``S = F_D D (x) P_D-bar = k_n N - k_r R``, with
  ``k_n = beta conj(P_n) |P_r|**2 / den2`` and ``k_r = beta**2 conj(P_r) |P_n|**2 / den2``;
* the corrected score (the paper's eq. 25-27) ``S_corr = S / sqrt(V(S_N) + V(S_R) +
  V_ast)`` with ``V(S_N) = V(N) (x) k_n**2``, ``V(S_R) = V(R) (x) k_r**2``, ``V(N)`` the
  per-pixel variance (sky noise plus the sources' Poisson noise) and, when
  ``astrometric_sigma`` is set, ``V_ast = sigma_ast**2 (|grad S_N|**2 + |grad S_R|**2)``.
  ``S_corr`` is in sigmas: a point source of significance 5 peaks near 5.

**Scaling to science ADU.** A point source of total flux ``A`` (science ADU) in ``N``
appears in ``D`` with total flux ``A F_D / beta`` and profile ``P_D`` (at zero frequency
``P_n = P_r = 1`` and ``D(0) = A / sqrt(sigma_n**2 + beta**2 sigma_r**2)``). The
residual's ``data`` is therefore ``D * beta / F_D = D * sqrt(sigma_n**2 + beta**2
sigma_r**2)``: a transient keeps its science flux, so aperture photometry on it with a
large aperture recovers its flux in the science frame's photometric system (whatever
``beta`` and the PSF models' truncation: the flux lives at zero frequency, where both
PSFs are 1), and the per-pixel noise is that factor (the sky noise of the science minus
the flux-scaled reference), times ``sqrt(V(D))`` where sources add Poisson noise.

**Flux ratio and residual offset.** Each frame is convolved with the other's PSF
(``N (x) P_r`` and ``R (x) P_n`` have the same PSF, so an aperture of any size holds the
same fraction of a star's flux in both, and centroids compare without bias). Stars found
on the reference's are measured in a 1.5 x FWHM aperture with a local background
annulus; unless ``flux_ratio`` fixes it, ``beta`` is the inverse-variance weighted,
clipped mean of the flux ratios of the unmasked, unsaturated stars above ``ratio_snr``
in both. This is the ratio as the PSF models see it, the one that subtracts the stars
best; with imperfect models it can differ from the total-flux ratio by a few percent.
The same stars give the mean science - template offset the alignment left, removed
(``fit_shift``) by a Fourier phase shift of the template when significant, and the
scatter of their offsets beyond the centroid errors, the registration noise used for
``V_ast`` when ``astrometric_sigma`` is negative.

**Sky.** ``S_corr`` is a matched filter: a sky mismatch of 0.1 sigma between the frames
moves it by about 1 sigma, hence the default ``background = "map"`` (sep background
meshes, which follow gradients) over a constant level.

Masked pixels (weight 0, non-finite, or at saturation) are set to the sky before the
FFTs; the output weight is the smaller of the two inputs' weights and 0 within
``mask_grow`` FWHM (of the broader PSF) of a masked pixel or of the frame edge. The FFT
arrays are zero-padded (sky) by the PSF sizes so that nothing wraps around the edges.
The PSF is taken constant over the frame, and the noise white: resampled (aligned)
frames have less high-frequency noise, which leaves the per-pixel scatter of ``data``
below its ``noise`` image (``meta["nnoise"]`` < 1) while ``S_corr`` and aperture errors,
dominated by low frequencies, stay close to calibrated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import SubtractBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, PsfModel, Residual, Template
from oasis_core.contracts.validators import finite, in_range, non_negative

__all__ = ["NativeZogy", "ZogyOptions"]

_BACKGROUNDS = ("constant", "map")
_PSF_MATCH = ("auto", "always", "never")
_MATCH_STARS = 25  # brightest template stars used to match the PSF pair
_SURE_STARS = 10  # a PSF from fewer stars than this is matched (psf_match = "auto")
_HUBER = 3.0  # sigmas where the PSF match's loss turns from quadratic to linear
_MAX_STARS = 500  # brightest stars measured for the flux ratio and the shift


@attrs.frozen(kw_only=True)
class ZogyOptions:
    """Options of the ``zogy`` subtract backend (``[subtract.zogy]``)."""

    flux_ratio: float = option(
        0.0,
        "science / template flux ratio F_N/F_R (1 for photometrically aligned frames); "
        "0 = measure it on the stars common to both frames",
        range=non_negative,
    )
    ratio_snr: float = option(
        20.0,
        "minimum aperture S/N (in both frames) of a star used to measure the flux ratio",
        range=non_negative,
    )
    ratio_min_stars: int = option(
        5,
        "with fewer usable stars the flux ratio is taken as 1 (meta['ratio_source'])",
        range=(1, None),
    )
    source_noise: bool = option(
        True, "add the sources' Poisson noise to the noise image and to the S_corr variance"
    )
    astrometric_sigma: float = option(
        0.0,
        "registration noise per axis (px) added to the S_corr variance (ZOGY's astrometric "
        "term); "
        "0 = no astrometric term; -1 (any negative) = measured: the scatter of the star "
        "offsets beyond their centroid errors",
        range=finite,
    )
    background: str = option(
        "map",
        "sky removed before the FFTs: 'map' (a sep background mesh: S_corr, a matched "
        "filter, turns a sky mismatch of 0.1 sigma into ~1 sigma) or 'constant' (the "
        "frame's background, else measured)",
        choices=_BACKGROUNDS,
    )
    back_size: int = option(
        64, "sep background mesh size (px) when background = 'map'", range=(1, None)
    )
    saturation: float = option(
        0.0,
        "mask pixels at or above this level (ADU); 0 = each frame's saturation",
        range=non_negative,
    )
    mask_grow: float = option(
        1.5,
        "output weight 0 within this many FWHM (of the broader PSF) of a masked pixel or "
        "of the frame edge",
        range=non_negative,
    )
    fit_shift: bool = option(
        True,
        "measure the mean science - template star offset left by the alignment and move "
        "the template by it (Fourier phase shift) when significant",
    )
    psf_beta: float = option(
        3.0,
        "Moffat beta of the PSF built from a frame's FWHM when it has no PSF image",
        range=in_range(1, None, lo_open=True),
    )
    psf_match: str = option(
        "auto",
        "match the PSF pair on the template's stars: Moffats of a common beta and the "
        "science/template width ratio that best null them in N (x) P_r - R (x) P_n; 'auto' "
        "= when either PSF is a fallback (moments, autocorrelation, a FWHM only) or from "
        "fewer than 10 stars",
        choices=_PSF_MATCH,
    )
    workers: int = option(0, "FFT threads; 0 = all CPUs", range=(0, None))


@attrs.frozen(kw_only=True)
class _Input:
    """One frame prepared for the FFTs (internal)."""

    name: str
    data: np.ndarray = attrs.field(eq=False, repr=False)  # float32, sky removed, bad -> 0
    bad: np.ndarray = attrs.field(eq=False, repr=False)
    weight: np.ndarray = attrs.field(eq=False, repr=False)
    psf: np.ndarray = attrs.field(eq=False, repr=False)  # odd, unit sum, float32
    sky: float
    sigma: float
    gain: float  # inf: no source Poisson term
    fwhm: float
    psf_source: str  # where the PSF came from, e.g. "fit (1 star)", "fwhm-moffat (frame FWHM)"
    psf_fallback: str  # "" or a sentence: the PSF is a fallback (few stars, moments...)
    psf_stars: int  # stars the PSF was measured on (0: unknown, or a FWHM only)


class NativeZogy(SubtractBackend):
    """Proper image subtraction (Zackay, Ofek & Gal-Yam 2016) with whole-array FFTs.

    Residual cards written to the header (a copy of the science header): ``ZOGYBETA``
    (science / template flux ratio), ``ZOGYNSTR`` (stars that measured it, 0 when given
    or defaulted), ``ZOGYFD`` (F_D, with F_R = 1), ``ZOGYSIGN``/``ZOGYSIGR`` (sky noise of
    each frame, ADU), ``ZOGYFWHM`` (FWHM of P_D, px), ``ZOGYNN`` (robust std of the
    normalised residual away from sources), ``ZOGYSSD`` (robust std of S_corr there),
    ``ZOGYDX``/``ZOGYDY`` (template shift applied, px) and ``ZOGYAST`` (registration
    noise in the S_corr variance, px).
    """

    name = "zogy"
    auto_priority = 10
    needs_psf = True  # subtract-pair measures both PSFs first
    Options = ZogyOptions
    description = "ZOGY proper image subtraction (Zackay+ 2016) with S_corr, numpy/scipy FFTs"

    def check(self, options: ZogyOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when sep is missing."""
        from oasis_native.mask import _require

        _require("subtract", "sep")

    def subtract(
        self, science: Frame, template: Template, *, options: ZogyOptions, workdir: Path
    ) -> Residual:
        """Return the proper difference scaled to the science frame's ADU, with S_corr.

        Parameters
        ----------
        science, template : Frame
            Aligned frames of the same shape. Used: ``data``, ``weight``, ``psf`` (else a
            Moffat of ``fwhm``, else a PSF measured by the native psf backend),
            ``background``, ``noise``, ``gain``, ``saturation``, ``name``, ``header``.
        options : ZogyOptions
        workdir : Path
            Scratch space of the PSF measurement fallback.

        Returns
        -------
        Residual
            ``data`` = D x beta / F_D (science ADU, see the module docstring), ``noise``
            its 1-sigma, ``weight``, ``extra["score"]`` = S_corr (float32, sigmas), Q,
            ``meta`` (``flux_ratio``, ``ratio_stars``, ``ratio_source``, ``fd``,
            ``fwhm`` of P_D, ``sigma_science``, ``sigma_template``, ``nnoise``,
            ``score_std``...), ``params`` (the options) and ``psf``: P_D, the PSF of the
            transients in ``data`` (between the science and the template PSF; the core
            replaces it by the science frame's model where it needs that one).

        Raises
        ------
        StageError
            Frames of different shapes, without usable pixels, sky noise or PSF.
        """
        from oasis_core.engine.quality import normalized_noise, q_value

        if science.shape != template.shape:
            raise StageError(
                f"subtract backend 'zogy': template {template.name!r} has shape "
                f"{template.shape}, science {science.name!r} has {science.shape}; align them"
            )
        sci = _prepare(science, options, "science", workdir)
        ref = _prepare(template, options, "template", workdir)
        sci, ref = _psf_from_other(sci, ref, options)
        match: dict[str, float | int | str] = {"psf_match": "off"}
        sol = None
        if options.psf_match == "always" or (
            options.psf_match == "auto" and (_uncertain(sci) or _uncertain(ref))
        ):
            sci_m, ref_m, match = _match_psfs(sci, ref)
            if sci_m is not sci:  # matched: kept only when the whole difference agrees
                sol, sol_m = _solve(sci, ref, options), _solve(sci_m, ref_m, options)
                q_own = q_value(sol["data"], sol["noise"], sol["weight"])
                q_m = q_value(sol_m["data"], sol_m["noise"], sol_m["weight"])
                match.update(psf_match_q=float(q_m), psf_match_q_own=float(q_own))
                if _better_q(q_m, q_own):
                    sci, ref, sol = sci_m, ref_m, sol_m
                else:
                    match["psf_match"] = "kept: their own PSFs give the better Q"
                del sol_m
        if sol is None:
            sol = _solve(sci, ref, options)

        q = q_value(sol["data"], sol["noise"], sol["weight"])
        usable = (sol["weight"] > 0) & ~sol["sources"]
        nnoise = normalized_noise(sol["data"], sol["noise"], sol["weight"], exclude=sol["sources"])
        score = sol["score"]
        if usable.sum() >= 100:
            s = score[usable]
            score_std = float(1.4826 * np.median(np.abs(s - np.median(s))))
        else:
            score_std = float("nan")
        meta: dict[str, float | int | str] = {
            "flux_ratio": sol["beta"],
            "ratio_stars": sol["nstars"],
            "ratio_source": sol["ratio_source"],
            "fd": sol["fd"],
            "fwhm": sol["fwhm"],
            "shift_x": sol["shift_x"],
            "shift_y": sol["shift_y"],
            "shift_stars": sol["shift_stars"],
            "astrometric_sigma": sol["astrometric_sigma"],
            "fwhm_science": sci.fwhm,
            "fwhm_template": ref.fwhm,
            "sigma_science": sci.sigma,
            "sigma_template": ref.sigma,
            "nnoise": float(nnoise),
            "score_std": score_std,
            "q": float(q),
            "psf_source_science": sci.psf_source,
            "psf_source_template": ref.psf_source,
            "choice_psf": f"science {sci.psf_source}; template {ref.psf_source}",
            **match,
        }
        pair = (("science", sci), ("template", ref))
        fallback = [f"{w} PSF: {i.psf_fallback}" for w, i in pair if i.psf_fallback]
        if fallback:
            meta["fallback"] = "; ".join(fallback)
        header = _header_copy(science.header)
        cards: list[tuple[str, Any, str]] = [
            ("ZOGYBETA", sol["beta"], "ZOGY science / template flux ratio F_N/F_R"),
            ("ZOGYNSTR", sol["nstars"], "ZOGY stars that measured the flux ratio"),
            ("ZOGYFD", sol["fd"], "ZOGY flux normalisation F_D of D (F_R = 1)"),
            ("ZOGYSIGN", sci.sigma, "ZOGY science sky noise [ADU]"),
            ("ZOGYSIGR", ref.sigma, "ZOGY template sky noise [ADU]"),
            ("ZOGYFWHM", sol["fwhm"], "ZOGY FWHM of the difference PSF P_D [pix]"),
            ("ZOGYDX", sol["shift_x"], "ZOGY template shift applied along x [pix]"),
            ("ZOGYDY", sol["shift_y"], "ZOGY template shift applied along y [pix]"),
            ("ZOGYAST", sol["astrometric_sigma"], "ZOGY registration noise in S_corr [pix]"),
            ("ZOGYPSFS", sci.psf_source, "ZOGY science PSF source"),
            ("ZOGYPSFT", ref.psf_source, "ZOGY template PSF source"),
            ("ZOGYPMAT", str(match["psf_match"]), "ZOGY PSF pair matched on template stars"),
            ("ZOGYNN", nnoise, "robust std of the normalised residual"),
            ("ZOGYSSD", score_std, "robust std of S_corr away from sources"),
        ]
        for key, value, comment in cards:
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # FITS has no NaN: an undefined value says "not computed"
            if isinstance(value, str):  # value and comment in one 80-character card
                comment = comment[: max(0, 65 - len(value.replace("'", "''")))]
            header[key] = (value, comment)
        return Residual(
            data=sol["data"],
            noise=sol["noise"],
            weight=sol["weight"],
            header=header,
            name=science.name,
            science=science.name,
            template=template.name,
            q=float(q),
            params=attrs.asdict(options),
            extra={"score": score},
            meta=meta,
            psf=PsfModel(
                image=sol["psf_d"],
                fwhm=sol["fwhm"],
                model="zogy",
                params={"psf_source": "P_D, the PSF of the proper difference"},
            ),
        )


# --------------------------------------------------------------------------- inputs


def _header_copy(header: Any) -> Any:
    from astropy.io import fits

    if isinstance(header, fits.Header):
        return header.copy()
    out = fits.Header()
    out.update(dict(header or {}))
    return out


def _prepare(frame: Frame, options: ZogyOptions, what: str, workdir: Path) -> _Input:
    """Sky-subtracted copy of ``frame`` with its mask, noise, gain and PSF stamp."""
    import sep

    from oasis_core.engine.stats import sky_noise

    where = f"subtract backend 'zogy': {what} {frame.name!r}"
    data = np.array(frame.data, dtype=np.float32, order="C")  # private, native order
    weight = np.asarray(frame.weight, dtype=np.float32)
    finite = np.isfinite(data)
    bad = ~finite | ~(weight > 0)
    sat = options.saturation if options.saturation > 0 else frame.saturation
    if sat is not None and math.isfinite(sat):
        bad |= finite & (data >= np.float32(sat))
    if bad.all():
        raise StageError(f"{where}: every pixel is masked (weight 0 or saturated)")
    ny, nx = data.shape
    known = frame.background is not None and math.isfinite(frame.background)
    data[bad] = np.float32(frame.background if known else np.median(data[~bad]))
    size = int(max(8, min(options.back_size, ny, nx)))
    try:
        bkg = sep.Background(data, mask=bad, bw=size, bh=size, fw=3, fh=3)
    except Exception as err:  # sep raises bare Exceptions
        raise StageError(f"{where}: sep background failed ({err})") from err
    measured_noise = sky_noise(frame.data, ~bad)
    if not (math.isfinite(measured_noise) and measured_noise > 0):
        measured_noise = float(bkg.globalrms)
    if frame.noise is not None and math.isfinite(frame.noise) and frame.noise > 0:
        # Frame.noise may predate a resampling (align), which lowers the per-pixel noise;
        # a measurement can be inflated by starlight in crowded fields: take the smaller
        sigma = float(frame.noise)
        if math.isfinite(measured_noise) and measured_noise > 0:
            sigma = min(sigma, measured_noise)
    else:
        sigma = float(measured_noise)
    if not (math.isfinite(sigma) and sigma > 0):
        raise StageError(f"{where}: no measurable sky noise (blank or constant frame?)")
    sky = float(frame.background) if known else float(bkg.globalback)  # type: ignore[arg-type]
    if options.background == "map":
        data -= bkg.back()
    else:
        data -= np.float32(sky)
    data[bad] = 0.0
    if frame.gain is not None and frame.gain > 0:
        gain = float(frame.gain)
    elif sky > 3.0 * sigma:  # the sky's own photon statistics (a lower bound of the gain)
        gain = sky / sigma**2
    else:  # sky-subtracted, no gain: sky noise only
        gain = math.inf
    psf, fwhm, source, fallback, nstars = _psf_stamp(frame, options, where, workdir)
    return _Input(
        name=frame.name,
        data=data,
        bad=bad,
        weight=weight,
        psf=psf,
        sky=sky,
        sigma=sigma,
        gain=gain,
        fwhm=fwhm,
        psf_source=source,
        psf_fallback=fallback,
        psf_stars=nstars,
    )


def _psf_stamp(
    frame: Frame, options: ZogyOptions, where: str, workdir: Path
) -> tuple[np.ndarray, float, str, str, int]:
    """The frame's PSF stamp (odd, unit sum), FWHM, source, fallback sentence and stars.

    In turn: its model (the psf backend's ``psf_source`` and ``psf_flag`` are carried:
    a PSF from fewer stars than wanted, from moments or from the autocorrelation is a
    fallback), else a Moffat of its FWHM, else one measured here by the native psf
    backend (whatever stars there are, even one). When even that fails the stamp is
    empty (size 0) and the FWHM NaN: :func:`_psf_from_other` fills it in.
    """
    from oasis_native.psf import NativePsf, NativePsfOptions

    failure = ""
    if frame.psf is None and not (frame.fwhm and math.isfinite(frame.fwhm) and frame.fwhm > 0):
        try:
            frame = NativePsf().psf(frame, options=NativePsfOptions(), workdir=workdir)
        except StageError as err:  # the reason, without the psf backend's "where"
            failure = re.sub(r"^psf backend '[^']*': frame '[^']*': ", "", str(err))
    if failure:
        return np.zeros((0, 0), np.float32), math.nan, "", failure, 0
    nstars = 0
    if frame.psf is not None:
        image = np.array(frame.psf.image, dtype=np.float64)
        fwhm = float(frame.psf.fwhm or frame.fwhm or 0.0)
        if image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0:
            # an even stamp has no central pixel: drop the last row/column
            image = image[
                : image.shape[0] - (1 - image.shape[0] % 2),
                : image.shape[1] - (1 - image.shape[1] % 2),
            ]
        image = np.where(np.isfinite(image), image, 0.0)
        params = frame.psf.params or {}
        source = str(params.get("psf_source") or frame.psf.model or "given")
        if frame.psf.nstars:
            source += f" ({frame.psf.nstars} star{'s' if frame.psf.nstars != 1 else ''})"
        fallback = str(params.get("psf_flag") or "")
        nstars = int(frame.psf.nstars)
    else:
        fwhm = float(frame.fwhm)  # type: ignore[arg-type]
        image = _moffat_stamp(fwhm, options.psf_beta)
        source, fallback = "fwhm-moffat (frame FWHM)", ""
    total = float(image.sum())
    if not (math.isfinite(total) and total > 0 and image.size > 1):
        raise StageError(f"{where}: its PSF image is empty or not positive; rerun the psf stage")
    if not (math.isfinite(fwhm) and fwhm > 0):
        fwhm = _stamp_fwhm(image)
    return (image / total).astype(np.float32), fwhm, source, fallback, nstars


def _moffat_stamp(fwhm: float, beta: float) -> np.ndarray:
    """A Moffat stamp (peak 1, half size max(7, 4 FWHM)) of ``fwhm`` and ``beta``."""
    from oasis_native.psf import moffat_profile

    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    half = int(max(7, math.ceil(4.0 * fwhm)))
    g = np.arange(-half, half + 1, dtype=np.float64)
    return moffat_profile(g[:, None] ** 2 + g[None, :] ** 2, alpha, beta)


def _psf_from_other(sci: _Input, ref: _Input, options: ZogyOptions) -> tuple[_Input, _Input]:
    """Give a frame with no measurable PSF (no star, no source, no FWHM) a Moffat of the
    other frame's FWHM, recorded as a fallback; neither: a StageError."""
    lost = [i for i in (sci, ref) if not i.psf.size]
    if len(lost) == 2:
        raise StageError(
            f"subtract backend 'zogy': no PSF for science {sci.name!r} ({sci.psf_fallback}) "
            f"nor template {ref.name!r} ({ref.psf_fallback}); give one a FWHM (header FWHM) "
            "or run the psf stage with a lower psf.native.threshold"
        )
    if not lost:
        return sci, ref
    bare, other = (sci, ref) if lost[0] is sci else (ref, sci)
    what = "template" if other is ref else "science"
    image = _moffat_stamp(other.fwhm, options.psf_beta)
    filled = attrs.evolve(
        bare,
        psf=(image / image.sum()).astype(np.float32),
        fwhm=other.fwhm,
        psf_source=f"fwhm-moffat ({what} FWHM)",
        psf_fallback=(
            f"a Moffat of the {what}'s FWHM ({other.fwhm:.2f} px), none measurable on it "
            f"({bare.psf_fallback})"
        ),
    )
    return (filled, ref) if bare is sci else (sci, filled)


def _uncertain(inp: _Input) -> bool:
    """Is this PSF a fallback, a profile of a FWHM alone or from fewer than
    :data:`_SURE_STARS` stars (a model given without a star count is trusted)?"""
    few = 0 < inp.psf_stars < _SURE_STARS
    return few or bool(inp.psf_fallback) or inp.psf_source.startswith("fwhm-")


def _better_q(a: float, b: float) -> bool:
    """Is Q ``a`` better than Q ``b`` (NaN is worst)?"""
    return math.isfinite(a) and (not math.isfinite(b) or a > b)


def _trust(inp: _Input) -> tuple[int, int]:
    """How far a PSF is trusted, for ordering: a measured fit above a fallback above a FWHM
    alone, then by the stars it was measured on."""
    if inp.psf_source.startswith("fwhm-"):
        kind = 0
    elif inp.psf_fallback and not inp.psf_source.startswith("fit"):
        kind = 1
    else:
        kind = 2
    return kind, inp.psf_stars


def _match_psfs(sci: _Input, ref: _Input) -> tuple[_Input, _Input, dict[str, Any]]:
    """The PSF pair that best nulls the template's stars, and what was done.

    ZOGY subtracts a static star exactly when ``N (x) P_r = beta R (x) P_n``; a PSF from a
    few stars, from moments or from a FWHM alone is rarely that consistent with the other
    frame's (crowded cutouts lose half their Q to a 6% width error). On boxes around the
    template's point sources (bright, untruncated, no wider than 1.5 template FWHM), the
    chi-square of ``N (x) P_r - a R (x) P_n`` within 2.5 FWHM (``a`` fitted, noise from
    the sky; a Huber loss beyond 3 sigma, so a transient near a star does not count) is
    minimised over Moffats of a common beta (2-30) and FWHM ratio (within a
    factor 2 of the frames'): the less trusted frame's FWHM moves (see :func:`_trust`; both
    halfway when equal). The common part of the two PSFs does not change that difference,
    so only the ratio and the shape are measured. The Moffats are proposed when they null
    the stars better than the frames' own (the caller keeps them when the whole difference
    image agrees: a better Q); otherwise, or with no such star (one also detected on the
    science frame, not a cosmic ray), the PSFs are kept (the same objects returned).
    """
    import scipy.fft as sfft
    import sep
    from scipy.optimize import minimize
    from scipy.spatial import cKDTree

    from oasis_native.psf import _cosmic, _source_size, moffat_profile

    ny, nx = sci.data.shape
    bad = sci.bad | ref.bad
    found = []
    for inp in (ref, sci):
        image = np.ascontiguousarray(np.where(bad, np.float32(0.0), inp.data), dtype=np.float32)
        try:
            objs = sep.extract(image, 5.0, err=inp.sigma, mask=bad, minarea=5)
        except Exception:  # sep raises bare Exceptions (buffer overflows): keep the PSFs
            return sci, ref, {"psf_match": "kept: star detection failed"}
        found.append(objs[~_cosmic(image, objs)] if len(objs) else objs)
    objs, sci_objs = found
    if len(objs) and len(sci_objs):
        size = 2.3548 * _source_size(objs, 5.0 * ref.sigma)
        # in both frames (not a cosmic ray or a transient), bright, whole, point-like
        dist, _ = cKDTree(np.column_stack([sci_objs["x"], sci_objs["y"]])).query(
            np.column_stack([objs["x"], objs["y"]])
        )
        ok = (
            (dist < 1.5)
            & (objs["peak"] >= 10.0 * ref.sigma)
            & ((objs["flag"] & sep.OBJ_TRUNC) == 0)
            & (size <= 1.5 * ref.fwhm)
        )
        objs = objs[ok]
        objs = objs[np.argsort(-objs["peak"], kind="stable")[:_MATCH_STARS]]
    else:
        objs = objs[:0]
    if not len(objs):
        return sci, ref, {"psf_match": "kept: no star in both frames to match on"}
    fwhm_max = max(sci.fwhm, ref.fwhm)
    radius = 2.5 * fwhm_max  # the wings too: they set the shape (beta)
    hp = math.ceil(3.0 * 2.0 * fwhm_max)  # PSF half size: room for the widest trial
    box = math.ceil(radius) + hp
    side = 2 * box + 1
    shape = (sfft.next_fast_len(side + 2 * hp + 1, real=True),) * 2
    # boxes around the stars (zero outside the frame), the pixels within radius scored
    g = np.arange(-box, box + 1)
    cy = np.rint(objs["y"]).astype(np.int64)[:, None, None] + g[None, :, None]
    cx = np.rint(objs["x"]).astype(np.int64)[:, None, None] + g[None, None, :]
    inside = (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)
    cyc, cxc = np.clip(cy, 0, ny - 1), np.clip(cx, 0, nx - 1)
    lost = _grow(bad, 0.5 * fwhm_max)
    n_box = np.where(inside & ~bad[cyc, cxc], sci.data[cyc, cxc], 0.0)
    r_box = np.where(inside & ~bad[cyc, cxc], ref.data[cyc, cxc], 0.0)
    dy = cy - objs["y"][:, None, None]
    dx = cx - objs["x"][:, None, None]
    score = inside & ~lost[cyc, cxc] & (dx**2 + dy**2 <= radius * radius)
    if score.sum() < 10:
        return sci, ref, {"psf_match": "kept: the template stars are masked"}
    n_hat = sfft.rfft2(n_box, s=shape, axes=(1, 2))
    r_hat = sfft.rfft2(r_box, s=shape, axes=(1, 2))

    def chi2_of(pn: np.ndarray, pr: np.ndarray) -> float:
        pn_hat = sfft.rfft2(_embed(pn, shape), s=shape)
        pr_hat = sfft.rfft2(_embed(pr, shape), s=shape)
        # linear convolutions (the padding keeps the wrap-around out of the boxes)
        a = sfft.irfft2(n_hat * pr_hat, s=shape, axes=(1, 2))[:, :side, :side][score]
        b = sfft.irfft2(r_hat * pn_hat, s=shape, axes=(1, 2))[:, :side, :side][score]
        vn, vr = sci.sigma**2 * float(np.sum(pr**2)), ref.sigma**2 * float(np.sum(pn**2))
        # Huber loss (and weights for the flux scale, by iteration): a transient or a
        # variable near a star must not steer the fit
        w = np.ones_like(a)
        amp = 1.0
        for _ in range(3):
            bb = float(np.dot(w * b, b))
            amp = float(np.dot(w * a, b)) / bb if bb > 0 else 1.0
            z = np.abs(a - amp * b) / math.sqrt(max(vn + amp * amp * vr, 1e-30))
            w = np.where(z > _HUBER, _HUBER / np.maximum(z, 1e-30), 1.0)
        return float(np.sum(np.where(z > _HUBER, 2.0 * _HUBER * z - _HUBER**2, z * z)))

    gh = np.arange(-hp, hp + 1, dtype=np.float64)
    rr = gh[:, None] ** 2 + gh[None, :] ** 2

    def moffat(fwhm: float, beta: float) -> np.ndarray:
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        img = moffat_profile(rr, alpha, beta)
        return img / img.sum()

    # the ratio moves the less trusted frame's FWHM (both halfway when equally trusted)
    rank_n, rank_r = _trust(sci), _trust(ref)
    w_n = 0.5 if rank_n == rank_r else float(rank_n < rank_r)

    def pair(p: np.ndarray) -> tuple[float, float, float]:
        k, beta = math.exp(float(p[0])), math.exp(float(p[1]))
        return sci.fwhm * k**w_n, ref.fwhm / k ** (1.0 - w_n), beta

    def cost(p: np.ndarray) -> float:
        fn, fr, beta = pair(p)
        return chi2_of(moffat(fn, beta), moffat(fr, beta))

    lo, hi = np.array([-math.log(2.0), math.log(2.0)]), np.array([math.log(2.0), math.log(30.0)])
    grid = [
        (cost(np.array([lk, lb])), lk, lb)
        for lb in np.log([2.2, 3.0, 5.0, 10.0, 25.0])
        for lk in np.linspace(lo[0], hi[0], 9)
    ]
    _, lk0, lb0 = min(grid)
    best = minimize(
        cost,
        np.array([lk0, lb0]),
        method="Nelder-Mead",
        bounds=list(zip(lo, hi, strict=True)),
        options={"maxfev": 40, "xatol": 0.005, "fatol": 1e-3},
    )
    fn, fr, beta = pair(best.x)
    own = chi2_of(_crop_psf(sci.psf, hp), _crop_psf(ref.psf, hp))
    info: dict[str, Any] = {
        "psf_match_stars": len(objs),
        "psf_match_chi2": float(best.fun),
        "psf_match_chi2_own": own,
    }
    if not float(best.fun) < own:
        return sci, ref, {"psf_match": "kept: their own PSFs null the stars best", **info}
    info.update(
        psf_match=f"Moffats matched on {len(objs)} template star{'s' if len(objs) != 1 else ''}",
        psf_beta_matched=beta,
        psf_width_ratio=(fn / fr) / (sci.fwhm / ref.fwhm),
    )
    out = []
    for inp, fwhm in ((sci, fn), (ref, fr)):
        image = _moffat_stamp(fwhm, beta)
        out.append(
            attrs.evolve(
                inp,
                psf=(image / image.sum()).astype(np.float32),
                fwhm=fwhm,
                psf_source=f"{inp.psf_source}, matched",
            )
        )
    return out[0], out[1], info


def _crop_psf(psf: np.ndarray, half: int) -> np.ndarray:
    """``psf`` as a (2 half + 1)**2 unit-sum stamp (cropped or zero-padded, centred)."""
    hy, hx = psf.shape[0] // 2, psf.shape[1] // 2
    cy, cx = min(hy, half), min(hx, half)
    out = np.zeros((2 * half + 1, 2 * half + 1))
    out[half - cy : half + cy + 1, half - cx : half + cx + 1] = psf[
        hy - cy : hy + cy + 1, hx - cx : hx + cx + 1
    ]
    return out / out.sum()


def _stamp_fwhm(stamp: np.ndarray) -> float:
    """FWHM (px) of a PSF stamp from the area above half maximum, on a 5x finer grid."""
    from scipy import ndimage

    fine = ndimage.zoom(np.asarray(stamp, np.float64), 5, order=3)
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / 25.0
    return float(2.0 * math.sqrt(area / math.pi))


# --------------------------------------------------------------------------- numerics


def _embed(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``stamp`` on a zero array of ``shape`` with its central pixel at (0, 0) (wrapped)."""
    hy, hx = stamp.shape[0] // 2, stamp.shape[1] // 2
    hy_max, hx_max = (shape[0] - 1) // 2, (shape[1] - 1) // 2
    if hy > hy_max or hx > hx_max:  # a stamp larger than the FFT: keep its centre
        cy, cx = min(hy, hy_max), min(hx, hx_max)
        stamp = stamp[hy - cy : hy + cy + 1, hx - cx : hx + cx + 1]
        stamp = stamp / stamp.sum()
        hy, hx = cy, cx
    out = np.zeros(shape, dtype=np.float32)
    ys = np.arange(-hy, hy + 1) % shape[0]
    xs = np.arange(-hx, hx + 1) % shape[1]
    out[np.ix_(ys, xs)] = stamp
    return out


def _centre_stamp(image: np.ndarray, half: int) -> np.ndarray:
    """The (2 half + 1)**2 stamp of an origin-centred (wrapped) full-size ``image``."""
    ys = np.arange(-half, half + 1) % image.shape[0]
    xs = np.arange(-half, half + 1) % image.shape[1]
    return np.asarray(image[np.ix_(ys, xs)], dtype=np.float64)


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` grown by a disk of ``radius`` px (FFT-free: a few binary dilations)."""
    from scipy import ndimage

    r = math.ceil(radius)
    if r <= 0 or not mask.any():
        return mask.copy()
    g = np.arange(-r, r + 1)
    disk = g[:, None] ** 2 + g[None, :] ** 2 <= radius * radius
    return ndimage.binary_dilation(mask, structure=disk)


def _solve(sci: _Input, ref: _Input, options: ZogyOptions) -> dict[str, Any]:
    """The ZOGY images and numbers for one prepared pair (see the module docstring)."""
    import scipy.fft as sfft

    workers = options.workers if options.workers > 0 else -1
    ny, nx = sci.data.shape
    pad = 2 * (max(sci.psf.shape) // 2 + max(ref.psf.shape) // 2) + 2
    shape = (
        sfft.next_fast_len(ny + pad, real=True),
        sfft.next_fast_len(nx + pad, real=True),
    )

    def fwd(image: np.ndarray) -> np.ndarray:
        return sfft.rfft2(image, s=shape, workers=workers)

    def inv(spectrum: np.ndarray, *, crop: bool = True) -> np.ndarray:
        out = sfft.irfft2(spectrum, s=shape, workers=workers)
        return out[:ny, :nx] if crop else out

    # a pixel masked in either frame is set to the sky in both (zero-padded: sky too), so
    # a star under a mask leaves only its edges, not a whole PSF, in D
    bad = sci.bad | ref.bad
    n_hat = fwd(np.where(bad, np.float32(0.0), sci.data))
    r_hat = fwd(np.where(bad, np.float32(0.0), ref.data))
    pn = fwd(_embed(sci.psf, shape))
    pr = fwd(_embed(ref.psf, shape))

    # cross-convolved images (same PSF P_n P_r): the flux ratio and a source mask
    n_cross = inv(n_hat * pr)
    r_cross = inv(r_hat * pn)
    sig_nc = sci.sigma * float(np.sqrt(np.sum(ref.psf.astype(np.float64) ** 2)))
    sig_rc = ref.sigma * float(np.sqrt(np.sum(sci.psf.astype(np.float64) ** 2)))
    fwhm_max = max(sci.fwhm, ref.fwhm)
    fwhm_cross = math.hypot(sci.fwhm, ref.fwhm)
    stars = None
    if options.flux_ratio <= 0 or options.fit_shift or options.astrometric_sigma < 0:
        stars = _stars(n_cross, r_cross, bad, sci, ref, fwhm_cross, options)
    if options.flux_ratio > 0:
        beta, nstars, source = float(options.flux_ratio), 0, "option"
    else:
        assert stars is not None
        beta, nstars = _flux_ratio(stars, options.ratio_min_stars)
        source = "stars" if nstars else "default"
    shift_x, shift_y, nshift, scatter = 0.0, 0.0, 0, 0.0
    if stars is not None:
        shift_x, shift_y, nshift, scatter = _shift(stars, fwhm_cross, options.ratio_min_stars)
        if not options.fit_shift:
            shift_x, shift_y = 0.0, 0.0
    ast_sigma = options.astrometric_sigma if options.astrometric_sigma >= 0 else scatter
    ramp = None
    if shift_x or shift_y:  # move the template's content by (dx, dy): R(x - d)
        fy = sfft.fftfreq(shape[0])[:, None]
        fx = sfft.rfftfreq(shape[1])[None, :]
        ramp = np.exp(-2j * np.pi * (fx * shift_x + fy * shift_y)).astype(np.complex64)
        r_hat = r_hat * ramp
    sources = (n_cross > 3.0 * sig_nc) | (r_cross > 3.0 * sig_rc)
    sources = _grow(sources, fwhm_max)
    del n_cross, r_cross

    an2 = (pn.real**2 + pn.imag**2).astype(np.float32)
    ar2 = (pr.real**2 + pr.imag**2).astype(np.float32)
    sn2, sr2 = np.float32(sci.sigma**2), np.float32(beta**2 * ref.sigma**2)
    den2 = sn2 * ar2 + sr2 * an2
    den2 = np.maximum(den2, np.float32(1e-30) * (sn2 + sr2))
    den = np.sqrt(den2)
    b32 = np.float32(beta)
    fd = beta / math.sqrt(sci.sigma**2 + beta**2 * ref.sigma**2)
    scale = beta / fd  # D -> science ADU

    # proper difference and its PSF
    d_hat = (pr * n_hat - b32 * pn * r_hat) / den
    data = inv(d_hat).astype(np.float32) * np.float32(scale)
    del d_hat
    pd_hat = (b32 / np.float32(fd)) * pr * pn / den
    half = max(sci.psf.shape[0], ref.psf.shape[0]) // 2
    pd = _centre_stamp(inv(pd_hat, crop=False), half)
    del pd_hat
    fwhm_d = sci.fwhm * _stamp_fwhm(pd) / _stamp_fwhm(sci.psf)

    # score S = k_n N - k_r R, its variance and S_corr
    kn_hat = b32 * np.conj(pn) * ar2 / den2
    kr_hat = (b32 * b32) * np.conj(pr) * an2 / den2
    s_hat = kn_hat * n_hat - kr_hat * r_hat
    score = inv(s_hat).astype(np.float32)
    del s_hat
    kn2 = inv(kn_hat, crop=False)
    kn2 *= kn2  # k_n**2, in place
    kr2 = inv(kr_hat, crop=False)
    kr2 *= kr2
    var_s = np.float32(sci.sigma**2 * float(kn2.sum()) + ref.sigma**2 * float(kr2.sum()))
    var_d: np.ndarray | np.float32 = np.float32(1.0)
    if options.source_noise and (math.isfinite(sci.gain) or math.isfinite(ref.gain)):
        vn = _source_variance(sci, bad)
        vr = _source_variance(ref, bad)
        vn_hat, vr_hat = fwd(vn), fwd(vr)
        if ramp is not None:
            vr_hat *= ramp
        del vn, vr
        acc = vn_hat * fwd(kn2)
        del kn2
        acc += vr_hat * fwd(kr2)
        del kr2
        var_s = var_s + inv(acc)
        kd2 = inv(pr / den, crop=False)
        kd2 *= kd2
        acc = vn_hat * fwd(kd2)
        kd2 = inv(b32 * pn / den, crop=False)
        kd2 *= kd2
        acc += vr_hat * fwd(kd2)
        var_d = var_d + inv(acc)
        del kd2, acc, vn_hat, vr_hat
    else:
        del kn2, kr2
    if ast_sigma > 0:
        fy = sfft.fftfreq(shape[0]).astype(np.float32)[:, None]
        fx = sfft.rfftfreq(shape[1]).astype(np.float32)[None, :]
        sn_hat, sr_hat = kn_hat * n_hat, kr_hat * r_hat
        grad2 = np.zeros((ny, nx), dtype=np.float32)
        for spec in (sn_hat, sr_hat):
            for freq in (fx, fy):
                g = inv(spec * (np.complex64(2j * np.pi) * freq))
                grad2 += g * g
        var_s = var_s + np.float32(ast_sigma**2) * grad2
        del sn_hat, sr_hat, grad2
    del kn_hat, kr_hat, n_hat, r_hat, pn, pr, an2, ar2, den, den2, ramp
    var_s = np.maximum(var_s, np.float32(1e-30))
    score = (score / np.sqrt(var_s)).astype(np.float32)
    noise = (np.float32(scale) * np.sqrt(np.maximum(var_d, np.float32(1.0)))).astype(np.float32)
    noise = np.broadcast_to(noise, (ny, nx)).astype(np.float32)

    # weight: the smaller input weight, 0 near masked pixels and the edges
    weight = np.clip(np.minimum(sci.weight, ref.weight), 0.0, 1.0).astype(np.float32)
    grow = options.mask_grow * fwhm_max
    edge = math.ceil(grow)
    lost = _grow(bad, grow)
    if edge > 0:
        lost[:edge], lost[-edge:], lost[:, :edge], lost[:, -edge:] = True, True, True, True
    weight[lost] = 0.0
    return {
        "data": data,
        "noise": noise,
        "weight": weight,
        "score": score,
        "sources": sources,
        "beta": beta,
        "nstars": nstars,
        "ratio_source": source,
        "fd": fd,
        "fwhm": float(fwhm_d),
        "psf_d": (np.clip(pd, 0.0, None) / max(float(np.clip(pd, 0.0, None).sum()), 1e-30)).astype(
            np.float32
        ),
        "shift_x": float(shift_x),
        "shift_y": float(shift_y),
        "shift_stars": nshift,
        "astrometric_sigma": float(ast_sigma),
    }


def _source_variance(im: _Input, bad: np.ndarray) -> np.ndarray:
    """Poisson variance of the sources above the sky (ADU**2), 0 on ``bad`` pixels."""
    if not math.isfinite(im.gain):
        return np.zeros(im.data.shape, dtype=np.float32)
    var = np.maximum(im.data, np.float32(0.0)) / np.float32(im.gain)
    var[bad] = 0.0
    return var


@attrs.frozen(kw_only=True)
class _Stars:
    """Aperture photometry and centroids of the stars common to both frames (internal)."""

    f_n: np.ndarray = attrs.field(eq=False, repr=False)
    f_r: np.ndarray = attrs.field(eq=False, repr=False)
    var_n: np.ndarray = attrs.field(eq=False, repr=False)
    var_r: np.ndarray = attrs.field(eq=False, repr=False)
    dx: np.ndarray = attrs.field(eq=False, repr=False)  # science - template centroid, px
    dy: np.ndarray = attrs.field(eq=False, repr=False)


def _stars(
    n_cross: np.ndarray,
    r_cross: np.ndarray,
    bad: np.ndarray,
    sci: _Input,
    ref: _Input,
    fwhm: float,
    options: ZogyOptions,
) -> _Stars:
    """The unmasked stars above ``ratio_snr`` in both cross-convolved images.

    ``N (x) P_r`` and ``R (x) P_n`` have the same PSF, so aperture sums (1.5 ``fwhm``,
    local background annulus) and windowed centroids compare without PSF corrections.
    """
    import sep

    nc = np.ascontiguousarray(n_cross, dtype=np.float32)
    rc = np.ascontiguousarray(r_cross, dtype=np.float32)
    reach = _grow(bad, fwhm)  # the convolution spreads masked pixels by ~ the PSFs
    nc[reach], rc[reach] = 0.0, 0.0
    sig_rc = ref.sigma * float(np.sqrt(np.sum(sci.psf.astype(np.float64) ** 2)))
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), min(nc.size, 3_000_000)))
    try:
        # the cross-convolved images are matched-filtered: their peak S/N is about the
        # aperture S/N, so stars below half of ratio_snr are not worth finding
        thresh = max(5.0, 0.5 * options.ratio_snr)
        objs = sep.extract(rc, thresh, err=sig_rc, mask=reach, minarea=5)
    except Exception as err:  # sep raises bare Exceptions on buffer overflows
        raise StageError(
            f"subtract backend 'zogy': template {ref.name!r}: star detection for the flux "
            f"ratio failed ({err}); set subtract.zogy.flux_ratio and fit_shift = false"
        ) from err
    objs = objs[np.argsort(-objs["flux"], kind="stable")[:_MAX_STARS]]
    x, y = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
    radius = 1.5 * fwhm
    ann = (2.5 * fwhm, 4.0 * fwhm)
    f_n, _, flag_n = sep.sum_circle(nc, x, y, radius, mask=reach, bkgann=ann)
    f_r, _, flag_r = sep.sum_circle(rc, x, y, radius, mask=reach, bkgann=ann)
    # aperture variance: the sky noise over the aperture (convolving with a unit-sum PSF
    # keeps the noise of a sum over an area much larger than the PSF) plus Poisson
    area = math.pi * radius * radius
    var_n = sci.sigma**2 * area + np.maximum(f_n, 0.0) / sci.gain
    var_r = ref.sigma**2 * area + np.maximum(f_r, 0.0) / ref.gain
    sig = fwhm / 2.3548
    xn, yn, wn = sep.winpos(nc, x, y, sig, mask=reach)
    xr, yr, wr = sep.winpos(rc, x, y, sig, mask=reach)
    ok = (((flag_n | flag_r) & (sep.APER_HASMASKED | sep.APER_TRUNC)) == 0) & (
        (f_n > options.ratio_snr * np.sqrt(var_n)) & (f_r > options.ratio_snr * np.sqrt(var_r))
    )
    ok &= (wn == 0) & (wr == 0) & (np.hypot(xn - xr, yn - yr) < 1.0)
    return _Stars(
        f_n=f_n[ok],
        f_r=f_r[ok],
        var_n=var_n[ok],
        var_r=var_r[ok],
        dx=(xn - xr)[ok],
        dy=(yn - yr)[ok],
    )


def _clipped_mean(values: np.ndarray, errors: np.ndarray, min_n: int) -> tuple[float, int]:
    """Inverse-variance weighted mean with iterative clipping at 3 x max(1, the robust
    spread of the normalised deviations); (mean, values kept)."""
    keep = np.ones(len(values), dtype=bool)
    mean = float(np.median(values))
    for _ in range(10):
        z = (values - mean) / errors
        spread = max(1.0, 1.4826 * float(np.median(np.abs(z[keep] - np.median(z[keep])))))
        new = np.abs(z) < 3.0 * spread
        if new.sum() < min_n:
            break
        w = 1.0 / errors[new] ** 2
        mean = float(np.sum(w * values[new]) / np.sum(w))
        if np.array_equal(new, keep):
            break
        keep = new
    return mean, int(keep.sum())


def _flux_ratio(stars: _Stars, min_n: int) -> tuple[float, int]:
    """(beta, stars used), or (1.0, 0) when fewer than ``min_n`` stars are usable."""
    if len(stars.f_n) < max(min_n, 1):
        return 1.0, 0
    ratio = stars.f_n / stars.f_r
    err = ratio * np.sqrt(stars.var_n / stars.f_n**2 + stars.var_r / stars.f_r**2)
    return _clipped_mean(ratio, err, max(min_n, 1))


def _shift(stars: _Stars, fwhm: float, min_n: int) -> tuple[float, float, int, float]:
    """(dx, dy, stars used, registration noise) from the science - template offsets.

    Each star's offset has its centroid error (~ sigma_PSF / S/N) plus the registration
    noise ``s`` per axis. Iterated: the weighted mean offset, ``s`` by maximum likelihood
    (so the bright stars, whose centroids are exact, decide it), and the rejection of
    stars whose offset is beyond 4 sigma (chi-square with 2 degrees of freedom above 16).
    The offset is (0, 0) when not significant (3 sigma); everything is 0 below
    ``min_n`` stars.
    """
    from scipy.optimize import minimize_scalar

    min_n = max(min_n, 2)
    if len(stars.f_n) < min_n:
        return 0.0, 0.0, 0, 0.0
    # centroid error of one image ~ sigma_PSF / S/N; the two images' errors add
    snr2 = 1.0 / (stars.var_n / stars.f_n**2 + stars.var_r / stars.f_r**2)
    e2 = ((fwhm / 2.3548) ** 2 / snr2).astype(np.float64)
    ox, oy = stars.dx.astype(np.float64), stars.dy.astype(np.float64)
    keep = np.ones(len(ox), dtype=bool)
    s2, mx, my = 0.0, 0.0, 0.0
    for _ in range(10):
        w = 1.0 / (e2[keep] + s2)
        mx = float(np.sum(w * ox[keep]) / np.sum(w))
        my = float(np.sum(w * oy[keep]) / np.sum(w))
        r2 = (ox[keep] - mx) ** 2 + (oy[keep] - my) ** 2  # two axes, same variance
        ek = e2[keep]

        def nll(log_s: float, r2: np.ndarray = r2, ek: np.ndarray = ek) -> float:
            v = ek + math.exp(2.0 * log_s)
            return float(np.sum(r2 / v + 2.0 * np.log(v)))

        hi = math.log(math.sqrt(float(np.max(r2))) + 1e-6)
        best = minimize_scalar(nll, bounds=(math.log(1e-4), hi), method="bounded")
        s2 = math.exp(2.0 * float(best.x))
        if nll(math.log(1e-4)) - float(best.fun) < 2.0:
            s2 = 0.0  # no evidence of scatter beyond the centroid errors
        new = ((ox - mx) ** 2 + (oy - my) ** 2) / (e2 + s2) < 16.0
        if new.sum() < min_n or np.array_equal(new, keep):
            break
        keep = new
    error = float(1.0 / np.sqrt(np.sum(1.0 / (e2[keep] + s2))))  # of the mean, per axis
    if math.hypot(mx, my) < 3.0 * error:
        mx, my = 0.0, 0.0
    return mx, my, int(keep.sum()), math.sqrt(s2)
