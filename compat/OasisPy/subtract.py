"""OasisPy's ``subtract`` module: :func:`~oasis_core.oasispy.SUBTRACT`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import SUBTRACT

__all__ = ["SUBTRACT"]
