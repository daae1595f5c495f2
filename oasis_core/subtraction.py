"""Subtraction as the core runs it, for the pipeline and for one pair.

:func:`run_subtraction` calls a subtract backend with the core's rules around it:

* **optimisation** (``[subtract] optimize``): the backend's
  :meth:`~oasis_core.backends.SubtractBackend.candidates` are tried cheapest first, up to
  ``max_tries``; the first whose Q reaches ``q_ceiling`` stops the search and the best Q
  is kept. ``meta`` records ``tries``, ``choice`` (1-based) and the backend's ``config``;
* **judgement**: a Q below ``q_floor`` fully masks the residual; a mostly masked residual
  or a backend's own flag (too few stamps) is recorded in ``meta["flag"]`` and logged.

:func:`subtract_pair` is ``oasis subtract-pair``: two already aligned FITS files in, a
residual (and optionally its noise image) out, outside any target tree.

The subtract backend ``auto`` (:class:`AutoBackend`, registered by the core like any
plugin's backend, options ``[subtract.auto]``) is a selector: bound to a registry and a
configuration (:func:`select_subtract`, :func:`auto_subtract`) it tries every subtract
backend that can run here, ``ois`` first, each with its own optimisation loop
(:func:`run_auto`, which :func:`run_subtraction` runs for it); among the residuals whose
noise image is honest (:func:`background_scatter` within ``noise_tolerance`` of 1) the best
Q is kept and the choice recorded (:func:`auto_cards`, and in ``meta["config"]``, which
``residuals/log.txt`` shows).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.backends import SubtractBackend, option
from oasis_core.config import SubtractSettings
from oasis_core.errors import OasisError, StageError
from oasis_core.model import Frame, Residual, Template
from oasis_core.validators import fraction

__all__ = [
    "CHOICE_PREFIX",
    "FALLBACK_KEY",
    "AutoBackend",
    "AutoOptions",
    "AutoSubtract",
    "PairPlan",
    "auto_cards",
    "auto_subtract",
    "background_scatter",
    "choice_text",
    "choices",
    "frame_choices",
    "judge_residual",
    "new_sources",
    "plan_pair",
    "provenance_options",
    "residual_cards",
    "run_auto",
    "run_subtraction",
    "select_subtract",
    "subtract_frames",
    "subtract_pair",
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


def _better(a: float, b: float) -> bool:
    """Is Q ``a`` better than Q ``b`` (nan is worst)?"""
    if not np.isfinite(a):
        return False
    return not np.isfinite(b) or a > b


def subtract_settings(settings: Any) -> SubtractSettings:
    """``settings`` as the typed ``[subtract]`` settings: a mapping's missing keys take
    :class:`~oasis_core.config.SubtractSettings`' defaults (the only ones), unknown keys
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
    backend : SubtractBackend or AutoSubtract
        A bound selector (:class:`AutoSubtract`) runs :func:`run_auto`.
    science, template : Frame, Template
        Aligned, on the same grid.
    options : object
        The backend's options (the first configuration tried).
    workdir : Path
        Scratch directory for the backend.
    settings : SubtractSettings or mapping
        ``optimize``, ``max_tries``, ``q_ceiling``, ``q_floor``; a mapping's missing keys
        take :class:`~oasis_core.config.SubtractSettings`' defaults.
    """
    settings = subtract_settings(settings)
    if isinstance(backend, AutoSubtract):
        return run_auto(backend, science, template, workdir=workdir, settings=settings)
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
        if best is None or _better(residual.q, best[0].q):
            best = (residual, index, opts)
        if np.isfinite(residual.q) and residual.q >= ceiling:
            break
    if best is None:
        raise StageError(
            f"{science.name}: every configuration failed; the first: "
            f"{unnamed(errors[0], science.name)}"
        ) from errors[0]
    residual, choice, opts = best
    from oasis_core.provenance import options_dict

    residual = _with_frame_choices(residual, science)
    meta = {
        **residual.meta,
        "tries": tries,
        "choice": choice,
        "seconds": round(time.perf_counter() - start, 3),
    }
    params = {k: v for k, v in options_dict(opts).items() if isinstance(v, (int, float, str, bool))}
    residual = attrs.evolve(residual, meta=meta, params=params or residual.params)
    return judge_residual(residual, science.name, float(settings.q_floor), template=template)


@attrs.frozen(kw_only=True)
class AutoOptions:
    """Options of the subtract backend ``auto`` (``[subtract.auto]``)."""

    ceiling: float = option(
        1.0,
        "stop trying further backends once one with an honest noise image reaches this Q "
        "(1 = try every backend that can run and keep the best)",
        range=fraction,
    )
    noise_tolerance: float = option(
        0.1,
        "rank by Q only residuals whose normalised background scatter is within this of 1 "
        "(a noise image too large hides the tails and inflates Q)",
        range=fraction,
    )


class AutoBackend(SubtractBackend):
    """The subtract backend ``auto``: a selector over the other subtract backends.

    Bound to a registry and a configuration (:meth:`bind`), it tries every subtract backend
    that can run there, by ``auto_priority``, and keeps the residual of best Q among those
    whose noise image is honest (:func:`run_auto`). Called on its own (:meth:`subtract`), it
    binds to the installed backends with their default options.
    """

    name = "auto"
    description = "every subtract backend that can run here; the best Q with honest noise"
    Options = AutoOptions

    def bind(self, registry: Any, config: Any) -> AutoSubtract:
        """The backends this selector tries under ``config`` (see :func:`auto_subtract`)."""
        return auto_subtract(registry, config)

    def subtract(
        self, science: Frame, template: Template, *, options: Any, workdir: Path
    ) -> Residual:
        """Run :func:`run_auto` over the installed backends with their default options."""
        from oasis_core.config import load_config
        from oasis_core.plugins import Registry

        registry = Registry()
        config = load_config(None, registry, use_config_file=False)
        auto = attrs.evolve(self.bind(registry, config), settings=options or AutoOptions())
        return run_auto(auto, science, template, workdir=workdir, settings=SubtractSettings())


@attrs.frozen(kw_only=True)
class AutoSubtract:
    """The subtract backend ``auto`` bound to a registry and configuration: the backends
    it tries, in order.

    Attributes
    ----------
    candidates : tuple of (name, backend, options)
        The subtract backends that can run here, by ``auto_priority``.
    skipped : mapping
        Backend name to the reason it cannot run here.
    settings : AutoOptions
        ``[subtract.auto]``: the ceiling and the noise tolerance.
    """

    name = "auto"
    stage = "subtract"
    candidates: tuple[tuple[str, Any, Any], ...]
    skipped: Mapping[str, str] = attrs.field(factory=dict)
    settings: AutoOptions = attrs.field(factory=AutoOptions)

    @property
    def needs_psf(self) -> bool:
        """Whether any candidate needs the frames' PSFs."""
        return any(getattr(b, "needs_psf", False) for _, b, _ in self.candidates)

    @property
    def options(self) -> dict[str, Any]:
        """Every candidate's options object, by name, and auto's own (what the provenance
        hashes, with the files they name)."""
        return {"auto": self.settings, **{name: opts for name, _, opts in self.candidates}}


