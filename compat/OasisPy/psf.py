"""OasisPy's ``psf`` module: :func:`~oasis_apps.oasispy.PSF`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import PSF

__all__ = ["PSF"]
