"""The ``psfex`` PSF backend: SExtractor finds the stars, PSFEx models the PSF.

Steps, all in the backend's workdir:

1. The frame is written as ``frame.fits`` (masked and non-finite pixels replaced by the
   median; SExtractor never sees them: their weight is 0) with its weight map
   ``weight.fits`` (``WEIGHT_TYPE MAP_WEIGHT``). ``GAIN`` is ``Frame.gain`` (0, i.e. no
   photon noise term, when unknown) and ``SATUR_LEVEL`` is ``saturation_fraction`` of
   ``Frame.saturation`` (of the brightest good pixel when unknown), so stars near
   saturation are flagged and PSFEx leaves them out.
2. A first SExtractor pass (``guess.cat``) gives a first FWHM: the median ``FWHM_IMAGE``
   of the stars, the most compact dense group of FWHMs (:func:`star_cluster`) among the
   candidates (``FLAGS = 0``, ``SNR_WIN >= min_snr``, ``(A-B)/(A+B) <= max_ellipticity``,
   FWHM within ``min_fwhm``..``max_fwhm``); in a deep extragalactic field (JWST) most
   candidates are galaxies, so their median would be no guess of the PSF. PSFEx then
   picks its stars within ``1 + 2 variability`` of the stars' ``2 FLUX_RADIUS``
   (``SAMPLE_FWHMRANGE``). The first FWHM sizes the PSF stamp
   (``PSF_SIZE``: ``2 half + 1``, ``half = 3 FWHM`` between 7 and 25, as the native
   backend's stamps), the ``VIGNET`` (the stamp plus 4 pixels a side) and the normalisation
   aperture (``PHOT_APERTURES``: 5 FWHM).
3. The second pass writes ``frame.cat`` (FITS_LDAC) with what PSFEx reads (``VIGNET``,
   ``X_IMAGE``, ``Y_IMAGE``, ``FLUX_APER``, ``FLUXERR_APER``, ``FLUX_RADIUS``,
   ``ELONGATION``, ``FLAGS``, ``SNR_WIN``) and ``FLUX_MAX``.
4. PSFEx fits ``frame.psf``. The spatial degree (``PSFVAR_DEGREES``) is ``psfvar_degree``,
   lowered until the candidate stars (those within ``variability`` of their median
   FWHM, as PSFEx selects them) number at least 5 per polynomial term. Its accepted
   stars come from PSFEx's output catalog (``FLAGS_PSF = 0``).
5. The PSF image is the model evaluated at the frame centre, resampled to the pixel grid
   when ``PSF_SAMP`` is not 1, normalised to unit sum. The FWHM is measured on it by a
   Moffat fit (``fwhm_from = "fit"``; PSFEx's own ``FWHM_Mean``, which is the mean over the
   field of a different estimator, comes out ~10% high on simulated Moffat stars) or taken
   from PSFEx's XML (``fwhm_from = "psfex"``).

The frame's ``background`` and ``noise`` have the native backend's meaning: SExtractor's
global sky level and robust sky standard deviation (``SEXBKGND``, ``SEXBKDEV``, from a
``back_size`` mesh as sep's), the noise replaced by the pixel-difference estimate of
:func:`oasis_core.engine.stats.sky_noise` when that is lower (crowding inflates the mesh RMS).
``snr`` is the median peak S/N ``peak / sqrt(noise**2 + peak / gain)`` (``peak / noise``
without a gain) of the ``snr_stars`` highest-S/N stars PSFEx accepted.

The ``PsfModel`` keeps ``frame.cat`` and ``frame.psf`` in ``files`` (the core stores them
as ``psf/NAME.cat`` and ``psf/NAME.psf``; the ``sextractor`` extract backend reads the
``.psf`` for ``SPREAD_MODEL``).

User files: ``default.sex``, ``default.param``, ``default.conv`` and ``default.psfex`` in
the target's ``configs/`` are used when present (see :mod:`oasis_sextractor.programs`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.backends import PsfBackend, option
from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, PsfModel
from oasis_core.contracts.validators import fraction, non_negative, positive

__all__ = ["FILES", "PsfexOptions", "PsfexPsf", "psfex_arguments", "sextractor_psf_arguments"]

#: File names in the workdir (SExtractor and PSFEx run there; names only, no paths).
FILES = {
    "image": "frame.fits",
    "weight": "weight.fits",
    "conv": "default.conv",
    "guess_param": "guess.param",
    "guess": "guess.cat",
    "param": "oasis.param",
    "catalog": "frame.cat",
    "psf": "frame.psf",
    "xml": "psfex.xml",
    "outcat": "psfex_out.cat",
}

#: Parameters of the first (FWHM guess) SExtractor pass.
GUESS_PARAMETERS = (
    "NUMBER",
    "X_IMAGE",
    "Y_IMAGE",
    "FLUX_MAX",
    "FWHM_IMAGE",
    "FLUX_RADIUS",
    "ELONGATION",
    "FLAGS",
    "SNR_WIN",
)

#: Parameters of the PSFEx catalog, ``VIGNET`` added with its size.
PSFEX_PARAMETERS = (
    "NUMBER",
    "X_IMAGE",
    "Y_IMAGE",
    "FLUX_APER(1)",
    "FLUXERR_APER(1)",
    "FLUX_RADIUS",
    "FWHM_IMAGE",
    "ELONGATION",
    "FLAGS",
    "SNR_WIN",
    "FLUX_MAX",
)

#: Candidate stars needed per polynomial term before a spatial degree is used.
STARS_PER_TERM = 5

#: Filter of both SExtractor passes (SExtractor's ``default.conv`` is about this wide).
FILTER_FWHM = 2.0


@attrs.frozen(kw_only=True)
class PsfexOptions:
    """Options of the ``psfex`` PSF backend (``[psf.psfex]``; SExtractor / PSFEx keys in
    brackets)."""

    sextractor_binary: str = option(
        "", "SExtractor program; '': 'source-extractor', else 'sex', on PATH"
    )
    psfex_binary: str = option("", "PSFEx program; '': 'psfex' on PATH")
    detect_thresh: float = option(
        3.0,
        "star detection threshold, sigmas of a pixel [DETECT_THRESH, ANALYSIS_THRESH]",
        range=positive,
    )
    detect_minarea: int = option(
        5, "minimum pixels above threshold [DETECT_MINAREA]", range=(1, None)
    )
    min_snr: float = option(20.0, "minimum S/N of a PSF star [SAMPLE_MINSN]", range=positive)
    max_ellipticity: float = option(
        0.3, "maximum (A-B)/(A+B) of a PSF star [SAMPLE_MAXELLIP]", range=fraction
    )
    min_fwhm: float = option(
        1.5, "smallest FWHM (px) of a PSF star (FWHM_IMAGE and PSFEx's)", range=positive
    )
    max_fwhm: float = option(
        20.0, "largest FWHM (px) of a PSF star (FWHM_IMAGE and PSFEx's)", range=positive
    )
    variability: float = option(
        0.2, "allowed FWHM scatter of the PSF stars [SAMPLE_VARIABILITY]", range=positive
    )
    psf_size: int = option(
        0,
        "PSF stamp side (px, odd) [PSF_SIZE]; 0: 6 x the first FWHM guess, 15 to 51",
        range=(0, None),
    )
    sampling: float = option(
        1.0, "PSF pixel step in image pixels [PSF_SAMPLING]; 0: PSFEx chooses", range=non_negative
    )
    psfvar_degree: int = option(
        2,
        "degree of the PSF variation across the frame [PSFVAR_DEGREES]; lowered when there "
        "are fewer than 5 candidate stars per term",
        range=(0, None),
    )
    min_stars: int = option(3, "fail the frame when PSFEx accepts fewer stars", range=(1, None))
    saturation_fraction: float = option(
        0.8,
        "SATUR_LEVEL = this x the frame's saturation (x its brightest pixel when unknown)",
        range=positive,
    )
    snr_stars: int = option(
        10, "the frame S/N is the median peak S/N of this many best accepted stars", range=(1, None)
    )
    back_size: int = option(64, "background mesh size (px) [BACK_SIZE]", range=(1, None))
    fwhm_from: str = option(
        "fit",
        "FWHM returned: 'fit' (Moffat fit to the PSF image) or 'psfex' (PSFEx's FWHM_Mean)",
        choices=("fit", "psfex"),
    )
    nthreads: int = option(1, "threads of each program [NTHREADS]", range=(1, None))
    timeout: float = option(
        600.0, "seconds before a program is stopped (a StageError); 0: no limit", range=non_negative
    )


def _user(workdir: Path, name: str) -> str | None:
    """``name`` when the user's copy of it is in ``workdir``."""
    return name if (workdir / name).is_file() else None


