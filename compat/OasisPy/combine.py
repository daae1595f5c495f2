"""OasisPy's ``combine`` module: :func:`~oasis_apps.oasispy.COMBINE`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import COMBINE

__all__ = ["COMBINE"]
