"""Native align backend: star matching (sep + astroalign), sub-pixel least-squares
refinement, spline resampling (scipy.ndimage) and photometric alignment.

The steps, for a frame and the reference:

1. **Detection.** ``sep`` finds stars on both images (background-subtracted, masked
   pixels excluded); windowed centroids (``sep.winpos``) give their positions.
2. **Initial transform**, by the first of these methods whose transform pairs enough
   stars (``min_matched``, and a quarter of the fewer stars):

   * ``astroalign``: ``astroalign.find_transform`` matches triangles of the brightest
     stars (coordinates are passed, so astroalign does not detect again);
   * ``pointset``: every star takes part, for sparse fields where the triangles of a few
     stars do not match (a star missing or extra on one image breaks them): every pair
     of stars on the frame and on the reference votes for a rotation and scale (the
     true one gathers a vote from each pair of common stars), and for each peak, and
     for no rotation, the offsets of every star to every star vote for the translation;
     a voted rotation must pair one star more;
   * ``wcs``: the frames' own celestial WCSs, when both have one;
   * ``phasecorr``: a translation by phase correlation of the images (each smoothed by
     the other's PSF, the matched filter for stars; refined to a fraction of a pixel),
     if its peak stands above the noise.

   When none pairs enough stars and the field is sparse (fewer than ``2 min_matched``
   stars on either image: small cutouts), the WCS transform, else the phase-correlation
   one, is used as it is: unchecked, and flagged (``fallback``). Otherwise the frame
   fails, its error naming what each method found.

   With ``initial = "none"`` no transform is sought: the frames are taken as already
   registered (simulations, OasisPy's ``align_method='fakes'``), the frame must have the
   reference's shape, its pixels are kept where they are (step 4 is skipped) and only the
   photometric alignment (step 5) is done.
3. **Refinement.** Stars are paired (mutual nearest neighbours within ``match_radius``)
   and a shift, similarity or affine transform is fitted by least squares with
   iterative clipping: a fitted star is judged by its offset from the fit of the others
   (a studentised deleted residual: with a handful of stars, a fit through all of them
   absorbs an outlier's offset); pairing and fit are repeated with the refined transform.
4. **Resampling.** ``scipy.ndimage.affine_transform`` warps the data with a spline of
   order ``order`` and the weight map with order 1. A pixel whose interpolation footprint
   touches a masked pixel or leaves the frame gets weight 0.
5. **Photometric alignment** (IRAF ``linmatch`` done on stars). Aperture fluxes of the
   paired stars on the warped frame and on the reference (after a local sep background)
   give ``scale`` = robust mean of ``flux_ref / flux_frame``, each aperture flux first
   divided by the share of a star's light its frame's PSF model puts in the aperture (the
   radius is ``phot_radius`` times the larger FWHM: frames whose PSFs differ in width or
   wings lose different shares outside it, which biased the scale by several per cent
   between frames of one seeing and different Moffat beta); the sky levels give
   ``offset = sky_ref - scale * sky_frame``; the data become ``scale * data + offset`` and
   ``gain``, ``saturation``, ``background`` and ``noise`` follow.

``meta`` records ``align_m00 .. align_m12`` (the 2x3 matrix mapping frame pixel
``(x, y)`` to reference pixel ``(x, y)``: ``x_ref = m00 x + m01 y + m02``,
``y_ref = m10 x + m11 y + m12``), ``shift_x``, ``shift_y``, ``rotation`` (degrees),
``align_scale`` (geometric), ``align_method`` (astroalign, pointset, wcs, phasecorr, none
when registration was skipped, or identity for the reference itself; also written to the
header as ``ALNMETH``), ``align_rms`` (px, of the paired stars; NaN without
any), ``n_matched``, ``align_note`` (why the methods tried first were passed over),
``choice_align`` (the method and how well, in a few words, as the core carries it into
the residual and ``residuals/log.txt``), ``fallback`` (a sentence when the transform was
not checked on stars or the flux scale not measured: the residual is flagged),
``phot_method`` (stars; sky: scale 1, only the sky levels matched, with fewer than
``min_phot_stars`` stars; off), ``phot_scale``, ``phot_offset`` and ``phot_nstars``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import AlignBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame
from oasis_core.contracts.validators import non_negative, positive
from oasis_core.engine.stats import exact_median
from oasis_native import sepstack

__all__ = ["NativeAlign", "NativeAlignOptions"]

_TRANSFORMS = ("shift", "similarity", "affine")
_INITIAL = ("auto", "astroalign", "pointset", "wcs", "phasecorr", "none")
# the methods each choice of `initial` tries, in turn
_ORDER = {
    "auto": ("astroalign", "pointset", "wcs", "phasecorr"),
    "astroalign": ("astroalign",),
    "pointset": ("pointset",),
    "wcs": ("wcs",),
    "phasecorr": ("phasecorr",),
    "none": (),  # registration skipped: the frames are taken as registered
}
_SIGMA_FLOOR = 0.05  # px: real centroids scatter by this much whatever a fit says
_PRECLIP_FLOOR = 0.3  # px: offsets (from the median offset, or the fit) never clipped
_MAX_RMS = 1.0  # px: a refined transform whose paired stars scatter more is a chance match
_POINTSET_VOTE_STARS = 30  # brightest stars whose pairs vote for rotation and scale
_POINTSET_OFFSET_STARS = 200  # brightest stars whose offsets vote for the translation
_POINTSET_MAX_SCALE = 2.0  # scales between 1/2 and 2 are considered
_POINTSET_PEAKS = 5  # (rotation, scale) peaks tried, besides no rotation
_POINTSET_MIN_BIN = 0.004  # rad: finest (rotation, log scale) bin
_NAMES = {"wcs": "WCSs", "phasecorr": "phase correlation"}  # of the unchecked methods
_REFINED = 3  # candidates of one method refined, most stars paired first
_PC_SOFT = 50.0  # sigmas: phase correlation compresses the range above this

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
        "initial transform: auto (astroalign, else pointset, else the WCSs, else phase "
        "correlation), or only one of astroalign, pointset (all star pairs vote), wcs, "
        "phasecorr (pure translation); none: the frames are already registered (no "
        "transform, no resampling: photometric alignment only)",
        choices=_INITIAL,
    )
    match_radius: float = option(
        3.0, "radius (px) to pair stars once the initial transform is known", range=positive
    )
    min_matched: int = option(
        3,
        "fewest matched stars accepted (with fewer than twice this on a frame, the WCS or "
        "phase correlation is used unchecked and flagged; else the frame fails)",
        range=(1, None),
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
        3,
        "fewest stars to measure the photometric scale (with fewer: scale 1, the sky "
        "levels matched, flagged)",
        range=(1, None),
    )


class NativeAlign(AlignBackend):
    """Align a frame on the reference with sep + astroalign + scipy.ndimage."""

    name = "native"
    Options = NativeAlignOptions
    description = (
        "sep + astroalign (point-set, WCS and phase-correlation fallbacks), spline warp, linmatch"
    )

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
        align_note="",
        choice_align="reference",
        phot_method="identity",
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
    data[bad] = exact_median(data[~bad])
    ny, nx = data.shape
    size = int(max(8, min(options.back_size, ny // 2, nx // 2)))
    sep.set_sub_object_limit(max(sep.get_sub_object_limit(), 4096))
    bkg = sep.Background(data, mask=bad, bw=size, bh=size)
    back = bkg.back()
    rms = float(bkg.globalrms)
    if not np.isfinite(rms) or rms <= 0:
        raise _err(frame, "the sky noise is zero or not finite; is the image blank?")
    sub = data - back
    sub[bad] = 0.0
    try:
        objs = sepstack.extract(sub, options.thresh, err=rms, mask=bad, minarea=options.minarea)
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


#: The last reference's stars (per process): (weak reference to the reference frame, the
#: options, its stars). Every frame of a series is aligned to one reference, which the
#: core hands a worker as the same object for every frame: its detection runs once per
#: worker rather than once per frame, and is let go with the reference.
_REFERENCE: list[Any] = []


def _reference_stars(reference: Frame, options: NativeAlignOptions) -> _Stars:
    """:func:`_detect` of ``reference``, computed once per process for the same reference
    object and options (see :data:`_REFERENCE`). Its arrays are shared by the frames
    aligned after it: nothing may write into them (sep cannot take read-only arrays)."""
    import weakref

    if _REFERENCE and _REFERENCE[0]() is reference and _REFERENCE[1] == options:
        return _REFERENCE[2]
    _REFERENCE.clear()
    stars = _detect(reference, options)
    try:
        ref = weakref.ref(reference, lambda _: _REFERENCE.clear())
    except TypeError:  # a frame type without weak references: nothing to remember
        return stars
    _REFERENCE[:] = [ref, options, stars]
    return stars


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


def _outlier_scores(src: np.ndarray, dst: np.ndarray, matrix: np.ndarray, kind: str) -> np.ndarray:
    """Each fitted star's offset from the least-squares fit ``matrix`` of all of them, in
    units of the scatter of the others, as it would be had the star been left out of the
    fit (an externally studentised residual, from the hat matrix: no refit).

    With a handful of stars a fit absorbs part of an outlier's offset and the outlier
    inflates the scatter; neither happens here. A score is NaN where the fit passes
    exactly through the star (2 stars for a similarity) or nothing is left to judge it.
    """
    n = len(src)
    e = dst - _apply(matrix, src)
    s = src - src.mean(axis=0)
    ones, zeros = np.ones(n), np.zeros(n)
    if kind == "shift" or (kind == "similarity" and n < 3) or (kind == "affine" and n < 4):
        blocks = np.stack([np.column_stack([ones, zeros]), np.column_stack([zeros, ones])], 1)
    elif kind == "similarity":
        blocks = np.stack(
            [
                np.column_stack([s[:, 0], -s[:, 1], ones, zeros]),
                np.column_stack([s[:, 1], s[:, 0], zeros, ones]),
            ],
            axis=1,
        )  # (n, 2, 4): the design rows of x' and y'
    else:
        d = np.column_stack([s, ones])
        blocks = np.stack([np.column_stack([d, 0 * d]), np.column_stack([0 * d, d])], axis=1)
    params = blocks.shape[2]
    dof = 2 * (n - 1) - params  # of the fit without the star
    out = np.full(n, np.nan)
    if dof < 1:
        return out
    try:
        inv = np.linalg.inv(np.tensordot(blocks, blocks, axes=([0, 1], [0, 1])))
    except np.linalg.LinAlgError:
        return out
    hat = np.matmul(np.matmul(blocks, inv), blocks.transpose(0, 2, 1))  # H_kk, (n, 2, 2)
    a, b = 1.0 - hat[:, 0, 0], -hat[:, 0, 1]  # I - H_kk = [[a, b], [c, d]]
    c, d = -hat[:, 1, 0], 1.0 - hat[:, 1, 1]
    det = a * d - b * c
    ok = det > 1e-9
    det = np.where(ok, det, 1.0)
    ex, ey = e[:, 0], e[:, 1]
    # e_k . (I - H_kk)^-1 e_k: what leaving the star out removes from the residual sum of
    # squares (its deleted residual, dotted with its residual)
    drop = (ex * (d * ex - b * ey) + ey * (a * ey - c * ex)) / det
    sigma = np.sqrt(np.clip(float(np.sum(e**2)) - drop, 0.0, None) / dof)
    score = np.sqrt(np.clip(drop, 0.0, None)) / np.maximum(sigma, _SIGMA_FLOOR)
    out[ok] = score[ok]
    return out


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
            # a fitted star is judged against the others (_outlier_scores), a star left
            # out against the robust scatter of the fitted ones (a 2-D distance is
            # Rayleigh: its median is 1.1774 sigma per axis)
            sigma = max(np.median(resid[keep]) / 1.1774, _SIGMA_FLOOR)
            score = resid / sigma
            score[keep] = _outlier_scores(src[i[keep]], dst[j[keep]], matrix, options.transform)
            # NaN (nothing to judge by): kept; so is a star within _PRECLIP_FLOOR of its
            # place, however tight the others (a mismatch is off by far more)
            new = ~((score > options.clip) & (resid > _PRECLIP_FLOOR))
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


def _phase_correlation(a: _Stars, b: _Stars) -> tuple[np.ndarray, float]:
    """Translation t (x, y) such that image ``b`` ~ image ``a`` shifted by t, and the
    significance of the correlation peak.

    The cross-power spectrum is weighted by both PSFs' transfer functions (Gaussians of
    each image's FWHM): each image is, in effect, smoothed by the other's PSF, which is the
    matched filter for a star and brings the two to one PSF. (A whitened, "phase-only"
    correlation weights every frequency alike: on a frame with a few stars the noise
    frequencies outnumber the stars' and the peak is lost.) The integer peak is refined by
    Newton steps on the band-limited correlation. The significance is the peak's height
    over the robust scatter of the correlation surface.
    """
    from scipy import fft

    ny = max(a.sub.shape[0], b.sub.shape[0])
    nx = max(a.sub.shape[1], b.sub.shape[1])

    def prep(stars: _Stars) -> np.ndarray:
        out = np.zeros((ny, nx))
        # in units of the sky noise; above _PC_SOFT sigmas the range is compressed so
        # that one saturated star does not outweigh every other
        img = stars.sub / stars.rms
        out[: img.shape[0], : img.shape[1]] = _PC_SOFT * np.arcsinh(img / _PC_SOFT)
        return out

    ky = fft.fftfreq(ny)[:, None]
    kx = fft.rfftfreq(nx)[None, :]
    sig2 = (a.fwhm**2 + b.fwhm**2) / 2.3548**2
    weight = np.exp(-2.0 * np.pi**2 * (kx**2 + ky**2) * sig2)
    cross = fft.rfft2(prep(b)) * np.conj(fft.rfft2(prep(a))) * weight
    corr = fft.irfft2(cross, s=(ny, nx))
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)
    med = float(np.median(corr))
    scatter = 1.4826 * float(np.median(np.abs(corr - med)))
    significance = (float(corr[py, px]) - med) / scatter if scatter > 0 else 0.0
    t = np.array([(px + nx / 2) % nx - nx / 2, (py + ny / 2) % ny - ny / 2], float)
    # C(t) = sum_k h_k Re(X_k exp(2 pi i k.t)), h = 2 for the columns rfft2 folds
    fold = np.full(cross.shape, 2.0)
    fold[:, 0] = 1.0
    if nx % 2 == 0:
        fold[:, -1] = 1.0
    cross *= fold
    wx, wy = 2.0 * np.pi * kx, 2.0 * np.pi * ky
    for _ in range(10):
        z = cross * np.exp(1j * (wx * t[0] + wy * t[1]))
        grad = -np.array([np.sum(wx * z.imag), np.sum(wy * z.imag)])
        hxy = -np.sum(wx * wy * z.real)
        hess = -np.array([[np.sum(wx**2 * z.real), hxy], [hxy, np.sum(wy**2 * z.real)]])
        if np.linalg.det(hess) <= 0 or hess[0, 0] >= 0:  # not at a maximum: keep the pixel
            break
        step = np.clip(-np.linalg.solve(hess, grad), -0.5, 0.5)
        t += step
        if np.abs(step).max() < 1e-4:
            break
    return t, significance


def _pc_threshold(stars: _Stars, shape: tuple[int, int]) -> float:
    """Significance a phase-correlation peak needs: the expected highest noise peak of a
    surface of this size and smoothness, plus 3."""
    cell = 4.0 * np.pi * max(stars.fwhm, 1.0) ** 2 / 2.3548**2  # px^2 per independent value
    n_eff = max(shape[0] * shape[1] / cell, 2.0)
    return float(np.sqrt(2.0 * np.log(n_eff)) + 3.0)


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


def _rotation_votes(src: np.ndarray, dst: np.ndarray, width: float) -> list[np.ndarray]:
    """Linear parts (2 x 2: scale x rotation) voted for by every pair of stars.

    A pair of stars on the frame and a pair on the reference, if they are the same two
    stars, give the rotation (the difference of the pairs' position angles, modulo pi:
    which end is which is unknown) and the scale (the ratio of their lengths). The true
    transform gathers one vote per pair of common stars, k (k - 1) / 2 for k common stars,
    while chance pairings spread over the (rotation, log scale) plane. The highest peaks
    of a histogram of bin ``width`` (rad; counts summed over 3 x 3 bins), each re-centred
    on the median of its votes, are returned highest first, each as both rotations
    (theta and theta + pi).
    """
    from scipy import ndimage

    def pairs(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i, j = np.triu_indices(len(xy), 1)
        v = xy[j] - xy[i]
        length = np.hypot(v[:, 0], v[:, 1])
        ok = length > 0
        return np.log(length[ok]), np.arctan2(v[ok, 1], v[ok, 0])

    la, ta = pairs(src)
    lb, tb = pairs(dst)
    if len(la) == 0 or len(lb) == 0:
        return []
    lim = np.log(_POINTSET_MAX_SCALE)
    logs = lb[None, :] - la[:, None]
    theta = (tb[None, :] - ta[:, None]) % np.pi
    keep = np.abs(logs) <= lim
    logs, theta = logs[keep], theta[keep]
    width = max(width, _POINTSET_MIN_BIN)
    n_t = int(np.ceil(np.pi / width))
    n_s = 2 * int(np.ceil(lim / width)) + 1
    hist, t_edges, s_edges = np.histogram2d(
        theta, logs, bins=(n_t, n_s), range=((0.0, np.pi), (-lim, lim))
    )
    mode = ("wrap", "constant")
    count = ndimage.uniform_filter(hist, size=3, mode=mode) * 9.0
    peaks = (count == ndimage.maximum_filter(count, size=3, mode=mode)) & (count >= 2.5)
    it, isc = np.nonzero(peaks)
    found: list[tuple[float, float]] = []
    for k in np.argsort(-count[it, isc], kind="stable"):
        t0 = 0.5 * (t_edges[it[k]] + t_edges[it[k] + 1])
        s0 = 0.5 * (s_edges[isc[k]] + s_edges[isc[k] + 1])
        for half in (1.5 * width, 0.75 * width):  # re-centre on the votes' median
            dt = (theta - t0 + np.pi / 2) % np.pi - np.pi / 2
            near = (np.abs(dt) <= half) & (np.abs(logs - s0) <= half)
            if not near.any():
                break
            t0, s0 = t0 + float(np.median(dt[near])), float(np.median(logs[near]))
        if any(
            abs((t0 - t1 + np.pi / 2) % np.pi - np.pi / 2) < 2 * width and abs(s0 - s1) < 2 * width
            for t1, s1 in found
        ):
            continue  # the same peak (a plateau of the histogram)
        found.append((t0, s0))
        if len(found) == _POINTSET_PEAKS:
            break
    out = []
    for t0, s0 in found:
        for t in (t0, t0 + np.pi):
            out.append(np.exp(s0) * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]))
    return out


def _offset_vote(src: np.ndarray, dst: np.ndarray, radius: float) -> np.ndarray | None:
    """The translation most star pairs agree on: the densest cell (3 x 3 bins of
    ``radius``) of the histogram of every offset ``dst[j] - src[i]``, refined to the median
    of the offsets near it; None without stars. (The histogram is kept sparse: the
    offsets of two large frames span thousands of bins a side.)"""
    if len(src) == 0 or len(dst) == 0:
        return None
    off = (dst[None, :, :] - src[:, None, :]).reshape(-1, 2)
    cell = np.floor((off - off.min(axis=0)) / radius).astype(np.int64) + 1
    span = int(cell[:, 1].max()) + 2
    cells, counts = np.unique(cell[:, 0] * span + cell[:, 1], return_counts=True)
    total = np.zeros(len(cells), np.int64)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            near = cells + dx * span + dy
            at = np.minimum(np.searchsorted(cells, near), len(cells) - 1)
            total += np.where(cells[at] == near, counts[at], 0)
    best = cells[int(np.argmax(total))]
    t = off.min(axis=0) + (np.array([best // span, best % span]) - 0.5) * radius
    for half in (1.5 * radius, 0.75 * radius):
        near = np.all(np.abs(off - t) <= half, axis=1)
        if not near.any():
            break
        t = np.median(off[near], axis=0)
    return t


def _pointset_candidates(
    fs: _Stars, rs: _Stars, options: NativeAlignOptions, shape: tuple[int, int]
) -> list[tuple[np.ndarray, int]]:
    """Transforms matching the frame's stars to the reference's from every pair of stars:
    a pure translation, and the rotations and scales voted for by pairs of stars
    (:func:`_rotation_votes`), each with the translation the offsets vote for
    (:func:`_offset_vote`); with each, the extra stars it must pair (1 for a voted
    rotation and scale: two stars fix those, so a third pairs by chance more often)."""
    src, dst = fs.xy[:_POINTSET_OFFSET_STARS], rs.xy[:_POINTSET_OFFSET_STARS]
    linear = [(np.eye(2), 0)]
    if options.transform != "shift":
        # a rotation error of `width` moves a star at the far corner by one match radius
        width = options.match_radius / float(np.hypot(*shape))
        nv = _POINTSET_VOTE_STARS
        linear += [(lin, 1) for lin in _rotation_votes(fs.xy[:nv], rs.xy[:nv], width)]
    out = []
    for lin, extra in linear:
        t = _offset_vote(src @ lin.T, dst, options.match_radius)
        if t is not None:
            matrix = np.eye(3)
            matrix[:2, :2] = lin
            matrix[:2, 2] = t
            out.append((matrix, extra))
    return out


@attrs.frozen
class _Solution:
    """The transform chosen, how it was found, and the stars paired under it."""

    matrix: np.ndarray
    method: str
    i: np.ndarray  # indices of the paired stars on the frame
    j: np.ndarray  # and on the reference
    rms: float  # px, of the paired stars (NaN without any)
    note: str  # why the methods tried before it were passed over
    flag: str  # "" or why the transform is not checked on the stars


class _NoCandidate(Exception):
    """A method that gives no transform for this pair (the reason is the message)."""


def _candidates(
    method: str,
    frame: Frame,
    reference: Frame,
    fs: _Stars,
    rs: _Stars,
    options: NativeAlignOptions,
) -> list[tuple[np.ndarray, int]]:
    """The candidate transforms of one method, each with the number of stars it must pair
    beyond the usual (see :func:`_pointset_candidates`); _NoCandidate says why none."""
    nf, nr = len(fs.xy), len(rs.xy)
    if method == "astroalign":
        import astroalign

        if min(nf, nr) < 3:
            raise _NoCandidate(f"{nf} stars on the frame, {nr} on the reference")
        ncp = options.max_control_points
        try:
            tform, _ = astroalign.find_transform(fs.xy[:ncp], rs.xy[:ncp], max_control_points=ncp)
        except (ValueError, astroalign.MaxIterError) as err:
            raise _NoCandidate(str(err).rstrip(".")) from err
        matrix = np.asarray(tform.params, dtype=float)
        if not np.all(np.isfinite(matrix)):
            raise _NoCandidate("degenerate transform")
        return [(matrix, 0)]
    if method == "pointset":
        if min(nf, nr) < max(options.min_matched, 2):
            raise _NoCandidate(f"{nf} stars on the frame, {nr} on the reference")
        return _pointset_candidates(fs, rs, options, reference.shape)
    if method == "wcs":
        matrix = _wcs_transform(frame, reference)
        if matrix is None:
            raise _NoCandidate("no celestial WCS on both")
        return [(matrix, 0)]
    t, significance = _phase_correlation(fs, rs)
    need = _pc_threshold(fs, reference.shape)
    if significance < need:
        raise _NoCandidate(f"no correlation peak (S/N {significance:.1f} < {need:.1f})")
    matrix = np.eye(3)
    matrix[:2, 2] = t
    return [(matrix, 0)]


def _find_transform(
    frame: Frame, reference: Frame, fs: _Stars, rs: _Stars, options: NativeAlignOptions
) -> _Solution:
    """Try the methods of ``options.initial`` in turn (auto: astroalign, the point-set
    match, the WCSs, phase correlation); the first whose transform pairs enough stars is
    refined on them and kept. When none does and the field is sparse (fewer than
    ``2 min_matched`` stars on either image), the first WCS or phase-correlation transform
    is kept as it is, flagged."""
    nf, nr = len(fs.xy), len(rs.xy)
    wanted = max(options.min_matched, int(np.ceil(0.25 * min(nf, nr))))
    notes: list[str] = []
    unchecked: list[tuple[str, np.ndarray]] = []
    for method in _ORDER[options.initial]:
        try:
            candidates = _candidates(method, frame, reference, fs, rs, options)
        except _NoCandidate as err:
            notes.append(f"{method}: {err}")
            continue
        if method in ("wcs", "phasecorr"):
            unchecked.append((method, candidates[0][0]))
        counts = [len(_match(fs.xy, rs.xy, m, options.match_radius)[0]) for m, _ in candidates]
        best_n = max(counts, default=0)
        for k in np.argsort(-np.asarray(counts), kind="stable")[:_REFINED]:
            start, extra = candidates[k]
            if counts[k] < wanted + extra:
                continue
            matrix, i, j, rms = _refine(fs.xy, rs.xy, start, options)
            if len(i) >= options.min_matched + extra and rms <= _MAX_RMS:
                return _Solution(matrix, method, i, j, rms, "; ".join(notes), "")
        notes.append(f"{method}: {best_n} stars matched")
    if unchecked and min(nf, nr) < 2 * options.min_matched:
        method, matrix = unchecked[0]
        i, j = _match(fs.xy, rs.xy, matrix, options.match_radius)
        resid = _apply(matrix, fs.xy[i]) - rs.xy[j]
        rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1)))) if len(i) else float("nan")
        flag = (
            f"alignment from the {_NAMES[method]}, not checked on stars ({nf} on the "
            f"frame, {nr} on the reference)"
        )
        return _Solution(matrix, method, i, j, rms, "; ".join(notes), flag)
    raise _err(
        frame,
        f"no transform found ({nf} stars on the frame, {nr} on the reference, "
        f"{wanted} must match; {'; '.join(notes)}); check that the frames overlap, or "
        "lower align.native.thresh (more stars) or align.native.min_matched",
        n_matched=0,
    )


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
        bad = _grown(bad, order // 2)
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
    sky = exact_median(fs.back.ravel())
    for row, (lo, hi) in enumerate(_inside_columns(inv, fs.bad.shape, shape)):
        data[row, :lo] = sky
        data[row, hi:] = sky
    return data, weight


def _grown(bad: np.ndarray, steps: int) -> np.ndarray:
    """``bad`` grown ``steps`` times by its 4 neighbours, pixels beyond the edges counted
    bad (``scipy.ndimage.binary_dilation(bad, iterations=steps, border_value=1)``), by
    whole-array ORs of shifted slices."""
    for _ in range(steps):
        out = bad.copy()
        out[1:] |= bad[:-1]
        out[:-1] |= bad[1:]
        out[:, 1:] |= bad[:, :-1]
        out[:, :-1] |= bad[:, 1:]
        out[0], out[-1], out[:, 0], out[:, -1] = True, True, True, True
        bad = out
    return bad


def _inside_columns(
    inv: np.ndarray, frame_shape: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """For each output row, the columns ``[lo, hi)`` whose input position (``inv`` maps
    output (x, y) to input) lies on the frame, within half a pixel of its edge pixels'
    centres: an affine map keeps a row's inside one interval, solved row by row."""
    ny_in, nx_in = frame_shape
    ny, nx = shape
    y = np.arange(ny, dtype=np.float64)
    lo = np.zeros(ny)
    hi = np.full(ny, float(nx - 1))
    empty = np.zeros(ny, bool)
    # input coordinate = a x + (b y + c) must lie in [-0.5, n_in - 0.5]
    for a, b, c, n_in in (
        (inv[0, 0], inv[0, 1], inv[0, 2], nx_in),
        (inv[1, 0], inv[1, 1], inv[1, 2], ny_in),
    ):
        start = b * y + c
        if abs(a) < 1e-12:  # constant along the row: all in or all out
            empty |= (start < -0.5) | (start > n_in - 0.5)
            continue
        x1 = (-0.5 - start) / a
        x2 = (n_in - 0.5 - start) / a
        lo = np.maximum(lo, np.minimum(x1, x2))
        hi = np.minimum(hi, np.maximum(x1, x2))
    first = np.ceil(lo - 1e-9).astype(np.int64)
    last = np.floor(hi + 1e-9).astype(np.int64) + 1
    first = np.clip(first, 0, nx)
    last = np.clip(last, 0, nx)
    last = np.where(empty | (last < first), first, last)
    return np.stack([first, last], axis=1)


def _encircled(frame: Frame, radius: float) -> float:
    """The share of a star's light within ``radius`` pixels of its centre, by the frame's
    PSF model (1 without one)."""
    import sep

    if frame.psf is None:
        return 1.0
    image = np.ascontiguousarray(np.asarray(frame.psf.image, np.float64))
    total = float(image.sum())
    if not (math.isfinite(total) and total > 0):
        return 1.0
    c = (image.shape[0] - 1) / 2.0
    inside, _, _ = sep.sum_circle(image, [c], [c], radius, subpix=5)
    share = float(inside[0]) / total
    return share if 0.3 < share <= 1.0 else 1.0


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
    magnification: float = 1.0,
) -> tuple[float, float, int, float, float, str]:
    """(scale, offset, nstars, sky_frame, noise_frame, flag) of the warped frame; with
    fewer than ``min_phot_stars`` stars the scale is 1 and only the sky levels are
    matched (``flag`` says so). ``magnification``: reference pixels per frame pixel."""
    import sep

    bad = ~(weight > 0)
    img = np.array(data, dtype=np.float32, order="C")
    img[bad] = exact_median(img[~bad]) if (~bad).any() else 0.0
    size = int(max(8, min(options.back_size, img.shape[0] // 2, img.shape[1] // 2)))
    bkg = sep.Background(img, mask=bad, bw=size, bh=size)
    back = bkg.back()
    sub = img - back
    sub[bad] = 0.0
    both = ~bad & ~rs.bad
    if not both.any():
        raise _err(frame, "no pixel overlaps the reference after warping")
    sky_f = exact_median(back[both])
    sky_r = exact_median(rs.back[both])
    rms_f = float(bkg.globalrms)
    if not options.photometric:
        return 1.0, 0.0, 0, sky_f, rms_f, ""
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
        flag = (
            f"photometric scale not measured ({n} paired unsaturated stars with S/N > "
            f"{options.phot_snr:g}; align.native.min_phot_stars = {options.min_phot_stars}): "
            "scale 1, sky levels matched"
        )
        return 1.0, sky_r - sky_f, n, sky_f, rms_f, flag
    # the apertures' light as totals: each frame's PSF model says what share of a star's
    # light falls within the radius (frames of different seeing, or of one seeing and
    # different wings, lose different shares outside it)
    shares = _encircled(frame, radius / magnification) / _encircled(reference, radius)
    ratio = f_r[ok] / f_f[ok] * shares
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
    return scale, offset, int(keep.sum()), sky_f, rms_f, ""


def _registered(
    frame: Frame, fs: _Stars, rs: _Stars, options: NativeAlignOptions
) -> tuple[_Solution, np.ndarray, np.ndarray]:
    """``initial = "none"``: the frame taken as registered on the reference. The identity
    transform (stars paired under it, for the photometric scale), and the frame's own
    pixels: data unchanged except masked pixels, set to the sky background as the warp
    does, and the weight map with non-finite data at 0."""
    eye = np.eye(3)
    i, j = _match(fs.xy, rs.xy, eye, options.match_radius)
    resid = fs.xy[i] - rs.xy[j]
    rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1)))) if len(i) else float("nan")
    found = _Solution(eye, "none", i, j, rms, "registration skipped (align.native.initial)", "")
    data = np.where(fs.bad, fs.back, np.asarray(frame.data)).astype(np.float32)
    weight = np.where(fs.bad, 0.0, np.asarray(frame.weight)).astype(np.float32)
    return found, data, np.clip(weight, 0.0, 1.0)


