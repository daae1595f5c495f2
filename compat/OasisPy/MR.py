"""OasisPy's ``MR`` module: :func:`~oasis_apps.oasispy.MR`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import MR

__all__ = ["MR"]
