"""OasisPy's ``combine`` module: :func:`~oasis_core.oasispy.COMBINE`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import COMBINE

__all__ = ["COMBINE"]
