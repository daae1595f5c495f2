"""The typed objects that stages pass to each other.

Stage backends receive these objects and return *new* ones (derive with
:func:`attrs.evolve`); they never edit the arrays they are given: the core hands out
read-only arrays, so an in-place edit fails loudly.

Pixel conventions
-----------------
* ``data`` is float32, in ADU, exactly as on disk (negative values are valid: many frames
  are sky-subtracted).
* ``weight`` is float32 in [0, 1]; 0 means "do not use this pixel" (masked, saturated,
  outside the field after alignment), 1 means a fully good pixel. Intermediate values are
  allowed (relative inverse variance, as SWarp uses them). A pixel of weight below
  :data:`MIN_WEIGHT` (0.5) has less than half of its data behind it (a template's median
  of one or two frames of five beside a saturated star): the core counts it as masked
  (the ``masked`` filter, the master residual, the variability image), so a backend that
  combines residuals leaves it out.
* ``noise`` on a :class:`Residual` is the 1-sigma uncertainty of each residual pixel in ADU.
* Coordinates are 0-based pixel coordinates, ``x`` along the last numpy axis.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.numeric import exact_median

__all__ = [
    "MIN_WEIGHT",
    "Frame",
    "KernelSolution",
    "PsfModel",
    "Residual",
    "Template",
    "header_wcs",
    "readonly",
]

MetaValue = float | int | str | bool

#: Smallest weight of a pixel that counts as data: below, less than half of the data
#: behind it is good (the template's median of one or two frames of five around a
#: saturated star). The one definition; :mod:`oasis_core.engine.sources` and the backends
#: import it.
MIN_WEIGHT = 0.5


def readonly(array: np.ndarray | None) -> np.ndarray | None:
    """Return ``array`` (not a copy) flagged read-only, so in-place edits raise."""
    if array is not None:
        array.flags.writeable = False
    return array


def _image(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, np.ndarray) or value.ndim != 2:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a 2-D array")


def _same_shape(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    _image(instance, attribute, value)
    if value.shape != instance.data.shape:
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} has shape {value.shape}, "
            f"data has {instance.data.shape}"
        )


def _float32(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _opt_bool(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=bool)


def _opt_float32(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.float32)


def _header(value: Any) -> Any:
    from astropy.io import fits

    if value is None:
        return fits.Header()
    if isinstance(value, fits.Header):
        return value
    return fits.Header(list(dict(value).items()))


@attrs.frozen(kw_only=True)
class PsfModel:
    """A point-spread-function model measured on one image.

    Attributes
    ----------
    image : ndarray
        The PSF at the image centre, an odd-sized stamp normalised to unit sum.
    fwhm : float
        Full width at half maximum in pixels.
    model : str
        ``"moffat"``, ``"gaussian"``, ``"empirical"`` or a backend's own name.
    params : mapping
        Fitted parameters (``alpha``, ``beta``, ``sigma``, ``ellipticity``...).
    nstars : int
        Stars used for the fit.
    files : tuple of Path
        Files the backend produced in its workdir that the core should keep in ``psf/``
        (e.g. a PSFEx ``.psf`` and SExtractor ``.cat``).
    """

    image: np.ndarray = attrs.field(eq=False, repr=False, converter=_float32, validator=_image)
    fwhm: float
    model: str = "empirical"
    params: Mapping[str, MetaValue] = attrs.field(factory=dict)
    nstars: int = 0
    files: tuple[Path, ...] = ()


@attrs.frozen(kw_only=True)
class Frame:
    """One image of the field with what the stages have measured on it.

    Attributes
    ----------
    data, weight : ndarray
        Pixels (float32, ADU) and weight map (float32 in [0, 1]).
    header : astropy.io.fits.Header
        The frame's header (the primary or the extension holding the data).
    path : Path or None
        The file the frame was read from.
    name : str
        Short name used for outputs (the file name without FITS suffixes).
    background, noise : float or None
        Median sky level and robust sky standard deviation, ADU.
    fwhm, snr : float or None
        Seeing in pixels and a frame signal-to-noise figure (median peak S/N of the
        stars used for the PSF), from the psf stage.
    gain, readnoise, saturation : float or None
        e-/ADU, e- and ADU; read from the header (see :mod:`oasis_core.engine.io`).
    psf : PsfModel or None
    meta : mapping
        Numbers a stage wants recorded (cosmic-ray count, transform, scale...).
    """

    data: np.ndarray = attrs.field(eq=False, repr=False, converter=_float32, validator=_image)
    weight: np.ndarray = attrs.field(eq=False, repr=False, converter=_opt_float32, default=None)
    header: Any = attrs.field(eq=False, repr=False, factory=dict, converter=_header)
    path: Path | None = None
    name: str = "frame"
    background: float | None = None
    noise: float | None = None
    fwhm: float | None = None
    snr: float | None = None
    gain: float | None = None
    readnoise: float | None = None
    saturation: float | None = None
    psf: PsfModel | None = attrs.field(default=None, eq=False)
    meta: Mapping[str, MetaValue] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.weight is None:
            object.__setattr__(self, "weight", np.isfinite(self.data).astype(np.float32))
        _same_shape(self, attrs.fields(type(self)).weight, self.weight)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the pixel array (ny, nx)."""
        return self.data.shape  # type: ignore[return-value]

    @property
    def wcs(self) -> Any:
        """The celestial WCS from the header, or None when the header has none."""
        return header_wcs(self.header)


