"""Entry point of the built-in ``ois`` plugin: Alard's Optimal Image Subtraction with
ISIS's parameters, in numpy/scipy."""

from __future__ import annotations

from oasis_core.contracts.hookspecs import hookimpl

__all__ = ["oasis_subtract_backends"]


@hookimpl
def oasis_subtract_backends():  # type: ignore[no-untyped-def]
    from oasis_ois.backend import OisSubtract

    yield OisSubtract()
