"""Native align backend: star matching (sep + astroalign), sub-pixel least-squares
refinement, spline resampling (scipy.ndimage) and photometric alignment.

The steps, for a frame and the reference:

1. **Detection.** ``sep`` finds stars on both images (background-subtracted, masked
   pixels excluded); windowed centroids (``sep.winpos``) give their positions.
2. **Initial transform.** ``astroalign.find_transform`` matches triangles of the brightest
   stars (coordinates are passed, so astroalign does not detect again). When it fails
   (too few stars, or a crowded field where the asterisms do not match), a pure
   translation is estimated by phase correlation of the two images; the candidate that
   pairs the most stars wins.
3. **Refinement.** Stars are paired (mutual nearest neighbours within ``match_radius``)
   and a shift, similarity or affine transform is fitted by least squares with
   iterative sigma clipping; pairing and fit are repeated with the refined transform.
4. **Resampling.** ``scipy.ndimage.affine_transform`` warps the data with a spline of
   order ``order`` and the weight map with order 1. A pixel whose interpolation footprint
   touches a masked pixel or leaves the frame gets weight 0.
5. **Photometric alignment** (IRAF ``linmatch`` done on stars). Aperture fluxes of the
   paired stars on the warped frame and on the reference (after a local sep background)
   give ``scale`` = robust mean of ``flux_ref / flux_frame``; the sky levels give
   ``offset = sky_ref - scale * sky_frame``; the data become ``scale * data + offset`` and
   ``gain``, ``saturation``, ``background`` and ``noise`` follow.

``meta`` records ``align_m00 .. align_m12`` (the 2x3 matrix mapping frame pixel
``(x, y)`` to reference pixel ``(x, y)``: ``x_ref = m00 x + m01 y + m02``,
``y_ref = m10 x + m11 y + m12``), ``shift_x``, ``shift_y``, ``rotation`` (degrees),
``align_scale`` (geometric), ``align_method``, ``align_rms`` (px), ``n_matched``,
``phot_scale``, ``phot_offset`` and ``phot_nstars``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.backends import AlignBackend, option
from oasis_core.errors import StageError
from oasis_core.model import Frame
from oasis_core.validators import non_negative, positive

__all__ = ["NativeAlign", "NativeAlignOptions"]

_TRANSFORMS = ("shift", "similarity", "affine")
_INITIAL = ("auto", "astroalign", "phasecorr")
_CLIP_FLOOR = 0.5  # px: position residuals below this are never clipped
_PRECLIP_FLOOR = 0.3  # px: the same for offsets from the median offset (first pass)

# WCS keywords (any alternate-WCS letter suffix) copied from the reference header.
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CUNIT\d|CRVAL\d|CRPIX\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|PROJP\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|"
    r"MJDREF|DATEREF|CNAME\d|CRDER\d|CSYER\d|"
    r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|"
    r"A_DMAX|B_DMAX|SIP_[A-Z_]+)[A-Z]?$"
)


@attrs.frozen(kw_only=True)
class NativeAlignOptions:
    """Options of the native align backend."""

    thresh: float = option(
        5.0, "star detection threshold, in sigmas of the sky noise", range=positive
    )
    minarea: int = option(
        5, "minimum number of connected pixels of a detected star", range=(1, None)
    )
    back_size: int = option(
        64, "mesh size (px) of the sep background used for detection", range=(1, None)
    )
    max_control_points: int = option(
        50, "brightest stars given to astroalign's triangle matching", range=(3, None)
    )
    max_stars: int = option(
        1000, "brightest stars kept for matching and refinement", range=(3, None)
    )
    transform: str = option(
        "similarity",
        "transform fitted to the matched stars: shift, similarity or affine",
        choices=_TRANSFORMS,
    )
    initial: str = option(
        "auto",
        "initial transform: auto (astroalign, phase correlation when it fails), "
        "astroalign or phasecorr (pure translation)",
        choices=_INITIAL,
    )
    match_radius: float = option(
        3.0, "radius (px) to pair stars once the initial transform is known", range=positive
    )
    min_matched: int = option(
        3, "fewest matched stars accepted (else the frame fails)", range=(1, None)
    )
    clip: float = option(
        3.0, "sigma clipping of the position residuals in the refinement", range=positive
    )
    order: int = option(
        3, "spline order for resampling the data (0-5; weight uses 1)", range=(0, 5)
    )
    photometric: bool = option(
        True, "rescale the data to the reference's flux scale and sky level (linmatch)"
    )
    phot_radius: float = option(
        2.0,
        "aperture radius for the photometric scale, in units of the larger FWHM",
        range=positive,
    )
    phot_snr: float = option(
        10.0, "minimum aperture S/N of a star used for the scale", range=non_negative
    )
    min_phot_stars: int = option(
        3, "fewest stars accepted for the photometric scale", range=(1, None)
    )


class NativeAlign(AlignBackend):
    """Align a frame on the reference with sep + astroalign + scipy.ndimage."""

    name = "native"
    Options = NativeAlignOptions
    description = "sep + astroalign (phase-correlation fallback), spline warp, linmatch"

    def check(self, options: Any) -> None:
        """Accept: every dependency is a requirement of OASIS itself."""

    def align(
        self, frame: Frame, reference: Frame, *, options: NativeAlignOptions, workdir: Path
    ) -> Frame:
        """Return ``frame`` resampled onto ``reference``'s grid and flux scale.

        Parameters
        ----------
        frame, reference : Frame
            The frame to align and the reference it is aligned on. Their ``fwhm`` is used
            when set (else estimated from the stars); ``saturation`` excludes saturated
            stars from the photometric scale.
        options : NativeAlignOptions
        workdir : Path
            Unused (nothing is written).

        Returns
        -------
        Frame
            With the reference's shape and WCS, weight 0 where no data, rescaled data and
            ``gain``, ``saturation``, ``background``, ``noise`` and ``meta`` updated.

        Raises
        ------
        StageError
            When too few stars are found or matched, or the photometric scale cannot be
            measured.
        """
        if frame.name == reference.name:
            return attrs.evolve(frame, meta={**frame.meta, **_identity_meta()})
        return _align(frame, reference, options)


# --------------------------------------------------------------------------- helpers


def _identity_meta() -> dict[str, Any]:
    meta: dict[str, Any] = {f"align_m{i}{j}": float(i == j) for i in range(2) for j in range(3)}
    meta.update(
        shift_x=0.0,
        shift_y=0.0,
        centre_shift_x=0.0,
        centre_shift_y=0.0,
        rotation=0.0,
        align_scale=1.0,
        align_method="identity",
        align_rms=0.0,
        n_matched=0,
        phot_scale=1.0,
        phot_offset=0.0,
        phot_nstars=0,
    )
    return meta


def _err(frame: Frame, what: str, **metadata: Any) -> StageError:
    return StageError(f"align frame {frame.name!r}: {what}", metadata=metadata)


@attrs.frozen
class _Stars:
    """Stars detected on one image, brightest first, plus the image products."""

    xy: np.ndarray  # (n, 2) windowed centroids (x, y)
    flux: np.ndarray
    saturated: np.ndarray  # bool
    fwhm: float
    sub: np.ndarray = attrs.field(repr=False)  # background-subtracted image, bad = 0
    back: np.ndarray = attrs.field(repr=False)  # sep background map
    rms: float
    bad: np.ndarray = attrs.field(repr=False)  # bool mask


def _detect(frame: Frame, options: NativeAlignOptions) -> _Stars:
    import sep

    data = np.array(frame.data, dtype=np.float32, order="C")  # private, native, writable
    bad = ~(np.isfinite(data) & (np.asarray(frame.weight) > 0))
    if bad.all():
        raise _err(frame, "every pixel has weight 0")
    data[bad] = np.median(data[~bad])
    ny, nx = data.shape
    size = int(max(8, min(options.back_size, ny // 2, nx // 2)))
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), data.size))
    sep.set_sub_object_limit(max(sep.get_sub_object_limit(), 4096))
    bkg = sep.Background(data, mask=bad, bw=size, bh=size)
    back = bkg.back()
    rms = float(bkg.globalrms)
    if not np.isfinite(rms) or rms <= 0:
        raise _err(frame, "the sky noise is zero or not finite; is the image blank?")
    sub = data - back
    sub[bad] = 0.0
    try:
        objs = sep.extract(sub, options.thresh, err=rms, mask=bad, minarea=options.minarea)
    except Exception as err:  # sep raises a bare Exception on buffer overflows
        raise _err(frame, f"sep star detection failed ({err}); raise align.native.thresh") from err
    # truncated (2) or singular (8) objects, and non-positive fluxes, are unusable
    keep = ((objs["flag"] & 10) == 0) & (objs["flux"] > 0) & (objs["a"] > 0)
    objs = objs[keep]
    if len(objs) == 0:
        return _Stars(
            np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool), frame.fwhm or 3.0, sub, back, rms, bad
        )
    x, y = objs["x"].astype(float), objs["y"].astype(float)
    rmax = np.clip(6.0 * objs["a"], 3.0, 30.0)
    rhalf, rflag = sep.flux_radius(sub, x, y, rmax, 0.5, normflux=objs["flux"], mask=bad, subpix=5)
    good_r = (rflag == 0) & np.isfinite(rhalf) & (rhalf > 0)
    if frame.fwhm is not None and np.isfinite(frame.fwhm) and frame.fwhm > 0:
        fwhm = float(frame.fwhm)
    elif good_r.any():
        fwhm = float(2.0 * np.median(rhalf[good_r]))  # r_half = FWHM / 2 for a Gaussian
    else:
        fwhm = 3.0
    # hot pixels and cosmic rays that slipped through the mask are much sharper
    keep = ~good_r | (rhalf > 0.25 * fwhm)
    # stars touching a masked pixel (a masked saturated core, a trail) have biased centroids
    near_bad, _, _ = sep.sum_circle(bad.astype(np.float32), x, y, max(fwhm, 2.0), subpix=1)
    keep &= near_bad == 0
    objs, x, y = objs[keep], x[keep], y[keep]
    sig = max(fwhm / 2.3548, 0.5)
    xw, yw, wflag = sep.winpos(sub, x, y, sig, mask=bad)
    ok = (wflag == 0) & (np.hypot(xw - x, yw - y) < max(1.0, 0.5 * fwhm))
    x = np.where(ok, xw, x)
    y = np.where(ok, yw, y)
    saturated = np.zeros(len(objs), bool)
    if frame.saturation is not None and np.isfinite(frame.saturation):
        level = back[
            np.clip(np.round(y).astype(int), 0, ny - 1), np.clip(np.round(x).astype(int), 0, nx - 1)
        ]
        saturated = objs["peak"] + level >= 0.9 * frame.saturation
    order = np.argsort(-objs["flux"], kind="stable")[: options.max_stars]
    xy = np.column_stack([x, y])[order]
    return _Stars(
        xy, objs["flux"][order].astype(float), saturated[order], fwhm, sub, back, rms, bad
    )


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _match(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i_src, i_dst) of mutual nearest neighbours within ``radius``."""
    from scipy.spatial import cKDTree

    if len(src) == 0 or len(dst) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    proj = _apply(matrix, src)
    d, j = cKDTree(dst).query(proj, distance_upper_bound=radius)
    found = np.isfinite(d)
    i = np.flatnonzero(found)
    j = j[found]
    _, back = cKDTree(proj).query(dst[j])
    mutual = back == i
    return i[mutual], j[mutual]


