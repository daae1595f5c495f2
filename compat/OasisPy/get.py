"""OasisPy's ``get`` module: :func:`~oasis_core.oasispy.GET`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import GET

__all__ = ["GET"]
