"""OasisPy's ``run`` module: :func:`~oasis_core.oasispy.RUN`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import RUN

__all__ = ["RUN"]
