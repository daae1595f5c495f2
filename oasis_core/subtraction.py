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

:func:`run_auto` is ``[subtract] backend = "auto"``: every subtract backend that can run
here (:func:`auto_subtract`, ``ois`` first), each with its own optimisation loop, until one
reaches the Q ceiling; the residual with the best Q is kept and the choice recorded
(:func:`auto_cards`, and in ``meta["config"]``, which ``residuals/log.txt`` shows).
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

from oasis_core.errors import OasisError, StageError
from oasis_core.model import Frame, Residual, Template

__all__ = [
    "AutoSubtract",
    "auto_cards",
    "auto_subtract",
    "judge_residual",
    "residual_cards",
    "run_auto",
    "run_subtraction",
    "subtract_pair",
]

log = logging.getLogger("oasis")


def _better(a: float, b: float) -> bool:
    """Is Q ``a`` better than Q ``b`` (nan is worst)?"""
    if not np.isfinite(a):
        return False
    return not np.isfinite(b) or a > b


def run_subtraction(
    backend: Any, science: Frame, template: Template, *, options: Any, workdir: Path, settings: Any
) -> Residual:
    """Subtract with the optimisation loop and the quality rules (see the module doc).

    Parameters
    ----------
    backend : SubtractBackend
    science, template : Frame, Template
        Aligned, on the same grid.
    options : object
        The backend's options (the first configuration tried).
    workdir : Path
        Scratch directory for the backend.
    settings : SubtractSettings or mapping
        ``optimize``, ``max_tries``, ``q_ceiling``, ``q_floor``.
    """
    get = settings.get if isinstance(settings, Mapping) else lambda k, d: getattr(settings, k, d)
    candidates: Any = [options]
    if get("optimize", True):
        # lazily: a backend may measure what later configurations need only if asked
        candidates = itertools.islice(
            backend.candidates(science, template, options=options),
            max(1, int(get("max_tries", 9))),
        )
    ceiling = float(get("q_ceiling", 0.75))
    best: tuple[Residual, int, Any] | None = None
    errors: list[OasisError] = []
    tries = 0
    start = time.perf_counter()
    for index, opts in enumerate(candidates, 1):
        tries = index
        try:
            residual = backend.subtract(science, template, options=opts, workdir=workdir)
        except OasisError as err:
            if not get("optimize", True):
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
            f"{science.name}: every configuration failed; the first: {errors[0]}"
        ) from errors[0]
    residual, choice, opts = best
    from oasis_core.provenance import options_dict

    meta = {
        **residual.meta,
        "tries": tries,
        "choice": choice,
        "seconds": round(time.perf_counter() - start, 3),
    }
    params = {k: v for k, v in options_dict(opts).items() if isinstance(v, (int, float, str, bool))}
    residual = attrs.evolve(residual, meta=meta, params=params or residual.params)
    return judge_residual(residual, science.name, float(get("q_floor", 0.0)))


#: The order in which ``backend = "auto"`` tries the subtract backends; installed backends
#: not named here follow, by name.


@attrs.frozen(kw_only=True)
class AutoSubtract:
    """The subtract "backend" ``auto``: the backends it tries, in order.

    Attributes
    ----------
    candidates : tuple of (name, backend, options)
        The subtract backends that can run here, by ``auto_priority``.
    skipped : mapping
        Backend name to the reason it cannot run here.
    """

    name = "auto"
    candidates: tuple[tuple[str, Any, Any], ...]
    skipped: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """Every candidate's options object, by name (what the provenance hashes, with the
        files they name)."""
        return {name: opts for name, _, opts in self.candidates}


