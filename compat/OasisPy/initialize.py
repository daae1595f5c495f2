"""OasisPy's ``initialize`` module: :func:`~oasis_core.oasispy.INITIALIZE`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import INITIALIZE

__all__ = ["INITIALIZE"]
