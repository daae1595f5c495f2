"""Entry point of the built-in ``native`` plugin (numpy/scipy/astropy, astroscrappy,
astroalign, sep): a backend for every stage, ``zogy`` for subtract.

Registered through the ``oasis.plugins`` entry-point group like any third-party plugin.
The backend modules import their heavy dependencies inside their methods, so listing the
backends (``oasis plugins``) stays fast.
"""

from __future__ import annotations

from oasis_core.contracts.hookspecs import hookimpl

__all__ = [
    "oasis_align_backends",
    "oasis_combine_backends",
    "oasis_extract_backends",
    "oasis_mask_backends",
    "oasis_mr_backends",
    "oasis_photometry_backends",
    "oasis_psf_backends",
    "oasis_simulators",
    "oasis_subtract_backends",
]


@hookimpl
def oasis_mask_backends():  # type: ignore[no-untyped-def]
    from oasis_native.mask import NativeMask

    yield NativeMask()


@hookimpl
def oasis_psf_backends():  # type: ignore[no-untyped-def]
    from oasis_native.psf import NativePsf

    yield NativePsf()


@hookimpl
def oasis_align_backends():  # type: ignore[no-untyped-def]
    from oasis_native.align import NativeAlign

    yield NativeAlign()


@hookimpl
def oasis_combine_backends():  # type: ignore[no-untyped-def]
    from oasis_native.combine import NativeCombine

    yield NativeCombine()


@hookimpl
def oasis_subtract_backends():  # type: ignore[no-untyped-def]
    from oasis_native.zogy import NativeZogy

    yield NativeZogy()


@hookimpl
def oasis_mr_backends():  # type: ignore[no-untyped-def]
    from oasis_native.mr import NativeMr, SigmaClipMr, SosAbsMr, SosMr

    yield NativeMr()
    yield SosMr()
    yield SosAbsMr()
    yield SigmaClipMr()


@hookimpl
def oasis_extract_backends():  # type: ignore[no-untyped-def]
    from oasis_native.extract import NativeExtract

    yield NativeExtract()


@hookimpl
def oasis_photometry_backends():  # type: ignore[no-untyped-def]
    from oasis_native.photometry import NativePhotometry

    yield NativePhotometry()


@hookimpl
def oasis_simulators():  # type: ignore[no-untyped-def]
    from oasis_native.simulator import NativeSimulator

    yield NativeSimulator()