def auto_subtract(registry: Any, config: Any, names: Sequence[str] | None = None) -> AutoSubtract:
    """The :class:`AutoSubtract` of the installed subtract backends that can run here.

    Parameters
    ----------
    registry : oasis_core.plugins.Registry
    config : oasis_core.config.Config
        Gives each backend's options (``[subtract.<name>]``).
    names : sequence of str, optional
        The backends to consider (default: every installed one but ``auto``), tried in
        the order of their ``auto_priority`` (the ``ois`` backend declares itself first).

    Raises
    ------
    BackendUnavailable
        When no subtract backend can run here (the message gives each one's reason).
    """
    from oasis_core.errors import BackendUnavailable

    installed = [n for n in registry.names("subtract") if n != "auto"]
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
    return AutoSubtract(candidates=tuple(candidates), skipped=skipped)


def run_auto(
    auto: AutoSubtract,
    science: Frame,
    template: Template,
    *,
    workdir: Path,
    settings: Any,
    ceiling: float | None = None,
) -> Residual:
    """Subtract with each of ``auto``'s backends in turn; keep the residual of best Q.

    Each backend runs with its own optimisation loop (:func:`run_subtraction`); the search
    stops as soon as one reaches ``ceiling`` (default ``[subtract] q_ceiling``), so with
    the default a later backend is tried only when the earlier ones are not good enough.
    With ``ceiling=inf`` every backend runs and the kept Q is the best of them all.

    ``meta`` of the result gains ``auto_choice`` (the backend kept), ``auto_tried``
    (``"ois 0.963, zogy 0.970"``: every backend tried and its Q, or why it failed) and
    ``config`` starts with ``auto: <choice>``, so that ``residuals/log.txt`` shows it.

    Raises
    ------
    StageError
        When every backend failed (the message gives each one's error).
    """
    get = settings.get if isinstance(settings, Mapping) else lambda k, d: getattr(settings, k, d)
    ceiling = float(get("q_ceiling", 0.75)) if ceiling is None else float(ceiling)
    best: tuple[Residual, str] | None = None
    tried: list[str] = []
    start = time.perf_counter()
    for name, backend, options in auto.candidates:
        try:
            residual = run_subtraction(
                backend, science, template, options=options, workdir=workdir, settings=settings
            )
        except OasisError as err:
            tried.append(f"{name} failed ({err})")
            log.debug("%s: auto: %s failed: %s", science.name, name, err)
            continue
        tried.append(f"{name} {residual.q:.3f}")
        if best is None or _better(residual.q, best[0].q):
            best = (residual, name)
        if np.isfinite(residual.q) and residual.q >= ceiling:
            break
    if best is None:
        raise StageError(f"{science.name}: subtract backend 'auto': {'; '.join(tried)}")
    residual, choice = best
    config = str(residual.meta.get("config", ""))
    meta = {
        **residual.meta,
        "auto_choice": choice,
        "auto_tried": ", ".join(tried),
        "config": f"auto: {choice} ({', '.join(tried)})" + (f"; {config}" if config else ""),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return attrs.evolve(residual, meta=meta)


def auto_cards(residual: Residual) -> dict[str, Any]:
    """Header cards recording the choice of ``backend = "auto"`` (none for a plain run)."""
    choice = residual.meta.get("auto_choice")
    if not choice:
        return {}
    return {"OASAUTO": (str(choice), "backend chosen by subtract backend 'auto'")}


def judge_residual(residual: Residual, name: str, q_floor: float) -> Residual:
    """Apply the core's quality rules: never ship a bad residual quietly."""
    flags = [str(residual.meta["flag"])] if residual.meta.get("flag") else []
    good = float((residual.weight > 0).mean())
    weight = residual.weight
    if good < 0.5:
        flags.append(f"mostly masked ({100 * (1 - good):.0f}% of pixels)")
    usable = bool(np.isfinite(residual.q) and residual.q >= q_floor)
    if not usable:
        flags.append(f"Q {residual.q:.3f} below the floor {q_floor}")
        weight = np.zeros_like(residual.weight)
    flag = "; ".join(flags)
    if flag:
        log.warning("%s: %s", name, flag)
    meta = {
        **residual.meta,
        "flag": flag,
        "good_fraction": round(float((weight > 0).mean()), 4),
        # the verdict, recorded with the residual (OAS USABLE, OAS Q_FLOOR): what reads it
        # later (mr, extract) follows it, whatever its own q_floor
        "usable": usable,
        "q_floor": float(q_floor),
    }
    return attrs.evolve(residual, weight=weight, meta=meta)


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
    options: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> Residual:
    """Subtract one already aligned pair, outside any target tree (``oasis subtract-pair``).

    Gain, read noise and saturation come from the headers; the PSF of each frame is
    measured with the configured psf backend when the subtract backend says it needs one
    (``needs_psf``). ``options`` are dotted keys as on the command line, e.g.
    ``{"subtract.ois.deg_spatial": 1}`` or ``{"deg_spatial": 1}`` (taken as the chosen
    backend's). The residual (with ``NOISE`` and ``WEIGHT`` extensions) is written to
    ``output``; with ``noise`` the noise image is also written there on its own.

    Raises
    ------
    UnknownBackend
        ``method`` is not an installed subtract backend (the message lists them).
    InputError
        Before any work: ``output`` or ``noise`` is an input or the other output, or
        cannot be written (see :func:`oasis_core.io.check_outputs`); unreadable frames or
        frames of different shapes.
    """
    import shutil
    import tempfile

    from oasis_core import io
    from oasis_core.config import load_config
    from oasis_core.errors import InputError
    from oasis_core.plugins import Registry
    from oasis_core.provenance import Provenance

    registry = registry or Registry()
    registry.get("subtract", method)  # an unknown name lists the installed ones
    io.check_outputs(
        inputs=[Path(science), Path(template)],
        outputs={"output": Path(output), "--noise file": None if noise is None else Path(noise)},
    )
    flat: dict[str, Any] = {"subtract.backend": method}
    for key, value in (options or {}).items():
        flat[key if "." in key else f"subtract.{method}.{key}"] = value
    config = load_config(None, registry, use_config_file=False, cli=flat)
    backend = registry.select("subtract", method, config.backend_options("subtract"))
    sci = io.read_frame(Path(science))
    tpl = io.read_frame(Path(template))
    if sci.shape != tpl.shape:
        raise InputError(
            f"{template}: shape {tpl.shape} differs from the science frame's {sci.shape}; "
            "subtract-pair needs aligned frames (run the pipeline to align them)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="oasis-pair-"))
    try:
        if getattr(backend, "needs_psf", False):
            psf_name = config.backend("psf")
            psf_backend = registry.select("psf", psf_name, config.backend_options("psf"))
            measured = []
            for frame in (sci, tpl):
                try:
                    frame = psf_backend.psf(
                        frame, options=config.backend_options("psf"), workdir=workdir
                    )
                except StageError as err:
                    log.warning("%s: no PSF measured (%s)", frame.path, err)
                measured.append(frame)
            sci, tpl = measured
        template_obj = Template(
            **{f.name: getattr(tpl, f.name) for f in attrs.fields(Frame)}, inputs=()
        )
        residual = run_subtraction(
            backend,
            sci,
            template_obj,
            options=config.backend_options("subtract"),
            workdir=workdir,
            settings=config.settings["subtract"],
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record = registry.get("subtract", method)
    prov = Provenance(
        stage="subtract",
        backend=method,
        plugin=f"{record.dist}=={record.version}",
        inputs={"science": Path(science), "template": Path(template)},
        options=config.backend_options("subtract"),
        settings=config.settings["subtract"],
    )
    residual = attrs.evolve(residual, name=sci.name, science=sci.name, template=tpl.name)
    cards = {**prov.header_cards(), **residual_cards(residual, sci, tpl)}
    io.write_residual(Path(output), residual, header_extra=cards)
    if noise is not None:
        from astropy.io import fits

        with io.atomic_write(Path(noise)) as tmp:
            fits.PrimaryHDU(np.asarray(residual.noise, np.float32)).writeto(tmp)
    return residual
