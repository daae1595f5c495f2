"""OasisPy's ``align`` module: :func:`~oasis_core.oasispy.ALIGN`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import ALIGN

__all__ = ["ALIGN"]
