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
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.backends import SubtractBackend, option
from oasis_core.errors import StageError
from oasis_core.model import Frame, Residual, Template
from oasis_core.validators import finite, in_range, non_negative

__all__ = ["NativeZogy", "ZogyOptions"]

_BACKGROUNDS = ("constant", "map")
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
        """Raise :class:`~oasis_core.errors.BackendUnavailable` when sep is missing."""
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
            ``score_std``...) and ``params`` (the options).

        Raises
        ------
        StageError
            Frames of different shapes, without usable pixels, sky noise or PSF.
        """
        from oasis_core.quality import normalized_noise, q_value

        if science.shape != template.shape:
            raise StageError(
                f"subtract backend 'zogy': template {template.name!r} has shape "
                f"{template.shape}, science {science.name!r} has {science.shape}; align them"
            )
        sci = _prepare(science, options, "science", workdir)
        ref = _prepare(template, options, "template", workdir)
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
        }
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
            ("ZOGYNN", nnoise, "robust std of the normalised residual"),
            ("ZOGYSSD", score_std, "robust std of S_corr away from sources"),
        ]
        for key, value, comment in cards:
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # FITS has no NaN: an undefined value says "not computed"
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

    from oasis_core.stats import sky_noise

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
    psf, fwhm = _psf_stamp(frame, options, where, workdir)
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
    )


def _psf_stamp(
    frame: Frame, options: ZogyOptions, where: str, workdir: Path
) -> tuple[np.ndarray, float]:
    """The frame's PSF stamp (odd, unit sum) and FWHM: its model, else a Moffat of its
    FWHM, else measured by the native psf backend."""
    from oasis_native.psf import NativePsf, NativePsfOptions, moffat_profile

    if frame.psf is None and not (frame.fwhm and math.isfinite(frame.fwhm) and frame.fwhm > 0):
        try:
            frame = NativePsf().psf(frame, options=NativePsfOptions(), workdir=workdir)
        except StageError as err:
            raise StageError(
                f"{where}: no PSF given and none could be measured ({err}); run the psf stage"
            ) from err
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
    else:
        fwhm = float(frame.fwhm)  # type: ignore[arg-type]
        beta = options.psf_beta
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        half = int(max(7, math.ceil(4.0 * fwhm)))
        g = np.arange(-half, half + 1, dtype=np.float64)
        image = moffat_profile(g[:, None] ** 2 + g[None, :] ** 2, alpha, beta)
    total = float(image.sum())
    if not (math.isfinite(total) and total > 0 and image.size > 1):
        raise StageError(f"{where}: its PSF image is empty or not positive; rerun the psf stage")
    if not (math.isfinite(fwhm) and fwhm > 0):
        fwhm = _stamp_fwhm(image)
    return (image / total).astype(np.float32), fwhm


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
