"""For plugin authors: a simulated pair with known answers and a contract check.

Three tools, all usable from a plugin's own tests (``pytest``) and behind
``oasis plugins --check NAME``:

* :func:`synthetic_pair`: an aligned science/template pair simulated in memory with numpy
  (Gaussian stars, a flat sky, Poisson and read noise, transients in the science frame
  only), whose every answer is known: positions and fluxes of the transients, the noise
  of each frame, the noise a perfect residual has, and the frames' PSFs;
* :func:`check_backend`: runs one backend of any stage on such simulated input and checks
  the stage contract (:mod:`oasis_core.backends`): read-only inputs left unchanged,
  output types and shapes, weights in [0, 1], noise finite and > 0, Q finite in [0, 1],
  the backend's name and options, and that its ``meta``/``params`` make valid FITS header
  cards (the output is written with the core's own writer). It returns a
  :class:`CheckReport` (Q and the normalised noise for residuals) or raises one
  :class:`ContractError` listing every breach;
* :func:`plugin_registry` and :func:`register_plugin`: a registry with a plugin object
  registered explicitly (a test's or a notebook's), which tolerates the same plugin being
  installed too: the explicit object replaces the installed copy instead of failing.

The simulator is a small numpy one of its own (the core imports no plugin); it is meant
to be fast (a 160x160 pair in a few milliseconds) rather than realistic.

Examples
--------
>>> pair = synthetic_pair(seed=1)
>>> pair.science.shape == pair.template.shape, len(pair.truth)
(True, 2)
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.errors import OasisError
from oasis_core.model import Frame, PsfModel, Residual, Template, readonly

__all__ = [
    "CheckReport",
    "ContractError",
    "SyntheticPair",
    "check_backend",
    "plugin_registry",
    "readonly_frame",
    "register_plugin",
    "synthetic_pair",
]

_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


class ContractError(OasisError, AssertionError):
    """A backend breaks the stage contract; the message lists every breach in one line.

    An :class:`AssertionError` too, so that a plugin's test fails (not errors) on it.
    """


# ------------------------------------------------------------------------- simulator


@attrs.frozen(kw_only=True)
class SyntheticPair:
    """An aligned science/template pair with its known answers (:func:`synthetic_pair`).

    Attributes
    ----------
    science : Frame
        The science frame, with ``background``, ``noise`` (sky sigma, ADU), ``gain``,
        ``readnoise``, ``saturation``, ``fwhm`` and ``psf`` set as the pipeline sets them
        after the psf and align stages.
    template : Template
        The mean of ``exposures``; its ``gain`` is the effective one (``depth x gain``),
        its ``inputs`` the exposures' names (the science frame's too when it is one).
    exposures : tuple of Frame
        The template's exposures (for combine backends).
    truth : astropy.table.Table
        One row per transient: ``x``, ``y`` (0-based pixels), ``flux`` (ADU, total) and
        ``peak_snr`` in the science frame.
    residual_sigma : float
        The sky noise (ADU) of a perfect residual, ``sqrt(sigma_S^2 + sigma_T^2)`` (less
        the shared part when the science frame is in the template).
    variance_science, variance_template : ndarray
        The per-pixel variance (ADU^2) of each frame's noise.
    """

    science: Frame
    template: Template
    exposures: tuple[Frame, ...] = attrs.field(repr=False)
    truth: Any = attrs.field(eq=False, repr=False)
    residual_sigma: float
    variance_science: np.ndarray = attrs.field(eq=False, repr=False)
    variance_template: np.ndarray = attrs.field(eq=False, repr=False)

    def ideal_residual(self, *, seed: int = 0) -> Residual:
        """A residual as a perfect subtraction leaves it: the transients (science PSF)
        plus noise of the pair's variance, with that noise image (for extract and mr
        backends)."""
        rng = np.random.default_rng(seed)
        variance = self.variance_science + self.variance_template
        model = np.zeros(self.science.shape)
        sigma = float(self.science.fwhm or 3.0) * _SIGMA_PER_FWHM
        for row in self.truth:
            _add_gaussian(model, float(row["x"]), float(row["y"]), float(row["flux"]), sigma)
        noise = np.sqrt(variance + model / float(self.science.gain or 1.0))
        data = model + rng.normal(0.0, 1.0, model.shape) * noise
        from oasis_core.quality import q_value

        q = q_value(data, noise, np.ones_like(data))
        return Residual(
            data=data,
            noise=noise,
            weight=np.ones_like(data),
            header=self.science.header.copy(),
            name=f"{self.science.name}_residual",
            science=self.science.name,
            template=self.template.name,
            q=q,
            psf=self.science.psf,
        )

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write the science and template frames as FITS files into ``directory``
        (``science.fits``, ``template.fits``: what ``oasis subtract-pair`` reads)."""
        from astropy.io import fits

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for frame in (self.science, self.template):
            path = directory / f"{frame.name}.fits"
            fits.PrimaryHDU(np.asarray(frame.data, np.float32), frame.header).writeto(
                path, overwrite=True
            )
            paths.append(path)
        return paths[0], paths[1]


