"""OasisPy's ``run`` module: :func:`~oasis_apps.oasispy.RUN`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import RUN

__all__ = ["RUN"]
