"""OasisPy's ``MR`` module: :func:`~oasis_core.oasispy.MR`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import MR

__all__ = ["MR"]
