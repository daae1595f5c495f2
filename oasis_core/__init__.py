"""OASIS core: the contracts a plugin author reads and the engine that runs them.

Two layers (docs/architecture.md):

- :mod:`oasis_core.contracts`: the stage records, hook specifications, data model,
  backend base classes, option validators and errors. It imports nothing else of OASIS.
- :mod:`oasis_core.engine`: configuration, target tree, pipeline, executors, provenance,
  FITS/ECSV input and output, quality measures, and the public API below. It imports the
  contracts, never a plugin or an application (:mod:`oasis_apps`).

The public API, reachable from the package (imports are lazy, so ``oasis --help`` stays
fast)::

    import oasis_core
    oasis_core.subtract_pair(science, template, method="ois")   # arrays, CCDData or paths
    oasis_core.run("OASIS/targets/m31", subtract="zogy")        # catalogs as Tables
    oasis_core.pipeline("OASIS/targets/m31", backends={"subtract": "ois"})
    oasis_core.mask("OASIS/targets/m31")                        # one stage

``oasis_core.pipeline`` is the :mod:`oasis_core.engine.pipeline` module, callable as its
:func:`~oasis_core.engine.pipeline.pipeline` function (OasisPy's habit).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "align",
    "combine",
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
    if name == "pipeline":
        return importlib.import_module("oasis_core.engine.pipeline")
    if name in ("subtract_pair", "run"):  # the in-memory API (oasis_core.engine.api)
        return getattr(importlib.import_module("oasis_core.engine.api"), name)
    if name in _STAGE_FUNCTIONS:
        return getattr(importlib.import_module("oasis_core.engine.pipeline"), name)
    raise AttributeError(f"module 'oasis_core' has no attribute {name!r}")
