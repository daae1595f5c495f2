"""OasisPy's ``mask`` module: :func:`~oasis_apps.oasispy.MASK`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import MASK

__all__ = ["MASK"]
