"""Entry point of the built-in ``sextractor`` plugin: the ``psfex`` psf backend (SExtractor
+ PSFEx) and the ``sextractor`` extract backend (SExtractor with SPREAD_MODEL).

This package is registered through the ``oasis.plugins`` entry-point group. The backends
run the external programs ``source-extractor`` (or ``sex``) and ``psfex``; when they are
missing, ``oasis plugins`` lists the backends as unavailable with the install hint. The
backend modules import their heavy dependencies inside their methods, so listing them
stays fast.
"""

from __future__ import annotations

from oasis_core.contracts.hookspecs import hookimpl

__all__ = ["oasis_extract_backends", "oasis_psf_backends"]


@hookimpl
def oasis_psf_backends():  # type: ignore[no-untyped-def]
    from oasis_sextractor.psf import PsfexPsf

    yield PsfexPsf()


@hookimpl
def oasis_extract_backends():  # type: ignore[no-untyped-def]
    from oasis_sextractor.extract import SextractorExtract

    yield SextractorExtract()
