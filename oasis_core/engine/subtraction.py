"""Subtraction as the core runs it, for the pipeline and for one pair.

:func:`run_subtraction` calls a subtract backend with the core's rules around it:

* **optimisation** (``[subtract] optimize``): the backend's
  :meth:`~oasis_core.contracts.backends.SubtractBackend.candidates` are tried cheapest
  first, up to ``max_tries``; the first whose Q reaches ``q_ceiling`` stops the search and
  the best Q is kept. ``meta`` records ``tries``, ``choice`` (1-based) and the backend's
  ``config``;
* **judgement**: a Q below ``q_floor`` fully masks the residual, and so does a residual
  that leaves the template's brightest stars at more than ``star_left_max`` of their flux
  (a wrong flux scale, which Q does not see: :func:`star_check`); a mostly masked residual
  or a backend's own flag (too few stamps) is recorded in ``meta["flag"]`` and logged.
  Where the template's stack misses frames over a source (a star saturated in the
  sharpest frames: :func:`oasis_core.engine.stacking.incomplete_sources`) the residual
  gets weight 0, and within a FWHM of it, whatever the backend.

A bound selector (the backend ``auto``, :mod:`oasis_core.engine.auto`) runs its own
candidates, each through :func:`run_subtraction`. One pair outside a target
(``oasis subtract-pair``): :mod:`oasis_core.engine.pair`.

**What was done** (the choices): a backend records each choice it made in ``meta`` under
a key starting with :data:`CHOICE_PREFIX` (``"choice_"``), e.g. ``meta["choice_kernel"] =
"delta basis"``, ``meta["choice_psf"] = "Moffat from the FWHM"``; the align stage does the
same in the aligned frame's ``meta`` (``choice_align``), and the core carries those into
the residual (:func:`frame_choices`); ``backend = "auto"`` adds ``choice_backend``. They
land in the residual's header as ``OAS CHOICE_<NAME>`` cards and in ``residuals/log.txt``
(``name=value`` in its ``choices`` field, :func:`choice_text`). A backend (or the align
stage) that had to fall back to a simpler method says so in ``meta["fallback"]`` (a
sentence): :func:`judge_residual` then flags the residual (``OAS FLAG``) without masking
it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import OasisError, StageError
from oasis_core.contracts.model import Frame, Residual, Template
from oasis_core.engine.config import SubtractSettings

__all__ = [
    "CHOICE_PREFIX",
    "FALLBACK_KEY",
    "better_q",
    "choice_text",
    "choices",
    "frame_choices",
    "judge_residual",
    "new_sources",
    "residual_cards",
    "run_subtraction",
    "star_check",
    "subtract_settings",
    "unnamed",
]

log = logging.getLogger("oasis")


#: ``meta`` keys starting with this record a choice a backend or the core made (see the
#: module doc): ``choice_kernel``, ``choice_psf``, ``choice_align``, ``choice_backend``...
CHOICE_PREFIX = "choice_"


#: The ``meta`` key in which a backend or the align stage says, in a sentence, that it fell
#: back to a simpler method (the residual is flagged, not masked).
FALLBACK_KEY = "fallback"


def choices(meta: Mapping[str, Any]) -> dict[str, str]:
    """The choices recorded in ``meta`` (keys :data:`CHOICE_PREFIX` + name), by name.

    Examples
    --------
    >>> choices({"choice_kernel": "delta", "choice": 2, "q": 0.9})
    {'kernel': 'delta'}
    """
    return {
        str(k)[len(CHOICE_PREFIX) :]: str(v)
        for k, v in meta.items()
        if str(k).startswith(CHOICE_PREFIX) and str(v) != ""
    }


def choice_text(meta: Mapping[str, Any]) -> str:
    """The choices as one short line, ``name=value`` separated by commas (in the order
    recorded): what ``residuals/log.txt`` and ``oasis subtract-pair`` show.

    Examples
    --------
    >>> choice_text({"choice_align": "phase correlation", "choice_kernel": "delta"})
    'align=phase correlation, kernel=delta'
    """
    return ", ".join(f"{k}={v}" for k, v in choices(meta).items())


def frame_choices(frame: Frame) -> dict[str, Any]:
    """The choices and fallback an earlier stage recorded in ``frame``'s header or meta
    (the align stage's ``OAS CHOICE_ALIGN``, ``OAS FALLBACK``...), as ``meta`` keys, to
    carry into the residual made from it."""
    found: dict[str, Any] = {}
    header = frame.header
    if header is not None:
        for key in list(header.keys()):
            name = str(key)
            if not name.startswith("OAS "):
                continue
            meta_key = name[4:].lower()
            if meta_key.startswith(CHOICE_PREFIX) or meta_key == FALLBACK_KEY:
                found[meta_key] = header[key]
    for key, value in (frame.meta or {}).items():
        if str(key).startswith(CHOICE_PREFIX) or key == FALLBACK_KEY:
            found[str(key)] = value
    return {k: v for k, v in found.items() if str(v) != ""}


def _with_frame_choices(residual: Residual, science: Frame) -> Residual:
    """``residual`` with the science frame's recorded choices (the backend's own win) and
    its fallback joined to the backend's."""
    carried = frame_choices(science)
    if not carried:
        return residual
    meta = {**{k: v for k, v in carried.items() if k != FALLBACK_KEY}, **residual.meta}
    falls = [str(v) for v in (carried.get(FALLBACK_KEY), residual.meta.get(FALLBACK_KEY)) if v]
    if falls:
        meta[FALLBACK_KEY] = "; ".join(dict.fromkeys(falls))
    return attrs.evolve(residual, meta=meta)