def _align(frame: Frame, reference: Frame, options: NativeAlignOptions) -> Frame:
    if options.initial == "none" and frame.shape != reference.shape:
        raise _err(
            frame,
            f"align.native.initial = 'none' takes the frames as registered, but the frame "
            f"is {frame.shape} and the reference {reference.shape}; choose another "
            "align.native.initial",
        )
    rs = _reference_stars(reference, options)
    fs = _detect(frame, options)
    if options.initial == "none":
        found, data, weight = _registered(frame, fs, rs, options)
    else:
        found = _find_transform(frame, reference, fs, rs, options)
        data, weight = _warp(frame, fs, found.matrix, reference.shape, options.order)
    matrix, i, j = found.matrix, found.i, found.j
    if not (weight > 0).any():
        raise _err(frame, "no pixel of the frame lands on the reference grid")
    scale, offset, nphot, sky_f, rms_f, phot_flag = _photometry(
        frame,
        reference,
        rs,
        fs,
        data,
        weight,
        rs.xy[j],
        rs.saturated[j],
        fs.saturated[i],
        options,
        magnification=math.sqrt(abs(float(np.linalg.det(matrix[:2, :2])))),
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
        align_method=found.method,
        align_rms=float(found.rms),
        n_matched=len(i),
        align_note=found.note,
        choice_align=(
            "none (taken as registered)"
            if found.method == "none"
            else f"{found.method} ({len(i)} stars, rms {found.rms:.2f} px)"
            if not found.flag
            else f"{found.method} (unchecked, {len(i)} stars paired)"
        ),
        fallback="; ".join(f for f in (frame.meta.get("fallback"), found.flag, phot_flag) if f),
        phot_method=("stars" if not phot_flag else "sky") if options.photometric else "off",
        phot_scale=scale,
        phot_offset=offset,
        phot_nstars=nphot,
    )

    def rescale(value: float | None) -> float | None:
        return None if value is None else scale * value + offset

    background = frame.background if frame.background is not None else sky_f
    noise = frame.noise if frame.noise is not None else rms_f
    header = _copy_header(frame, reference)
    header["ALNMETH"] = (found.method, "align method (none: taken as registered)")
    return attrs.evolve(
        frame,
        data=data,
        weight=weight,
        header=header,
        background=rescale(background),
        noise=scale * noise,
        gain=None if frame.gain is None else frame.gain / scale,
        saturation=rescale(frame.saturation),
        meta={**frame.meta, **meta},
    )
