"""OasisPy's ``montage`` module: :func:`~oasis_core.oasispy.MOSAIC`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import MOSAIC

__all__ = ["MOSAIC"]