def auto_subtract(registry: Any, config: Any, names: Sequence[str] | None = None) -> AutoSubtract:
    """The :class:`AutoSubtract` of the installed subtract backends that can run here.

    Parameters
    ----------
    registry : oasis_core.plugins.Registry
    config : oasis_core.config.Config
        Gives each backend's options (``[subtract.<name>]``) and auto's (``[subtract.auto]``).
    names : sequence of str, optional
        The backends to consider (default: every installed one but ``auto``), tried in
        the order of their ``auto_priority`` (the ``ois`` backend declares itself first).

    Raises
    ------
    BackendUnavailable
        When no subtract backend can run here (the message gives each one's reason).
    """
    from oasis_core.errors import BackendUnavailable

    installed = [
        n
        for n in registry.names("subtract")
        if not isinstance(registry.records["subtract"][n].backend, AutoBackend)
    ]
    wanted = [n for n in (names if names is not None else installed) if n in installed]

    def priority(name: str) -> tuple[int, str]:
        backend = registry.records["subtract"][name].backend
        return (int(getattr(backend, "auto_priority", 100)), name)

    order = sorted(wanted, key=priority)
    candidates = []
    skipped: dict[str, str] = {}
    for name in order:
        options = config.backend_options("subtract", name)
        try:
            backend = registry.select("subtract", name, options)
        except BackendUnavailable as err:
            skipped[name] = str(err)
            continue
        candidates.append((name, backend, options))
    if not candidates:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none installed"
        raise BackendUnavailable(
            f"subtract backend 'auto': no subtract backend can run here ({reasons})"
        )
    own = AutoOptions()
    if "auto" in registry.records["subtract"]:
        own = config.backend_options("subtract", "auto")
    return AutoSubtract(candidates=tuple(candidates), skipped=skipped, settings=own)