def unnamed(err: BaseException, name: str) -> str:
    """``err``'s message without its leading ``"<name>: "`` (a unit's errors start with
    its name): for a message that names the unit itself, so that it says it once."""
    text = str(err)
    while name and text.startswith(f"{name}: "):
        text = text.removeprefix(f"{name}: ")
    return text


def better_q(a: float, b: float) -> bool:
    """Is Q ``a`` better than Q ``b`` (nan is worst)?"""
    if not np.isfinite(a):
        return False
    return not np.isfinite(b) or a > b


def subtract_settings(settings: Any) -> SubtractSettings:
    """``settings`` as the typed ``[subtract]`` settings: a mapping's missing keys take
    :class:`~oasis_core.engine.config.SubtractSettings`' defaults (the only ones), unknown keys
    are ignored.

    Examples
    --------
    >>> subtract_settings({"q_floor": 0.2}).q_floor, subtract_settings({}).q_floor
    (0.2, 0.5)
    """
    if isinstance(settings, SubtractSettings):
        return settings
    if not isinstance(settings, Mapping):
        settings = attrs.asdict(settings, recurse=False) if attrs.has(type(settings)) else {}
    known = {f.name for f in attrs.fields(SubtractSettings)}
    return SubtractSettings(**{k: v for k, v in settings.items() if k in known})


def run_subtraction(
    backend: Any, science: Frame, template: Template, *, options: Any, workdir: Path, settings: Any
) -> Residual:
    """Subtract with the optimisation loop and the quality rules (see the module doc).

    Parameters
    ----------
    backend : SubtractBackend or a bound selector
        A bound selector (``auto``: :class:`~oasis_core.engine.auto.AutoSubtract`) runs
        its own ``select(science, template, workdir=, settings=)``.
    science, template : Frame, Template
        Aligned, on the same grid.
    options : object
        The backend's options (the first configuration tried).
    workdir : Path
        Scratch directory for the backend.
    settings : SubtractSettings or mapping
        ``optimize``, ``max_tries``, ``q_ceiling``, ``q_floor``; a mapping's missing keys
        take :class:`~oasis_core.engine.config.SubtractSettings`' defaults.
    """
    settings = subtract_settings(settings)
    select = getattr(backend, "select", None)  # a bound selector ('auto') runs its own
    if callable(select):
        return select(science, template, workdir=workdir, settings=settings)
    candidates: Any = [options]
    if settings.optimize:
        # lazily: a backend may measure what later configurations need only if asked
        candidates = itertools.islice(
            backend.candidates(science, template, options=options),
            max(1, int(settings.max_tries)),
        )
    ceiling = float(settings.q_ceiling)
    best: tuple[Residual, int, Any] | None = None
    errors: list[OasisError] = []
    tries = 0
    start = time.perf_counter()
    for index, opts in enumerate(candidates, 1):
        tries = index
        try:
            residual = backend.subtract(science, template, options=opts, workdir=workdir)
        except OasisError as err:
            if not settings.optimize:
                raise
            errors.append(err)
            log.debug("%s: configuration %d failed: %s", science.name, index, err)
            continue
        if residual.data.shape != science.shape:
            raise StageError(
                f"{science.name}: subtract backend {backend.name!r} returned shape "
                f"{residual.data.shape}, the science frame has {science.shape}"
            )
        if best is None or better_q(residual.q, best[0].q):
            best = (residual, index, opts)
        if np.isfinite(residual.q) and residual.q >= ceiling:
            break
    if best is None:
        raise StageError(
            f"{science.name}: every configuration failed; the first: "
            f"{unnamed(errors[0], science.name)}"
        ) from errors[0]
    residual, choice, opts = best
    from oasis_core.engine.provenance import options_dict

    residual = _with_frame_choices(residual, science)
    meta = {
        **residual.meta,
        "tries": tries,
        "choice": choice,
        "seconds": round(time.perf_counter() - start, 3),
    }
    params = {k: v for k, v in options_dict(opts).items() if isinstance(v, (int, float, str, bool))}
    residual = attrs.evolve(residual, meta=meta, params=params or residual.params)
    return judge_residual(
        residual,
        science.name,
        float(settings.q_floor),
        template=template,
        science=science,
        star_left_max=float(settings.star_left_max),
    )