def _add_gaussian(image: np.ndarray, x: float, y: float, flux: float, sigma: float) -> None:
    """Add a circular Gaussian of total ``flux`` centred on (x, y) (in place)."""
    r = math.ceil(5 * sigma)
    x0, x1 = max(int(x) - r, 0), min(int(x) + r + 1, image.shape[1])
    y0, y1 = max(int(y) - r, 0), min(int(y) + r + 1, image.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma * sigma))
    image[y0:y1, x0:x1] += flux * g / (2 * math.pi * sigma * sigma)


def _psf_model(fwhm: float) -> PsfModel:
    sigma = fwhm * _SIGMA_PER_FWHM
    half = math.ceil(4 * sigma)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    image = np.exp(-(xx**2 + yy**2) / (2 * sigma * sigma))
    return PsfModel(
        image=image / image.sum(), fwhm=float(fwhm), model="gaussian", params={"sigma": sigma}
    )


def _header(shape: tuple[int, int], gain: float, readnoise: float, saturation: float) -> Any:
    from astropy.io import fits

    ny, nx = shape
    h = fits.Header()
    h["BUNIT"] = ("adu", "pixel unit")
    h["GAIN"] = (gain, "e-/ADU")
    h["RDNOISE"] = (readnoise, "read noise [e-]")
    h["SATURATE"] = (saturation, "saturation level [ADU]")
    h["EXPTIME"] = (60.0, "[s]")
    h["MJD-OBS"] = (60000.0, "start of the exposure [d]")
    for key, value in {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 150.0,
        "CRVAL2": 2.0,
        "CRPIX1": (nx + 1) / 2,
        "CRPIX2": (ny + 1) / 2,
        "CDELT1": -0.3 / 3600,
        "CDELT2": 0.3 / 3600,
        "CUNIT1": "deg",
        "CUNIT2": "deg",
    }.items():
        h[key] = value
    return h


