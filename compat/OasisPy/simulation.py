"""OasisPy's ``simulation`` module: :func:`~oasis_core.oasispy.sim_fakes`,
:func:`~oasis_core.oasispy.sim_sameField` and :func:`~oasis_core.oasispy.SIM`, re-exported
from :mod:`oasis_core.oasispy`."""

from oasis_core.oasispy import SIM, sim_fakes, sim_sameField

__all__ = ["SIM", "sim_fakes", "sim_sameField"]