def sextractor_psf_arguments(
    program: str,
    *,
    catalog: str,
    params: str,
    gain: float,
    saturation: float,
    aperture: float,
    options: PsfexOptions,
    workdir: Path,
) -> list[str]:
    """The SExtractor command line of one pass of the psf backend.

    Parameters
    ----------
    program : str
    catalog, params : str
        Catalog and parameter file names.
    gain, saturation : float
        ``GAIN`` (0 = unknown) and ``SATUR_LEVEL`` (ADU).
    aperture : float
        ``PHOT_APERTURES`` diameter (px).
    options : PsfexOptions
    workdir : Path
        Where ``default.sex`` / ``default.conv`` may be (the user's).

    Returns
    -------
    list of str
    """
    from oasis_sextractor.programs import command_line

    forced = {
        "CATALOG_NAME": catalog,
        "CATALOG_TYPE": "FITS_LDAC",
        "PARAMETERS_NAME": params,
        "WEIGHT_TYPE": "MAP_WEIGHT",
        "WEIGHT_IMAGE": FILES["weight"],
        "GAIN": float(gain),
        "SATUR_LEVEL": float(saturation),
        "PHOT_APERTURES": float(aperture),
        "VERBOSE_TYPE": "QUIET",
        "WRITE_XML": False,
    }
    tunable = {
        "DETECT_THRESH": options.detect_thresh,
        "ANALYSIS_THRESH": options.detect_thresh,
        "DETECT_MINAREA": options.detect_minarea,
        "FILTER": True,
        "FILTER_NAME": FILES["conv"],
        "BACK_SIZE": options.back_size,
        "NTHREADS": options.nthreads,
    }
    return command_line(
        program,
        [FILES["image"]],
        forced=forced,
        tunable=tunable,
        user_config=_user(workdir, "default.sex"),
    )


