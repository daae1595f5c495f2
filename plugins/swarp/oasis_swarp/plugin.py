"""Entry point of the built-in ``swarp`` plugin: SWarp combine and mr backends.

This package is registered through the ``oasis.plugins`` entry-point group. Both backends
run the external ``SWarp`` program (Debian package ``swarp``); when it is missing,
``oasis plugins`` lists them as unavailable with the install hint.
"""

from __future__ import annotations

from oasis_core.contracts.hookspecs import hookimpl

__all__ = ["oasis_combine_backends", "oasis_mr_backends"]


@hookimpl
def oasis_combine_backends():  # type: ignore[no-untyped-def]
    from oasis_swarp.combine import SwarpCombine

    yield SwarpCombine()


@hookimpl
def oasis_mr_backends():  # type: ignore[no-untyped-def]
    from oasis_swarp.mr import SwarpMr

    yield SwarpMr()
