"""A simulated, aligned science/template pair whose every answer is known
(:func:`synthetic_pair`): a small numpy simulator of the core's own (the core imports no
plugin), fast rather than realistic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.model import Frame, PsfModel, Residual, Template, readonly

__all__ = [
    "SyntheticPair",
    "readonly_frame",
    "synthetic_pair",
]


_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


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
        from oasis_core.engine.quality import q_value

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

    ny, nx = int(shape[0]), int(shape[1])
    _check_parameters(shape, fwhm_science, fwhm_template, sky, gain, depth)
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
    transient_image, truth = _transients((ny, nx), transients, sci_sigma, sigma_sky)

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
    common = {"background": sky, "noise": sigma_sky, "gain": gain, "readnoise": readnoise}
    for data, name in zip(exposure_data, names, strict=True):
        fwhm = fwhm_science if name == "science" else fwhm_template
        exposures.append(
            readonly_frame(
                Frame(
                    data=data,
                    header=header.copy(),
                    name=name,
                    saturation=saturation,
                    fwhm=fwhm,
                    psf=_psf_model(fwhm),
                    **common,
                )
            )
        )
    var_tpl = (tpl_model / gain + (readnoise / gain) ** 2) / depth
    # the mean of two PSFs when the science frame is in: its FWHM is the measured one's job
    tpl_fwhm = (
        _mean_fwhm(fwhm_science, fwhm_template, depth) if science_in_template else fwhm_template
    )
    template = _stacked(
        exposure_data, names, sky=sky, sigma_sky=sigma_sky, gain=gain, readnoise=readnoise,
        saturation=saturation, fwhm=tpl_fwhm, psf_fwhm=fwhm_template,
    )  # fmt: skip
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


def _check_parameters(
    shape: tuple[int, int],
    fwhm_science: float,
    fwhm_template: float,
    sky: float,
    gain: float,
    depth: int,
) -> None:
    """Raise :class:`ValueError` naming the first parameter of :func:`synthetic_pair` out
    of its range."""
    if min(int(shape[0]), int(shape[1])) < 64:
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


def _transients(
    shape: tuple[int, int], transients: Sequence[Any], sigma: float, sigma_sky: float
) -> tuple[np.ndarray, Any]:
    """The image of the transients (Gaussians of ``sigma``) and their truth table (x, y,
    flux, peak S/N against the sky noise)."""
    from astropy.table import Table

    truth = Table(names=("x", "y", "flux", "peak_snr"), dtype=(float, float, float, float))
    transient_image = np.zeros(shape)
    for x, y, flux in transients:
        _add_gaussian(transient_image, float(x), float(y), float(flux), sigma)
        peak = float(flux) / (2 * math.pi * sigma**2)
        truth.add_row((float(x), float(y), float(flux), peak / sigma_sky))
    return transient_image, truth


def _stacked(
    exposures: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    sky: float,
    sigma_sky: float,
    gain: float,
    readnoise: float,
    saturation: float,
    fwhm: float,
    psf_fwhm: float,
) -> Template:
    """The mean of ``exposures`` as a template: gain and read noise of a sum of
    ``len(exposures)`` exposures, sky noise down by its square root."""
    depth = len(exposures)
    shape = exposures[0].shape
    return Template(
        data=np.mean(exposures, axis=0),
        header=_header(shape, gain * depth, readnoise * math.sqrt(depth), saturation),
        name="template",
        background=sky,
        noise=sigma_sky / math.sqrt(depth),
        gain=gain * depth,
        readnoise=readnoise * math.sqrt(depth),
        saturation=saturation,
        fwhm=fwhm,
        psf=_psf_model(psf_fwhm),
        inputs=tuple(names),
    )