def psfex_arguments(
    program: str,
    *,
    psf_size: int,
    degree: int,
    fwhm_range: tuple[float, float],
    options: PsfexOptions,
    workdir: Path,
) -> list[str]:
    """The PSFEx command line (on ``frame.cat``, writing ``frame.psf``, ``psfex.xml`` and
    ``psfex_out.cat``).

    Parameters
    ----------
    program : str
    psf_size : int
        ``PSF_SIZE`` (both axes).
    degree : int
        ``PSFVAR_DEGREES``.
    fwhm_range : tuple of float
        ``SAMPLE_FWHMRANGE`` (PSFEx's FWHM: 2 x ``FLUX_RADIUS``).
    options : PsfexOptions
    workdir : Path
        Where ``default.psfex`` may be (the user's).

    Returns
    -------
    list of str
    """
    from oasis_sextractor.programs import command_line

    forced = {
        "PSF_SIZE": (psf_size, psf_size),
        "PSF_DIR": ".",
        "PSF_SUFFIX": ".psf",
        "WRITE_XML": True,
        "XML_NAME": FILES["xml"],
        "OUTCAT_TYPE": "FITS_LDAC",
        "OUTCAT_NAME": FILES["outcat"],
        "CHECKPLOT_TYPE": "NONE",
        "CHECKIMAGE_TYPE": "NONE",
        "VERBOSE_TYPE": "QUIET",
    }
    tunable = {
        "PSF_SAMPLING": options.sampling,
        "PSFVAR_DEGREES": degree,
        "SAMPLE_MINSN": options.min_snr,
        "SAMPLE_MAXELLIP": options.max_ellipticity,
        "SAMPLE_FWHMRANGE": fwhm_range,
        "SAMPLE_VARIABILITY": options.variability,
        "NTHREADS": options.nthreads,
    }
    return command_line(
        program,
        [FILES["catalog"]],
        forced=forced,
        tunable=tunable,
        user_config=_user(workdir, "default.psfex"),
    )


