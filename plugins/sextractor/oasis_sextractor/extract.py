"""The ``sextractor`` extract backend: SExtractor on the residual and on its negative.

The residual minus its median (masked pixels set to 0) is written as ``positive.fits`` and
its negative as ``negative.fits``; the noise image is the weight map (``WEIGHT_TYPE
MAP_RMS``, ``RESCALE_WEIGHTS N``: used as it is), with masked pixels (weight 0, or no
finite noise) at :data:`BAD_RMS`, which SExtractor treats as bad (``WEIGHT_THRESH``), so
they yield no detection. ``GAIN`` is 0: the noise image already holds the sources' photon
noise. The background is 0 (``BACK_TYPE MANUAL``) unless ``back_size`` asks for
SExtractor's own mesh.

Detection matches the native backend's: a Gaussian filter of the PSF FWHM (``fwhm``, else
the residual's ``meta["fwhm"]`` or ``FWHM`` header card, else 3 px; the same +-1 FWHM
kernel), and ``detect_thresh`` in sigmas of the matched-filtered residual. SExtractor
compares the filtered image with ``DETECT_THRESH`` times the *unfiltered* pixel noise, so
the backend passes ``DETECT_THRESH = detect_thresh x sqrt(sum k**2) / sum k`` (the noise of
the normalised filter): with the defaults pure noise gives as few false sources as the
native backend. Without the filter ``DETECT_THRESH = detect_thresh``.

Columns, with the native backend's meaning: ``x``, ``y`` (0-based: SExtractor's 1-based
windowed centroids ``XWIN_IMAGE - 1``, or the isophotal ``X_IMAGE - 1`` when the windowed
one is flagged or moved by more than half a FWHM), ``flux``, ``flux_err`` (circular aperture
of radius ``radius``, 1.5 FWHM by default: ``FLUX_APER``, ``FLUXERR_APER``; negative flux
for negative sources), ``peak`` (signed ``FLUX_MAX``), ``snr`` (as the native backend's:
the PSF-weighted, matched-filter significance at the position, i.e. the residual in sigmas
smoothed with a Gaussian of the FWHM and scaled to unit noise; for a point source the
optimal S/N, about 1.8 times the aperture's ``|flux| / flux_err``), ``a``, ``b``
(``A_IMAGE``, ``B_IMAGE``), ``theta`` (radians), ``npix`` (``ISOAREA_IMAGE``), ``sign``
(+1 / -1), ``flag`` (SExtractor's ``FLAGS``) and, when the residual has a PSF model,
``spread_model`` and ``spread_model_err`` (``SPREAD_MODEL``: ~0 for a point source, > 0
for a source broader than the PSF, < 0 for one sharper, e.g. a cosmic ray).

The PSF model is ``residual.psf``: its PSFEx ``.psf`` file when it has one (from the
``psfex`` psf backend, with its spatial variation), else a constant PSFEx model written
from its image (:func:`oasis_sextractor.psffile.write_psfex`), so any psf backend's model
serves. User files: ``default.sex``, ``default.param`` and ``default.conv``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import ExtractBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Residual
from oasis_core.contracts.validators import fraction, non_negative, positive

__all__ = [
    "BAD_RMS",
    "FILES",
    "SextractorExtract",
    "SextractorExtractOptions",
    "detect_thresh",
    "extract_arguments",
    "matched_significance",
    "parse_catalog",
]

#: File names in the workdir.
FILES = {
    "positive": "positive.fits",
    "negative": "negative.fits",
    "rms": "rms.fits",
    "conv": "default.conv",
    "param": "oasis.param",
    "psf": "model.psf",
    "positive_cat": "positive.cat",
    "negative_cat": "negative.cat",
}

#: RMS written for masked pixels, and the threshold above which SExtractor ignores them.
BAD_RMS = 1.0e30
BAD_THRESH = 1.0e29

#: Catalog parameters the backend reads.
PARAMETERS = (
    "NUMBER",
    "X_IMAGE",
    "Y_IMAGE",
    "XWIN_IMAGE",
    "YWIN_IMAGE",
    "FLAGS_WIN",
    "FLUX_APER(1)",
    "FLUXERR_APER(1)",
    "FLUX_MAX",
    "A_IMAGE",
    "B_IMAGE",
    "THETA_IMAGE",
    "ISOAREA_IMAGE",
    "FLAGS",
)
PSF_PARAMETERS = ("SPREAD_MODEL", "SPREADERR_MODEL")

_DEFAULT_FWHM = 3.0
_FLOAT_COLUMNS = ("x", "y", "flux", "flux_err", "peak", "snr", "a", "b", "theta")
_INT_COLUMNS = ("npix", "sign", "flag")


@attrs.frozen(kw_only=True)
class SextractorExtractOptions:
    """Options of the ``sextractor`` extract backend (``[extract.sextractor]``; SExtractor
    keys in brackets)."""

    sextractor_binary: str = option(
        "", "SExtractor program; '': 'source-extractor', else 'sex', on PATH"
    )
    detect_thresh: float = option(
        5.0,
        "detection threshold in sigmas of the matched-filtered residual, as the native "
        "backend's thresh [DETECT_THRESH, scaled by the filter's noise]",
        range=positive,
    )
    analysis_thresh: float = option(
        0.0,
        "SExtractor's ANALYSIS_THRESH (sigmas of a pixel); 0: the DETECT_THRESH passed",
        range=non_negative,
    )
    detect_minarea: int = option(
        5, "minimum pixels above threshold [DETECT_MINAREA]", range=(1, None)
    )
    filter: bool = option(True, "Gaussian detection filter of the PSF FWHM [FILTER]")
    fwhm: float = option(
        0.0,
        "PSF FWHM (px) for the filter and the aperture; 0: the residual's meta['fwhm'] or "
        "header FWHM, else 3",
        range=non_negative,
    )
    radius: float = option(
        0.0, "aperture radius (px) [PHOT_APERTURES = 2 radius]; 0: 1.5 x FWHM", range=non_negative
    )
    negative: bool = option(True, "also detect negative sources (on -R), with sign = -1")
    deblend_nthresh: int = option(32, "deblending sub-thresholds [DEBLEND_NTHRESH]", range=(1, 64))
    deblend_mincont: float = option(
        0.005, "deblending contrast, 1 = no deblending [DEBLEND_MINCONT]", range=fraction
    )
    clean: bool = option(
        False,
        "clean spurious detections near bright sources [CLEAN] (off, as the native "
        "backend: on residuals it drops real sources near a bright residual)",
    )
    back_size: int = option(
        0,
        "0: the residual's median is its background (as the native backend); > 0: "
        "SExtractor's background mesh of this size [BACK_SIZE]",
        range=(0, None),
    )
    spread_model: bool = option(
        True, "measure SPREAD_MODEL when the residual has a PSF model [PSF_NAME]"
    )
    nthreads: int = option(1, "SExtractor threads [NTHREADS]", range=(1, None))
    timeout: float = option(
        600.0,
        "seconds before SExtractor is stopped (a StageError); 0: no limit",
        range=non_negative,
    )


def residual_fwhm(residual: Residual, options: SextractorExtractOptions) -> float:
    """The FWHM for the filter and aperture: the option, the residual's ``meta["fwhm"]``,
    its ``FWHM`` header card, its PSF model's, else 3 px."""
    header = residual.header
    candidates: list[Any] = [
        options.fwhm,
        residual.meta.get("fwhm"),
        header.get("FWHM") if header is not None else None,
        residual.psf.fwhm if residual.psf is not None else None,
    ]
    for value in candidates:
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            return v
    return _DEFAULT_FWHM


