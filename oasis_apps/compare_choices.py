"""The backend choices of :func:`oasis_apps.compare.compare`: which stages vary, the
combinations of their choices, and which of them can run here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from oasis_core.contracts.errors import BackendUnavailable

__all__ = ["SHARED_STAGES", "VARIABLE_STAGES", "Combination", "combinations", "parse_choices"]

#: Stages whose backend a comparison may vary (their outputs live per combination).
VARIABLE_STAGES = ("subtract", "mr", "extract")

#: Stages run once and shared by every combination.
SHARED_STAGES = ("mask", "psf", "align", "combine")


@attrs.frozen
class Combination:
    """One choice of backend per varied stage.

    Attributes
    ----------
    name : str
        The directory name under ``compare/``: the choices joined by ``+``.
    backends : mapping
        Stage to backend name.
    skipped : str
        Why it cannot run here (empty when it can).
    """

    name: str
    backends: Mapping[str, str]
    skipped: str = ""


def parse_choices(value: str | Sequence[str] | None) -> list[str]:
    """``"ois, zogy"`` or ``["ois", "zogy"]`` -> ``["ois", "zogy"]`` (duplicates dropped).

    Examples
    --------
    >>> parse_choices("ois,zogy, ois")
    ['ois', 'zogy']
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        name = str(item).strip()
        if name and name not in out:
            out.append(name)
    return out


def _availability(ctx: Any, stage: str, name: str) -> str:
    """Why backend ``name`` of ``stage`` cannot run here ("" when it can). An unknown
    name raises :class:`~oasis_core.contracts.errors.UnknownBackend` (a typo, not a skip)."""
    ctx.registry.get(stage, name)
    try:
        backend = ctx.registry.select(stage, name, ctx.config.backend_options(stage, name))
        bind = getattr(backend, "bind", None)  # a selector (subtract 'auto'): its candidates
        if callable(bind):
            bind(ctx.registry, ctx.config)
    except BackendUnavailable as err:
        return str(err)
    return ""


def combinations(ctx: Any, choices: Mapping[str, list[str]]) -> list[Combination]:
    stages = [s for s in VARIABLE_STAGES if s in choices]
    reasons = {(s, n): _availability(ctx, s, n) for s in stages for n in choices[s]}
    out = []
    for values in itertools.product(*(choices[s] for s in stages)):
        backends = dict(zip(stages, values, strict=True))
        why = "; ".join(r for s, n in backends.items() if (r := reasons[(s, n)]))
        out.append(Combination("+".join(values), backends, why))
    return out
