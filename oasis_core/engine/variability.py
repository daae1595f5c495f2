"""The variability image: where the residuals vary, whichever way.

The master residual is a signed mean: a source that is bright on the template nights is
negative in most residuals and shows there as a negative source; one that goes up and
down averages out. The variability image looks at the spread instead. For residual ``i``
with data ``R_i`` (its median removed), noise ``sigma_i`` and PSF width ``s_i`` (its
``FWHM`` card over 2.3548), the PSF-weighted flux at every pixel and its variance are::

    f_i = G_i * R_i                   (G_i: a unit-sum Gaussian of width s_i)
    v_i = (G_i**2 * sigma_i**2) c_i**2 + (eps_i t_i)**2 + (w_i u_i)**2

where ``c_i`` is the robust spread of ``f_i / sqrt(v_i)`` when above 1 (noise correlated
between neighbouring pixels, as in a residual whose science frame was convolved), ``t_i``
the template's sources weighted the same way (``G_i * T``, its sky removed) and ``eps_i``
the residual's own mismatch at stars (:func:`mismatch`: a kernel that scaled the stars a
percent wrong leaves that percent of every star in the residual, which is not
variability), and ``w_i u_i`` the same in the stars' wings, where a kernel that matched
the cores leaves a ring: ``u_i`` the template smoothed three times wider, ``w_i`` measured
where ``u_i`` outshines ``t_i`` (without a template both terms are left out). The
statistic is the chi-square of the ``f_i`` about their weighted mean::

    chi2 = sum(f_i**2 / v_i) - sum(f_i / v_i)**2 / sum(1 / v_i)

over the ``n`` residuals with data there but the one farthest from zero (a single
frame's artefact, a cosmic ray or a satellite trail, is not variability; a pixel is left
out of a residual when more than 5 % of its PSF weight falls on pixels of weight below
0.5, where less than half the data behind it is good), with
``n - 2`` degrees of freedom, turned into the Gaussian significance of the same tail
probability, then centred and scaled by the image's own median and robust spread (leaving
the largest term out shifts the null), so that the image is about N(0, 1) where nothing
varies and detection on it works like detection on a residual in sigma units.
A constant source that was subtracted well is flat; a transient, a fading source and a
variable that is brighter on the template all stand out, with no sign.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from oasis_core.contracts.model import MIN_WEIGHT, Residual

__all__ = [
    "ARTEFACTS",
    "MIN_RESIDUALS",
    "artefact_verdict",
    "chi2_significance",
    "detection_kinds",
    "exempt_varying",
    "mismatch",
    "residual_terms",
    "template_artifacts",
    "template_sigma",
    "template_stars",
    "variability_image",
]

#: Fewest residuals a variability image is made from (a spread of two means little).
MIN_RESIDUALS = 3


#: Width of the wings' envelope, in units of the PSF's sigma: a kernel that matches the
#: stars' cores leaves its errors out to a few FWHM (a ring), where the star smoothed to
#: the PSF is faint but smoothed this wide is not.
WING_WIDTH = 3.0

#: Largest fraction of a pixel's PSF weight that may fall on masked pixels.
MASKED_WEIGHT_MAX = 0.05

#: A source the template's own frames show, in their residuals' mean, at least this many
#: sigmas (and no differently from the other residuals) is the template's (see
#: :func:`template_artifacts`).
TEMPLATE_SIGMA = 3.0


def chi2_significance(chi2: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """The Gaussian significance z with the same upper-tail probability as ``chi2`` for
    ``dof`` degrees of freedom (0 where ``dof`` < 1), clipped to [-8, 1000]: exact (the
    upper tail computed directly) while the tail is above 1e-300 (z below 37), the
    Wilson-Hilferty cube-root approximation beyond, where the tail underflows (any such
    source is far above a threshold).

    >>> z = chi2_significance(np.array([28.0, 1000.0]), np.array([10, 10]))
    >>> [round(float(v), 2) for v in z]
    [2.91, 30.79]
    """
    from scipy.special import gammaincc, ndtri

    chi2 = np.maximum(np.asarray(chi2, np.float64), 0.0)
    dof = np.asarray(dof, np.float64)
    ok = dof >= 1
    k = np.where(ok, dof, 1.0)
    tail = gammaincc(k / 2.0, chi2 / 2.0)
    exact = -ndtri(np.clip(tail, 1e-300, 1.0))
    c = 2.0 / (9.0 * k)
    cube_root = (np.cbrt(chi2 / k) - (1.0 - c)) / np.sqrt(c)
    z = np.where(tail > 1e-300, exact, cube_root)
    z = np.where(ok, z, 0.0)
    return np.clip(np.nan_to_num(z, nan=0.0, posinf=1000.0, neginf=-8.0), -8.0, 1000.0)


def _robust_spread(values: np.ndarray) -> float:
    """IQR / 1.349 of a sample of ``values`` (nan for fewer than 100)."""
    if values.size < 100:
        return float("nan")
    step = max(1, values.size // 50_000)
    q25, q75 = np.percentile(values[::step], [25, 75])
    return float((q75 - q25) / 1.349)


def _flux_and_variance(
    residual: Residual,
    template: np.ndarray | None = None,
    smoothed: dict[float, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(f, v, v0) of one residual as in the module docstring; v = 0 where it has no
    data. With ``template`` (its sources above a sky of 0), ``v`` also holds the
    residual's mismatch at stars, ``(eps t)**2`` (see :func:`mismatch`), and ``v0`` is
    the noise's alone; ``smoothed`` keeps the template smoothed at each width
    (residuals share their widths)."""
    from scipy.ndimage import gaussian_filter

    data = np.asarray(residual.data, np.float32)
    noise = np.asarray(residual.noise, np.float32)
    good = (np.asarray(residual.weight) >= MIN_WEIGHT) & (noise > 0) & np.isfinite(data)
    zeros = np.zeros(data.shape, np.float32)
    if good.sum() < 100:
        return zeros, zeros, zeros
    fwhm = float(residual.header.get("FWHM", 3.0) or 3.0)
    sigma = max(fwhm, 1.0) / 2.3548
    values = data[good]
    level = np.median(values[:: max(1, values.size // 50_000)])  # a sample's: the level
    centred = np.where(good, data - np.float32(level), np.float32(0.0))
    flux = gaussian_filter(centred, sigma, mode="constant", truncate=3.0)
    # G**2 is a Gaussian of width sigma / sqrt(2) scaled by 1 / (4 pi sigma**2)
    narrow = sigma / np.sqrt(2.0)
    var = gaussian_filter(np.where(good, noise * noise, np.float32(0.0)), narrow, truncate=3.0)
    var /= np.float32(4.0 * np.pi * sigma**2)
    usable = var > 0
    if not good.all():
        cover = gaussian_filter(good.astype(np.float32), narrow, mode="nearest", truncate=3.0)
        usable &= cover >= 1.0 - MASKED_WEIGHT_MAX
    step = max(1, int(np.sqrt(data.size / 200_000)))  # a sample of about 200,000 pixels
    sample = usable[::step, ::step]
    z = flux[::step, ::step][sample] / np.sqrt(var[::step, ::step][sample])
    spread = _robust_spread(z)
    if np.isfinite(spread) and spread > 1.0:
        var *= np.float32(spread**2)
    noise_var = np.where(usable, var, np.float32(0.0))
    if template is not None and template.shape == data.shape:
        cache = smoothed if smoothed is not None else {}
        narrow_width, wide_width = _width(sigma), _width(WING_WIDTH * sigma)
        for width in (narrow_width, wide_width):
            if width not in cache:
                cache[width] = gaussian_filter(template, width, mode="constant", truncate=3.0)
        stars = cache[narrow_width]
        eps = mismatch(flux, var, stars, usable)
        if eps > 0:
            var += np.float32(eps * eps) * stars * stars
        # the wings: where the star smoothed wide outshines it smoothed to the PSF
        wide = cache[wide_width]
        eps_wing = mismatch(flux, var, wide, usable & (stars < wide))
        if eps_wing > 0:
            var += np.float32(eps_wing * eps_wing) * wide * wide
    return np.where(usable, flux, 0.0), np.where(usable, var, 0.0), noise_var


def mismatch(flux: np.ndarray, var: np.ndarray, stars: np.ndarray, usable: np.ndarray) -> float:
    """The residual's mismatch at stars, ``eps``: the robust spread of ``f / t`` (the
    residual's PSF-weighted flux over the template's, ``stars``) where the template's
    star stands 30 times above the residual's noise, less what that noise explains; 0
    with fewer than 20 such pixels. A residual whose kernel scaled or shaped the stars a
    little wrong leaves ``eps t`` at each star (a constant star, dimmed or brightened a
    percent or two in one frame); as a term of the variance it keeps such stars from
    passing as variables, while a star that truly varies by more stands out."""
    bright = usable & (stars > 0) & (stars * stars > np.float32(900.0) * var)
    if bright.sum() < 20:
        return 0.0
    t = stars[bright].astype(np.float64)
    ratio = flux[bright] / t
    noise_part = np.median(np.sqrt(var[bright]) / t)
    spread = 1.4826 * float(np.median(np.abs(ratio)))
    return float(np.sqrt(max(spread**2 - noise_part**2, 0.0)))


def template_stars(template: np.ndarray | None) -> np.ndarray | None:
    """The template's sources above its sky (its median), 0 where it is not finite: what
    :func:`variability_image` weighs the stars' mismatch with."""
    if template is None:
        return None
    stars = np.asarray(template, np.float32)
    finite = np.isfinite(stars)
    sky = np.median(stars[finite][:: max(1, int(finite.sum()) // 50_000)])
    return np.where(finite, stars - np.float32(sky), np.float32(0.0))


#: The template is smoothed at widths a step of this many per cent apart (the nearest
#: to the residual's PSF): residuals of like seeing share one smoothed template, and the
#: mismatch's amplitude, fitted, absorbs the difference.
WIDTH_STEP = 10.0


def _width(sigma: float) -> float:
    """``sigma`` rounded to the nearest width of a geometric ladder of :data:`WIDTH_STEP`
    per cent steps."""
    step = np.log1p(WIDTH_STEP / 100.0)
    return round(float(np.exp(step * round(np.log(max(sigma, 1e-3)) / step))), 4)


def residual_terms(args: tuple[Any, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One residual's ``(f, v, v0)`` (module docstring, :func:`_flux_and_variance`) from
    ``(residual_path, template_path)``: a task an executor runs where the files are (the
    template path may be None)."""
    from oasis_core.engine import io

    residual_path, template_path = args
    stars, smoothed = (None, {}) if template_path is None else _worker_stars(template_path)
    terms = _flux_and_variance(io.read_residual(residual_path), stars, smoothed)
    while len(smoothed) > SMOOTHED_KEPT:  # the oldest first
        smoothed.pop(next(iter(smoothed)))
    return terms


#: A worker keeps the template smoothed at the last this many widths (residuals of like
#: seeing share them; the mr stage sends the residuals in order of seeing).
SMOOTHED_KEPT = 2


def _worker_stars(path: Any) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """The template's stars (:func:`template_stars`) and its smoothed versions so far: a
    worker serves many residuals of one template and keeps them in its one cache
    (:func:`oasis_core.engine.tasks.worker_cached`), not the template itself."""
    from pathlib import Path

    from oasis_core.engine import io
    from oasis_core.engine.tasks import worker_cached

    def load() -> tuple[np.ndarray, dict[float, np.ndarray]]:
        return template_stars(io.read_output_frame(Path(path)).data), {}

    return worker_cached("template stars", {"template": Path(path)}, load)


def variability_image(
    residuals: Sequence[Residual],
    template: np.ndarray | None = None,
    header: Any = None,
    *,
    terms: Iterable[tuple[Any, ...]] | None = None,
    members: Collection[str] = (),
) -> Residual:
    """The variability image of ``residuals`` (see the module docstring) as a
    :class:`Residual` in sigma units: ``data`` the significance, ``noise`` 1 where at
    least :data:`MIN_RESIDUALS` residuals have data (0 elsewhere), ``weight`` the fraction
    of residuals used (0 below that), header ``header`` (default: the first residual's)
    with ``FWHM`` the width of a point source on the image (the residuals' median FWHM
    times sqrt(2): the PSF-weighted flux is the PSF smoothed once more), ``BUNIT`` '',
    ``NCOMBINE`` and ``PSFWTD`` (true: the extract stage detects on it without smoothing
    it again). ``template`` (the template's pixels) adds the stars' mismatch terms.

    ``members``: the science frames stacked into the template. A source that is the
    template's, not the sky's (its PSF at some brightness, a hole), is in every residual
    alike, the template's own frames' too; a source of the sky is not in theirs, since
    the template is their stack (their residuals' mean there is about 0). With members,
    two more images (``extra``): ``tplsig``, the significance of the members' residuals'
    PSF-weighted mean, and ``tpldiff``, that of its difference from the other residuals'
    mean (NaN where either has none); both without the most deviant residual, like the
    chi-square. :func:`template_artifacts` reads them.

    The template test asks whether the members show a source against their noise alone
    (``v0``, without the stars' mismatch terms: a structure every residual shares, the
    template's frames' too, is the template's however bright the star under it), and
    whether they differ from the others against the noise and the mismatch (each
    frame's kernel leaves a star's mismatch a little differently).

    ``terms``: every residual's ``(f, v)``, ``(f, v, v0)`` or ``(f, v, v0, member)``
    in any order, made elsewhere (by :func:`residual_terms` on an executor's workers);
    then ``residuals`` give only the shape and headers. One pass over the residuals;
    seven images of the image's size in memory (thirteen with members).
    """
    if not residuals:
        raise ValueError("variability_image: no residual")
    shape = residuals[0].data.shape
    members = frozenset(members)
    if terms is None:
        stars = template_stars(template)
        smoothed: dict[float, np.ndarray] = {}
        terms = ((*_flux_and_variance(r, stars, smoothed), r.science in members) for r in residuals)
    # sums in float64 (the chi-square is a difference of two of them); each residual's
    # terms, and the most deviant one's, in float32
    s0 = np.zeros(shape, np.float64)
    s1 = np.zeros(shape, np.float64)
    s2 = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    worst = np.zeros(shape, np.float32)  # the largest f**2 / v so far, and its terms
    worst_inv = np.zeros(shape, np.float32)
    worst_flux = np.zeros(shape, np.float32)
    tpl: dict[str, np.ndarray] = {}  # the template test's sums, weighed by the noise alone
    if members:
        tpl = {k: np.zeros(shape, np.float64) for k in ("m0", "m1", "f0", "f1")}
        tpl["worst_inv0"] = np.zeros(shape, np.float32)
        tpl["worst_member"] = np.zeros(shape, bool)
    for term_ in terms:  # one residual at a time, whole arrays
        flux = np.asarray(term_[0], np.float32)
        var = np.asarray(term_[1], np.float32)
        var0 = np.asarray(term_[2], np.float32) if len(term_) > 2 else var
        member = bool(term_[3]) if len(term_) > 3 else False
        has = var > 0
        inv = np.zeros(shape, np.float32)
        np.divide(np.float32(1.0), var, out=inv, where=has)
        weighted = flux * inv
        term = weighted * flux
        s0 += inv
        s1 += weighted
        s2 += term
        count += has
        larger = term > worst
        np.copyto(worst, term, where=larger)
        np.copyto(worst_inv, inv, where=larger)
        np.copyto(worst_flux, flux, where=larger)
        if tpl:
            inv0 = np.zeros(shape, np.float32)
            np.divide(np.float32(1.0), var0, out=inv0, where=var0 > 0)
            np.copyto(tpl["worst_inv0"], inv0, where=larger)
            np.copyto(tpl["worst_member"], member, where=larger)
            if member:
                tpl["m0"] += inv0
                tpl["m1"] += flux * inv0
                tpl["f0"] += inv
                tpl["f1"] += weighted
    # without the most deviant residual: one frame's artefact (a cosmic ray, a trail, a
    # bad column) is not variability
    s0 -= worst_inv
    s1 -= worst_flux * worst_inv.astype(np.float64)
    s2 -= worst
    count -= (worst_inv > 0).astype(np.int32)
    enough = count >= MIN_RESIDUALS - 1
    # the significance by blocks of rows: a dozen whole-image temporaries otherwise
    z = np.empty(shape, np.float64)
    for sl in _row_blocks(shape):
        e = enough[sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            chi2 = np.where(e, s2[sl] - s1[sl] ** 2 / np.where(s0[sl] > 0, s0[sl], 1.0), 0.0)
        z[sl] = chi2_significance(chi2, np.where(e, count[sl] - 1, 0))
    del chi2
    # leaving one residual out shifts and narrows the null a little: centre and scale it
    # on the image itself (most pixels vary not at all)
    sample = z[enough]
    sample = sample[:: max(1, sample.size // 200_000)]
    if sample.size >= 100:
        q25, q50, q75 = np.percentile(sample, [25, 50, 75])
        spread = (q75 - q25) / 1.349
        if spread > 0:
            z = (z - q50) / spread
    z = np.where(enough, z, 0.0)
    extra = _template_images(tpl, s0, s1, worst_inv, worst_flux) if tpl else {}
    fwhms = [float(h.get("FWHM", 3.0) or 3.0) for h in _headers(residuals)]
    out_header = (residuals[0].header if header is None else header).copy()
    out_header["FWHM"] = (
        round(float(np.median(fwhms)) * np.sqrt(2.0), 3),
        "[pix] a point source on the variability image",
    )
    out_header["BUNIT"] = ("", "Gaussian significance of the chi-square")
    out_header["NCOMBINE"] = (len(residuals), "residuals combined")
    out_header["PSFWTD"] = (True, "PSF-weighted: detected unsmoothed")
    if extra:
        out_header["NTPLMEM"] = (len(members), "residuals of the template's own frames")
    weight = np.where(enough, (count + 1) / len(residuals), 0.0)
    return Residual(
        data=z.astype(np.float32),
        noise=enough.astype(np.float32),
        weight=weight.astype(np.float32),
        header=out_header,
        name="VAR",
        science="VAR",
        template=residuals[0].template,
        extra=extra,
    )


def _template_images(
    tpl: dict[str, np.ndarray],
    s0: np.ndarray,
    s1: np.ndarray,
    worst_inv: np.ndarray,
    worst_flux: np.ndarray,
) -> dict[str, np.ndarray]:
    """``tplsig`` and ``tpldiff`` (see :func:`variability_image`), the most deviant
    residual taken out: whether the members show the source, against their noise alone
    (``m0``, ``m1``: their sums weighed by ``1 / v0``); whether they differ from the
    others, against the noise and the stars' mismatch (``f0``, ``f1``: their sums weighed
    by ``1 / v``, and ``s0``, ``s1`` those of all residuals, the worst out already):
    each frame's kernel leaves a star's mismatch a little differently."""
    sig = np.empty(s0.shape, np.float32)
    diff = np.empty(s0.shape, np.float32)
    for sl in _row_blocks(s0.shape):  # by blocks of rows: no whole-image temporaries
        worst_inv0, member = tpl["worst_inv0"][sl], tpl["worst_member"][sl]
        w_inv, w_flux = worst_inv[sl], worst_flux[sl]
        m0 = tpl["m0"][sl] - np.where(member, worst_inv0, 0.0)
        m1 = tpl["m1"][sl] - np.where(member, w_flux * worst_inv0, 0.0)
        f0 = tpl["f0"][sl] - np.where(member, w_inv, 0.0)
        f1 = tpl["f1"][sl] - np.where(member, w_flux * w_inv, 0.0)
        o0 = s0[sl] - f0
        o1 = s1[sl] - f1
        tiny = 1e-12 * np.maximum(s0[sl], 1e-300)
        has_m, has_f, has_o = m0 > 0, f0 > tiny, o0 > tiny
        with np.errstate(divide="ignore", invalid="ignore"):
            sig[sl] = np.where(has_m, m1 / np.sqrt(m0), np.nan)
            diff[sl] = np.where(
                has_f & has_o, (f1 / f0 - o1 / o0) / np.sqrt(1.0 / f0 + 1.0 / o0), np.nan
            )
    return {"tplsig": sig, "tpldiff": diff}


#: Rows per block of the variability image's last steps (about 1 Mpix of 2048 columns).
_BLOCK_PIXELS = 1 << 20


def _row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    rows = max(1, _BLOCK_PIXELS // max(1, int(shape[1])))
    for r0 in range(0, int(shape[0]), rows):
        yield slice(r0, min(int(shape[0]), r0 + rows))


def template_artifacts(table: Any, images: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """Which sources of ``table`` (a residual's or the master residual's detections:
    ``x``, ``y``, ``sign``) are the template's, not the sky's: where the template's own
    frames show them in their residuals' mean, at :data:`TEMPLATE_SIGMA` or more with their sign, no
    differently from the other residuals (``tplsig``, ``tpldiff`` of
    :func:`variability_image`). A template stacked from frames of different seeing
    gives faint stars another PSF than bright ones (a median is not linear in the
    noise); the kernel, fitted on the bright ones, leaves the faint ones in every
    residual, and the master residual stacks them into sources that no frame holds. A
    single residual's detection on such a structure (by a bright star, where it stands
    out in one frame's noise) is the template's too.
    All False without the images."""
    sig = template_sigma(table, images)
    if images is None or "tpldiff" not in images:
        return sig >= TEMPLATE_SIGMA  # NaN (no image there) is False
    diff = np.abs(_at(table, images["tpldiff"]))
    return (sig >= TEMPLATE_SIGMA) & ~(diff >= TEMPLATE_SIGMA)


def template_sigma(table: Any, images: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The template's own frames' residuals' mean at each source of ``table`` (``x``,
    ``y``, ``sign``), in sigmas, signed like the source (``tplsig`` of
    :func:`variability_image`, at the nearest pixel); NaN without the image."""
    if not images or "tplsig" not in images:
        return np.full(len(table), np.nan, np.float32)
    sign = np.sign(np.asarray(table["sign"], float)) if "sign" in table.colnames else 1.0
    return (_at(table, images["tplsig"]) * sign).astype(np.float32)


def _at(table: Any, image: np.ndarray) -> np.ndarray:
    """``image`` at the nearest pixel to each source of ``table`` (clipped to the image)."""
    ny, nx = image.shape
    x = np.clip(np.rint(np.asarray(table["x"], float)).astype(int), 0, nx - 1)
    y = np.clip(np.rint(np.asarray(table["y"], float)).astype(int), 0, ny - 1)
    return np.asarray(image[y, x], np.float64)


def _headers(residuals: Sequence[Any]) -> list[Any]:
    """The residuals' headers (a series read from disk gives them without the pixels)."""
    headers = getattr(residuals, "headers", None)
    return list(headers()) if callable(headers) else [r.header for r in residuals]


def _time_order(detections: Mapping[str, Any]) -> dict[str, int]:
    """Each residual's rank in time (by its ``mjd`` column; the given order where a
    residual has no time)."""
    names = list(detections)
    times = []
    for name in names:
        table = detections[name]
        mjd = table["mjd"] if "mjd" in table.colnames and len(table) else None
        known = mjd is not None and not np.ma.getmaskarray(mjd)[0]
        times.append(float(np.ma.getdata(mjd)[0]) if known else np.nan)
    if not np.isfinite(times).all():
        return {name: k for k, name in enumerate(names)}
    return {name: int(r) for r, name in zip(np.argsort(np.argsort(times)), names, strict=True)}


def detection_kinds(sources: Any, detections: Mapping[str, Any], radius: float) -> np.ndarray:
    """The kind of each source found on the variability image, from the signs of the
    individual residuals' detections within ``radius`` pixels and their order in time:
    ``transient`` when only positive ones (or the negative ones all came first: it
    appeared), ``fading`` when the positive ones all came first, else ``variable``
    (both ways, only negative ones: brighter on the template, or none). The light curve
    of the photometry stage refines this."""
    from oasis_core.engine.sources import match_catalogs

    n = len(sources)
    first_pos = np.full(n, np.inf)
    last_pos = np.full(n, -np.inf)
    first_neg = np.full(n, np.inf)
    last_neg = np.full(n, -np.inf)
    order = _time_order(detections)
    for name, table in detections.items():  # one catalog per residual
        hit = match_catalogs(sources, table, radius)
        found = hit >= 0
        if not found.any():
            continue
        sign = np.asarray(table["sign"], float)[hit[found]]
        rank = float(order[name])
        for lo, hi, which in ((first_pos, last_pos, sign > 0), (first_neg, last_neg, sign < 0)):
            idx = np.flatnonzero(found)[which]
            lo[idx] = np.minimum(lo[idx], rank)
            hi[idx] = np.maximum(hi[idx], rank)
    pos, neg = np.isfinite(first_pos), np.isfinite(first_neg)
    kind = np.full(n, "variable", dtype="U9")
    kind[pos & (~neg | (last_neg < first_pos))] = "transient"
    kind[pos & neg & (last_pos < first_neg)] = "fading"
    return kind


#: The reasons that call a residual's detection an artefact of the subtraction or of the
#: mask (:mod:`oasis_core.engine.sources`), not a faint or negative source.
ARTEFACTS = ("wing", "masked", "dipole", "extended", "sharp", "point", "template")


def artefact_verdict(sources: Any, detections: Mapping[str, Any], radius: float) -> np.ndarray:
    """The ``reason`` of each source of the variability image: its own, unless the
    residuals detected it and called every one of those detections an artefact
    (:data:`ARTEFACTS`; within one FWHM of the source, the ``fwhm`` column, at least
    ``radius`` px): then their most common reason. The variability image sees that the
    residuals differ there; the residuals say why: the halo a kernel left around a bright
    star in the broadest frames only, its core masked. ``detections``: each residual's
    detections, judged without the ``negative`` and ``majority`` filters (a variable is
    fainter than the template at times, and found in most frames)."""
    reason = np.asarray(sources["reason"], dtype="U10").copy()
    if not len(sources):
        return reason
    xs, ys = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    width = np.asarray(sources["fwhm"], float) if "fwhm" in sources.colnames else np.zeros(len(xs))
    reach = np.maximum(np.nan_to_num(width, nan=0.0), radius)
    found: list[list[str]] = [[] for _ in range(len(xs))]
    for table in detections.values():
        if not len(table):
            continue
        tx, ty = np.asarray(table["x"], float), np.asarray(table["y"], float)
        why = np.asarray(table["reason"], dtype="U10")
        near = np.hypot(tx[None] - xs[:, None], ty[None] - ys[:, None]) <= reach[:, None]
        for i, j in zip(*np.nonzero(near), strict=True):
            found[i].append(str(why[j]))
    for i, whys in enumerate(found):
        if reason[i] == "kept" and whys and all(w in ARTEFACTS for w in whys):
            values, counts = np.unique(whys, return_counts=True)
            reason[i] = values[np.argmax(counts)]
    return reason


def exempt_varying(table: Any, varying: Any, radius: float, lenient: Any) -> Any:
    """Give ``table`` (a filtered catalog of a residual or of the master residual) a
    ``kind`` column and keep its sources that vary: a detection within ``radius`` pixels
    of a kept source of the variability image (``varying``, with its ``kind``) takes that
    kind and the ``reason`` of ``lenient`` (the same detections filtered without the
    ``negative`` and ``majority`` filters: those serve a transient search, and a variable
    is dimmer than the template on some nights and found on most). Other detections are
    ``transient`` when positive, ``fading`` when negative."""
    from oasis_core.engine.sources import match_catalogs

    n = len(table)
    sign = np.asarray(table["sign"], float) if n else np.zeros(0)
    kind = np.where(sign < 0, "fading", "transient").astype("U9")
    if n and varying is not None and len(varying):
        hit = match_catalogs(table, varying, radius)
        matched = hit >= 0
        kind[matched] = np.asarray(varying["kind"], dtype="U9")[hit[matched]]
        reason = np.asarray(table["reason"], dtype="U10")
        reason[matched] = np.asarray(lenient["reason"], dtype="U10")[matched]
        table["reason"] = reason
    table["kind"] = kind
    return table
