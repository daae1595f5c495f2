"""OasisPy's ``test`` module: :func:`~oasis_apps.oasispy.TEST`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import TEST

__all__ = ["TEST"]
