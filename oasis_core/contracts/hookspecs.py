"""The plugin contract: one hook per stage, each yielding named backends.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names are the
hooks below; it is found through the ``oasis.plugins`` entry-point group (built-in plugins
use the same path). The hooks only *register* backends: they are called once when a plugin
manager resolves backends, before any stage runs, take no arguments and yield (or return
a list of) backend instances, subclasses of the base classes in
:mod:`oasis_core.contracts.backends`. A plugin implements only the hooks for the stages it serves.

Backend names must be unique within a stage across all installed plugins; a duplicate is
an error naming both distributions.

Each hook is named by its stage's record in :mod:`oasis_core.contracts.stages`; a third-party stage
declares its hook in its own module, which the record names (``hookspecs``).
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from oasis_core.contracts.backends import (
    AlignBackend,
    CombineBackend,
    ExtractBackend,
    MaskBackend,
    MrBackend,
    PhotometryBackend,
    PsfBackend,
    Simulator,
    SubtractBackend,
)

__all__ = [
    "hookimpl",
    "hookspec",
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

hookspec = pluggy.HookspecMarker("oasis")
hookimpl = pluggy.HookimplMarker("oasis")


@hookspec
def oasis_mask_backends() -> Iterable[MaskBackend]:
    """Yield the mask backends this plugin provides.

    A mask backend returns the frame with a weight map in [0, 1] (0 = bad pixel).

    Examples
    --------
    >>> @hookimpl
    ... def oasis_mask_backends():
    ...     yield MyMask()
    """


@hookspec
def oasis_psf_backends() -> Iterable[PsfBackend]:
    """Yield the PSF backends this plugin provides.

    A PSF backend measures the frame's PSF model, FWHM, S/N, background and noise.
    """


@hookspec
def oasis_align_backends() -> Iterable[AlignBackend]:
    """Yield the alignment backends this plugin provides.

    An align backend resamples a frame onto the reference frame's grid and rescales it
    to the reference's photometric level.
    """


@hookspec
def oasis_combine_backends() -> Iterable[CombineBackend]:
    """Yield the template-combination backends this plugin provides.

    A combine backend stacks the chosen aligned frames into a :class:`Template`.
    """


@hookspec
def oasis_subtract_backends() -> Iterable[SubtractBackend]:
    """Yield the subtraction backends this plugin provides.

    A subtract backend PSF-matches the template to a science frame and returns a
    :class:`Residual` with its noise image, kernel and Q.

    Examples
    --------
    >>> @hookimpl
    ... def oasis_subtract_backends():
    ...     yield HotpantsSubtract()
    """


@hookspec
def oasis_mr_backends() -> Iterable[MrBackend]:
    """Yield the master-residual backends this plugin provides.

    An mr backend combines the residuals into one master residual.
    """


@hookspec
def oasis_extract_backends() -> Iterable[ExtractBackend]:
    """Yield the source-extraction backends this plugin provides.

    An extract backend detects sources on one residual and returns a Table.
    """


@hookspec
def oasis_photometry_backends() -> Iterable[PhotometryBackend]:
    """Yield the photometry backends this plugin provides.

    A photometry backend measures forced fluxes at given positions on one residual (and
    on the template, for the reference flux) with the PSF the core gives it, and returns
    a Table, one row per position (the light curves are the core's).

    Examples
    --------
    >>> @hookimpl
    ... def oasis_photometry_backends():
    ...     yield MyPsfPhotometry()
    """


@hookspec
def oasis_simulators() -> Iterable[Simulator]:
    """Yield the simulators this plugin provides (not a stage: a source of test data).

    ``oasis demo`` simulates its frames with the simulator named by ``--simulator``
    (default ``native``).
    """