def detect_thresh(thresh: float, kernel: np.ndarray | None) -> float:
    """SExtractor's ``DETECT_THRESH`` for a matched-filter significance ``thresh``.

    Parameters
    ----------
    thresh : float
        Sigmas of the filtered image.
    kernel : ndarray or None
        The filter (any normalisation), None without filtering.

    Returns
    -------
    float
        ``thresh * sqrt(sum k**2) / sum k``: SExtractor thresholds the normalised filtered
        image in units of the unfiltered pixel noise.

    Examples
    --------
    >>> detect_thresh(5.0, None), detect_thresh(5.0, np.ones((1, 4)))
    (5.0, 2.5)
    """
    if kernel is None:
        return float(thresh)
    k = np.asarray(kernel, dtype=np.float64)
    return float(thresh * math.sqrt(float((k * k).sum())) / float(k.sum()))


def extract_arguments(
    program: str,
    image: str,
    catalog: str,
    *,
    thresh: float,
    aperture: float,
    psf: str | None,
    options: SextractorExtractOptions,
    workdir: Path,
) -> list[str]:
    """The SExtractor command line of one sign.

    Parameters
    ----------
    program, image, catalog : str
    thresh : float
        ``DETECT_THRESH`` (already scaled, see :func:`detect_thresh`).
    aperture : float
        ``PHOT_APERTURES`` diameter (px).
    psf : str or None
        ``PSF_NAME`` (for ``SPREAD_MODEL``), None for none.
    options : SextractorExtractOptions
    workdir : Path
        Where ``default.sex`` / ``default.conv`` may be (the user's).

    Returns
    -------
    list of str
    """
    from oasis_sextractor.programs import command_line, is_user_file

    filtered = options.filter or is_user_file(workdir, FILES["conv"])
    user_sex = "default.sex" if (workdir / "default.sex").is_file() else None
    forced: dict[str, Any] = {
        "CATALOG_NAME": catalog,
        "CATALOG_TYPE": "FITS_LDAC",
        "PARAMETERS_NAME": FILES["param"],
        "WEIGHT_TYPE": "MAP_RMS",
        "WEIGHT_IMAGE": FILES["rms"],
        "WEIGHT_THRESH": BAD_THRESH,
        "RESCALE_WEIGHTS": False,
        "WEIGHT_GAIN": False,
        "GAIN": 0.0,
        "PHOT_APERTURES": float(aperture),
        "VERBOSE_TYPE": "QUIET",
        "WRITE_XML": False,
    }
    if psf is not None:
        forced["PSF_NAME"] = psf
    tunable: dict[str, Any] = {
        "DETECT_THRESH": thresh,
        "ANALYSIS_THRESH": options.analysis_thresh or thresh,
        "DETECT_MINAREA": options.detect_minarea,
        "FILTER": filtered,
        "DEBLEND_NTHRESH": options.deblend_nthresh,
        "DEBLEND_MINCONT": options.deblend_mincont,
        "CLEAN": options.clean,
        "NTHREADS": options.nthreads,
        "MEMORY_OBJSTACK": 20000,
    }
    if filtered:
        tunable["FILTER_NAME"] = FILES["conv"]
    if options.back_size > 0:
        tunable.update(BACK_TYPE="AUTO", BACK_SIZE=options.back_size)
    else:
        tunable.update(BACK_TYPE="MANUAL", BACK_VALUE=0.0)
    return command_line(program, [image], forced=forced, tunable=tunable, user_config=user_sex)


