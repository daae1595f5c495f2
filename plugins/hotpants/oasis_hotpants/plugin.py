"""Entry point of the built-in ``hotpants`` plugin: Becker's HOTPANTS subtract backend.

This package is registered through the ``oasis.plugins`` entry-point group. The backend
runs the external ``hotpants`` program (https://github.com/acbecker/hotpants); when it is
missing, ``oasis plugins`` lists the backend as unavailable with the build hint.
"""

from __future__ import annotations

from oasis_core.contracts.hookspecs import hookimpl

__all__ = ["oasis_subtract_backends"]


@hookimpl
def oasis_subtract_backends():  # type: ignore[no-untyped-def]
    from oasis_hotpants.backend import HotpantsSubtract

    yield HotpantsSubtract()
