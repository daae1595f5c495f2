"""OasisPy's ``initialize`` module: :func:`~oasis_apps.oasispy.INITIALIZE`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import INITIALIZE

__all__ = ["INITIALIZE"]
