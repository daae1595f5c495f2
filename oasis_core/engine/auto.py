"""The subtract backend ``auto``: a selector over the other subtract backends.

:class:`AutoBackend` is registered by the core like any plugin's backend (options
``[subtract.auto]``). Bound to a registry and a configuration (:func:`select_subtract`,
:func:`auto_subtract`) it becomes an :class:`AutoSubtract`, which tries every subtract
backend that can run here, ``ois`` first, each with its own optimisation loop
(:func:`run_auto`, through :func:`~oasis_core.engine.subtraction.run_subtraction`); among
the residuals whose noise image is honest (:func:`background_scatter` within
``noise_tolerance`` of 1) the best Q is kept and the choice recorded (:func:`auto_cards`,
and in ``meta["config"]``, which ``residuals/log.txt`` shows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import SubtractBackend, option
from oasis_core.contracts.errors import OasisError, StageError
from oasis_core.contracts.model import Frame, Residual, Template
from oasis_core.contracts.validators import fraction
from oasis_core.engine.config import SubtractSettings
from oasis_core.engine.subtraction import (
    CHOICE_PREFIX,
    better_q,
    run_subtraction,
    unnamed,
)

__all__ = [
    "AutoBackend",
    "AutoOptions",
    "AutoSubtract",
    "auto_cards",
    "auto_subtract",
    "background_scatter",
    "provenance_options",
    "run_auto",
    "select_subtract",
]

log = logging.getLogger("oasis")


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
        from oasis_core.engine.config import load_config
        from oasis_core.engine.plugins import Registry

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

    def select(
        self, science: Frame, template: Template, *, workdir: Path, settings: Any
    ) -> Residual:
        """Subtract with every candidate and keep one (:func:`run_auto`)."""
        return run_auto(self, science, template, workdir=workdir, settings=settings)


def auto_subtract(registry: Any, config: Any, names: Sequence[str] | None = None) -> AutoSubtract:
    """The :class:`AutoSubtract` of the installed subtract backends that can run here.

    Parameters
    ----------
    registry : oasis_core.engine.plugins.Registry
    config : oasis_core.engine.config.Config
        Gives each backend's options (``[subtract.<name>]``) and auto's (``[subtract.auto]``).
    names : sequence of str, optional
        The backends to consider (default: every installed one but ``auto``), tried in
        the order of their ``auto_priority`` (the ``ois`` backend declares itself first).

    Raises
    ------
    BackendUnavailable
        When no subtract backend can run here (the message gives each one's reason).
    """
    from oasis_core.contracts.errors import BackendUnavailable

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
    (:func:`oasis_core.engine.quality.normalized_noise`): 1 when its noise image is honest, below
    1 when overstated."""
    from oasis_core.engine.quality import normalized_noise, source_footprint

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
        if honest and _usable(residual) and np.isfinite(residual.q) and residual.q >= ceiling:
            break
    if not results:
        raise StageError(f"{science.name}: subtract backend 'auto': {'; '.join(tried)}")
    # a residual the core's rules made unusable (a wrong flux scale...) is never ranked
    # above one they kept, however high its Q
    kept = [r for r in results if _usable(r[0])] or results
    ranked = [r for r in kept if r[2]]
    note = ""
    if not ranked:
        ranked = kept
        note = f"no residual's background scatter within {tolerance:g} of 1; ranked all by Q"
        log.warning("%s: subtract backend 'auto': %s", science.name, note)
    residual, choice, _ = ranked[0]
    for candidate in ranked[1:]:
        if better_q(candidate[0].q, residual.q):
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


def _usable(residual: Residual) -> bool:
    """The core's verdict on ``residual`` (``meta["usable"]``; true when not judged)."""
    return residual.meta.get("usable") is not False


def auto_cards(residual: Residual) -> dict[str, Any]:
    """Header cards recording the choice of ``backend = "auto"`` (none for a plain run)."""
    choice = residual.meta.get("auto_choice")
    if not choice:
        return {}
    return {"OASAUTO": (str(choice), "backend chosen by subtract backend 'auto'")}
