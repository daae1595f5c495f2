"""OasisPy's ``subtract`` module: :func:`~oasis_apps.oasispy.SUBTRACT`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import SUBTRACT

__all__ = ["SUBTRACT"]