def _empty(with_spread: bool) -> Any:
    from astropy.table import Table

    cols: dict[str, np.ndarray] = {c: np.zeros(0, np.float64) for c in _FLOAT_COLUMNS}
    cols.update({c: np.zeros(0, np.int32) for c in _INT_COLUMNS})
    if with_spread:
        cols.update(spread_model=np.zeros(0), spread_model_err=np.zeros(0))
    return Table(cols)


def matched_significance(
    data: np.ndarray, noise: np.ndarray, bad: np.ndarray, fwhm: float
) -> np.ndarray:
    """The residual in sigmas, smoothed with a Gaussian of ``fwhm`` and scaled to unit
    noise: at a point source, its PSF-weighted (optimal) significance (the native extract
    backend's ``snr``).

    Parameters
    ----------
    data, noise : ndarray
        Residual (background removed) and its 1-sigma image.
    bad : ndarray of bool
        Masked pixels (count as 0).
    fwhm : float

    Returns
    -------
    ndarray (float32)
    """
    from scipy.ndimage import gaussian_filter

    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    z = np.where(bad, np.float32(0.0), data / np.where(bad, 1.0, noise)).astype(np.float32)
    scale = np.float32(2.0 * math.sqrt(math.pi) * sigma)
    return gaussian_filter(z, sigma, mode="constant") * scale


