"""OasisPy's simulations and tools (``sim_fakes``, ``sim_sameField``, ``SIM``, ``TEST``,
``MOSAIC``, ``GET``, ``INITIALIZE``) over OASIS's applications. Imported through
:mod:`oasis_apps.oasispy`, whose docstring says how they map onto OASIS.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from oasis_apps.oasispy_stages import PathSpec, prompt, target_paths, tracks_given
from oasis_core.contracts.errors import InputError

__all__ = [
    "GET",
    "INITIALIZE",
    "MOSAIC",
    "SAME_FIELD_NAMES",
    "SIM",
    "TEST",
    "sim_fakes",
    "sim_sameField",
]

log = logging.getLogger("oasis")


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
        for p in target_paths(location)
    }


#: OasisPy's ``sim_sameField`` parameter names and the names the OASIS same-field
#: simulation may use for them (the first it accepts is used).
SAME_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "numIms": ("numIms", "n_images", "num_images", "n_frames"),
    "mode": ("mode", "psf", "PSF"),
}


@tracks_given
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
    return {p: run(p, **kwargs) for p in target_paths(location)}


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
        images = prompt("frames to mosaic (a directory, or comma-separated FITS files)")
    if output is None:
        output = prompt("mosaic file to write", default="mosaic.fits")
    mosaic = importlib.import_module("oasis_apps.mosaic")
    inputs = [Path(p) for p in target_paths(images)]  # type: ignore[arg-type]
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
    mode = str(prompt("get data from LCO or unpack frames on disk? (dl/unpack)", "unpack"))
    mode = mode.strip().lower()
    if mode not in ("dl", "unpack"):
        raise InputError(f"GET: mode {mode!r}: answer 'dl' or 'unpack'")
    if mode == "unpack":
        source = Path(prompt("frames to copy (file or directory)", str(Path.home() / "Downloads")))
    name = str(prompt("target name (or path)"))
    target = _new_target(name, Path(prompt("directory holding OASIS/", ".")))
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
        return str(prompt(text, "", show_default=False)).strip() or None

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
        path = prompt("directory in which to build the OASIS file tree", os.getcwd())
    base = init_root(Path(path))  # type: ignore[arg-type]
    log.info("OASIS file tree in %s", base)
    return base
