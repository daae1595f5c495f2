"""OasisPy's ``pipeline`` module: :func:`~oasis_apps.oasispy.PIPELINE`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import PIPELINE

__all__ = ["PIPELINE"]
