"""OasisPy's module layout, so that scripts written for OasisPy (UCSB Optical SETI, 2019)
run unchanged on OASIS.

Each submodule re-exports the functions OasisPy documents in it from
:mod:`oasis_apps.oasispy` (where they are implemented and documented)::

    from OasisPy import align, subtract
    from OasisPy.psf import PSF
    from OasisPy.simulation import sim_fakes

    align.ALIGN(path)                    # or align_method='fakes': photometric only
    subtract.SUBTRACT(path, method='ois')

The modules are OasisPy's: ``initialize``, ``get``, ``mask``, ``align``, ``psf``,
``combine``, ``subtract``, ``MR``, ``extract``, ``pipeline``, ``run``, ``simulation``,
``test`` and ``montage``. ``mr`` and ``mosaic`` are the same modules as ``MR`` and
``montage`` under lower-case and OASIS names (one file each, so that the package also
installs on case-insensitive file systems).
"""

from __future__ import annotations

import sys

from OasisPy import (
    MR,
    align,
    combine,
    extract,
    get,
    initialize,
    mask,
    montage,
    pipeline,
    psf,
    run,
    simulation,
    subtract,
    test,
)

__all__ = [
    "MR",
    "align",
    "combine",
    "extract",
    "get",
    "initialize",
    "mask",
    "montage",
    "mosaic",
    "mr",
    "pipeline",
    "psf",
    "run",
    "simulation",
    "subtract",
    "test",
]

mr = MR
mosaic = montage
# `import OasisPy.mr` and `from OasisPy.mr import MR` find the aliases too
sys.modules[f"{__name__}.mr"] = MR
sys.modules[f"{__name__}.mosaic"] = montage
