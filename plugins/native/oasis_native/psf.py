"""The ``native`` PSF backend: sep detection, a median stack of PSF stars, a Moffat or
Gaussian fit.

Steps: a sep background (the frame may be sky-subtracted; masked pixels, weight 0, are left
out); sep detection; PSF stars are the unsaturated, untruncated, roundish, high-S/N
detections with no comparably bright neighbour and no masked pixel in their stamp; their
stamps are cut at sub-pixel centres (sep windowed centroids, cubic-spline resampling, all
stars at once), normalised by their core flux and median-stacked; the chosen model is
fitted to the stack with :func:`scipy.optimize.least_squares`.

The frame's ``snr`` is the median peak signal-to-noise ``peak / sqrt(rms**2 + peak / gain)``
(just ``peak / rms`` when the gain is unknown) of the ``snr_stars`` brightest PSF stars. In a
series of one field these are mostly the same stars in every frame, so the figure ranks the
frames by seeing, sky and transparency (the median over *all* stars above a S/N cut would
not: with power-law counts it sits near twice the cut whatever the frame).
``background`` and ``noise`` are sep's global sky level and robust sky standard deviation.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.backends import PsfBackend, option
from oasis_core.model import Frame, PsfModel
from oasis_core.validators import fraction, in_range, non_negative, positive

__all__ = ["NativePsf", "NativePsfOptions", "gaussian_profile", "moffat_profile"]

_MODELS = ("moffat", "gaussian")


@attrs.frozen(kw_only=True)
class NativePsfOptions:
    """Options of the ``native`` PSF backend (``[psf.native]``)."""

    model: str = option(
        "moffat", "profile fitted to the stacked PSF stars: 'moffat' or 'gaussian'", choices=_MODELS
    )
    threshold: float = option(
        5.0, "sep detection threshold (sigmas of the sky noise)", range=positive
    )
    min_snr: float = option(10.0, "minimum peak signal-to-noise of a PSF star", range=non_negative)
    max_stars: int = option(
        200, "use at most this many PSF stars (the highest S/N ones)", range=(1, None)
    )
    min_stars: int = option(
        3, "fail the frame when fewer usable PSF stars are found", range=(1, None)
    )
    stamp_half: int = option(
        0,
        "half size (pixels) of the star stamps and PSF image; 0 = 3 x the first FWHM "
        "estimate, between 7 and 25",
        range=(0, None),
    )
    isolation: float = option(
        3.0,
        "reject a star with a neighbour closer than this many FWHM that is brighter "
        "than neighbour_fraction of it",
        range=non_negative,
    )
    neighbour_fraction: float = option(0.1, "see isolation", range=non_negative)
    max_ellipticity: float = option(
        0.3, "reject detections more elongated than this (1 - b/a)", range=fraction
    )
    saturation_fraction: float = option(
        0.8,
        "reject stars whose peak pixel reaches this fraction of the saturation level "
        "(of the data maximum when the saturation is unknown)",
        range=in_range(0, 1, lo_open=True),
    )
    snr_stars: int = option(
        10, "the frame S/N is the median peak S/N of this many brightest PSF stars", range=(1, None)
    )
    back_size: int = option(64, "sep background mesh size (pixels)", range=(1, None))
    image: str = option(
        "model",
        "PSF image returned: 'model' (the fitted profile) or 'empirical' (the "
        "median stack of the stars)",
        choices=("model", "empirical"),
    )


def moffat_profile(r2: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Moffat profile ``(1 + r2 / alpha**2) ** -beta`` (peak 1) at squared radii ``r2``.

    Parameters
    ----------
    r2 : ndarray
        Squared distances from the centre, pixels**2.
    alpha, beta : float
        Core width (pixels) and wing index; FWHM = ``2 alpha sqrt(2**(1/beta) - 1)``.

    Returns
    -------
    ndarray
    """
    return (1.0 + r2 / (alpha * alpha)) ** (-beta)