def new_sources(residual: Residual, template: Frame, fwhm: float) -> np.ndarray:
    """Pixels of the residual's new sources: each region where it is significant (5 sigma
    or more through the PSF-matched filter, either sign) over which the template has
    nothing (below 5 sigma everywhere in it, through the same filter), with the disc of
    2.5 FWHM around its peak: a transient, not a subtraction error.

    Parameters
    ----------
    residual : Residual
    template : Frame
        On the residual's grid.
    fwhm : float
        The residual's PSF FWHM (px).

    Returns
    -------
    ndarray of bool
    """
    from scipy import ndimage

    from oasis_core.engine.sources import matched_significance

    shape = residual.data.shape
    out = np.zeros(shape, bool)
    sigma = max(float(fwhm), 1.0) / 2.3548
    bad = ~(residual.weight > 0)
    significance, _ = matched_significance(np.where(bad, 0.0, residual.normalized), bad, sigma)
    tpl = np.asarray(template.data, np.float64)
    t_bad = ~(np.asarray(template.weight) > 0) | ~np.isfinite(tpl)
    values = tpl[~t_bad]
    if values.size < 100:
        return out
    med = float(np.median(values))
    spread = float(1.4826 * np.median(np.abs(values - med))) or 1.0
    t_sig, _ = matched_significance(np.where(t_bad, 0.0, (tpl - med) / spread), t_bad, sigma)
    labels, n = ndimage.label((np.abs(significance) >= 5.0) & ~bad)
    if n == 0:
        return out
    index = np.arange(1, n + 1)
    quiet = np.asarray(ndimage.maximum(t_sig, labels, index)) < 5.0
    peaks = ndimage.maximum_position(np.abs(significance), labels, index)
    r = 2.5 * max(float(fwhm), 1.0)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for label, is_new, (py, px) in zip(index, quiet, peaks, strict=True):
        if is_new:
            out |= labels == label
            out |= (xx - px) ** 2 + (yy - py) ** 2 <= r * r
    return out


def star_check(residual: Residual, template: Frame, science: Frame | None = None) -> dict[str, Any]:
    """The residual's flux at the template's brightest stars, as a fraction of their flux
    (:func:`oasis_core.engine.quality.star_flux_left`, the flux scale measured on the
    stars in ``science`` when it is given, else the backend's ``meta["fscale"]``, else 1):
    ``meta`` entries ``star_left`` (the median fraction, signed) and ``star_left_n`` (the
    stars measured); none without a usable star."""
    from oasis_core.engine.quality import star_flux_left

    scale = residual.meta.get("fscale", 1.0)
    scale = float(scale) if isinstance(scale, (int, float)) and np.isfinite(scale) else 1.0
    sky = template.background
    left = star_flux_left(
        residual.data,
        residual.weight,
        template.data,
        fwhm=_residual_fwhm(residual, template),
        template_weight=template.weight,
        template_sky=sky if sky is not None and np.isfinite(sky) else None,
        science=None if science is None else science.data,
        science_sky=None if science is None else science.background,
        scale=scale if scale > 0 else 1.0,
        saturation=template.saturation,
    )
    if left.n == 0:
        return {}
    return {"star_left": round(left.fraction, 4), "star_left_n": left.n}


