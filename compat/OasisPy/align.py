"""OasisPy's ``align`` module: :func:`~oasis_apps.oasispy.ALIGN`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import ALIGN

__all__ = ["ALIGN"]