def gaussian_profile(r2: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian profile ``exp(-r2 / (2 sigma**2))`` (peak 1) at squared radii ``r2``.

    Parameters
    ----------
    r2 : ndarray
        Squared distances from the centre, pixels**2.
    sigma : float
        Standard deviation (pixels); FWHM = 2.3548 sigma.

    Returns
    -------
    ndarray
    """
    return np.exp(-0.5 * r2 / (sigma * sigma))


def _fit(stack: np.ndarray, model: str, fwhm0: float) -> dict[str, float]:
    """Fit ``model`` (plus amplitude, centre, constant) to the stacked stamp.

    The Moffat is fitted to the whole stamp. A Gaussian cannot follow the wings of a real
    PSF, which would inflate its width, so it is fitted to the core only (radius 1.5 FWHM,
    twice: around the first estimate, then around the first fit).
    """
    if model == "gaussian":
        first = _fit_model(stack, model, fwhm0, 1.5 * fwhm0)
        return _fit_model(stack, model, first["fwhm"], 1.5 * first["fwhm"])
    return _fit_model(stack, model, fwhm0, np.inf)


def _fit_model(stack: np.ndarray, model: str, fwhm0: float, radius: float) -> dict[str, float]:
    from scipy.optimize import least_squares

    half = stack.shape[0] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    use = ((xx**2 + yy**2) <= max(radius, 2.0) ** 2) & np.isfinite(stack)
    xx, yy = xx[use], yy[use]
    z = stack.astype(np.float64)[use]
    amp0 = float(np.nanmax(stack))
    if model == "moffat":
        beta0 = 3.0
        alpha0 = fwhm0 / (2.0 * math.sqrt(2.0 ** (1.0 / beta0) - 1.0))

        def resid(p: np.ndarray) -> np.ndarray:
            r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
            return p[0] * moffat_profile(r2, p[3], p[4]) + p[5] - z

        p0 = [amp0, 0.0, 0.0, alpha0, beta0, 0.0]
        lo = [0.0, -2.0, -2.0, 0.1, 1.01, -np.inf]
        hi = [np.inf, 2.0, 2.0, 10.0 * half, 30.0, np.inf]
    else:

        def resid(p: np.ndarray) -> np.ndarray:
            r2 = (xx - p[1]) ** 2 + (yy - p[2]) ** 2
            return p[0] * gaussian_profile(r2, p[3]) + p[4] - z

        p0 = [amp0, 0.0, 0.0, fwhm0 / 2.3548, 0.0]
        lo = [0.0, -2.0, -2.0, 0.1, -np.inf]
        hi = [np.inf, 2.0, 2.0, 5.0 * half, np.inf]
    p0 = np.clip(p0, np.add(lo, 1e-6), np.subtract(hi, 1e-6))
    res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
    p = res.x
    out = {"amplitude": float(p[0]), "x0": float(p[1]), "y0": float(p[2])}
    if model == "moffat":
        alpha, beta = float(p[3]), float(p[4])
        out.update(
            alpha=alpha,
            beta=beta,
            sky=float(p[5]),
            fwhm=2.0 * alpha * math.sqrt(2.0 ** (1.0 / beta) - 1.0),
        )
    else:
        sigma = float(p[3])
        out.update(sigma=sigma, sky=float(p[4]), fwhm=2.0 * math.sqrt(2.0 * math.log(2.0)) * sigma)
    out["rms_residual"] = float(np.sqrt(np.mean(res.fun**2)) / max(amp0, 1e-30))
    return out


def _shape_moments(image: np.ndarray, radius: float) -> tuple[float, float]:
    """Ellipticity ``1 - b/a`` and position angle (deg, from +x) from second moments."""
    half = image.shape[0] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    yy, xx = np.meshgrid(off, off, indexing="ij")
    w = np.where(xx**2 + yy**2 <= radius * radius, np.clip(image, 0.0, None), 0.0)
    total = w.sum()
    if total <= 0:
        return 0.0, 0.0
    mx, my = (w * xx).sum() / total, (w * yy).sum() / total
    dx, dy = xx - mx, yy - my
    mxx = (w * dx * dx).sum() / total
    myy = (w * dy * dy).sum() / total
    mxy = (w * dx * dy).sum() / total
    eig = np.linalg.eigvalsh(np.array([[mxx, mxy], [mxy, myy]]))
    if eig[1] <= 0:
        return 0.0, 0.0
    ellipticity = 1.0 - math.sqrt(max(eig[0], 0.0) / eig[1])
    theta = 0.5 * math.degrees(math.atan2(2.0 * mxy, mxx - myy))
    return float(ellipticity), float(theta)


def _isolated(
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    keep: np.ndarray,
    fwhm0: float,
    options: NativePsfOptions,
) -> tuple[np.ndarray, float]:
    """Detections with no neighbour brighter than ``neighbour_fraction`` of them within
    ``isolation`` FWHM. In crowded fields, where fewer than 10 candidates pass, looser
    criteria are tried in turn. Returns the mask and the radius (in FWHM) used."""
    from scipy import spatial

    tree = spatial.cKDTree(np.column_stack([x, y]))
    levels = [
        (options.isolation, options.neighbour_fraction),
        (options.isolation * 2.0 / 3.0, min(3.0 * options.neighbour_fraction, 1.0)),
        (min(1.5, options.isolation), 1.0),
    ]
    target = max(options.min_stars, 10)
    for radius, ratio in levels:
        pairs = tree.query_pairs(max(radius * fwhm0, 1.0), output_type="ndarray")
        crowded = np.zeros(len(x), dtype=bool)
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            crowded[i[flux[j] > ratio * flux[i]]] = True
            crowded[j[flux[i] > ratio * flux[j]]] = True
        if np.count_nonzero(keep & ~crowded) >= target:
            break
    return ~crowded, float(radius)


def _cut_stamps(
    sub: np.ndarray, bad: np.ndarray, xc: np.ndarray, yc: np.ndarray, half: int
) -> np.ndarray:
    """(n, 2*half+1, 2*half+1) stamps of ``sub`` centred on the sub-pixel positions
    (cubic-spline resampling, all stars at once); NaN where a masked pixel or the frame
    edge is within reach of the spline."""
    from scipy import ndimage

    grid = np.arange(-half, half + 1, dtype=np.float64)
    shape3 = (len(xc), 2 * half + 1, 2 * half + 1)
    cy = np.broadcast_to(yc[:, None, None] + grid[None, :, None], shape3).ravel()
    cx = np.broadcast_to(xc[:, None, None] + grid[None, None, :], shape3).ravel()
    stamps = ndimage.map_coordinates(sub, [cy, cx], order=3, mode="nearest").reshape(shape3)
    reach = ndimage.binary_dilation(bad, iterations=2).astype(np.float32)
    lost = ndimage.map_coordinates(reach, [cy, cx], order=1, mode="constant", cval=1.0)
    stamps[lost.reshape(shape3) > 0] = np.nan
    return stamps


class NativePsf(PsfBackend):
    """Measures the PSF from a median stack of bright isolated stars (sep + least squares)."""

    name = "native"
    Options = NativePsfOptions
    description = "sep detection, median stack of PSF stars, Moffat or Gaussian fit"

    def check(self, options: NativePsfOptions) -> None:
        """Raise :class:`~oasis_core.errors.BackendUnavailable` when sep is missing."""
        from oasis_native.mask import _require

        _require("psf", "sep")

    def psf(self, frame: Frame, *, options: NativePsfOptions, workdir: Path) -> Frame:
        """Return ``frame`` with ``psf``, ``fwhm``, ``snr``, ``background`` and ``noise`` set.

        Parameters
        ----------
        frame : Frame
            Pixels with weight 0 (the mask stage's output) are ignored; ``saturation``
            and ``gain`` are used when set.
        options : NativePsfOptions
        workdir : Path
            Unused (nothing is written).

        Returns
        -------
        Frame
            ``psf`` is a :class:`~oasis_core.model.PsfModel` whose image is an odd,
            unit-sum stamp (the fitted profile, or the median stack) and whose ``params``
            hold the fit (``alpha``/``beta`` or ``sigma``, ``ellipticity``, ``theta``...).

        Raises
        ------
        StageError
            When fewer than ``min_stars`` usable stars are found or the fit fails.

        Notes
        -----
        Raises sep's global extraction pixel stack (``sep.set_extract_pixstack``) to fit
        the frame, up to 3 million pixels, for crowded fields.
        """
        import sep

        from oasis_core.errors import StageError

        where = f"psf backend 'native': frame {frame.name!r}"
        data = np.array(frame.data, dtype=np.float32, order="C")  # native-endian copy
        ny, nx = data.shape
        bad = ~np.isfinite(data) | (np.asarray(frame.weight) <= 0)
        if bad.all():
            raise StageError(f"{where}: every pixel is masked (weight 0)")
        raw_max = float(data[~bad].max())
        data[bad] = float(np.median(data[~bad]))
        size = int(max(8, min(options.back_size, ny, nx)))
        bkg = sep.Background(data, mask=bad, bw=size, bh=size, fw=3, fh=3)
        background, noise = float(bkg.globalback), float(bkg.globalrms)
        # crowding inflates sep's RMS: keep the pixel-difference estimate when lower
        from oasis_core.stats import sky_noise

        diff_noise = sky_noise(frame.data, ~bad)
        if math.isfinite(diff_noise) and 0 < diff_noise < noise:
            noise = diff_noise
        if not (math.isfinite(noise) and noise > 0):
            raise StageError(f"{where}: the sky noise is {noise} (blank or constant frame?)")
        sub = data - bkg.back()
        sub[bad] = 0.0
        if sep.get_extract_pixstack() < min(data.size, 3_000_000):
            sep.set_extract_pixstack(min(data.size, 3_000_000))
        objs = sep.extract(sub, options.threshold, err=noise, mask=bad, minarea=5)

        def fail(n: int, why: str) -> StageError:
            msg = (
                f"{where}: {n} usable PSF stars ({why}), need {options.min_stars} at "
                f"threshold {options.threshold:g} sigma and min_snr {options.min_snr:g}; "
                "lower psf.native.threshold / min_snr or check the frame and its mask"
            )
            return StageError(msg, metadata={"nstars": n, "ndetected": len(objs)})

        if len(objs) < options.min_stars:
            raise fail(len(objs), f"{len(objs)} detections")
        x, y, a, b = objs["x"], objs["y"], objs["a"], objs["b"]
        flux, peak = objs["flux"], objs["peak"]
        snr_peak = peak / noise
        sat_level = frame.saturation if frame.saturation is not None else raw_max
        raw_peak = frame.data[objs["ypeak"], objs["xpeak"]]
        keep = (
            ((objs["flag"] & ~sep.OBJ_MERGED) == 0)  # merged is fine, truncated is not
            & (snr_peak >= options.min_snr)
            & (raw_peak < options.saturation_fraction * sat_level)
            & (a > 0)
            & (b >= (1.0 - options.max_ellipticity) * a)
        )
        if keep.sum() < options.min_stars:
            raise fail(int(keep.sum()), "bright, unsaturated and round enough")

        # first FWHM estimate from the half-light radius of the candidates (0.5 FWHM for a
        # Gaussian, 0.63 FWHM for a Moffat of beta 3)
        rhalf, rflag = sep.flux_radius(
            sub, x[keep], y[keep], np.clip(6.0 * a[keep], 3.0, 50.0), 0.5, mask=bad, subpix=5
        )
        rhalf = rhalf[(rflag == 0) & np.isfinite(rhalf) & (rhalf > 0)]
        fwhm0 = float(np.clip(1.8 * np.median(rhalf), 1.0, 30.0)) if len(rhalf) else 3.0
        half = options.stamp_half or int(np.clip(math.ceil(3.0 * fwhm0), 7, 25))

        isolated, isolation_used = _isolated(x, y, flux, keep, fwhm0, options)
        # the core (radius 1.5 FWHM) inside the frame and free of masked pixels; masked or
        # outside pixels further out are left out of the stack
        ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
        rc = math.ceil(1.5 * fwhm0) + 1
        inside = (ix - rc >= 0) & (ix + rc < nx) & (iy - rc >= 0) & (iy + rc < ny)
        cand = np.flatnonzero(keep & isolated & inside)
        off = np.arange(-rc, rc + 1)
        win = bad[iy[cand, None, None] + off[None, :, None], ix[cand, None, None] + off[None, None]]
        win &= (off[:, None] ** 2 + off[None, :] ** 2 <= rc * rc)[None]
        cand = cand[~win.any(axis=(1, 2))]
        if len(cand) < options.min_stars:
            raise fail(len(cand), "isolated, core inside the frame and unmasked")
        cand = cand[np.argsort(-snr_peak[cand], kind="stable")[: options.max_stars]]

        # sub-pixel centres (windowed centroids), stamps, normalised by their core flux
        sig = np.full(len(cand), fwhm0 / 2.3548)
        xw, yw, wflag = sep.winpos(sub, x[cand], y[cand], sig, mask=bad)
        good = (wflag == 0) & (np.hypot(xw - x[cand], yw - y[cand]) < 1.5)
        cand, xw, yw = cand[good], xw[good], yw[good]
        if len(cand) < options.min_stars:
            raise fail(len(cand), "with a good centroid")
        stamps = _cut_stamps(sub, bad, xw, yw, half)
        grid = np.arange(-half, half + 1, dtype=np.float64)
        core = grid[:, None] ** 2 + grid[None, :] ** 2 <= (1.5 * fwhm0) ** 2
        norm = np.where(core, stamps, 0.0).sum(axis=(1, 2))
        ok = np.isfinite(norm) & (norm > 0)
        stamps, cand = stamps[ok] / norm[ok, None, None], cand[ok]
        if len(cand) < options.min_stars:
            raise fail(len(cand), "with an unmasked core of positive flux")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # stack pixels with no star
            stack = np.nanmedian(stamps, axis=0)

        fit = _fit(stack, options.model, fwhm0)
        fwhm = fit["fwhm"]
        if not (math.isfinite(fwhm) and 0.3 < fwhm < 4.0 * half):
            msg = (
                f"{where}: the {options.model} fit to {len(cand)} stars failed (FWHM {fwhm:.3g} px)"
            )
            raise StageError(msg, metadata={"nstars": len(cand)})
        clean = np.nan_to_num(stack - fit["sky"], nan=0.0)
        ellipticity, theta = _shape_moments(clean, 2.0 * fwhm)
        if options.image == "model":
            out_half = max(half, math.ceil(3.0 * fwhm))
            g = np.arange(-out_half, out_half + 1, dtype=np.float64)
            rr = g[:, None] ** 2 + g[None, :] ** 2
            if options.model == "moffat":
                image = moffat_profile(rr, fit["alpha"], fit["beta"])
            else:
                image = gaussian_profile(rr, fit["sigma"])
        else:
            image = np.clip(clean, 0.0, None)
        image = image / image.sum()

        # frame S/N: median peak S/N of the brightest PSF stars (sky noise, plus the star's
        # Poisson noise when the gain is known)
        top = cand[: options.snr_stars]  # cand is sorted by decreasing S/N
        peaks = peak[top]
        rms_at = bkg.rms()[iy[top], ix[top]]
        rms_at = np.where(rms_at > 0, rms_at, noise)
        var = rms_at**2 + (peaks / frame.gain if frame.gain else 0.0)
        snr = float(np.median(peaks / np.sqrt(var)))

        params: dict[str, Any] = {k: v for k, v in fit.items() if k != "sky"}
        params.update(
            ellipticity=ellipticity,
            theta=theta,
            fwhm_guess=fwhm0,
            stamp_half=half,
            ndetected=len(objs),
            isolation=isolation_used,
        )
        psf = PsfModel(
            image=image.astype(np.float32),
            fwhm=float(fwhm),
            model=options.model,
            params=params,
            nstars=len(cand),
        )
        return attrs.evolve(
            frame, psf=psf, fwhm=float(fwhm), snr=snr, background=background, noise=noise
        )