def candidates(columns: dict[str, np.ndarray], options: PsfexOptions) -> np.ndarray:
    """Boolean mask of the catalog rows that can be PSF stars (unflagged, bright, round,
    FWHM in range)."""
    elong = columns["ELONGATION"]
    max_elong = (1.0 + options.max_ellipticity) / max(1.0 - options.max_ellipticity, 1e-6)
    fwhm = columns["FWHM_IMAGE"]
    return (
        (columns["FLAGS"] == 0)
        & (columns["SNR_WIN"] >= options.min_snr)
        & (elong <= max_elong)
        & (fwhm >= options.min_fwhm)
        & (fwhm <= options.max_fwhm)
    )


def star_cluster(fwhm: np.ndarray, variability: float, need: int) -> np.ndarray:
    """The stars among PSF candidates: the most compact dense cluster of FWHMs.

    Stars share one FWHM, galaxies spread above it (cosmic rays and hot pixels, below,
    are already cut by ``min_fwhm``). The cluster is centred on the candidate with the
    most neighbours within ``variability`` (relative) among those at most ``1 +
    variability`` times the smallest FWHM that has ``need`` such neighbours; the median
    of the candidates would land on the galaxies in a deep extragalactic field.

    Parameters
    ----------
    fwhm : ndarray
        FWHMs of the candidates.
    variability : float
        Relative half width of the cluster.
    need : int
        Neighbours (itself included) that make a cluster.

    Returns
    -------
    ndarray of bool
        The members (all False when no cluster is dense enough).

    Examples
    --------
    >>> star_cluster(np.array([2.4, 2.5, 2.6, 7.0, 7.1, 7.2, 7.3, 8.0]), 0.2, 3).tolist()
    [True, True, True, False, False, False, False, False]
    """
    f = np.asarray(fwhm, dtype=np.float64)
    members = np.zeros(len(f), dtype=bool)
    if len(f) == 0:
        return members
    order = np.argsort(f, kind="stable")
    fs = f[order]
    count = np.searchsorted(fs, fs * (1.0 + variability), side="right") - np.searchsorted(
        fs, fs * (1.0 - variability), side="left"
    )
    dense = np.flatnonzero(count >= need)
    if len(dense) == 0:
        return members
    reach = np.flatnonzero(fs <= fs[dense[0]] * (1.0 + variability))
    centre = fs[reach[np.argmax(count[reach])]]
    return np.abs(f - centre) <= variability * centre


def choose_degree(n_candidates: int, requested: int) -> int:
    """The highest degree <= ``requested`` with :data:`STARS_PER_TERM` candidates per
    polynomial term (``(d + 1)(d + 2) / 2`` terms for x, y).

    Examples
    --------
    >>> choose_degree(100, 2), choose_degree(20, 2), choose_degree(5, 2)
    (2, 1, 0)
    """
    degree = requested
    while degree > 0 and n_candidates < STARS_PER_TERM * (degree + 1) * (degree + 2) // 2:
        degree -= 1
    return degree


