"""OasisPy's stage functions (``MASK``, ``ALIGN``, ``PSF``, ``COMBINE``, ``SUBTRACT``, ``MR``,
``EXTRACT``, ``PIPELINE``, ``RUN``) and what the OasisPy layer shares: its lists of
target paths, which parameters a caller gave, and prompts. Imported through
:mod:`oasis_apps.oasispy`, whose docstring says how they map onto OASIS.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from oasis_core.contracts.errors import InputError

__all__ = [
    "ALIGN",
    "ALIGN_METHODS",
    "COMBINE",
    "EXTRACT",
    "MASK",
    "MR",
    "MR_METHODS",
    "PIPELINE",
    "PSF",
    "RUN",
    "SUBTRACT",
    "PathSpec",
    "prompt",
    "run_on_targets",
    "target_paths",
    "tracks_given",
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


def tracks_given(fn: F) -> F:
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


def target_paths(path: PathSpec) -> list[str]:
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


def run_on_targets(
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
    for p in target_paths(path):
        ctx = pl.make_context(
            p, backends=backends, options=options, use_config_file=use_config_file
        )
        results[p] = pl.run_stages(ctx, stages)[stages[-1]]
    return results


def prompt(text: str, default: Any = None, **kwargs: Any) -> Any:
    import typer

    return typer.prompt(text, default=default, **kwargs)


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
    return run_on_targets(path, ["mask"])


@tracks_given
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
    return run_on_targets(path, ["mask", "psf", "align"], backends=backends, options=options)


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
    return run_on_targets(path, ["psf"])


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
    return run_on_targets(path, ["combine"])


@tracks_given
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
    return run_on_targets(path, ["subtract"], backends=backends, use_config_file=use_config_file)


@tracks_given
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
    return run_on_targets(
        path, ["mr"], backends=backends, options=options, use_config_file=use_config_file
    )


@tracks_given
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
    return run_on_targets(path, ["extract"], options=options)


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

    return {p: pl.pipeline(p) for p in target_paths(path)}


def RUN() -> None:
    """Choose an OASIS method from a menu and answer its prompts (OasisPy's ``run.RUN``).

    The same menu as ``oasis run`` without a target.
    """
    from oasis_apps.cli_menu import menu

    menu()