#: Fewest stars whose median fraction left (:func:`star_check`) can mask a residual: one
#: or two may be variable.
STAR_CHECK_MIN = 3


def judge_residual(
    residual: Residual,
    name: str,
    q_floor: float,
    *,
    template: Frame | None = None,
    science: Frame | None = None,
    star_left_max: float = 0.0,
) -> Residual:
    """Apply the core's quality rules: never ship a bad residual quietly.

    The flag (``meta["flag"]``, ``OAS FLAG``) gathers the backend's own flag, the
    fallback it or the align stage reported (``meta["fallback"]``: flagged, not masked), a
    mostly masked residual, a Q below ``q_floor`` and stars left at more than
    ``star_left_max`` of their flux (both of which also mask it fully).

    Q measures how well the template's content was subtracted; on a small frame a bright
    transient weighs on it as much as a poor subtraction. So when Q is below ``q_floor``
    and the ``template`` is given, Q is measured again away from the residual's new
    sources (:func:`new_sources`: significant where the template has nothing); that Q,
    recorded as ``meta["q_new_excluded"]``, then decides.

    Q does not see a wrong flux scale when the stars are few: with the ``template`` the
    residual's flux at its brightest stars is measured (:func:`star_check`, with the flux
    scale measured on ``science``'s stars when given; ``meta["star_left"]``,
    ``meta["star_left_n"]``) and, with :data:`STAR_CHECK_MIN` stars or more, a median
    beyond ``star_left_max`` (0: no limit) flags and masks the residual.

    With the ``template``, the residual also gets weight 0 where the template's stack
    misses frames over a source (:func:`oasis_core.engine.stacking.incomplete_sources`:
    there the template has other frames' PSF than around it, and the kernel leaves a
    star-shaped excess) and within one FWHM of those pixels (the kernel and the PSF carry
    the excess that far); ``meta["incomplete_masked"]`` counts the pixels so masked (of
    the residual's weight > 0). The backend's kernel is fitted as it was: only the
    verdict on those pixels changes.

    ``meta["noise_correlation"]`` (``OAS NOISE_CORRELATION``) records how much more the
    residual's noise spreads at the PSF's scale than its noise image says
    (:func:`oasis_core.engine.sources.noise_correlation`): the mr stage weighs the
    residual by its inverse square."""
    flags = [str(residual.meta["flag"])] if residual.meta.get("flag") else []
    fallback = str(residual.meta.get(FALLBACK_KEY) or "")
    if fallback and not any(fallback in f for f in flags):
        flags.append(f"fallback: {fallback}")
    good = float((residual.weight > 0).mean())
    weight = residual.weight
    if good < 0.5:
        flags.append(f"mostly masked ({100 * (1 - good):.0f}% of pixels)")
    usable = bool(np.isfinite(residual.q) and residual.q >= q_floor)
    extra: dict[str, Any] = {}
    if not usable and template is not None and np.isfinite(residual.q) and good > 0:
        from oasis_core.engine.quality import q_value

        fwhm = _residual_fwhm(residual, template)
        exclude = new_sources(residual, template, fwhm)
        if exclude.any():
            q_away = q_value(residual.data, residual.noise, residual.weight, exclude=exclude)
            extra["q_new_excluded"] = round(float(q_away), 4)
            usable = bool(np.isfinite(q_away) and q_away >= q_floor)
    if not usable:
        flags.append(f"Q {residual.q:.3f} below the floor {q_floor}")
        weight = np.zeros_like(residual.weight)
    if template is not None and good > 0:
        extra.update(star_check(residual, template, science))
        left, n_stars = extra.get("star_left", 0.0), int(extra.get("star_left_n", 0))
        if star_left_max > 0 and n_stars >= STAR_CHECK_MIN and abs(left) > star_left_max:
            flags.append(
                f"stars left at {100 * left:+.0f}% of their flux (median of {n_stars}; "
                f"limit {100 * star_left_max:g}%): a wrong flux scale"
            )
            usable = False
            weight = np.zeros_like(residual.weight)
    if template is not None and good > 0 and np.shape(template.data) == weight.shape:
        from oasis_core.engine.stacking import incomplete_sources

        incomplete = getattr(template, "holes", None)  # judged once, when it was combined
        if incomplete is None or np.shape(incomplete) != weight.shape:
            incomplete = incomplete_sources(template)
        if incomplete.any():  # and as far as the kernel and the PSF carry it: 1 FWHM
            radius = max(1, int(np.ceil(_residual_fwhm(residual, template))))
            incomplete = grow_disk(incomplete, radius)
        incomplete = incomplete & (weight > 0)  # the template's own mask stays as it is
        extra["incomplete_masked"] = int(incomplete.sum())
        if incomplete.any():
            weight = np.where(incomplete, np.float32(0), weight)
    if good > 0:  # what its pixels' noise is worth at the PSF's scale (the mr stage's weight)
        from oasis_core.engine.sources import noise_correlation

        extra["noise_correlation"] = round(
            noise_correlation(residual, _matched_fwhm(residual, science, template)), 3
        )
    flag = "; ".join(flags)
    if flag:
        log.warning("%s: %s", name, flag)
    meta = {
        **residual.meta,
        **extra,
        "flag": flag,
        "good_fraction": round(float((weight > 0).mean()), 4),
        # the verdict, recorded with the residual (OAS USABLE, OAS Q_FLOOR): what reads it
        # later (mr, extract) follows it, whatever its own q_floor
        "usable": usable,
        "q_floor": float(q_floor),
    }
    return attrs.evolve(residual, weight=weight, meta=meta)


