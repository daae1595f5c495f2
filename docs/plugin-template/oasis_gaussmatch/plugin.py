"""The hook OASIS calls (entry point ``gaussmatch`` of the ``oasis.plugins`` group)."""

from oasis_core.contracts.hookspecs import hookimpl
from oasis_gaussmatch.backend import GaussMatch


@hookimpl
def oasis_subtract_backends():
    yield GaussMatch()
