"""Base classes of the stage backends, one per stage.

A backend is a small object with a user-facing ``name``, an ``Options`` attrs class (every
option has a default and a ``help`` in its metadata), an optional :meth:`Backend.check`
that raises :class:`~oasis_core.contracts.errors.BackendUnavailable` when it cannot run
here, and one
stage method that takes objects and returns new objects. Backends never touch the target
tree: they get a private ``workdir`` for scratch files and the core persists what they
return.

Stage methods (all options keyword-only, after the data)::

    MaskBackend.mask(frame, *, options, workdir) -> Frame            # new weight map
    PsfBackend.psf(frame, *, options, workdir) -> Frame              # fwhm, snr, psf...
    AlignBackend.align(frame, reference, *, options, workdir) -> Frame
    CombineBackend.combine(frames, *, options, workdir) -> Template
    SubtractBackend.subtract(science, template, *, options, workdir) -> Residual
    MrBackend.master(residuals, *, options, workdir) -> Residual
    ExtractBackend.extract(residual, *, options, workdir) -> astropy Table
    PhotometryBackend.photometry(image, positions, *, psf, options, workdir) -> astropy Table
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs

from oasis_core.contracts.model import Frame, PsfModel, Residual, Template
from oasis_core.contracts.stages import StageNames, StageTable
from oasis_core.contracts.validators import Check, InRange, one_of

__all__ = [
    "STAGES",
    "AlignBackend",
    "Backend",
    "CombineBackend",
    "ExtractBackend",
    "MaskBackend",
    "MrBackend",
    "NoOptions",
    "PhotometryBackend",
    "PsfBackend",
    "Simulator",
    "SubtractBackend",
    "option",
    "option_check",
]

#: The pipeline's stages, in the order they run: a live view of :mod:`oasis_core.contracts.stages`
#: (third-party stages included).
STAGES: Sequence[str] = StageNames()

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def option(
    default: Any,
    help: str,  # noqa: A002 - the attrs metadata key
    *,
    range: tuple[float | None, float | None] | InRange | None = None,  # noqa: A002
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    nan: bool = False,
    path: bool = False,
    **kwargs: Any,
) -> Any:
    """Declare one option: its default, a one-line help (shown by ``oasis init``) and what
    values it takes, checked whenever the options object is made (from ``oasis.toml``, the
    command line or Python).

    Parameters
    ----------
    default : object
        The default; its type is the option's type.
    help : str
        One line; ``oasis init`` writes it with the range after the key.
    range : (lo, hi) or InRange, optional
        Numbers only: the closed interval ``[lo, hi]`` (``None``: unbounded), or one of
        the shared ranges of :mod:`oasis_core.contracts.validators` for open bounds
        (``positive``, ``non_negative``, ``in_range(0, 1, lo_open=True)``...). Every
        numeric option declares one. A float option refuses NaN and infinities unless
        ``nan=True`` or the range has that infinity as a closed bound.
    choices : sequence, optional
        The allowed values (strings or numbers).
    check : Check, optional
        A specific check no range or choice expresses
        (:func:`oasis_core.contracts.validators.satisfies`).
    nan : bool
        NaN is a valid value of this float option (it never is otherwise).
    path : bool
        The value names a file (``""``: none). The options hash covers the file's
        contents (:mod:`oasis_core.engine.provenance`), so editing the file redoes the work.
    **kwargs
        Passed to :func:`attrs.field` (``converter``, a further ``validator``...).

    Raises
    ------
    ValueError
        When more than one of ``range``, ``choices`` and ``check`` is given, or the
        default is not allowed by them.

    Examples
    --------
    >>> from oasis_core.contracts.validators import positive
    >>> @attrs.frozen(kw_only=True)
    ... class MyOptions:
    ...     threshold: float = option(5.0, "detection threshold in sigmas", range=positive)
    ...     fraction: float = option(0.5, "fraction of the frames", range=(0, 1))
    >>> MyOptions(threshold=-1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    oasis_core.contracts.validators.OptionValueError: MyOptions: threshold = -1.0: must be ...
    """
    given = [c for c in (range, choices, check) if c is not None]
    if len(given) > 1:
        raise ValueError("option(): give at most one of range, choices and check")
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    if range is not None:
        if not number:
            raise ValueError(f"option(): range given for the non-numeric default {default!r}")
        base = range if isinstance(range, InRange) else InRange(*range)
        check = attrs.evolve(base, nan=base.nan or nan)
        if isinstance(default, int):
            check = _integer_range(check)
    elif choices is not None:
        check = one_of(*choices)
    elif check is None and isinstance(default, float):
        check = InRange(nan=nan)  # finite, whatever its range
    if check is not None and not check.test(default):
        raise ValueError(f"option(): the default {default!r} is not {check.words()}")
    validators = [check] if check is not None else []
    extra = kwargs.pop("validator", None)
    if extra is not None:
        validators += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    # "declared": the option states its values (a float without a range is only "finite")
    metadata = {"help": help, "check": check, "path": path, "declared": bool(given)}
    return attrs.field(default=default, metadata=metadata, validator=validators or None, **kwargs)


def _integer_range(check: InRange) -> InRange:
    """``check`` for integers: open integer bounds closed (``> 0`` is ``>= 1``)."""
    lo, hi, lo_open, hi_open = check.lo, check.hi, check.lo_open, check.hi_open
    if lo is not None and lo_open and float(lo).is_integer():
        lo, lo_open = lo + 1, False
    if hi is not None and hi_open and float(hi).is_integer():
        hi, hi_open = hi - 1, False
    return attrs.evolve(check, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, integer=True)


def option_check(field: Any) -> Check | None:
    """The check an option declared (its range or choices), or None."""
    return field.metadata.get("check")


@attrs.frozen(kw_only=True)
class NoOptions:
    """Options of a backend that has none."""


class Backend:
    """What every backend has.

    Attributes
    ----------
    name : str
        User-facing name, lower case, ``[a-z0-9_-]+``; unique within a stage across every
        installed plugin.
    stage : str
        One of :data:`STAGES` (set by the per-stage base class).
    Options : type
        An ``attrs`` class whose fields (declared with :func:`option`) are the backend's
        options; they are read from ``[<stage>.<name>]`` in ``oasis.toml``.
    description : str
        One line shown by ``oasis plugins``.
    user_files : tuple of str
        Names of configuration files a user may put in the target's ``configs/`` to
        override the backend's own (e.g. ``("default.sex", "default.param")``). Before
        calling the stage method, the core copies each one present into ``workdir``; the
        backend uses ``workdir / name`` when it exists.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    user_files: ClassVar[tuple[str, ...]] = ()

    def check(self, options: Any) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` if this backend
        cannot run.

        The message says what is missing and how to get it. The default accepts.
        """

    def __repr__(self) -> str:
        return f"<{self.stage} backend {self.name!r}>"


class MaskBackend(Backend):
    """Builds a frame's weight map (cosmic rays, saturation, bad pixels...)."""

    stage = "mask"

    def mask(self, frame: Frame, *, options: Any, workdir: Path) -> Frame:
        """Return ``frame`` with a new ``weight`` (0 on pixels not to use).

        The incoming weight (non-finite pixels and the file's own bad-pixel mask already
        at 0) must be respected: a pixel it excludes stays excluded.
        """
        raise NotImplementedError


class PsfBackend(Backend):
    """Measures the PSF, seeing and signal-to-noise of a frame."""

    stage = "psf"

    def psf(self, frame: Frame, *, options: Any, workdir: Path) -> Frame:
        """Return ``frame`` with ``psf``, ``fwhm``, ``snr``, ``background`` and ``noise`` set."""
        raise NotImplementedError


class AlignBackend(Backend):
    """Registers a frame onto the reference frame's pixel grid."""

    stage = "align"

    def align(self, frame: Frame, reference: Frame, *, options: Any, workdir: Path) -> Frame:
        """Return ``frame`` resampled onto ``reference``'s grid.

        Pixels with no data after warping get weight 0; the data are linearly rescaled to
        the reference's photometric level; ``meta`` records the transform and the scale.
        The result has the reference's shape.
        """
        raise NotImplementedError


class CombineBackend(Backend):
    """Stacks aligned frames into a template."""

    stage = "combine"

    def combine(self, frames: Sequence[Frame], *, options: Any, workdir: Path) -> Template:
        """Return the template built from ``frames`` (already chosen and aligned)."""
        raise NotImplementedError


class SubtractBackend(Backend):
    """Subtracts a PSF-matched template from a science frame.

    Set ``needs_psf = True`` when :meth:`subtract` needs the frames' ``psf`` models
    (``oasis subtract-pair`` then measures them with the psf backend first), and
    ``auto_priority`` to place the backend in the order ``backend = "auto"`` tries them.
    """

    stage = "subtract"
    needs_psf: ClassVar[bool] = False
    #: Order in which the subtract backend ``auto`` tries the backends (lowest first).
    auto_priority: ClassVar[int] = 100

    def subtract(
        self, science: Frame, template: Template, *, options: Any, workdir: Path
    ) -> Residual:
        """Return the residual science - K*template in the science frame's flux scale.

        The residual carries its noise image, weight map, kernel solution and Q.
        """
        raise NotImplementedError

    def candidates(self, science: Frame, template: Template, *, options: Any) -> Iterable[Any]:
        """Option sets to try on this pair, cheapest first; the first is ``options``.

        May be a generator: the core asks for the next one only when the previous
        configuration fell short, so work needed only by later ones can wait.

        When ``[subtract] optimize`` is on, the core runs :meth:`subtract` with each in
        turn, stops at the first whose Q reaches ``[subtract] q_ceiling`` and keeps the
        best. The default offers only ``options``.
        """
        return [options]


class MrBackend(Backend):
    """Combines residuals into a master residual."""

    stage = "mr"

    def master(self, residuals: Sequence[Residual], *, options: Any, workdir: Path) -> Residual:
        """Return the master residual of ``residuals`` (usually of normalised residuals).

        Its ``noise`` is the 1-sigma level of each pixel of the master residual.
        """
        raise NotImplementedError


class ExtractBackend(Backend):
    """Detects sources on a residual or the master residual."""

    stage = "extract"

    #: Columns every extract backend returns (more are allowed, e.g. ``spread_model``).
    COLUMNS: ClassVar[tuple[str, ...]] = ("x", "y", "flux", "flux_err", "peak", "snr", "a", "b")

    def extract(self, residual: Residual, *, options: Any, workdir: Path) -> Any:
        """Return an :class:`astropy.table.Table` of detections with :attr:`COLUMNS`.

        ``x``, ``y`` are 0-based pixel positions, ``flux`` in ADU (negative for negative
        sources when the backend detects them), ``snr`` the detection significance, ``a``
        and ``b`` the semi-axes in pixels. Filtering (majority, dipoles) is the core's job.
        """
        raise NotImplementedError


class PhotometryBackend(Backend):
    """Measures fluxes at given positions on a residual (or on the template): forced
    photometry, one row per position."""

    stage = "photometry"

    #: Columns every photometry backend returns, one row per position, in their order.
    COLUMNS: ClassVar[tuple[str, ...]] = ("flux", "flux_err", "flag")

    def photometry(
        self, image: Residual, positions: Any, *, psf: PsfModel, options: Any, workdir: Path
    ) -> Any:
        """Return an :class:`astropy.table.Table` with :attr:`COLUMNS`, row ``i`` for
        ``positions[i]``.

        ``image`` is a residual (or the template, given as a :class:`Residual` whose
        ``noise`` is the template's noise image and whose ``data`` has its sky removed);
        ``positions`` an ``(N, 2)`` float array of 0-based ``x``, ``y`` on its grid;
        ``psf`` the image of a point source of unit flux *in template ADU* at the image
        centre, built by the core (the template's PSF convolved with the residual's
        kernel when the template was convolved, the template's PSF when the science
        frame was, else the science frame's PSF), so that ``flux`` comes out in template
        ADU whatever the frame's photometric scale. ``flux_err`` is the 1-sigma error
        from ``image.noise`` (a backend may scale it for the noise correlations the
        noise image misses, saying so in the table's ``meta``); ``flag`` an integer, 0
        for a clean measurement (bit 1: a masked pixel near the position, 2: partly off
        the image, 4: no usable pixel, flux NaN, 8: a poor fit; 16 is the core's: the
        residual itself is flagged). More columns are allowed (``background``,
        ``chi2``...).
        """
        raise NotImplementedError


class Simulator:
    """Makes simulated series of frames with a truth table (``oasis demo`` uses one).

    Attributes
    ----------
    name : str
        User-facing name, ``[a-z0-9-]+``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def simulate(
        self,
        directory: Path,
        *,
        n_frames: int,
        shape: tuple[int, int],
        seed: int,
        transients: int | None = None,
    ) -> Any:
        """Write ``n_frames`` FITS frames into ``directory``; return the truth table.

        ``transients`` is how many transients to inject (``None``: the simulator's own
        choice; ``oasis test`` asks for 0 and injects its own). A simulator that cannot
        honour it may leave the keyword out of its signature; the core then does not pass
        it.

        The truth is an astropy Table with one row per (transient, frame where it shows):
        ``frame`` (file name without suffix), ``x``, ``y`` (0-based pixels in that frame),
        ``ra``, ``dec`` (degrees, when the frames have a WCS), ``flux`` (ADU),
        ``peak_snr`` and ``id``.
        """
        raise NotImplementedError


#: Stage name to its backend base class: a view of :mod:`oasis_core.contracts.stages`.
BASES: Mapping[str, type[Backend]] = StageTable(lambda stage: stage.base_class)