def read_xml_fwhm(path: Path) -> float:
    """PSFEx's ``FWHM_Mean`` (pixels) from its XML output, nan when absent."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return float("nan")
    for table in root.iter():
        if not table.tag.endswith("TABLE") or table.get("name") != "PSF_Fields":
            continue
        fields = [f.get("name") for f in table.iter() if f.tag.endswith("FIELD")]
        rows = [r for r in table.iter() if r.tag.endswith("TR")]
        if "FWHM_Mean" not in fields or not rows:
            continue
        cells = [td.text for td in rows[0] if td.tag.endswith("TD")]
        try:
            return float(cells[fields.index("FWHM_Mean")])
        except (IndexError, TypeError, ValueError):
            return float("nan")
    return float("nan")


class PsfexPsf(PsfBackend):
    """PSF model from PSFEx on a SExtractor catalog (see the module docstring)."""

    name = "psfex"
    Options = PsfexOptions
    description = "SExtractor + PSFEx PSF model (external programs source-extractor, psfex)"
    user_files = ("default.sex", "default.param", "default.conv", "default.psfex")

    def _programs(self, options: PsfexOptions) -> tuple[str, str]:
        from oasis_sextractor.programs import find_program

        where = "psf backend 'psfex'"
        sex = find_program(
            "sextractor",
            options.sextractor_binary,
            where=where,
            option_key="psf.psfex.sextractor_binary",
        )
        psfex = find_program(
            "psfex", options.psfex_binary, where=where, option_key="psf.psfex.psfex_binary"
        )
        return sex, psfex

    def check(self, options: PsfexOptions) -> None:
        """Raise :class:`~oasis_core.contracts.errors.BackendUnavailable` when SExtractor or PSFEx
        is missing."""
        self._programs(options)

    def psf(self, frame: Frame, *, options: PsfexOptions, workdir: Path) -> Frame:
        """Return ``frame`` with ``psf``, ``fwhm``, ``snr``, ``background`` and ``noise`` set.

        Parameters
        ----------
        frame : Frame
            Pixels of weight 0 are ignored; ``gain`` and ``saturation`` are used when set.
        options : PsfexOptions
        workdir : Path
            Scratch directory: images, catalogs and PSFEx outputs are written there.

        Returns
        -------
        Frame
            ``psf`` is a :class:`~oasis_core.contracts.model.PsfModel` (``model = "psfex"``) whose
            image is the model at the frame centre (odd, unit sum), ``nstars`` the stars
            PSFEx accepted, ``files`` the catalog and the ``.psf`` file, ``params``
            PSFEx's figures (``psfex_fwhm``, ``fwhm_mean``, ``chi2``, ``loaded``,
            ``degree``, ``sampling``...) and the Moffat ``beta`` of the fit.

        Raises
        ------
        BackendUnavailable
            When a program is missing.
        StageError
            When every pixel is masked, too few stars are found or accepted, or a program
            fails (the message ends with its own error line).
        """
        from oasis_core.engine.stats import sky_noise
        from oasis_sextractor.programs import (
            gaussian_kernel,
            merge_parameters,
            provide_conv,
            read_ldac,
            run_program,
            write_image,
        )
        from oasis_sextractor.psffile import measure_fwhm, read_psfex

        sex, psfex = self._programs(options)
        where = f"psf backend 'psfex': frame {frame.name!r}"
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)

        data = np.array(frame.data, dtype=np.float32)
        weight = np.array(frame.weight, dtype=np.float32)
        bad = ~np.isfinite(data) | ~(weight > 0) | ~np.isfinite(weight)
        if bad.all():
            raise StageError(f"{where}: every pixel is masked (weight 0)")
        good_max = float(data[~bad].max())
        data[bad] = float(np.median(data[~bad]))
        weight[bad] = 0.0
        write_image(workdir / FILES["image"], data)
        write_image(workdir / FILES["weight"], weight)
        provide_conv(workdir, gaussian_kernel(FILTER_FWHM), "Gaussian, FWHM 2 px")
        gain = float(frame.gain) if frame.gain and frame.gain > 0 else 0.0
        level = frame.saturation if frame.saturation else good_max
        saturation = options.saturation_fraction * float(level)
        user_param = workdir / "default.param"
        user_text = user_param.read_text(errors="replace") if user_param.is_file() else None

        def sextractor(catalog: str, params: str, aperture: float) -> dict[str, np.ndarray]:
            args = sextractor_psf_arguments(
                sex,
                catalog=catalog,
                params=params,
                gain=gain,
                saturation=saturation,
                aperture=aperture,
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
            return _read(workdir / catalog, where, "SExtractor", read_ldac)

        # pass 1: a first FWHM from the candidate stars
        (workdir / FILES["guess_param"]).write_text("\n".join(GUESS_PARAMETERS) + "\n")
        guess = sextractor(FILES["guess"], FILES["guess_param"], 5.0 * 3.0)
        cand = candidates(guess, options)
        ndetected = len(guess["NUMBER"])

        def fail(n: int, what: str) -> StageError:
            msg = (
                f"{where}: {what} among {ndetected} detections, need {options.min_stars} "
                "PSF stars; lower psf.psfex.min_snr / detect_thresh or check the frame and "
                "its mask"
            )
            return StageError(msg, metadata={"nstars": n, "ndetected": ndetected})

        ncand = int(cand.sum())
        if ncand < options.min_stars:
            raise fail(
                ncand, f"{ncand} candidate PSF stars (unflagged, S/N >= {options.min_snr:g}, round)"
            )
        need = max(options.min_stars, min(5, ncand))
        stars = star_cluster(guess["FWHM_IMAGE"][cand], options.variability, need)
        if not stars.any():
            raise fail(
                0,
                f"no {need} of the {ncand} candidate PSF stars share one FWHM (within "
                f"{100 * options.variability:g}%)",
            )
        fwhm0 = float(np.clip(np.median(guess["FWHM_IMAGE"][cand][stars]), 1.0, 30.0))
        # PSFEx measures FWHMs as 2 x FLUX_RADIUS: its range brackets the stars' values
        fr0 = float(np.median(2.0 * guess["FLUX_RADIUS"][cand][stars]))
        spread = 1.0 + 2.0 * options.variability
        fwhm_range = (
            max(options.min_fwhm, fr0 / spread),
            max(min(options.max_fwhm, fr0 * spread), options.min_fwhm * spread),
        )
        if options.psf_size:
            half = options.psf_size // 2
        else:
            half = int(np.clip(math.ceil(3.0 * fwhm0), 7, 25))
        psf_size = 2 * half + 1
        vignet = psf_size + 8
        aperture = 5.0 * fwhm0

        # pass 2: the catalog PSFEx reads
        needed = [*PSFEX_PARAMETERS, f"VIGNET({vignet},{vignet})"]
        (workdir / FILES["param"]).write_text("\n".join(merge_parameters(needed, user_text)) + "\n")
        cat = sextractor(FILES["catalog"], FILES["param"], aperture)
        # the spatial degree the stars can constrain
        cand2 = candidates(cat, options)
        nstars = int(star_cluster(cat["FWHM_IMAGE"][cand2], options.variability, need).sum())
        degree = choose_degree(nstars, options.psfvar_degree)

        args = psfex_arguments(
            psfex,
            psf_size=psf_size,
            degree=degree,
            fwhm_range=fwhm_range,
            options=options,
            workdir=workdir,
        )
        run_program(
            args,
            cwd=workdir,
            where=where,
            label="PSFEx",
            outputs=[FILES["psf"]],
            timeout=options.timeout,
        )
        try:
            model = read_psfex(workdir / FILES["psf"])
        except (OSError, KeyError, ValueError) as err:
            raise StageError(f"{where}: cannot read PSFEx's {FILES['psf']} ({err})") from err
        if model.accepted < options.min_stars:
            raise fail(
                model.accepted, f"PSFEx accepted {model.accepted} of {model.loaded} stars loaded"
            )
        ny, nx = frame.shape
        try:
            image = model.image((nx + 1) / 2.0, (ny + 1) / 2.0)
        except ValueError as err:
            raise StageError(f"{where}: unusable PSFEx model ({err})") from err
        fit_fwhm, beta = measure_fwhm(image)
        xml_fwhm = read_xml_fwhm(workdir / FILES["xml"])
        fwhm = fit_fwhm if options.fwhm_from == "fit" else xml_fwhm
        if not (math.isfinite(fwhm) and 0.3 < fwhm < 2.0 * image.shape[0]):
            msg = f"{where}: no usable FWHM ({options.fwhm_from}: {fwhm:.3g} px)"
            raise StageError(msg, metadata={"nstars": model.accepted})

        # background and noise as the native backend's; S/N of the accepted stars
        _, head = read_ldac(workdir / FILES["catalog"])
        background = float(head.get("SEXBKGND", np.nan))
        noise = float(head.get("SEXBKDEV", np.nan))
        diff_noise = sky_noise(frame.data, ~bad)
        if math.isfinite(diff_noise) and 0 < diff_noise < noise:
            noise = diff_noise
        if not (math.isfinite(noise) and noise > 0):
            raise StageError(f"{where}: the sky noise is {noise} (blank or constant frame?)")
        accepted = _accepted(workdir / FILES["outcat"], cat["NUMBER"])
        if not accepted.any():  # no output catalog: the candidates stand in
            accepted = candidates(cat, options)
        snr = frame_snr(cat["FLUX_MAX"], cat["SNR_WIN"], accepted, noise, gain, options.snr_stars)

        params: dict[str, Any] = {
            "psfex_fwhm": _finite(model.fwhm),
            "fwhm_mean": _finite(xml_fwhm),
            "fwhm_fit": _finite(fit_fwhm),
            "beta": _finite(beta),
            "chi2": _finite(model.chi2),
            "loaded": model.loaded,
            "degree": model.degree,
            "sampling": model.sampling,
            "psf_size": psf_size,
            "fwhm_guess": round(fwhm0, 4),
            "nstars_guess": nstars,
            "ndetected": len(cat["NUMBER"]),
        }
        psf = PsfModel(
            image=image.astype(np.float32),
            fwhm=float(fwhm),
            model="psfex",
            params=params,
            nstars=int(model.accepted),
            files=(workdir / FILES["catalog"], workdir / FILES["psf"]),
        )
        return attrs.evolve(
            frame, psf=psf, fwhm=float(fwhm), snr=snr, background=background, noise=noise
        )


def _finite(value: float) -> float | str:
    return float(value) if math.isfinite(value) else "nan"


def _read(path: Path, where: str, label: str, reader: Any) -> dict[str, np.ndarray]:
    try:
        columns, _ = reader(path)
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise StageError(f"{where}: cannot read {label}'s catalog {path.name} ({err})") from err
    return columns


def _accepted(outcat: Path, numbers: np.ndarray) -> np.ndarray:
    """Rows of the SExtractor catalog (by ``NUMBER``) that PSFEx accepted (``FLAGS_PSF =
    0`` in its output catalog); all False when that catalog is missing or unreadable."""
    from oasis_sextractor.programs import read_ldac

    keep = np.zeros(len(numbers), dtype=bool)
    try:
        out, _ = read_ldac(outcat)
    except (OSError, KeyError, ValueError, IndexError):
        return keep
    if "SOURCE_NUMBER" not in out or "FLAGS_PSF" not in out or len(numbers) == 0:
        return keep
    ids = out["SOURCE_NUMBER"][out["FLAGS_PSF"] == 0]
    order = np.argsort(numbers, kind="stable")
    pos = np.clip(np.searchsorted(numbers[order], ids), 0, len(numbers) - 1)
    rows = order[pos]
    keep[rows[numbers[rows] == ids]] = True
    return keep


def frame_snr(
    peak: np.ndarray,
    snr_win: np.ndarray,
    use: np.ndarray,
    noise: float,
    gain: float,
    n: int,
) -> float:
    """Median peak S/N ``peak / sqrt(noise**2 + peak / gain)`` of the ``n`` highest-S/N
    (``snr_win``) stars among ``use``; nan when there is none.

    Examples
    --------
    >>> frame_snr(np.array([100.0, 50.0, 10.0]), np.array([30.0, 20.0, 5.0]),
    ...           np.array([True, True, False]), 5.0, 0.0, 10)
    15.0
    """
    rows = np.flatnonzero(use)
    if len(rows) == 0:
        return float("nan")
    rows = rows[np.argsort(-snr_win[rows], kind="stable")[:n]]
    p = np.asarray(peak[rows], dtype=np.float64)
    var = noise**2 + (np.clip(p, 0.0, None) / gain if gain > 0 else 0.0)
    return float(np.median(p / np.sqrt(var)))
