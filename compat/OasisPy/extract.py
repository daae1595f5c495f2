"""OasisPy's ``extract`` module: :func:`~oasis_core.oasispy.EXTRACT`, re-exported from
:mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import EXTRACT

__all__ = ["EXTRACT"]
