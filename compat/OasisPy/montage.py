"""OasisPy's ``montage`` module: :func:`~oasis_apps.oasispy.MOSAIC`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import MOSAIC

__all__ = ["MOSAIC"]
