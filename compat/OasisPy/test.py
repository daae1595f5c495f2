"""OasisPy's ``test`` module: :func:`~oasis_core.oasispy.TEST`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import TEST

__all__ = ["TEST"]