def grow_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by a disk of ``radius`` px: :func:`scipy.ndimage.binary_dilation`
    with that structure (nothing beyond the edges), made by placing the disk at each
    pixel of a sparse mask (a template's holes: thousands of pixels of millions, where
    the whole-image dilation costs a quarter of a second on 2048x2048)."""
    mask = np.asarray(mask, bool)
    dy, dx = np.nonzero(
        np.add.outer(np.arange(-radius, radius + 1) ** 2, np.arange(-radius, radius + 1) ** 2)
        <= radius**2
    )
    ys, xs = np.nonzero(mask)
    if ys.size * dy.size > mask.size // 4:  # not sparse: the dilation is cheaper
        from scipy.ndimage import binary_dilation

        disk = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
        disk[dy, dx] = True
        return binary_dilation(mask, structure=disk)
    ny, nx = mask.shape
    ty = (ys[:, None] + (dy - radius)[None]).ravel()
    tx = (xs[:, None] + (dx - radius)[None]).ravel()
    inside = (ty >= 0) & (ty < ny) & (tx >= 0) & (tx < nx)
    out = np.zeros(mask.shape, bool)
    out[ty[inside], tx[inside]] = True
    return out


def _residual_fwhm(residual: Residual, template: Frame) -> float:
    """The residual's PSF FWHM: the backend's, else the template's, else 3 px."""
    for value in (residual.meta.get("fwhm"), template.fwhm):
        if isinstance(value, (int, float)) and np.isfinite(value) and value > 0:
            return float(value)
    return 3.0


def _matched_fwhm(
    residual: Residual, science: Frame | None, template: Frame | None
) -> float | None:
    """The residual's PSF FWHM: the backend's, else the broader of the two frames'."""
    matched = residual.meta.get("fwhm")
    if isinstance(matched, (int, float)) and np.isfinite(matched) and matched > 0:
        return float(matched)
    widths = [f.fwhm for f in (science, template) if f is not None and f.fwhm]
    return float(max(widths)) if widths else None


def residual_cards(residual: Residual, science: Frame, template: Frame) -> dict[str, Any]:
    """Header cards the core adds to every residual: the PSF widths it carries."""
    cards: dict[str, Any] = {}
    if science.fwhm:
        cards["SFWHM"] = (float(science.fwhm), "science PSF FWHM [pix]")
    if template.fwhm:
        cards["TFWHM"] = (float(template.fwhm), "template PSF FWHM [pix]")
    matched = _matched_fwhm(residual, science, template)
    if matched:
        cards["FWHM"] = (float(matched), "PSF FWHM of the residual [pix]")
    return cards