def parse_catalog(
    columns: dict[str, np.ndarray],
    sign: int,
    fwhm: float,
    significance: np.ndarray | None = None,
) -> Any:
    """The backend's table from one SExtractor catalog (vectorised).

    Parameters
    ----------
    columns : dict of str to ndarray
        The catalog's columns (:func:`oasis_sextractor.programs.read_ldac`).
    sign : int
        +1 for the residual, -1 for its negative (fluxes and peaks negated).
    fwhm : float
        Windowed centroids moved by more than half of it are replaced by isophotal ones.
    significance : ndarray, optional
        :func:`matched_significance` of the residual: ``snr`` is ``sign`` times its value
        at the (rounded) position; without it, ``|flux| / flux_err``. nan when the
        aperture has no error.

    Returns
    -------
    astropy.table.Table
        With ``spread_model`` / ``spread_model_err`` when the catalog has them.
    """
    from astropy.table import Table

    def col(name: str) -> np.ndarray:
        value = np.asarray(columns[name])
        return value[:, 0] if value.ndim == 2 else value

    with_spread = "SPREAD_MODEL" in columns
    n = len(col("NUMBER"))
    if n == 0:
        return _empty(with_spread)
    xi, yi = col("X_IMAGE") - 1.0, col("Y_IMAGE") - 1.0
    xw, yw = col("XWIN_IMAGE") - 1.0, col("YWIN_IMAGE") - 1.0
    ok = (col("FLAGS_WIN") == 0) & np.isfinite(xw) & np.isfinite(yw)
    ok &= np.hypot(xw - xi, yw - yi) < 0.5 * fwhm
    flux = sign * col("FLUX_APER").astype(np.float64)
    flux_err = col("FLUXERR_APER").astype(np.float64)
    err = np.where(flux_err > 0, flux_err, np.nan)
    x, y = np.where(ok, xw, xi), np.where(ok, yw, yi)
    if significance is None:
        snr = np.abs(flux) / err
    else:
        iy = np.clip(np.rint(y).astype(np.int64), 0, significance.shape[0] - 1)
        ix = np.clip(np.rint(x).astype(np.int64), 0, significance.shape[1] - 1)
        at = sign * significance[iy, ix].astype(np.float64)
        snr = np.where(np.isfinite(err), at, np.nan)
    table = Table(
        {
            "x": x,
            "y": y,
            "flux": flux,
            "flux_err": flux_err,
            "peak": sign * col("FLUX_MAX").astype(np.float64),
            "snr": snr,
            "a": col("A_IMAGE").astype(np.float64),
            "b": col("B_IMAGE").astype(np.float64),
            "theta": np.deg2rad(col("THETA_IMAGE").astype(np.float64)),
            "npix": col("ISOAREA_IMAGE").astype(np.int32),
            "sign": np.full(n, sign, np.int32),
            "flag": col("FLAGS").astype(np.int32),
        }
    )
    if with_spread:
        table["spread_model"] = col("SPREAD_MODEL").astype(np.float64)
        table["spread_model_err"] = col("SPREADERR_MODEL").astype(np.float64)
    return table


