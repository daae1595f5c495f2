"""OasisPy's ``mask`` module: :func:`~oasis_core.oasispy.MASK`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import MASK

__all__ = ["MASK"]