def select_subtract(registry: Any, config: Any, name: str | None = None) -> Any:
    """The subtract backend ``name`` (default: the configured one), checked and, for a
    selector such as ``auto``, bound to ``registry`` and ``config`` (its ``bind``).

    Raises
    ------
    UnknownBackend, BackendUnavailable
        One line naming the backend and what is wrong.
    """
    name = config.backend("subtract") if name is None else name
    backend = registry.select("subtract", name, config.backend_options("subtract", name))
    bind = getattr(backend, "bind", None)
    return bind(registry, config) if callable(bind) else backend


def provenance_options(backend: Any, options: Any) -> Any:
    """What a stage's provenance hashes as ``backend``'s options: a bound selector's
    (:class:`AutoSubtract`) every candidate's options and its own, else ``options``."""
    return backend.options if isinstance(backend, AutoSubtract) else options


def background_scatter(residual: Residual, template: Frame) -> float:
    """The residual's normalised scatter away from the template's sources
    (:func:`oasis_core.quality.normalized_noise`): 1 when its noise image is honest, below
    1 when overstated."""
    from oasis_core.quality import normalized_noise, source_footprint

    exclude = source_footprint(template.data, residual.weight)
    return normalized_noise(residual.data, residual.noise, residual.weight, exclude=exclude)