def synthetic_pair(
    shape: tuple[int, int] = (160, 160),
    *,
    seed: int = 0,
    fwhm_science: float = 3.6,
    fwhm_template: float = 2.6,
    n_stars: int = 80,
    sky: float = 400.0,
    gain: float = 1.5,
    readnoise: float = 5.0,
    depth: int = 4,
    transients: Sequence[tuple[float, float, float]] | None = None,
    science_in_template: bool = False,
) -> SyntheticPair:
    """Simulate an aligned science/template pair whose answers are known.

    Both frames see the same stars through circular Gaussian PSFs of the given widths,
    on a flat sky of ``sky`` ADU that is kept (not subtracted), with Poisson noise (as its
    Gaussian limit) and read noise. The template is the mean of ``depth`` exposures on
    the science frame's photometric scale; the transients are in the science frame only.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape; at least 64x64.
    seed : int
        Seed of every random draw.
    fwhm_science, fwhm_template : float
        PSF FWHM of each frame, pixels (> 0).
    n_stars : int
        Static stars, fluxes log-uniform from S/N 10 to 300 at their peak.
    sky : float
        Sky level, ADU (> 0).
    gain, readnoise : float
        e-/ADU and e- of one exposure.
    depth : int
        Exposures averaged into the template (>= 1).
    transients : sequence of (x, y, flux), optional
        Transients of the science frame (ADU, total). Default: two, of peak S/N 30 and 10,
        at 1/3 and 2/3 of the diagonal.
    science_in_template : bool
        Make the science frame (without its transients) one of the template's exposures,
        as when the pipeline's template stacks it: its noise is then shared with the
        template.

    Returns
    -------
    SyntheticPair

    Raises
    ------
    ValueError
        A parameter out of its range, naming it.
    """
    from astropy.table import Table

    ny, nx = int(shape[0]), int(shape[1])
    if min(ny, nx) < 64:
        raise ValueError(f"synthetic_pair: shape {shape} is too small; use at least (64, 64)")
    for label, value in (
        ("fwhm_science", fwhm_science),
        ("fwhm_template", fwhm_template),
        ("sky", sky),
        ("gain", gain),
    ):
        if not value > 0:
            raise ValueError(f"synthetic_pair: {label} = {value}: must be > 0")
    if int(depth) < 1:
        raise ValueError(f"synthetic_pair: depth = {depth}: must be >= 1")
    depth = int(depth)
    rng = np.random.default_rng(seed)
    var_one = sky / gain + (readnoise / gain) ** 2  # one exposure's sky variance, ADU^2
    sigma_sky = math.sqrt(var_one)
    margin = 3.0 * max(fwhm_science, fwhm_template)
    xs = rng.uniform(margin, nx - 1 - margin, n_stars)
    ys = rng.uniform(margin, ny - 1 - margin, n_stars)
    peak_area = 2 * math.pi * (max(fwhm_science, fwhm_template) * _SIGMA_PER_FWHM) ** 2
    fluxes = np.exp(rng.uniform(math.log(10.0), math.log(300.0), n_stars)) * sigma_sky * peak_area

    def stars(fwhm: float) -> np.ndarray:
        image = np.zeros((ny, nx))
        for x, y, f in zip(xs, ys, fluxes, strict=True):
            _add_gaussian(image, x, y, f, fwhm * _SIGMA_PER_FWHM)
        return image

    sci_sigma = fwhm_science * _SIGMA_PER_FWHM
    if transients is None:
        area = 4 * math.pi * sci_sigma**2  # flux of a peak S/N s: s * sigma * 2 pi sigma_psf^2
        transients = [
            (nx / 3 + 0.3, ny / 3 + 0.7, 30.0 * sigma_sky * area / 2),
            (2 * nx / 3 - 0.4, 2 * ny / 3 + 0.2, 10.0 * sigma_sky * area / 2),
        ]
    truth = Table(names=("x", "y", "flux", "peak_snr"), dtype=(float, float, float, float))
    transient_image = np.zeros((ny, nx))
    for x, y, flux in transients:
        _add_gaussian(transient_image, float(x), float(y), float(flux), sci_sigma)
        peak = float(flux) / (2 * math.pi * sci_sigma**2)
        truth.add_row((float(x), float(y), float(flux), peak / sigma_sky))

    def observe(model: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        variance = (model / gain + (readnoise / gain) ** 2) / n
        return model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(variance), variance

    saturation = 60000.0
    sci_static = sky + stars(fwhm_science)
    tpl_model = sky + stars(fwhm_template)
    exposures = []
    exposure_data = []
    for _ in range(depth):
        data, _ = observe(tpl_model, 1)
        exposure_data.append(data)
    sci_noise_only, var_sci = observe(sci_static, 1)
    science_data = sci_noise_only + transient_image
    var_sci = var_sci + transient_image / gain
    names = [f"exposure_{i}" for i in range(depth)]
    if science_in_template:  # the science frame, without its transients, is exposure 0
        exposure_data[0] = sci_noise_only
        names[0] = "science"
    header = _header((ny, nx), gain, readnoise, saturation)
    for i, data in enumerate(exposure_data):
        exposures.append(
            readonly_frame(
                Frame(
                    data=data,
                    header=header.copy(),
                    name=names[i],
                    background=sky,
                    noise=sigma_sky,
                    gain=gain,
                    readnoise=readnoise,
                    saturation=saturation,
                    fwhm=fwhm_template if names[i] != "science" else fwhm_science,
                    psf=_psf_model(fwhm_template if names[i] != "science" else fwhm_science),
                )
            )
        )
    tpl_data = np.mean(exposure_data, axis=0)
    var_tpl = (tpl_model / gain + (readnoise / gain) ** 2) / depth
    tpl_header = _header((ny, nx), gain * depth, readnoise * math.sqrt(depth), saturation)
    template = Template(
        data=tpl_data,
        header=tpl_header,
        name="template",
        background=sky,
        noise=sigma_sky / math.sqrt(depth),
        gain=gain * depth,
        readnoise=readnoise * math.sqrt(depth),
        saturation=saturation,
        fwhm=fwhm_template if not science_in_template else None,
        psf=_psf_model(fwhm_template),
        inputs=tuple(names),
    )
    if science_in_template:  # the mean of two PSFs: its FWHM is the measured one's job
        template = attrs.evolve(template, fwhm=_mean_fwhm(fwhm_science, fwhm_template, depth))
    science = Frame(
        data=science_data,
        header=header.copy(),
        name="science",
        background=sky,
        noise=sigma_sky,
        gain=gain,
        readnoise=readnoise,
        saturation=saturation,
        fwhm=fwhm_science,
        psf=_psf_model(fwhm_science),
    )
    shared = 2.0 / depth if science_in_template else 0.0
    residual_sigma = sigma_sky * math.sqrt(max(1.0 + 1.0 / depth - shared, 0.0))
    return SyntheticPair(
        science=science,
        template=template,
        exposures=tuple(exposures),
        truth=truth,
        residual_sigma=residual_sigma,
        variance_science=var_sci,
        variance_template=var_tpl,
    )


def _mean_fwhm(fwhm_science: float, fwhm_template: float, depth: int) -> float:
    """FWHM of the mean of one science PSF and depth - 1 template PSFs (approximately)."""
    return (fwhm_science + (depth - 1) * fwhm_template) / depth


def readonly_frame(frame: Frame) -> Frame:
    """``frame`` with its arrays flagged read-only (as the core hands them out)."""
    readonly(frame.data)
    readonly(frame.weight)
    return frame


# ------------------------------------------------------------------------- the check


@attrs.frozen(kw_only=True)
class CheckReport:
    """What :func:`check_backend` found.

    Attributes
    ----------
    stage, backend : str
    output : object
        What the stage method returned.
    q, normalized_noise : float or None
        For a residual (subtract, mr): its Q and the robust scatter of its normalised
        residual away from sources (1 when its noise image is honest).
    figures : dict
        Further numbers, by stage (``fwhm`` for psf, ``masked_fraction`` for mask,
        ``detections`` for extract...).
    """

    stage: str
    backend: str
    output: Any = attrs.field(eq=False, repr=False)
    q: float | None = None
    normalized_noise: float | None = None
    figures: dict[str, Any] = attrs.field(factory=dict)

    def line(self) -> str:
        """One line: ``<stage> <backend>: Q 0.982, normalised noise 1.01``."""
        parts = []
        if self.q is not None:
            parts.append(f"Q {self.q:.3f}")
        if self.normalized_noise is not None:
            parts.append(f"normalised noise {self.normalized_noise:.2f}")
        for key, value in self.figures.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return f"{self.stage} {self.backend}: " + (", ".join(parts) or "ok")


def _digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _inputs(stage: str, pair: SyntheticPair) -> tuple[tuple[Any, ...], list[Any]]:
    """The positional arguments of ``stage``'s method, and the objects to watch."""
    if stage == "mask":
        weight = np.ones(pair.science.shape, np.float32)
        weight[:4, :] = 0  # the incoming zeros a mask backend must keep
        frame = readonly_frame(attrs.evolve(pair.science, weight=weight))
        return (frame,), [frame]
    if stage in ("psf",):
        frame = readonly_frame(attrs.evolve(pair.science, psf=None, fwhm=None))
        return (frame,), [frame]
    if stage == "align":
        frame = readonly_frame(attrs.evolve(pair.science))
        reference = readonly_frame(attrs.evolve(pair.template))
        return (frame, reference), [frame, reference]
    if stage == "combine":
        frames = [readonly_frame(attrs.evolve(f)) for f in pair.exposures]
        return (frames,), frames
    if stage == "subtract":
        science = readonly_frame(attrs.evolve(pair.science))
        template = readonly_frame(attrs.evolve(pair.template))
        return (science, template), [science, template]
    if stage == "mr":
        residuals = [_readonly_residual(pair.ideal_residual(seed=s)) for s in range(3)]
        return (residuals,), residuals
    if stage == "extract":
        residual = _readonly_residual(pair.ideal_residual())
        return (residual,), [residual]
    raise ValueError(f"check_backend: no simulated input for stage {stage!r}")


def _readonly_residual(residual: Residual) -> Residual:
    for array in (residual.data, residual.noise, residual.weight):
        readonly(array)
    return residual


def _arrays(obj: Any) -> dict[str, Any]:
    names = ("data", "weight", "noise")
    return {n: getattr(obj, n) for n in names if getattr(obj, n, None) is not None}


_METHODS = {
    "mask": "mask",
    "psf": "psf",
    "align": "align",
    "combine": "combine",
    "subtract": "subtract",
    "mr": "master",
    "extract": "extract",
}


def check_backend(
    backend: Any,
    stage: str | None = None,
    *,
    options: Any = None,
    pair: SyntheticPair | None = None,
    workdir: Path | None = None,
) -> CheckReport:
    """Run ``backend`` on simulated input and check the stage contract.

    The input comes from ``pair`` (default ``synthetic_pair()``): the science frame for
    mask and psf, science and template for align and subtract, the template's exposures
    for combine, ideal residuals of the pair for mr and extract. Its arrays are read-only,
    as the core hands them out. Checked:

    * the backend: an instance of the stage's base class, ``name`` matching
      ``[a-z0-9][a-z0-9_-]*``, ``Options()`` made from defaults, every option with a help;
    * the inputs: unchanged (an in-place edit of a read-only array is reported as such);
    * the output: its type (``Frame``, ``Template``, ``Residual``, a Table with columns
      ``x``, ``y``, ``flux``, ``snr``), its shape (the reference's for align), the
      frame's ``name`` kept, ``weight`` finite in [0, 1] with the incoming zeros kept
      (mask); ``noise`` finite and > 0 where the weight is > 0 (residuals; frames'
      scalar ``noise`` when set); ``Q`` finite in [0, 1] (subtract); ``fwhm`` finite and
      > 0 (psf);
    * the header cards: ``meta``, ``params`` and the kernel's ``meta`` hold only bool,
      int, float or str values, and the output is written with the core's writer
      (:func:`oasis_core.io.write_residual` / :func:`~oasis_core.io.write_frame`) with
      every warning an error, each scalar ``meta`` key then present as an ``OAS <KEY>``
      card.

    Parameters
    ----------
    backend : Backend
        The plugin's backend object.
    stage : str, optional
        Default: ``backend.stage``.
    options : object, optional
        The backend's options; default ``backend.Options()``.
    pair : SyntheticPair, optional
        The simulated input; default :func:`synthetic_pair` with its defaults.
    workdir : Path, optional
        Scratch directory for the backend; default a temporary one, removed after.

    Returns
    -------
    CheckReport
        With Q and the normalised noise for subtract and mr backends.

    Raises
    ------
    ContractError
        Listing every breach found, in one line.
    BackendUnavailable
        From the backend's own ``check`` (a missing program).
    """
    from oasis_core.backends import BASES, NAME_RE

    stage = stage or getattr(backend, "stage", "")
    if stage not in _METHODS:
        raise ContractError(
            f"check_backend: unknown stage {stage!r}; stages: {', '.join(_METHODS)}"
        )
    name = str(getattr(backend, "name", "") or "")
    problems: list[str] = []
    base = BASES[stage]
    if not isinstance(backend, base):
        problems.append(f"not a {base.__name__}")
    if not NAME_RE.match(name):
        problems.append(f"name {name!r} must match [a-z0-9][a-z0-9_-]*")
    if options is None:
        try:
            options = backend.Options()
        except Exception as err:  # reported, with its cause, as a breach
            raise ContractError(
                f"{stage} backend {name!r}: Options() fails with its defaults: "
                f"{type(err).__name__}: {err}"
            ) from err
    if attrs.has(type(options)):
        undocumented = [f.name for f in attrs.fields(type(options)) if not f.metadata.get("help")]
        if undocumented:
            problems.append(f"options without a help: {', '.join(undocumented)} (use option())")
    backend.check(options)
    pair = pair or synthetic_pair()
    args, watched = _inputs(stage, pair)
    before = [{k: _digest(v) for k, v in _arrays(obj).items()} for obj in watched]
    with _scratch(workdir) as scratch:
        try:
            output = getattr(backend, _METHODS[stage])(*args, options=options, workdir=scratch)
        except Exception as err:
            if _read_only_fault(err):
                raise ContractError(
                    f"{stage} backend {name!r} edits its input in place "
                    f"({_read_only_fault(err)}); derive new arrays and return new objects "
                    "(attrs.evolve)"
                ) from err
            raise
        for obj, digests in zip(watched, before, strict=True):
            changed = [k for k, v in _arrays(obj).items() if _digest(v) != digests[k]]
            if changed:
                problems.append(f"modified its input {obj.name!r} ({', '.join(changed)})")
        report = _check_output(stage, name, output, args, problems, scratch)
    if problems:
        raise ContractError(f"{stage} backend {name!r}: " + "; ".join(problems))
    return report


def _read_only_fault(err: BaseException | None) -> str:
    """The message of the in-place write to a read-only array behind ``err``, or ''."""
    while err is not None:
        if isinstance(err, ValueError) and "read-only" in str(err):
            return str(err)
        err = err.__cause__
    return ""


@contextmanager
def _scratch(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="oasis-check-") as tmp:
        yield Path(tmp)


def _check_output(
    stage: str, name: str, output: Any, args: tuple[Any, ...], problems: list[str], scratch: Path
) -> CheckReport:
    figures: dict[str, Any] = {}
    q = nnoise = None
    if stage == "extract":
        figures = _check_table(output, args[0], problems)
        return CheckReport(stage=stage, backend=name, output=output, figures=figures)
    expected = {"mask": Frame, "psf": Frame, "align": Frame, "combine": Template}.get(
        stage, Residual
    )
    if not isinstance(output, expected):
        problems.append(f"returned {type(output).__name__}, not a {expected.__name__}")
        return CheckReport(stage=stage, backend=name, output=output)
    shape = (args[1] if stage == "align" else _first(args[0])).data.shape
    if output.data.shape != shape:
        problems.append(f"returned shape {output.data.shape}, expected {shape}")
        return CheckReport(stage=stage, backend=name, output=output)
    weight = np.asarray(output.weight)
    if not (np.isfinite(weight).all() and weight.min() >= 0 and weight.max() <= 1):
        problems.append("weight not finite in [0, 1]")
    if stage in ("mask", "psf", "align") and output.name != args[0].name:
        problems.append(
            f"returned a frame named {output.name!r}; keep the input's {args[0].name!r}"
        )
    if stage == "mask":
        if (weight[np.asarray(args[0].weight) == 0] > 0).any():
            problems.append("a pixel the incoming weight excludes (0) got a weight > 0")
        figures["masked fraction"] = round(float((weight == 0).mean()), 4)
    if isinstance(output, Residual):
        q, nnoise = _check_residual(output, args, stage, problems)
    else:
        _check_frame_numbers(output, stage, problems, figures)
    _check_cards(output, problems, scratch)
    return CheckReport(
        stage=stage, backend=name, output=output, q=q, normalized_noise=nnoise, figures=figures
    )


def _first(arg: Any) -> Any:
    return arg[0] if isinstance(arg, (list, tuple)) else arg


def _check_residual(
    output: Residual, args: tuple[Any, ...], stage: str, problems: list[str]
) -> tuple[float | None, float | None]:
    from oasis_core.quality import normalized_noise, q_value, source_footprint

    good = np.asarray(output.weight) > 0
    noise = np.asarray(output.noise)
    if not good.any():
        problems.append("every pixel has weight 0")
        return None, None
    if not (np.isfinite(noise[good]).all() and (noise[good] > 0).all()):
        problems.append("noise not finite and > 0 where the weight is > 0")
    if not np.isfinite(np.asarray(output.data)[good]).all():
        problems.append("data not finite where the weight is > 0")
    q = float(output.q)
    if stage == "subtract" and not (math.isfinite(q) and 0 <= q <= 1):
        problems.append(
            f"Q = {q}: must be finite in [0, 1]; compute it with "
            "oasis_core.quality.q_value(data, noise, weight)"
        )
    if stage == "mr" and not math.isfinite(q):  # a master residual's Q is optional
        q = q_value(output.data, output.noise, output.weight)
    template = args[1] if stage == "subtract" else None
    exclude = source_footprint(template.data, output.weight) if template is not None else None
    nnoise = normalized_noise(output.data, output.noise, output.weight, exclude=exclude)
    return q, float(nnoise)


def _check_frame_numbers(output: Frame, stage: str, problems: list[str], figures: dict) -> None:
    for attr in ("noise", "background", "fwhm", "gain"):
        value = getattr(output, attr)
        if value is not None and not math.isfinite(float(value)):
            problems.append(f"{attr} = {value}: not finite")
    if output.noise is not None and not float(output.noise) > 0:
        problems.append(f"noise = {output.noise}: must be > 0")
    if stage == "psf":
        if output.fwhm is None or not float(output.fwhm) > 0:
            problems.append(f"fwhm = {output.fwhm}: a psf backend sets it, finite and > 0")
        else:
            figures["fwhm"] = round(float(output.fwhm), 3)
        if output.noise is None or output.background is None:
            problems.append("a psf backend sets background and noise")
    if output.noise is not None:
        figures.setdefault("noise", round(float(output.noise), 3))


def _non_scalars(where: str, mapping: Any) -> list[str]:
    return [
        f"{where}[{k!r}] is a {type(v).__name__}: only bool, int, float and str become header cards"
        for k, v in dict(mapping or {}).items()
        if not isinstance(v, (bool, int, float, str, np.integer, np.floating))
    ]


def _check_cards(output: Any, problems: list[str], scratch: Path) -> None:
    """Write ``output`` as the core does, every warning an error, and read the cards back."""
    from astropy.io import fits

    from oasis_core import io

    problems += _non_scalars("meta", output.meta)
    if isinstance(output, Residual):
        problems += _non_scalars("params", output.params)
        if output.kernel is not None:
            problems += _non_scalars("kernel.meta", output.kernel.meta)
    path = scratch / "oasis-check-output.fits"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if isinstance(output, Residual):
                io.write_residual(path, output)
            else:
                io.write_frame(path, output)
            header = fits.getheader(path)
    except Exception as err:  # reported with its cause: the card that cannot be written
        problems.append(f"its header cannot be written: {type(err).__name__}: {err}")
        return
    finally:
        path.unlink(missing_ok=True)
    for key, value in dict(output.meta or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            continue  # not a FITS value: no card (unknown)
        if isinstance(value, (bool, int, float, str)) and f"OAS {str(key).upper()}" not in header:
            problems.append(f"meta[{key!r}] did not become the card 'OAS {str(key).upper()}'")


def _check_table(table: Any, residual: Residual, problems: list[str]) -> dict[str, Any]:
    colnames = list(getattr(table, "colnames", []) or [])
    if not colnames and not hasattr(table, "colnames"):
        problems.append(f"returned {type(table).__name__}, not an astropy Table")
        return {}
    missing = [c for c in ("x", "y", "flux", "snr") if c not in colnames]
    if missing:
        problems.append(f"no column {', '.join(missing)}")
        return {}
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    ny, nx = residual.data.shape
    if len(x) and not (np.isfinite(x).all() and np.isfinite(y).all()):
        problems.append("x, y not finite")
    elif len(x) and ((x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)).any():
        problems.append("x, y outside the image (0-based pixels, x along the last axis)")
    return {"detections": len(x)}


# ------------------------------------------------------------------------- registration


def register_plugin(pm: Any, plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` on ``pm``, tolerating the same plugin installed too.

    The object replaces any other registered plugin (an installed copy, loaded through
    its entry point) that provides a backend of the same stage and name; the core's own
    plugin is never replaced. Registering an object already registered returns its name.

    Parameters
    ----------
    pm : pluggy.PluginManager
        From :func:`oasis_core.plugins.make_plugin_manager`.
    plugin : object
        A module or object with ``@hookimpl`` functions.
    name : str, optional
        The registration name; default pluggy's.

    Returns
    -------
    str
        The name it is registered under.
    """
    from oasis_core.plugins import CORE_PLUGIN, Registry

    if plugin in pm.get_plugins():
        return str(pm.get_name(plugin))
    registered = pm.register(plugin, name=name)
    mine = pm.get_name(plugin) or registered
    for (_stage, _name), records in Registry(pm).duplicates.items():
        if mine in {r.plugin for r in records}:
            for record in records:
                if record.plugin not in (mine, CORE_PLUGIN) and pm.has_plugin(record.plugin):
                    pm.unregister(name=record.plugin)
    return str(mine)


def plugin_registry(*plugins: Any, autoload: bool | None = None) -> Any:
    """A :class:`~oasis_core.plugins.Registry` with ``plugins`` registered explicitly.

    Parameters
    ----------
    *plugins : object or (name, object)
        Plugins (modules or objects with ``@hookimpl`` functions), each optionally with
        its registration name; registered by :func:`register_plugin`, so an installed copy
        of the same plugin is replaced rather than reported as a duplicate.
    autoload : bool, optional
        Load the installed plugins too (default: unless ``OASIS_DISABLE_PLUGIN_AUTOLOAD``
        is set).

    Returns
    -------
    Registry
        Pass it as ``registry=`` to ``pipeline``, ``subtract_pair`` or ``compare``.

    Examples
    --------
    >>> from oasis_core.hookspecs import hookimpl
    >>> class Mine:
    ...     @hookimpl
    ...     def oasis_subtract_backends(self):
    ...         return []
    >>> registry = plugin_registry(("mine", Mine()))
    >>> registry.pm.has_plugin("mine")
    True
    """
    from oasis_core.plugins import Registry, make_plugin_manager

    pm = make_plugin_manager(autoload=autoload)
    for item in plugins:
        name, plugin = item if isinstance(item, tuple) else (None, item)
        register_plugin(pm, plugin, name)
    return Registry(pm)
