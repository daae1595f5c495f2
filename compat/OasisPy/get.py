"""OasisPy's ``get`` module: :func:`~oasis_apps.oasispy.GET`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import GET

__all__ = ["GET"]
