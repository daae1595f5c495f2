"""OasisPy's ``psf`` module: :func:`~oasis_core.oasispy.PSF`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import PSF

__all__ = ["PSF"]