class SextractorExtract(ExtractBackend):
    """Detect positive and negative sources on a residual with SExtractor (see the
    module docstring)."""

    name = "sextractor"
    Options = SextractorExtractOptions
    description = "SExtractor (+/-) with a matched filter, aperture photometry, SPREAD_MODEL"
    user_files = ("default.sex", "default.param", "default.conv")

    def _program(self, options: SextractorExtractOptions) -> str:
        from oasis_sextractor.programs import find_program

        return find_program(
            "sextractor",
            options.sextractor_binary,
            where="extract backend 'sextractor'",
            option_key="extract.sextractor.sextractor_binary",
        )

    def check(self, options: SextractorExtractOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when SExtractor is
        missing."""
        self._program(options)

    def extract(
        self, residual: Residual, *, options: SextractorExtractOptions, workdir: Path
    ) -> Any:
        """Return an astropy Table of the sources on ``residual``.

        Parameters
        ----------
        residual : Residual
            Its ``noise`` image is the weight map; weight-0 pixels are masked; its
            ``psf`` (when set) gives ``SPREAD_MODEL``.
        options : SextractorExtractOptions
        workdir : Path
            Scratch directory (images, filter, PSF model, catalogs).

        Returns
        -------
        astropy.table.Table
            One row per source, sorted by decreasing ``snr``; the columns of the module
            docstring (an empty table with those columns when nothing is found).

        Raises
        ------
        BackendUnavailable
            When SExtractor is missing.
        StageError
            When every pixel is masked or SExtractor fails (the message ends with its
            own error line).
        """
        from astropy.table import vstack

        from oasis_sextractor.programs import (
            gaussian_kernel,
            merge_parameters,
            provide_conv,
            read_ldac,
            run_program,
            write_image,
        )

        program = self._program(options)
        where = f"extract backend 'sextractor': residual {residual.name!r}"
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)

        data = np.array(residual.data, dtype=np.float32)
        noise = np.array(residual.noise, dtype=np.float32)
        bad = ~(
            (np.asarray(residual.weight) > 0) & (noise > 0) & np.isfinite(data) & np.isfinite(noise)
        )
        if bad.all():
            raise StageError(f"{where}: every pixel has weight 0")
        data -= np.median(data[~bad])
        data[bad] = 0.0
        fwhm = residual_fwhm(residual, options)
        significance = matched_significance(data, noise, bad, fwhm)
        noise[bad] = BAD_RMS
        radius = options.radius if options.radius > 0 else 1.5 * fwhm
        kernel = gaussian_kernel(fwhm) if options.filter else None
        thresh = detect_thresh(options.detect_thresh, kernel)
        if kernel is not None:
            provide_conv(workdir, kernel, f"Gaussian, FWHM {fwhm:.3f} px")
        psf_name, psf_source = self._psf(residual, options, workdir, fwhm)

        user_param = workdir / "default.param"
        user_text = user_param.read_text(errors="replace") if user_param.is_file() else None
        needed = [*PARAMETERS, *(PSF_PARAMETERS if psf_name else ())]
        (workdir / FILES["param"]).write_text("\n".join(merge_parameters(needed, user_text)) + "\n")
        write_image(workdir / FILES["rms"], noise)

        tables = []
        for sign in (1, -1) if options.negative else (1,):
            key = "positive" if sign > 0 else "negative"
            write_image(workdir / FILES[key], data if sign > 0 else -data)
            catalog = FILES[f"{key}_cat"]
            args = extract_arguments(
                program,
                FILES[key],
                catalog,
                thresh=thresh,
                aperture=2.0 * radius,
                psf=psf_name,
                options=options,
                workdir=workdir,
            )
            run_program(
                args,
                cwd=workdir,
                where=where,
                label="SExtractor",
                outputs=[catalog],
                timeout=options.timeout,
            )
            try:
                columns, _ = read_ldac(workdir / catalog)
                table = parse_catalog(columns, sign, fwhm, significance)
                if psf_name is None:  # only measured against a PSF model
                    table.remove_columns(
                        [c for c in ("spread_model", "spread_model_err") if c in table.colnames]
                    )
                tables.append(table)
            except (OSError, KeyError, ValueError, IndexError) as err:
                msg = f"{where}: cannot read SExtractor's catalog {catalog} ({err})"
                raise StageError(msg) from err
        table = vstack(tables) if len(tables) > 1 else tables[0]
        if len(table):
            order = np.argsort(-np.nan_to_num(np.asarray(table["snr"]), nan=-1.0), kind="stable")
            table = table[order]
        table.meta.update(
            {
                "fwhm": fwhm,
                "radius": radius,
                "thresh": options.detect_thresh,
                "detect_thresh": thresh,
                "detect_on": "residual",
                "psf": psf_source,
            }
        )
        return table

    def _psf(
        self,
        residual: Residual,
        options: SextractorExtractOptions,
        workdir: Path,
        fwhm: float,
    ) -> tuple[str | None, str]:
        """The ``PSF_NAME`` for ``SPREAD_MODEL`` (None: no model) and where it came from."""
        from oasis_sextractor.psffile import write_psfex

        model = residual.psf
        if not options.spread_model or model is None:
            return None, "none"
        target = workdir / FILES["psf"]
        for f in model.files:
            if Path(f).suffix == ".psf" and Path(f).is_file():
                shutil.copyfile(f, target)  # a plain name: PSF_NAME is a comma list
                return FILES["psf"], "psfex file"
        image = np.asarray(model.image, dtype=np.float64)
        if not (np.isfinite(image).all() and image.sum() > 0):
            return None, "none (unusable PSF image)"
        write_psfex(target, image, model.fwhm if model.fwhm > 0 else fwhm)
        return FILES["psf"], "psf image"