@attrs.frozen(kw_only=True)
class Template(Frame):
    """The deep reference image built by the combine stage.

    Attributes
    ----------
    inputs : tuple of str
        Names of the frames that went into it.
    holes : ndarray of bool or None
        Where the template is not one stack with the rest of it: a hole in its coverage
        over a source whose peak the missing frames' seeing changes
        (:func:`oasis_core.engine.stacking.incomplete_sources`). The core computes it once,
        from the inputs of every combine backend, and stores it as the template's
        ``HOLES`` extension; every residual is then masked there. None: not computed (the
        core then judges the template's weight alone).
    """

    name: str = "template"
    inputs: tuple[str, ...] = ()
    holes: np.ndarray | None = attrs.field(default=None, eq=False, repr=False, converter=_opt_bool)


@attrs.frozen(kw_only=True)
class KernelSolution:
    """The PSF-matching kernel a subtraction found.

    Attributes
    ----------
    image : ndarray or None
        The kernel at the image centre (odd-sized stamp).
    coefficients : ndarray or None
        Backend-specific coefficients (e.g. basis x spatial polynomial terms).
    direction : str
        ``"template"`` when the template was convolved, ``"science"`` otherwise.
    meta : mapping
        Number of stamps used and rejected, kernel sum (photometric scale), background
        terms, ...
    """

    image: np.ndarray | None = attrs.field(eq=False, repr=False, default=None)
    coefficients: np.ndarray | None = attrs.field(eq=False, repr=False, default=None)
    direction: str = "template"
    meta: Mapping[str, MetaValue] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Residual:
    """A difference image, science minus PSF-matched template.

    Attributes
    ----------
    data : ndarray
        The residual, ADU, in the science frame's photometric system.
    noise : ndarray
        1-sigma uncertainty of every residual pixel (ADU), as hotpants' noise image.
    weight : ndarray
        Weight map of the residual in [0, 1] (0 where either input was unusable).
    header : astropy.io.fits.Header
        Header of the science frame plus what the subtraction recorded.
    name, science, template : str
        Residual name and the names of its inputs.
    q : float
        OasisPy's quality figure Q = 1 / (1 + chi2/N_pix) (see
        :func:`oasis_core.engine.quality.q_value`); ``nan`` when it could not be computed.
    kernel : KernelSolution or None
    params : mapping
        The parameters the backend used (recorded in the header).
    extra : mapping of str to ndarray
        Further images, e.g. ``{"score": S_corr}`` for ZOGY.
    meta : mapping
        Numbers to record (stamps used, run time...). ``meta["flag"]`` is a non-empty
        string when the subtraction is not to be trusted (too few stamps, Q below floor).
    psf : PsfModel or None
        The PSF of the residual's sources: the core sets it for the extract stage to the
        science frame's model (the template's for the master residual), with the files
        the psf backend kept (e.g. a PSFEx ``.psf``) in ``psf.files``. Not stored with
        the residual.
    """

    data: np.ndarray = attrs.field(eq=False, repr=False, converter=_float32, validator=_image)
    noise: np.ndarray = attrs.field(eq=False, repr=False, converter=_float32, validator=_same_shape)
    weight: np.ndarray = attrs.field(
        eq=False, repr=False, converter=_float32, validator=_same_shape
    )
    header: Any = attrs.field(eq=False, repr=False, factory=dict, converter=_header)
    name: str = "residual"
    science: str = ""
    template: str = ""
    q: float = float("nan")
    kernel: KernelSolution | None = attrs.field(default=None, eq=False)
    params: Mapping[str, MetaValue] = attrs.field(factory=dict)
    extra: Mapping[str, np.ndarray] = attrs.field(eq=False, repr=False, factory=dict)
    meta: Mapping[str, MetaValue] = attrs.field(factory=dict)
    psf: PsfModel | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def noise_correlation(self) -> float:
        """How many times more the residual's noise spreads at its PSF's scale than its
        noise image says (``meta["noise_correlation"]``, which the core measures on every
        residual it judges; 1 when not recorded, never below 1). A residual whose
        science frame was convolved shares noise between neighbouring pixels: in a mean
        of residuals its pixels deserve ``weight / noise_correlation**2``."""
        value = self.meta.get("noise_correlation")
        if isinstance(value, (int, float)) and np.isfinite(value) and value > 1:
            return float(value)
        return 1.0

    @property
    def normalized(self) -> np.ndarray:
        """R_norm = (R - mu_R) / sigma, 0 where the weight is 0.

        ``sigma`` is the noise image, which for frames that keep their sky equals
        sqrt(B_S + B_T) in Poisson units (OasisPy's normalisation); ``mu_R`` is the
        median of the good pixels.
        """
        data, noise = np.asarray(self.data), np.asarray(self.noise)
        good = (np.asarray(self.weight) > 0) & (noise > 0) & np.isfinite(data)
        out = np.zeros(data.shape, dtype=np.float32)
        if not good.any():
            return out
        mu = np.float32(exact_median(data[good]))
        np.subtract(data, mu, out=out, where=good)
        np.divide(out, noise, out=out, where=good)
        return out


def header_wcs(header: Any) -> Any:
    """The celestial WCS of ``header``, or None when it has none (bare headers)."""
    if not header or "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header, naxis=2)
        except Exception as err:  # astropy raises many types on broken WCS keys
            logging.getLogger("oasis").warning("invalid WCS in header ignored: %s", err)
            return None
    return wcs if wcs.has_celestial else None
