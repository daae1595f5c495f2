"""OasisPy's ``simulation`` module: :func:`~oasis_apps.oasispy.sim_fakes`,
:func:`~oasis_apps.oasispy.sim_sameField` and :func:`~oasis_apps.oasispy.SIM`, re-exported
from :mod:`oasis_apps.oasispy`."""

from oasis_apps.oasispy import SIM, sim_fakes, sim_sameField

__all__ = ["SIM", "sim_fakes", "sim_sameField"]
