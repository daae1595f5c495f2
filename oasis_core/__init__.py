"""OASIS core: contracts, data model, config, target tree, pipeline and CLI.

The pipeline and its stages are reachable from the package, as OasisPy's users expect::

    import oasis_core
    oasis_core.pipeline("OASIS/targets/m31", backends={"subtract": "ois"})
    oasis_core.mask("OASIS/targets/m31")

Two frames in memory (arrays, CCDData) or on disk are subtracted with
``oasis_core.subtract_pair(science, template, method="ois")``, and a target run with its
catalogs returned as astropy Tables by ``oasis_core.run(target, subtract="zogy")``
(:mod:`oasis_core.api`).

``oasis_core.pipeline`` is the :mod:`oasis_core.pipeline` module, callable as the
:func:`oasis_core.pipeline.pipeline` function. Imports are lazy, so ``oasis --help`` stays
fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "align",
    "combine",
    "compare",
    "extract",
    "mask",
    "mr",
    "pipeline",
    "psf",
    "run",
    "subtract",
    "subtract_pair",
]

_STAGE_FUNCTIONS = ("mask", "psf", "align", "combine", "subtract", "mr", "extract")


def __getattr__(name: str) -> Any:
    if name in ("pipeline", "compare"):
        return importlib.import_module(f"oasis_core.{name}")
    if name in ("subtract_pair", "run"):  # the in-memory API (oasis_core.api)
        return getattr(importlib.import_module("oasis_core.api"), name)
    if name in _STAGE_FUNCTIONS:
        return getattr(importlib.import_module("oasis_core.pipeline"), name)
    raise AttributeError(f"module 'oasis_core' has no attribute {name!r}")