def run_auto(
    auto: AutoSubtract,
    science: Frame,
    template: Template,
    *,
    workdir: Path,
    settings: Any,
    ceiling: float | None = None,
) -> Residual:
    """Subtract with each of ``auto``'s backends in turn; keep the best honest residual.

    Each backend runs with its own optimisation loop (:func:`run_subtraction`) and its
    residual's background scatter is measured (:func:`background_scatter`). Q ranks only
    the residuals whose scatter is within ``noise_tolerance`` of 1 (an overstated noise
    image hides the tails and inflates Q); when none is, every residual is ranked by Q and
    ``meta["auto_note"]`` says so. The search stops as soon as an honest residual reaches
    ``ceiling`` (default ``[subtract.auto] ceiling``).

    ``meta`` of the result gains ``auto_choice`` (the backend kept), ``auto_tried``
    (``"ois 0.963 (noise 1.02), zogy 0.970 (noise 0.66)"``: every backend tried, its Q and
    scatter, or why it failed) and ``config`` starts with ``auto: <choice>``, so that
    ``residuals/log.txt`` shows it.

    Raises
    ------
    StageError
        When every backend failed (the message gives each one's error).
    """
    ceiling = float(auto.settings.ceiling) if ceiling is None else float(ceiling)
    tolerance = float(auto.settings.noise_tolerance)
    results: list[tuple[Residual, str, bool]] = []
    tried: list[str] = []
    start = time.perf_counter()
    for name, backend, options in auto.candidates:
        try:
            residual = run_subtraction(
                backend, science, template, options=options, workdir=workdir, settings=settings
            )
        except OasisError as err:
            tried.append(f"{name} failed ({unnamed(err, science.name)})")
            log.debug("%s: auto: %s failed: %s", science.name, name, err)
            continue
        scatter = background_scatter(residual, template)
        honest = bool(np.isfinite(scatter) and abs(scatter - 1.0) <= tolerance)
        tried.append(f"{name} {residual.q:.3f} (noise {scatter:.2f})")
        results.append((residual, name, honest))
        if honest and np.isfinite(residual.q) and residual.q >= ceiling:
            break
    if not results:
        raise StageError(f"{science.name}: subtract backend 'auto': {'; '.join(tried)}")
    ranked = [r for r in results if r[2]]
    note = ""
    if not ranked:
        ranked = results
        note = f"no residual's background scatter within {tolerance:g} of 1; ranked all by Q"
        log.warning("%s: subtract backend 'auto': %s", science.name, note)
    residual, choice, _ = ranked[0]
    for candidate in ranked[1:]:
        if _better(candidate[0].q, residual.q):
            residual, choice = candidate[0], candidate[1]
    config = str(residual.meta.get("config", ""))
    meta = {
        **residual.meta,
        "auto_choice": choice,
        "auto_tried": ", ".join(tried),
        f"{CHOICE_PREFIX}backend": choice,
        "config": f"auto: {choice} ({', '.join(tried)})" + (f"; {config}" if config else ""),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if note:
        meta["auto_note"] = note
    return attrs.evolve(residual, meta=meta)


def auto_cards(residual: Residual) -> dict[str, Any]:
    """Header cards recording the choice of ``backend = "auto"`` (none for a plain run)."""
    choice = residual.meta.get("auto_choice")
    if not choice:
        return {}
    return {"OASAUTO": (str(choice), "backend chosen by subtract backend 'auto'")}


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

    from oasis_core.sources import matched_significance

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


def judge_residual(
    residual: Residual, name: str, q_floor: float, *, template: Frame | None = None
) -> Residual:
    """Apply the core's quality rules: never ship a bad residual quietly.

    The flag (``meta["flag"]``, ``OAS FLAG``) gathers the backend's own flag, the
    fallback it or the align stage reported (``meta["fallback"]``: flagged, not masked), a
    mostly masked residual and a Q below ``q_floor`` (which also masks it fully).

    Q measures how well the template's content was subtracted; on a small frame a bright
    transient weighs on it as much as a poor subtraction. So when Q is below ``q_floor``
    and the ``template`` is given, Q is measured again away from the residual's new
    sources (:func:`new_sources`: significant where the template has nothing); that Q,
    recorded as ``meta["q_new_excluded"]``, then decides."""
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
        from oasis_core.quality import q_value

        fwhm = _residual_fwhm(residual, template)
        exclude = new_sources(residual, template, fwhm)
        if exclude.any():
            q_away = q_value(residual.data, residual.noise, residual.weight, exclude=exclude)
            extra["q_new_excluded"] = round(float(q_away), 4)
            usable = bool(np.isfinite(q_away) and q_away >= q_floor)
    if not usable:
        flags.append(f"Q {residual.q:.3f} below the floor {q_floor}")
        weight = np.zeros_like(residual.weight)
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


def _residual_fwhm(residual: Residual, template: Frame) -> float:
    """The residual's PSF FWHM: the backend's, else the template's, else 3 px."""
    for value in (residual.meta.get("fwhm"), template.fwhm):
        if isinstance(value, (int, float)) and np.isfinite(value) and value > 0:
            return float(value)
    return 3.0


def residual_cards(residual: Residual, science: Frame, template: Frame) -> dict[str, Any]:
    """Header cards the core adds to every residual: the PSF widths it carries."""
    cards: dict[str, Any] = {}
    if science.fwhm:
        cards["SFWHM"] = (float(science.fwhm), "science PSF FWHM [pix]")
    if template.fwhm:
        cards["TFWHM"] = (float(template.fwhm), "template PSF FWHM [pix]")
    matched = residual.meta.get("fwhm")
    if not (isinstance(matched, (int, float)) and np.isfinite(matched) and matched > 0):
        matched = max(science.fwhm or 0.0, template.fwhm or 0.0) or None
    if matched:
        cards["FWHM"] = (float(matched), "PSF FWHM of the residual [pix]")
    return cards


def subtract_pair(
    science: Path,
    template: Path,
    output: Path,
    *,
    method: str = "ois",
    noise: Path | None = None,
    catalog: Path | None = None,
    options: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> Residual:
    """Subtract one already aligned pair, outside any target tree (``oasis subtract-pair``).

    Gain, read noise and saturation come from the headers; the PSF of each frame is
    measured with the configured psf backend when the subtract backend says it needs one
    (``needs_psf``), and the science frame's when a catalog is asked for. ``options`` are
    dotted keys as on the command line, e.g. ``{"subtract.ois.deg_spatial": 1}``,
    ``{"extract.native.thresh": 4}`` or ``{"deg_spatial": 1}`` (taken as the chosen
    subtract backend's). The residual (with ``NOISE`` and ``WEIGHT`` extensions) is
    written to ``output``; with ``noise`` the noise image is also written there on its
    own. ``method="auto"`` tries every subtract backend that can run here and keeps the
    best Q (as ``[subtract] backend = "auto"``).

    With ``catalog``, the residual's candidates are written there (ECSV, whatever the
    name) as a pipeline run gives them for that
    residual: the configured extract backend's detections and the core's filters
    (:func:`oasis_core.pipeline.filter_sources`; the majority filter needs three residuals
    or more, so it plays no part), one row per detection with its ``reason`` (``kept``...)
    and ``ra``/``dec`` when the science frame has a WCS. A residual below the Q floor
    gives an empty catalog (its metadata says why).

    Returns
    -------
    Residual
        As written; ``meta["choice_*"]`` records the choices made (see the module doc).

    Raises
    ------
    UnknownBackend
        ``method`` is not an installed subtract backend (the message lists them).
    InputError
        Before any work: ``output``, ``noise`` or ``catalog`` is an input or another
        output, or cannot be written (see :func:`oasis_core.io.check_outputs`); unreadable
        frames or frames of different shapes.
    """
    from oasis_core import io

    plan = plan_pair(method, options, registry, catalog=catalog is not None)
    io.check_outputs(
        inputs=[Path(science), Path(template)],
        outputs={
            "output": Path(output),
            "--noise file": None if noise is None else Path(noise),
            "--catalog file": None if catalog is None else Path(catalog),
        },
    )
    sci = io.read_frame(Path(science))
    tpl = io.read_frame(Path(template))
    residual, _ = subtract_frames(
        plan,
        sci,
        tpl,
        inputs={"science": Path(science), "template": Path(template)},
        output=Path(output),
        noise=None if noise is None else Path(noise),
        catalog=None if catalog is None else Path(catalog),
    )
    return residual


@attrs.frozen(kw_only=True)
class PairPlan:
    """The choices of one pair subtraction, resolved and checked before any work
    (:func:`plan_pair`).

    Attributes
    ----------
    registry : oasis_core.plugins.Registry
    config : oasis_core.config.Config
        The defaults with the options given.
    method : str
        The subtract backend's name (``"auto"`` included).
    backend : SubtractBackend or AutoSubtract
    needs_psf : bool
        Whether the frames' PSFs are measured first.
    extractor : ExtractBackend or None
        When a catalog is asked for.
    """

    registry: Any
    config: Any
    method: str
    backend: Any
    needs_psf: bool
    extractor: Any = None


def plan_pair(
    method: str,
    options: Mapping[str, Any] | None = None,
    registry: Any = None,
    *,
    catalog: bool = False,
    source: str = "command line",
) -> PairPlan:
    """Resolve and check the backends and options of a pair subtraction, before any work.

    Parameters
    ----------
    method : str
        A subtract backend's name, or ``"auto"``.
    options : mapping, optional
        Dotted keys (``{"subtract.ois.deg_spatial": 1}``) or the subtract backend's own
        (``{"deg_spatial": 1}``), checked by the configuration's validators.
    registry : oasis_core.plugins.Registry, optional
    catalog : bool
        Whether a catalog will be made (the extract backend is then checked too).
    source : {"command line", "argument"}
        What an error about an option names as its origin.

    Raises
    ------
    UnknownBackend, BackendUnavailable, ConfigError
        One line naming the backend or option and what is wrong.
    """
    from oasis_core.config import load_config
    from oasis_core.plugins import Registry

    registry = registry or Registry()
    registry.get("subtract", method)  # an unknown name lists the installed ones
    flat: dict[str, Any] = {"subtract.backend": method}
    for key, value in (options or {}).items():
        flat[key if "." in key else f"subtract.{method}.{key}"] = value
    if source == "argument":
        config = load_config(None, registry, use_config_file=False, arguments=flat)
    else:
        config = load_config(None, registry, use_config_file=False, cli=flat)
    backend = select_subtract(registry, config, method)
    needs_psf = bool(getattr(backend, "needs_psf", False))
    if needs_psf or catalog:
        registry.get("psf", config.backend("psf"))  # an unknown name lists the installed ones
    extractor = None
    if catalog:  # a bad name or a missing program fails before any work
        registry.get("extract", config.backend("extract"))
        extractor = registry.select(
            "extract", config.backend("extract"), config.backend_options("extract")
        )
    return PairPlan(
        registry=registry,
        config=config,
        method=method,
        backend=backend,
        needs_psf=needs_psf,
        extractor=extractor,
    )


def subtract_frames(
    plan: PairPlan,
    sci: Frame,
    tpl: Frame,
    *,
    inputs: Mapping[str, Path | None],
    output: Path | None = None,
    noise: Path | None = None,
    catalog: Path | None = None,
) -> tuple[Residual, dict[str, Any]]:
    """Subtract one aligned pair of frames as ``oasis subtract-pair`` does, whichever way
    the frames came in (files through :func:`oasis_core.io.read_frame`, arrays through
    :func:`oasis_core.io.frame_from_arrays`), and write only the outputs named.

    Parameters
    ----------
    plan : PairPlan
    sci, tpl : Frame
        The science and template frames.
    inputs : mapping
        ``{"science": ..., "template": ...}``: the file each frame was read from, or None
        for a frame given in memory (its provenance card then records the digest of its
        pixels).
    output, noise, catalog : Path, optional
        Where to write the residual, its noise image and its catalog (checked by the
        caller with :func:`oasis_core.io.check_outputs`).

    Returns
    -------
    residual : Residual
    cards : dict
        The header cards added to the residual's (provenance, PSF widths, auto's
        choice): ``io.residual_header(residual, cards)`` is the header written.

    Raises
    ------
    InputError
        The frames differ in shape.
    """
    import shutil
    import tempfile

    from oasis_core import io
    from oasis_core.errors import InputError

    if sci.shape != tpl.shape:
        raise InputError(
            f"{inputs.get('template') or tpl.name}: shape {tpl.shape} differs from the "
            f"science frame's {sci.shape}; subtract-pair needs aligned frames (run the "
            "pipeline to align them)"
        )
    registry, config, method, backend = plan.registry, plan.config, plan.method, plan.backend
    workdir = Path(tempfile.mkdtemp(prefix="oasis-pair-"))
    try:
        if plan.needs_psf:
            sci, tpl = (_measure_psf(f, registry, config, workdir) for f in (sci, tpl))
        template_obj = Template(
            **{f.name: getattr(tpl, f.name) for f in attrs.fields(Frame)}, inputs=()
        )
        settings = config.settings["subtract"]
        residual = run_subtraction(
            backend,
            sci,
            template_obj,
            options=config.backend_options("subtract"),
            workdir=workdir,
            settings=settings,
        )
        residual = attrs.evolve(residual, name=sci.name, science=sci.name, template=tpl.name)
        prov = _pair_provenance(registry, config, method, backend, inputs, (sci, tpl))
        cards = {**prov, **residual_cards(residual, sci, tpl)}
        cards.update(auto_cards(residual))
        if output is not None:
            io.write_residual(Path(output), residual, header_extra=cards)
        if noise is not None:
            from astropy.io import fits

            # the noise image as the residual's NOISE extension: its unit and WCS
            header = io.residual_header(residual, cards)
            ext = io.image_extension(
                residual.noise,
                "NOISE",
                wcs_from=header,
                bunit=str(header["BUNIT"]) if "BUNIT" in header else None,
            )
            with io.atomic_write(Path(noise)) as tmp:
                fits.PrimaryHDU(ext.data, ext.header).writeto(tmp)
        if catalog is not None and output is not None:
            if sci.psf is None:
                sci = _measure_psf(sci, registry, config, workdir)
            _pair_catalog(
                Path(output), Path(catalog), sci, plan.extractor, registry, config, workdir
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return residual, cards


def _measure_psf(frame: Frame, registry: Any, config: Any, workdir: Path) -> Frame:
    """``frame`` with its PSF measured by the configured psf backend (unchanged, with a
    warning, when the backend cannot measure one)."""
    name = config.backend("psf")
    backend = registry.select("psf", name, config.backend_options("psf"))
    try:
        return backend.psf(frame, options=config.backend_options("psf"), workdir=workdir)  # type: ignore[no-any-return]
    except StageError as err:
        log.warning("%s: no PSF measured (%s)", frame.path, unnamed(err, frame.name))
        return frame


def _pair_provenance(
    registry: Any,
    config: Any,
    method: str,
    backend: Any,
    inputs: Mapping[str, Path | None],
    frames: tuple[Frame, Frame],
) -> dict[str, Any]:
    """The provenance header cards of a pair's residual; an input given in memory (None in
    ``inputs``) is recorded by the sha256 of its pixels (float32) instead of its file's."""
    import hashlib

    from oasis_core.io import sha256
    from oasis_core.provenance import Provenance

    files = {k: Path(v) for k, v in inputs.items() if v is not None}
    record = registry.get("subtract", method)
    prov = Provenance(
        stage="subtract",
        backend=method,
        plugin=f"{record.dist}=={record.version}",
        inputs=files,
        options=provenance_options(backend, config.backend_options("subtract", method)),
        settings=config.settings["subtract"],
    )
    cards: dict[str, Any] = prov.header_cards()
    if len(files) == len(inputs):
        return cards
    digests = dict(zip(("science", "template"), frames, strict=True))
    entries = []
    for name, path in sorted(inputs.items()):
        if path is not None:
            entries.append(f"{name[:32]}:{sha256(Path(path))[:32]}")
        else:
            pixels = np.ascontiguousarray(digests[name].data, np.float32).tobytes()
            entries.append(f"{name[:32]}:{hashlib.sha256(pixels).hexdigest()[:32]}")
    cards = {k: v for k, v in cards.items() if not k.startswith("OASIN")}
    cards.update({f"OASIN{i}": entry for i, entry in enumerate(entries)})
    return cards


def _pair_catalog(
    residual_path: Path,
    catalog: Path,
    science: Frame,
    extractor: Any,
    registry: Any,
    config: Any,
    workdir: Path,
) -> None:
    """Detect and filter on the residual as written (as the pipeline's extract stage reads
    it, with the science frame's PSF) and write the catalog."""
    from astropy.table import Table

    from oasis_core import io
    from oasis_core.pipeline import detect, filter_sources
    from oasis_core.provenance import Provenance

    name = config.backend("extract")
    record = registry.get("extract", name)
    settings = config.settings["extract"]
    prov = Provenance(
        stage="extract",
        backend=name,
        plugin=f"{record.dist}=={record.version}",
        inputs={"residual": residual_path},
        options=config.backend_options("extract"),
        settings=settings,
    )
    residual = io.read_residual(residual_path)
    if science.psf is not None:
        residual = attrs.evolve(residual, psf=science.psf)
    wcs = io.header_wcs(science.header) if science.header is not None else None
    note = ""
    if bool(residual.meta.get("usable", True)) and bool((residual.weight > 0).any()):
        table = detect(
            extractor, residual, options=config.backend_options("extract"), workdir=workdir
        )
        positives = table[np.asarray(table["sign"]) > 0]
        table = filter_sources(
            table,
            settings=settings,
            catalogs=[positives],
            n_residuals=1,
            frame=residual.science or residual.name,
            wcs=wcs,
        )
    else:
        note = f"residual not usable ({residual.meta.get('flag') or 'no weight left'})"
        log.warning("%s: no candidates: %s", catalog, note)
        columns = ("x", "y", "flux", "flux_err", "snr", "sign", "reason")
        table = Table({c: np.zeros(0, "U10" if c == "reason" else float) for c in columns})
        table.add_column(np.zeros(0, "U1"), name="frame", index=0)
    table.meta.clear()
    table.meta.update(
        {k: str(v[0] if isinstance(v, tuple) else v) for k, v in prov.cards().items()}
    )
    if note:
        table.meta["OASNOTE"] = note
    io.write_table(table, catalog, fmt="ascii.ecsv")
