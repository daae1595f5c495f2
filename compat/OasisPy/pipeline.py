"""OasisPy's ``pipeline`` module: :func:`~oasis_core.oasispy.PIPELINE`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import PIPELINE

__all__ = ["PIPELINE"]
