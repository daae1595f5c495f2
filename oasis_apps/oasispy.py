"""OasisPy's documented functions, with their names and parameters, as thin calls into OASIS.

OASIS grew out of OasisPy (UCSB Optical SETI). Its scripts call one upper-case function per
step, ``from OasisPy import subtract; subtract.SUBTRACT(path, method='ois')``; here the same
calls work after ``from oasis_apps.oasispy import *``::

    MASK(path)                                   the mask stage
    ALIGN(path, align_method='standard')         mask, psf, then align (OasisPy masked first)
    PSF(path)                                    the psf stage
    COMBINE(path)                                the combine stage (the template)
    SUBTRACT(path, method='ois', use_config_file=True)
    MR(path, method='swarp', sig_thresh=4, gauss_sig=3, gauss_filt=False, use_config_file=True)
    EXTRACT(path, method='both')
    PIPELINE(path)                               every stage
    RUN()                                        the ``oasis run`` menu
    sim_fakes(location, n_fakes, iterations, input_mode='flux', PSF='moffat',
              subtract_method='ois', f_min=0, f_max=40000)
    sim_sameField(location, numIms=100, ..., mode='moffat')
    SIM()                                        the ``oasis sim`` menu
    TEST()                                       the installation self-test
    MOSAIC()                                     a mosaic, from prompts
    GET()                                        frames into a target, from prompts
    INITIALIZE()                                 the OASIS directory tree

**Paths.** As in OasisPy, ``path`` may be a comma-separated list of target directories
(``"a, b"``); each is run in turn and the first failure stops the run. A list or tuple of
paths works too. Spaces around the commas are dropped, but unlike OasisPy a path that
itself contains spaces is kept whole. Each function returns ``{path: result}`` with the
OASIS result of each target (OasisPy returned nothing).

**Methods and the configuration file.** OasisPy's ``use_config_file=True`` read the method
from the target's ``OASIS.config``, ignoring the argument. OASIS reads
``configs/oasis.toml`` with its own precedence (function argument > file > default), and
these functions keep OasisPy's meaning where it matters: *a parameter you pass* is a
function argument and wins over the file; *a parameter left at its default* lets the file
decide (``[subtract] backend``, ``[mr] backend``, ``[extract] method``...), and OASIS's own
defaults equal OasisPy's documented ones. ``use_config_file=False`` ignores the file.

ALIGN's ``align_method='fakes'`` (photometric alignment only, for frames already
registered) runs the native align backend with ``initial = "none"``.

**What OASIS does not honour** is accepted and logged (logger ``oasis``): MR's ``'phose'``
(run as ``'sos'``), the ``sigma_clip`` parameters given to another MR method, and the
``sim_sameField`` parameters the installed same-field simulation does not take. Errors are
:class:`~oasis_core.contracts.errors.OasisError` subclasses with a one-line message; OasisPy printed
and called ``sys.exit``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from oasis_core.contracts.errors import InputError

__all__ = [
    "ALIGN",
    "COMBINE",
    "EXTRACT",
    "GET",
    "INITIALIZE",
    "MASK",
    "MOSAIC",
    "MR",
    "PIPELINE",
    "PSF",
    "RUN",
    "SIM",
    "SUBTRACT",
    "TEST",
    "sim_fakes",
    "sim_sameField",
]

log = logging.getLogger("oasis")

PathSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

F = TypeVar("F", bound=Callable[..., Any])

#: OasisPy's MR methods and the OASIS mr backend each runs as.
MR_METHODS = {
    "swarp": "swarp",
    "sos": "sos",
    "sos_abs": "sos_abs",
    "sigma_clip": "sigma_clip",
    "phose": "sos",
}

#: OasisPy's ALIGN methods: the OASIS align backend each runs as, and its options.
ALIGN_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "standard": ("native", {}),
    "fakes": ("native", {"align.native.initial": "none"}),
}


# ---------------------------------------------------------------------------- helpers


def _tracks_given(fn: F) -> F:
    """Tell ``fn`` which parameters its caller passed (``_given``), so that a parameter
    left at its default can let the configuration file decide. ``_given`` is hidden from
    the public signature."""
    sig = inspect.signature(fn)
    public = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "_given"])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = frozenset(public.bind(*args, **kwargs).arguments)
        return fn(*args, _given=given, **kwargs)

    wrapper.__signature__ = public  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _targets(path: PathSpec) -> list[str]:
    """The target paths in ``path``: a comma-separated string (OasisPy) or a sequence."""
    if isinstance(path, (list, tuple)):
        items = [os.fspath(p) for p in path]
    else:
        text = os.fspath(path)  # type: ignore[arg-type]
        items = [text] if Path(text).is_dir() else text.split(",")
    paths = [p.strip() for p in items if p.strip()]
    if not paths:
        raise InputError(f"path {path!r}: no target directory given")
    return paths


def _run(
    path: PathSpec,
    stages: Sequence[str],
    *,
    backends: Mapping[str, str] | None = None,
    options: Mapping[str, Any] | None = None,
    use_config_file: bool = True,
) -> dict[str, Any]:
    """Run ``stages`` on each target in ``path``; return ``{path: last stage's result}``."""
    from oasis_core.engine import pipeline as pl

    results: dict[str, Any] = {}
    for p in _targets(path):
        ctx = pl.make_context(
            p, backends=backends, options=options, use_config_file=use_config_file
        )
        results[p] = pl.run_stages(ctx, stages)[stages[-1]]
    return results


def _prompt(text: str, default: Any = None, **kwargs: Any) -> Any:
    import typer

    return typer.prompt(text, default=default, **kwargs)


# ---------------------------------------------------------------------------- stages


def MASK(path: PathSpec) -> dict[str, Any]:
    """Mask cosmic rays, saturated stars and other defects (OasisPy's ``mask.MASK``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.

    Returns
    -------
    dict
        Per target, the names of the frames usable after masking (weight maps in
        ``masks/``).

    Examples
    --------
    >>> MASK("OASIS/targets/M31")  # doctest: +SKIP
    """
    return _run(path, ["mask"])


@_tracks_given
def ALIGN(
    path: PathSpec, align_method: str = "standard", *, _given: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Register every frame onto the reference frame (OasisPy's ``align.ALIGN``).

    OasisPy's ALIGN masked the frames first; OASIS measures PSFs before aligning, so this
    runs the mask, psf and align stages (work already done is skipped).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.
    align_method : str
        ``'standard'`` (default): the configured align backend (``native``). ``'fakes'``
        (OasisPy's photometric alignment without registration, for frames already
        registered such as simulations): the ``native`` backend with
        ``align.native.initial = "none"``, which keeps each frame's pixels where they are
        and only matches its flux scale and sky level to the reference's (recorded as
        ``ALNMETH = 'none'`` in the aligned header). Any other value names an OASIS align
        backend.

    Returns
    -------
    dict
        Per target, the names of the aligned frames (``aligned/``).
    """
    backends: dict[str, str] = {}
    options: dict[str, Any] = {}
    if "align_method" in _given:
        backends["align"], options = ALIGN_METHODS.get(align_method, (align_method, {}))
        if options:
            log.info("ALIGN: align_method %r: %s", align_method, options)
    return _run(path, ["mask", "psf", "align"], backends=backends, options=options)


def PSF(path: PathSpec) -> dict[str, Any]:
    """Measure each frame's PSF (OasisPy's ``psf.PSF``, which ran PSFEx).

    The configured psf backend runs (``native``, or ``psfex`` when chosen in
    ``configs/oasis.toml``); outliers are set aside in ``archive/``.

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.

    Returns
    -------
    dict
        Per target, the names of the frames kept (``psf/NAME.psf.fits``, ``psf/psf.ecsv``).
    """
    return _run(path, ["psf"])


def COMBINE(path: PathSpec) -> dict[str, Any]:
    """Stack the best-seeing aligned frames into the template (OasisPy's ``combine.COMBINE``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.

    Returns
    -------
    dict
        Per target, the path of ``templates/template.fits``.
    """
    return _run(path, ["combine"])


@_tracks_given
def SUBTRACT(
    path: PathSpec,
    method: str = "ois",
    use_config_file: bool = True,
    *,
    _given: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Subtract the template from every aligned frame (OasisPy's ``subtract.SUBTRACT``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.
    method : str
        Subtract backend: ``'ois'`` (default), ``'hotpants'``, ``'zogy'`` or any installed
        one (``oasis plugins``). Passed explicitly, it wins over ``[subtract] backend`` in
        ``configs/oasis.toml``; left at its default, the file decides (OasisPy's
        ``use_config_file=True`` read the method from the file). An empty string counts
        as not given.
    use_config_file : bool
        Read ``configs/oasis.toml`` (default True).

    Returns
    -------
    dict
        Per target, the names of the frames subtracted (``residuals/NAME_residual.fits``).
    """
    backends = {"subtract": method} if "method" in _given and method else {}
    return _run(path, ["subtract"], backends=backends, use_config_file=use_config_file)


@_tracks_given
def MR(
    path: PathSpec,
    method: str = "swarp",
    sig_thresh: float = 4,
    gauss_sig: float = 3,
    gauss_filt: bool = False,
    use_config_file: bool = True,
    *,
    _given: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Stack the residuals into the master residual ``MR.fits`` (OasisPy's ``MR.MR``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.
    method : str
        ``'swarp'`` (default; OASIS falls back to ``native`` when SWarp is not installed),
        ``'sos'``, ``'sos_abs'``, ``'sigma_clip'``, or any installed mr backend. OasisPy's
        later ``'phose'`` (photometric source elimination) is not available and runs as
        ``'sos'``, the sum of squares it was built on (logged). Passed explicitly, the
        method wins over ``[mr] backend`` in the file; left at its default, the file
        decides.
    sig_thresh, gauss_sig, gauss_filt : float, float, bool
        ``sigma_clip`` only: the threshold in sigmas, and the Gaussian smoothing of the
        result (``mr.sigma_clip.*``). Given with another method they are logged as
        ignored. Left at their defaults, the file decides.
    use_config_file : bool
        Read ``configs/oasis.toml`` (default True).

    Returns
    -------
    dict
        Per target, the path of ``residuals/MR.fits``.
    """
    backends: dict[str, str] = {}
    if "method" in _given:
        backend = MR_METHODS.get(method, method)
        if method == "phose":
            log.info("MR: method 'phose' is not available in OASIS; using 'sos' (sum of squares)")
        backends["mr"] = backend
    values = {"sig_thresh": sig_thresh, "gauss_sig": gauss_sig, "gauss_filt": gauss_filt}
    options = {f"mr.sigma_clip.{k}": v for k, v in values.items() if k in _given}
    if options and backends and backends["mr"] != "sigma_clip":
        log.warning(
            "MR: %s apply to method 'sigma_clip' only; ignored by %r",
            ", ".join(k for k in values if k in _given),
            method,
        )
    return _run(path, ["mr"], backends=backends, options=options, use_config_file=use_config_file)


@_tracks_given
def EXTRACT(
    path: PathSpec, method: str = "both", *, _given: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Detect and filter sources in the residuals (OasisPy's ``extract.EXTRACT``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.
    method : str
        ``'both'`` (default): the residuals and the master residual; ``'indiv'``: the
        residuals only; ``'MR'``: the master residual only. Passed explicitly it wins over
        ``[extract] method`` in the file; left at its default, the file decides.

    Returns
    -------
    dict
        Per target, the summary of the detections (counts, mean Q); catalogs are in
        ``sources/`` (``filtered_sources.txt``, ``total_sources.txt``...).
    """
    options = {"extract.method": method} if "method" in _given else {}
    return _run(path, ["extract"], options=options)


def PIPELINE(path: PathSpec) -> dict[str, Any]:
    """Run every stage, mask to extract (OasisPy's ``pipeline.PIPELINE``).

    Parameters
    ----------
    path : str
        Target directory; a comma-separated list runs several.

    Returns
    -------
    dict
        Per target, each stage's result (``result[path]["extract"]`` summarises the
        detections).
    """
    from oasis_core.engine import pipeline as pl

    return {p: pl.pipeline(p) for p in _targets(path)}


def RUN() -> None:
    """Choose an OASIS method from a menu and answer its prompts (OasisPy's ``run.RUN``).

    The same menu as ``oasis run`` without a target.
    """
    from oasis_apps.cli_menu import menu

    menu()


# ---------------------------------------------------------------------------- simulations


def sim_fakes(
    location: PathSpec,
    n_fakes: int = 20,
    iterations: int = 50,
    input_mode: str = "flux",
    PSF: str = "moffat",
    subtract_method: str = "ois",
    f_min: float = 0,
    f_max: float = 40000,
) -> dict[str, Any]:
    """Inject fake point sources and measure how many are found (OasisPy's
    ``simulation.sim_fakes``); runs :func:`oasis_apps.fakes.sim_fakes`.

    Parameters
    ----------
    location : str
        Target directory; a comma-separated list runs several. The target is copied to
        ``OASIS/simulations/<name>_fakes`` and never modified.
    n_fakes, iterations : int
        Fakes per iteration, and iterations.
    input_mode : str
        ``'flux'`` (``f_min``..``f_max`` in ADU) or ``'mag'`` (magnitudes).
    PSF : str
        Fake profile: ``'moffat'`` or ``'gaussian'``.
    subtract_method : str
        Subtract backend.
    f_min, f_max : float
        Faintest and brightest fake.

    Returns
    -------
    dict
        Per target, a :class:`oasis_apps.fakes.FakesResult` (the table of fakes, the 50 %
        and 90 % completeness fluxes).
    """
    from oasis_apps import fakes

    return {
        p: fakes.sim_fakes(
            p,
            n_fakes,
            iterations,
            input_mode=input_mode,
            PSF=PSF,
            subtract_method=subtract_method,
            f_min=f_min,
            f_max=f_max,
        )
        for p in _targets(location)
    }


#: OasisPy's ``sim_sameField`` parameter names and the names the OASIS same-field
#: simulation may use for them (the first it accepts is used).
SAME_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "numIms": ("numIms", "n_images", "num_images", "n_frames"),
    "mode": ("mode", "psf", "PSF"),
}


@_tracks_given
def sim_sameField(
    location: PathSpec,
    numIms: int = 100,
    bkg_mag: float = 22.5,
    fwhm_min: float = 3,
    fwhm_max: float = 6,
    rot_min: float = -2.5,
    rot_max: float = 2.5,
    shift_min: float = -2,
    shift_max: float = 2,
    scale_mult: tuple[float, float] = (0, 1.5),
    scale_add: tuple[float, float] = (-20, 50),
    zero_point: float = 25,
    mode: str = "moffat",
    *,
    _given: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Simulate frames of one field with nothing variable and count false detections
    (OasisPy's ``simulation.sim_sameField``); runs
    :func:`oasis_apps.samefield.sim_same_field`.

    Parameters
    ----------
    location : str
        Target directory whose reference frame is the model; a comma-separated list runs
        several.
    numIms : int
        Frames to simulate.
    bkg_mag : float
        Mean sky background [mag].
    fwhm_min, fwhm_max : float
        Range of the frames' FWHM [pix].
    rot_min, rot_max : float
        Range of the rotations [deg].
    shift_min, shift_max : float
        Range of the x and y shifts [pix].
    scale_mult, scale_add : tuple of float
        Ranges of the multiplicative and additive photometric scalings.
    zero_point : float
        Magnitude zero point.
    mode : str
        Source profile: ``'moffat'`` (default, as ``oasis sim same-field``), ``'gauss'``,
        ``'real'`` (the frame's PSF) or ``'sky'`` (GalSim, for OasisPy's SkyMaker).

    Returns
    -------
    dict
        Per target, what the same-field simulation returns.

    Notes
    -----
    Each parameter is passed under the name the installed simulation takes (see
    :data:`SAME_FIELD_NAMES`); one it does not take is logged as ignored when you gave it.
    """
    samefield = importlib.import_module("oasis_apps.samefield")
    run = samefield.sim_same_field
    values = {
        "numIms": numIms,
        "bkg_mag": bkg_mag,
        "fwhm_min": fwhm_min,
        "fwhm_max": fwhm_max,
        "rot_min": rot_min,
        "rot_max": rot_max,
        "shift_min": shift_min,
        "shift_max": shift_max,
        "scale_mult": scale_mult,
        "scale_add": scale_add,
        "zero_point": zero_point,
        "mode": mode,
    }
    kwargs, ignored = _adapt(run, values, SAME_FIELD_NAMES)
    ignored = [n for n in ignored if n in _given]
    if ignored:
        log.warning("sim_sameField: %s not supported by OASIS; ignored", ", ".join(ignored))
    return {p: run(p, **kwargs) for p in _targets(location)}


def _adapt(
    fn: Callable[..., Any], values: Mapping[str, Any], names: Mapping[str, Sequence[str]]
) -> tuple[dict[str, Any], list[str]]:
    """``values`` renamed to the parameters ``fn`` takes; and the names it does not take."""
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in values.items():
        accepted = [n for n in names.get(name, (name,)) if n in params]
        if accepted:
            kwargs[accepted[0]] = value
        elif var_kw:
            kwargs[name] = value
        else:
            ignored.append(name)
    return kwargs, ignored


def SIM() -> None:
    """Choose a simulation (fakes or same-field) and answer its prompts (OasisPy's
    ``simulation.SIM``); the same menu as ``oasis sim``."""
    from oasis_apps.cli_sim import sim_menu

    sim_menu()


def TEST() -> bool:
    """Check the installation end to end (OasisPy's ``test.TEST``); runs
    :func:`oasis_apps.selftest.run_selftest`.

    Returns
    -------
    bool
        True when the self-test passes. Like OasisPy it prints ``TEST SUCCESSFUL!`` or
        ``Test failure: ...``.
    """
    selftest = importlib.import_module("oasis_apps.selftest")
    ok = bool(selftest.run_selftest())
    print("TEST SUCCESSFUL!" if ok else "Test failure: results do not match the expected ones")
    return ok


# ---------------------------------------------------------------------------- set-up


def MOSAIC(images: PathSpec | None = None, output: str | os.PathLike[str] | None = None) -> Any:
    """Build a mosaic from a set of frames (OasisPy's ``montage.MOSAIC``); runs
    :func:`oasis_apps.mosaic.mosaic`.

    Like OasisPy's, it asks for what it needs when called without arguments.

    Parameters
    ----------
    images : str, optional
        A directory of frames or a comma-separated list of FITS files (prompted for when
        None).
    output : str, optional
        The mosaic to write (prompted for when None; default ``mosaic.fits``).

    Returns
    -------
    Any
        What :func:`oasis_apps.mosaic.mosaic` returns.
    """
    if images is None:
        images = _prompt("frames to mosaic (a directory, or comma-separated FITS files)")
    if output is None:
        output = _prompt("mosaic file to write", default="mosaic.fits")
    mosaic = importlib.import_module("oasis_apps.mosaic")
    inputs = [Path(p) for p in _targets(images)]  # type: ignore[arg-type]
    return mosaic.mosaic(inputs, Path(output))


def GET() -> Any:
    """Bring frames into a target (OasisPy's ``get.GET``), answering prompts.

    Two modes, as in OasisPy: ``unpack`` copies frames already on disk
    (:func:`oasis_apps.get.unpack`, as ``oasis get --unpack``); ``dl`` downloads them from
    the Las Cumbres Observatory archive (:func:`oasis_apps.lco.download`). The target is
    ``<directory>/OASIS/targets/<name>`` (a path to an existing directory is used as is),
    created with a default ``configs/oasis.toml`` when new.

    Returns
    -------
    UnpackReport or DownloadReport
    """
    mode = str(_prompt("get data from LCO or unpack frames on disk? (dl/unpack)", "unpack"))
    mode = mode.strip().lower()
    if mode not in ("dl", "unpack"):
        raise InputError(f"GET: mode {mode!r}: answer 'dl' or 'unpack'")
    if mode == "unpack":
        source = Path(_prompt("frames to copy (file or directory)", str(Path.home() / "Downloads")))
    name = str(_prompt("target name (or path)"))
    target = _new_target(name, Path(_prompt("directory holding OASIS/", ".")))
    if mode == "unpack":
        from oasis_apps.get import unpack

        report = unpack([source], target)
        log.info(
            "%s: %d copied, %d already there, %d refused",
            target.data,
            len(report.copied),
            len(report.present),
            len(report.refused),
        )
        return report
    from oasis_apps import lco

    def optional(text: str) -> str | None:
        return str(_prompt(text, "", show_default=False)).strip() or None

    limit = optional("largest number of frames (blank: all)")
    report = lco.download(
        target,
        object_name=optional("object name (blank: any)"),
        filter_name=optional("filter (blank: any)"),
        proposal=optional("proposal id (blank: any)"),
        start=optional("first observation date, YYYY-MM-DD (blank: any)"),
        end=optional("last observation date, YYYY-MM-DD (blank: any)"),
        limit=int(limit) if limit else None,
        token=optional("LCO API token (blank: public data only)"),
    )
    log.info(
        "%s: %d downloaded, %d already there, %d failed",
        target.data,
        len(report.downloaded),
        len(report.present),
        len(report.failed),
    )
    return report


def _new_target(name: str, root: Path) -> Any:
    """The target ``name`` (a path, or a name under ``root/OASIS/targets``), created with a
    default configuration file."""
    from oasis_core.engine import io
    from oasis_core.engine.config import render_config
    from oasis_core.engine.plugins import Registry
    from oasis_core.engine.tree import Target, init_root

    path = Path(name)
    if not (path.is_dir() or len(path.parts) > 1):
        path = init_root(root) / "targets" / name
    target = Target(path).create()
    if not target.config_file.exists():
        io.write_text(target.config_file, render_config(Registry()))
    return target


def INITIALIZE(path: str | os.PathLike[str] | None = None) -> Path:
    """Create the OASIS directory tree ``OASIS/{targets,simulations,temp,archive}``
    (OasisPy's ``initialize.INITIALIZE``).

    OasisPy also offered to install ISIS; OASIS's ``ois`` backend needs no installation.

    Parameters
    ----------
    path : str, optional
        Directory in which ``OASIS/`` is created; asked for when None (default: the
        current directory).

    Returns
    -------
    Path
        The ``OASIS`` directory.
    """
    from oasis_core.engine.tree import init_root

    if path is None:
        path = _prompt("directory in which to build the OASIS file tree", os.getcwd())
    base = init_root(Path(path))  # type: ignore[arg-type]
    log.info("OASIS file tree in %s", base)
    return base