def _fit(src: np.ndarray, dst: np.ndarray, kind: str) -> np.ndarray:
    """Least-squares transform (3x3) mapping ``src`` onto ``dst``."""
    n = len(src)
    matrix = np.eye(3)
    centre = src.mean(axis=0)
    s = src - centre
    if kind == "shift" or (kind == "similarity" and n < 3) or (kind == "affine" and n < 4):
        matrix[:2, 2] = np.mean(dst - src, axis=0)
        return matrix
    if kind == "similarity":
        # x' = a x - b y + tx ; y' = b x + a y + ty
        rows = np.zeros((2 * n, 4))
        rows[0::2] = np.column_stack([s[:, 0], -s[:, 1], np.ones(n), np.zeros(n)])
        rows[1::2] = np.column_stack([s[:, 1], s[:, 0], np.zeros(n), np.ones(n)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)
        lin = np.array([[a, -b], [b, a]])
        t = np.array([tx, ty])
    else:
        design = np.column_stack([s, np.ones(n)])
        coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
        lin = coef[:2].T
        t = coef[2]
    matrix[:2, :2] = lin
    matrix[:2, 2] = t - lin @ centre
    return matrix


def _refine(
    src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, options: NativeAlignOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pair the stars and fit the transform with clipping; return (matrix, i, j, rms)."""
    radius = options.match_radius
    i = j = np.zeros(0, int)
    rms = np.nan
    for _ in range(3):  # re-pair with the refined transform
        i, j = _match(src, dst, matrix, radius)
        if len(i) == 0:
            break
        # gross mismatches first, robustly: offsets from the median offset (a least-squares
        # fit with few stars would absorb them)
        offsets = dst[j] - _apply(matrix, src[i])
        dist = np.hypot(*(offsets - np.median(offsets, axis=0)).T)
        keep = dist <= max(options.clip * np.median(dist) / 1.1774, _PRECLIP_FLOOR)
        if keep.sum() < 2:
            keep[:] = True
        for _ in range(5):  # clip outlying pairs
            matrix = _fit(src[i[keep]], dst[j[keep]], options.transform)
            resid = np.hypot(*(_apply(matrix, src[i]) - dst[j]).T)
            # resid is a 2-D distance (Rayleigh): its median is 1.1774 sigma per axis
            # (floor: centroids of real stars scatter by ~0.1 px, and with few stars the
            # median underestimates sigma; only gross mismatches need rejecting)
            sigma = np.median(resid[keep]) / 1.1774
            new = resid <= max(options.clip * sigma, _CLIP_FLOOR)
            if new.sum() < 2 or np.array_equal(new, keep):
                break
            keep = new
        else:  # not converged: fit the last selection
            matrix = _fit(src[i[keep]], dst[j[keep]], options.transform)
            resid = np.hypot(*(_apply(matrix, src[i]) - dst[j]).T)
        i, j = i[keep], j[keep]
        rms = float(np.sqrt(np.mean(resid[keep] ** 2)))
        radius = min(options.match_radius, max(5.0 * rms, 1.0))
    return matrix, i, j, rms


def _phase_correlation(a: np.ndarray, b: np.ndarray, rms_a: float, rms_b: float) -> np.ndarray:
    """Translation t (x, y) such that image ``b`` ~ image ``a`` shifted by t."""
    from scipy import fft

    ny = max(a.shape[0], b.shape[0])
    nx = max(a.shape[1], b.shape[1])

    def prep(img: np.ndarray, rms: float) -> np.ndarray:
        out = np.zeros((ny, nx), np.float32)
        # compress the dynamic range so that a few bright stars do not dominate
        out[: img.shape[0], : img.shape[1]] = np.arcsinh(np.clip(img / rms, 0.0, None))
        return out

    fa = fft.rfft2(prep(a, rms_a))
    fb = fft.rfft2(prep(b, rms_b))
    cross = fb * np.conj(fa)
    cross /= np.maximum(np.abs(cross), 1e-12)
    corr = fft.irfft2(cross, s=(ny, nx))
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)

    def vertex(cm: float, c0: float, cp: float) -> float:
        denom = cm - 2.0 * c0 + cp
        return 0.0 if denom == 0 else float(np.clip(0.5 * (cm - cp) / denom, -0.5, 0.5))

    dy = vertex(corr[py - 1, px], corr[py, px], corr[(py + 1) % ny, px])
    dx = vertex(corr[py, px - 1], corr[py, px], corr[py, (px + 1) % nx])
    ty = (py + dy + ny / 2) % ny - ny / 2
    tx = (px + dx + nx / 2) % nx - nx / 2
    return np.array([tx, ty])


def _wcs_transform(frame: Frame, reference: Frame) -> np.ndarray | None:
    """The affine map of ``frame``'s pixels onto ``reference``'s given by their celestial
    WCSs (a 5 x 5 grid of points fitted), or None without both."""
    fw, rw = frame.wcs, reference.wcs
    if fw is None or rw is None:
        return None
    ny, nx = frame.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    try:
        ra, dec = fw.all_pix2world(gx.ravel(), gy.ravel(), 0)
        rx, ry = rw.all_world2pix(ra, dec, 0)
    except Exception:  # a WCS astropy cannot invert: no candidate
        return None
    design = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([rx, ry]), rcond=None)
    matrix = np.eye(3)
    matrix[:2, :] = coef.T
    return matrix if np.all(np.isfinite(matrix)) else None


def _initial_transform(
    frame: Frame,
    fs: _Stars,
    rs: _Stars,
    options: NativeAlignOptions,
    reference: Frame | None = None,
) -> tuple[np.ndarray, str]:
    import astroalign

    candidates: list[tuple[int, np.ndarray, str]] = []
    ncp = options.max_control_points
    reason = ""
    if options.initial == "phasecorr":
        reason = "align.native.initial = phasecorr"
    elif len(fs.xy) >= 3 and len(rs.xy) >= 3:
        try:
            tform, _ = astroalign.find_transform(fs.xy[:ncp], rs.xy[:ncp], max_control_points=ncp)
            matrix = np.asarray(tform.params, dtype=float)
            candidates.append(
                (len(_match(fs.xy, rs.xy, matrix, options.match_radius)[0]), matrix, "astroalign")
            )
        except (ValueError, astroalign.MaxIterError) as err:
            reason = f"astroalign: {err}"
    else:
        reason = f"{len(fs.xy)} stars on the frame, {len(rs.xy)} on the reference"
    best = max((c[0] for c in candidates), default=0)
    wanted = max(options.min_matched, 0.25 * min(len(fs.xy), len(rs.xy)))
    if options.initial != "astroalign" and best < wanted:
        matrix = np.eye(3)
        matrix[:2, 2] = _phase_correlation(fs.sub, rs.sub, fs.rms, rs.rms)
        candidates.append(
            (len(_match(fs.xy, rs.xy, matrix, options.match_radius)[0]), matrix, "phasecorr")
        )
        wcs_matrix = _wcs_transform(frame, reference) if reference is not None else None
        if wcs_matrix is not None:  # sparse fields: the headers may know the rotation
            n_wcs = len(_match(fs.xy, rs.xy, wcs_matrix, options.match_radius)[0])
            candidates.append((n_wcs, wcs_matrix, "wcs"))
    n, matrix, method = max(candidates, key=lambda c: c[0])
    if n < max(options.min_matched, 1):
        raise _err(
            frame,
            f"only {n} stars matched the reference "
            f"({len(fs.xy)} on the frame, {len(rs.xy)} on the reference"
            f"{'; ' + reason if reason else ''}); lower align.native.thresh or "
            "check that the frames overlap",
            n_matched=n,
        )
    return matrix, method


def _copy_header(frame: Frame, reference: Frame) -> Any:
    from astropy.io import fits

    def as_header(h: Any) -> Any:
        return h.copy() if isinstance(h, fits.Header) else fits.Header(dict(h or {}))

    out = as_header(frame.header)
    ref = as_header(reference.header)
    for key in [k for k in out if _WCS_KEY.match(k)]:
        del out[key]
    for card in ref.cards:
        if _WCS_KEY.match(card.keyword):
            out.append(card, end=True)
    return out


def _warp(
    frame: Frame, fs: _Stars, matrix: np.ndarray, shape: tuple[int, int], order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resample data (spline ``order``) and weight (linear) onto the reference grid."""
    from scipy import ndimage

    inv = np.linalg.inv(matrix)
    # ndimage works in (row, col) = (y, x): input = mat @ output + offset
    mat = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
    off = np.array([inv[1, 2], inv[0, 2]])
    filled = fs.sub + fs.back  # bad pixels replaced by the sky background
    data = ndimage.affine_transform(
        filled, mat, off, output_shape=shape, order=order, mode="nearest", output=np.float32
    )
    bad = fs.bad
    if order >= 2:  # the spline footprint reaches one (two) pixels beyond the linear one
        bad = ndimage.binary_dilation(bad, iterations=order // 2, border_value=1)
    weight = np.where(fs.bad, 0.0, np.asarray(frame.weight, np.float32)).astype(np.float32)
    weight = ndimage.affine_transform(
        weight, mat, off, output_shape=shape, order=1, mode="constant", cval=0.0, output=np.float32
    )
    touched = ndimage.affine_transform(
        bad.astype(np.float32),
        mat,
        off,
        output_shape=shape,
        order=1,
        mode="constant",
        cval=1.0,
        output=np.float32,
    )
    weight[touched > 1e-3] = 0.0
    np.clip(weight, 0.0, 1.0, out=weight)
    # outside the frame: sky level rather than the edge pixels smeared by mode="nearest"
    yy = np.arange(shape[0], dtype=np.float32)[:, None]
    xx = np.arange(shape[1], dtype=np.float32)[None, :]
    xin = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    yin = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    ny, nx = fs.bad.shape
    outside = (xin < -0.5) | (xin > nx - 0.5) | (yin < -0.5) | (yin > ny - 0.5)
    data[outside] = float(np.median(fs.back))
    return data, weight


def _photometry(
    frame: Frame,
    reference: Frame,
    rs: _Stars,
    fs: _Stars,
    data: np.ndarray,
    weight: np.ndarray,
    ref_xy: np.ndarray,
    ref_sat: np.ndarray,
    frm_sat: np.ndarray,
    options: NativeAlignOptions,
) -> tuple[float, float, int, float, float]:
    """(scale, offset, nstars, sky_frame, noise_frame) of the warped frame."""
    import sep

    bad = ~(weight > 0)
    img = np.array(data, dtype=np.float32, order="C")
    img[bad] = np.median(img[~bad]) if (~bad).any() else 0.0
    size = int(max(8, min(options.back_size, img.shape[0] // 2, img.shape[1] // 2)))
    bkg = sep.Background(img, mask=bad, bw=size, bh=size)
    back = bkg.back()
    sub = img - back
    sub[bad] = 0.0
    both = ~bad & ~rs.bad
    if not both.any():
        raise _err(frame, "no pixel overlaps the reference after warping")
    sky_f = float(np.median(back[both]))
    sky_r = float(np.median(rs.back[both]))
    rms_f = float(bkg.globalrms)
    if not options.photometric:
        return 1.0, 0.0, 0, sky_f, rms_f
    use = ~ref_sat & ~frm_sat
    x, y = ref_xy[use, 0], ref_xy[use, 1]
    radius = options.phot_radius * max(fs.fwhm, rs.fwhm)
    f_r, e_r, g_r = sep.sum_circle(
        rs.sub, x, y, radius, err=rs.rms, mask=rs.bad, gain=reference.gain
    )
    f_f, e_f, g_f = sep.sum_circle(sub, x, y, radius, err=rms_f, mask=bad, gain=frame.gain)
    ok = (g_r == 0) & (g_f == 0) & (f_r > options.phot_snr * e_r) & (f_f > options.phot_snr * e_f)
    n = int(ok.sum())
    if n < options.min_phot_stars:
        raise _err(
            frame,
            f"only {n} unsaturated stars with S/N > {options.phot_snr:g} for "
            "the photometric scale; lower align.native.phot_snr or set "
            "align.native.photometric = false",
            phot_nstars=n,
        )
    ratio = f_r[ok] / f_f[ok]
    var = ratio**2 * ((e_r[ok] / f_r[ok]) ** 2 + (e_f[ok] / f_f[ok]) ** 2)
    keep = np.ones(n, bool)
    for _ in range(5):
        med = np.median(ratio[keep])
        mad = 1.4826 * np.median(np.abs(ratio[keep] - med))
        new = np.abs(ratio - med) <= 3.0 * np.maximum(mad, np.sqrt(var))
        if new.sum() < options.min_phot_stars or np.array_equal(new, keep):
            break
        keep = new
    w = 1.0 / var[keep]
    scale = float(np.sum(w * ratio[keep]) / np.sum(w))
    offset = sky_r - scale * sky_f
    return scale, offset, int(keep.sum()), sky_f, rms_f


def _align(frame: Frame, reference: Frame, options: NativeAlignOptions) -> Frame:
    rs = _detect(reference, options)
    fs = _detect(frame, options)
    matrix, method = _initial_transform(frame, fs, rs, options, reference)
    matrix, i, j, rms = _refine(fs.xy, rs.xy, matrix, options)
    if len(i) < options.min_matched:
        raise _err(
            frame,
            f"only {len(i)} stars matched after refinement "
            f"(minimum align.native.min_matched = {options.min_matched})",
            n_matched=len(i),
        )
    data, weight = _warp(frame, fs, matrix, reference.shape, options.order)
    if not (weight > 0).any():
        raise _err(frame, "no pixel of the frame lands on the reference grid")
    scale, offset, nphot, sky_f, rms_f = _photometry(
        frame, reference, rs, fs, data, weight, rs.xy[j], rs.saturated[j], fs.saturated[i], options
    )
    if options.photometric:
        data = (data * np.float32(scale) + np.float32(offset)).astype(np.float32)

    lin = matrix[:2, :2]
    det = float(np.linalg.det(lin))
    centre = np.array([(frame.shape[1] - 1) / 2.0, (frame.shape[0] - 1) / 2.0])
    meta: dict[str, Any] = {
        f"align_m{r}{c}": float(matrix[r, c]) for r in range(2) for c in range(3)
    }
    meta.update(
        shift_x=float(matrix[0, 2]),
        shift_y=float(matrix[1, 2]),
        centre_shift_x=float(_apply(matrix, centre[None])[0, 0] - centre[0]),
        centre_shift_y=float(_apply(matrix, centre[None])[0, 1] - centre[1]),
        rotation=float(np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))),
        align_scale=float(np.sqrt(abs(det))),
        align_method=method,
        align_rms=float(rms),
        n_matched=len(i),
        phot_scale=scale,
        phot_offset=offset,
        phot_nstars=nphot,
    )

    def rescale(value: float | None) -> float | None:
        return None if value is None else scale * value + offset

    background = frame.background if frame.background is not None else sky_f
    noise = frame.noise if frame.noise is not None else rms_f
    return attrs.evolve(
        frame,
        data=data,
        weight=weight,
        header=_copy_header(frame, reference),
        background=rescale(background),
        noise=scale * noise,
        gain=None if frame.gain is None else frame.gain / scale,
        saturation=rescale(frame.saturation),
        meta={**frame.meta, **meta},
    )
