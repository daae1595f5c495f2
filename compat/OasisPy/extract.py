"""OasisPy's ``extract`` module: :func:`~oasis_apps.oasispy.EXTRACT`, re-exported from
:mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import EXTRACT

__all__ = ["EXTRACT"]
