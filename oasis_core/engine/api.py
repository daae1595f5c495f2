"""The in-memory API: subtract a pair from Python, with arrays, CCDData or files.

:func:`subtract_pair` is ``oasis subtract-pair`` for Python users. Each frame may be a path,
a numpy array (a masked array's mask is honoured) or an astropy ``NDData``/``CCDData``;
whichever way it comes in, it becomes a frame through the same code as a file
(:func:`oasis_core.engine.io.frame_from_arrays`, which :func:`oasis_core.engine.io.read_frame` also
uses: gain, read noise and saturation from the header, non-finite pixels masked...) and is
subtracted by the same code as the command (:func:`oasis_core.engine.pair.subtract_frames`:
the optimisation loop, the Q floor, the provenance cards). So the same pair gives the same
residual and Q whichever way it comes in.

What an ``NDData`` brings:

* ``data``: the image; ``meta``: its FITS header (gain, read noise, saturation...);
* ``wcs``: its WCS cards written into that header (replacing the header's own);
* ``mask``: ``True`` (non-zero) pixels get weight 0;
* ``uncertainty``: pixels whose uncertainty is not finite or not positive get weight 0,
  and its median over the good pixels becomes the frame's sky noise (``Frame.noise``,
  which a backend uses when it is below its own measurement).

Example::

    import oasis_core
    from astropy.nddata import CCDData

    sci = CCDData.read("sci.fits", unit="adu")
    tpl = CCDData.read("tpl.fits", unit="adu")
    diff = oasis_core.subtract_pair(sci, tpl, kernel="delta")
    diff.meta["OASQ"], diff.uncertainty.array, diff.mask
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.contracts.errors import InputError

__all__ = ["RunResult", "run", "subtract_pair"]


def subtract_pair(
    science: Any, template: Any, output: Any = None, method: str = "ois", **options: Any
) -> Any:
    """Subtract an aligned pair in memory; write the residual only when asked.

    Parameters
    ----------
    science, template : str, Path, ndarray or astropy.nddata.NDData
        The science frame and the template, on one pixel grid: FITS files (read as
        ``oasis subtract-pair`` reads them), arrays, or ``NDData``/``CCDData`` (data,
        uncertainty, mask, wcs and meta as header; see the module doc).
    output : str or Path, optional
        Write the residual there (with ``NOISE`` and ``WEIGHT`` extensions), exactly as
        ``oasis subtract-pair`` does. Nothing is written without it.
    method : str
        The subtract backend (``"ois"`` by default, ``"hotpants"``, ``"zogy"``...) or
        ``"auto"`` (every backend that can run here; the best Q kept among those whose
        noise image describes their background, see
        :class:`oasis_core.engine.auto.AutoBackend`).
    **options
        The backend's options, e.g. ``kernel="delta"`` or ``deg_spatial=1``, checked as
        ``[subtract.<method>]`` in ``oasis.toml`` is.

    Returns
    -------
    astropy.nddata.CCDData
        The residual: ``data`` (science minus the PSF-matched template, in the science
        frame's units), ``uncertainty`` (a ``StdDevUncertainty`` of the noise image),
        ``mask`` (where the weight is 0), ``wcs`` (the science frame's) and ``meta``, the
        FITS header ``oasis subtract-pair`` writes: ``OASQ`` (Q), the ``OAS CHOICE_*``
        choices made, ``OAS USABLE``, the provenance...

    Raises
    ------
    UnknownBackend
        ``method`` is not an installed subtract backend (the message lists them).
    ConfigError
        An option is unknown or out of its range (the message names it).
    InputError
        A frame is not a 2-D image, has no finite or no unmasked pixel, the two differ
        in shape, an input is of a type not understood, or ``output`` cannot be written.
    """
    from oasis_core.engine import io
    from oasis_core.engine.pair import plan_pair, subtract_frames

    plan = plan_pair(method, options, catalog=False, source="argument")
    sci, sci_path = _frame(science, "science")
    tpl, tpl_path = _frame(template, "template")
    if output is not None:
        io.check_outputs(inputs=[sci_path, tpl_path], outputs={"output": Path(output)})
    residual, cards = subtract_frames(
        plan,
        sci,
        tpl,
        inputs={"science": sci_path, "template": tpl_path},
        output=None if output is None else Path(output),
    )
    return _as_ccddata(residual, io.residual_header(residual, cards), science)


def _frame(value: Any, role: str) -> tuple[Any, Path | None]:
    """The frame ``value`` gives (``role``: science or template) and its file, if any."""
    from oasis_core.engine import io

    if isinstance(value, str | Path):
        return io.read_frame(Path(value)), Path(value)
    where = f"{role} ({type(value).__name__})"
    from astropy.nddata import NDData

    if isinstance(value, NDData):
        return _nddata_frame(value, role, where), None
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        weight = None
        if isinstance(value, np.ma.MaskedArray):
            weight = _mask_weight(np.ma.getmaskarray(value), value.shape, where)
            value = value.data
        return io.frame_from_arrays(value, weight=weight, where=where, name=role), None
    raise InputError(
        f"{role}: a {type(value).__name__} is not an image; give a FITS path, a numpy array "
        "of numbers or an astropy NDData/CCDData"
    )


def _mask_weight(mask: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Weight 1, 0 where ``mask`` is true (non-zero)."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape) and mask.ndim != 0:
        raise InputError(f"{where}: mask shape {mask.shape} != the data's {tuple(shape)}")
    return np.where(np.broadcast_to(mask != 0, shape), 0.0, 1.0).astype(np.float32)


def _nddata_frame(nd: Any, role: str, where: str) -> Any:
    """The frame of an ``NDData`` (see the module doc)."""
    import warnings

    from astropy.io import fits
    from astropy.nddata import StdDevUncertainty

    from oasis_core.engine import io

    data = np.asarray(nd.data)
    if data.dtype.kind not in "biuf":
        raise InputError(f"{where}: data of type {data.dtype} are not numbers")
    shape = data.shape
    weight = None if nd.mask is None else _mask_weight(nd.mask, shape, where)
    header = _meta_header(nd.meta)
    if nd.wcs is not None:
        wcs = getattr(nd.wcs, "low_level_wcs", nd.wcs)
        if not hasattr(wcs, "to_header"):
            raise InputError(
                f"{where}: its wcs ({type(wcs).__name__}) cannot be written as FITS cards; "
                "give an astropy.wcs.WCS"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's notes on SIP/TPV keywords
            cards = wcs.to_header(relax=True)
        for key in [k for k in header if io.WCS_KEY_RE.match(k)]:
            del header[key]
        for card in cards.cards:  # its WCS cards only: not its rounded MJD-OBS, DATE-OBS...
            if io.WCS_KEY_RE.match(card.keyword):
                header.append(card)
    noise = None
    if nd.uncertainty is not None:
        std = np.asarray(nd.uncertainty.represent_as(StdDevUncertainty).array, np.float64)
        if std.shape != shape:
            raise InputError(f"{where}: uncertainty shape {std.shape} != the data's {shape}")
        usable = np.isfinite(std) & (std > 0)
        weight = (np.ones(shape, np.float32) if weight is None else weight) * usable
        good = usable & (weight > 0) & np.isfinite(data)
        if good.any():
            noise = float(np.median(std[good]))
    frame = io.frame_from_arrays(
        data,
        weight=weight,
        header=header if len(header) else fits.Header(),
        where=where,
        name=role,
    )
    if noise is not None:
        from oasis_core.engine.io import attrs_evolve

        frame = attrs_evolve(frame, noise=noise)
    return frame


def _meta_header(meta: Any) -> Any:
    """``meta`` as a FITS header (a copy): a header as is, a mapping's scalar items."""
    import contextlib
    import warnings

    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning

    if isinstance(meta, fits.Header):
        return meta.copy()
    header = fits.Header()
    for key, value in dict(meta or {}).items():
        if isinstance(value, tuple) and len(value) == 2:
            value, comment = value
        else:
            comment = None
        if isinstance(value, bool | int | float | str | np.generic):
            with warnings.catch_warnings(), contextlib.suppress(ValueError, KeyError):
                warnings.simplefilter("ignore", VerifyWarning)
                header[str(key)] = (value, comment)
    return header


def _as_ccddata(residual: Any, header: Any, science: Any) -> Any:
    """The residual as a ``CCDData`` (units of the science frame's, else its BUNIT, else
    adu)."""
    import astropy.units as u
    from astropy.nddata import CCDData, NDData, StdDevUncertainty

    from oasis_core.engine.io import header_wcs

    unit: Any = getattr(science, "unit", None) if isinstance(science, NDData) else None
    if unit is None:
        try:
            unit = u.Unit(str(header.get("BUNIT", "adu")), parse_strict="raise")
        except ValueError:
            unit = u.adu
    return CCDData(
        np.array(residual.data, np.float32),
        unit=unit,
        uncertainty=StdDevUncertainty(np.array(residual.noise, np.float32)),
        mask=np.asarray(residual.weight) == 0,
        wcs=header_wcs(residual.header),
        meta=header,
    )


#: The catalogs a run writes in ``sources/``, by their key in :class:`RunResult`.
CATALOG_FILES = {
    "sources": "sources.ecsv",
    "filtered_sources": "filtered_sources.ecsv",
    "mr_sources": "MR_sources.ecsv",
    "mr_filtered_sources": "MR_filtered_sources.ecsv",
    "variables": "variables.ecsv",
}


class RunResult:
    """What :func:`run` returns: the target, each stage's summary and the catalogs.

    Attributes
    ----------
    target : Path
        The target's folder.
    summary : dict
        Each stage's result (``summary["extract"]``: the counts and mean Q that
        ``sources/total_sources.txt`` gives).
    catalogs : dict of str to astropy.table.Table
        ``sources``, ``filtered_sources``, ``mr_sources`` and ``mr_filtered_sources`` (the
        ECSV catalogs, with units: ``SkyCoord(t["ra"], t["dec"])`` and
        ``Time(t["mjd"], format="mjd")`` work as they are), the photometry stage's
        ``variables`` (one row per source) and ``lightcurves`` (one row per source per
        frame); a catalog the run did not write is absent.
    """

    __slots__ = ("catalogs", "summary", "target")

    def __init__(self, target: Path, summary: dict[str, Any], catalogs: dict[str, Any]) -> None:
        self.target = target
        self.summary = summary
        self.catalogs = catalogs

    def __getitem__(self, name: str) -> Any:
        """A catalog by its key (``result["filtered_sources"]``)."""
        return self.catalogs[name]

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {len(v)} rows" for k, v in self.catalogs.items())
        return f"RunResult({str(self.target)!r}; {rows})"


def run(
    target: str | Path,
    *,
    options: dict[str, Any] | None = None,
    jobs: int | None = None,
    force: bool = False,
    **backends: str,
) -> RunResult:
    """Run every stage on a target (as ``oasis run``) and return its catalogs as Tables.

    Parameters
    ----------
    target : str or Path
        The target folder (or its name under ``./OASIS/targets``).
    options : dict, optional
        Dotted keys to values, as ``-o`` gives them: ``{"subtract.q_floor": 0.6,
        "subtract.ois.kernel": "delta"}``.
    jobs : int, optional
        Worker processes (0: one per core; default: the configuration's).
    force : bool
        Redo every unit of work, not only what changed.
    **backends : str
        A backend per stage: ``run(t, subtract="zogy", extract="sextractor")``.

    Returns
    -------
    RunResult

    Raises
    ------
    oasis_core.contracts.errors.OasisError
        As ``oasis run`` does (one-line messages): an unknown stage or backend, a bad
        option, a target that is busy or not writable, a stage that produced nothing.
    """
    from astropy.table import Table

    from oasis_core.contracts.backends import STAGES
    from oasis_core.engine.pipeline import closing_executor, make_context, run_stages

    unknown = sorted(set(backends) - set(STAGES))
    if unknown:
        raise InputError(
            f"argument: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}"
        )
    ctx = make_context(target, backends=backends, options=options, jobs=jobs, force=force)
    with closing_executor(ctx):
        summary = run_stages(ctx)
    folder = ctx.target.stage_dir("extract")
    catalogs = {
        key: Table.read(folder / name, format="ascii.ecsv")
        for key, name in CATALOG_FILES.items()
        if (folder / name).exists()
    }
    curves = ctx.target.stage_dir("photometry") / "lightcurves.ecsv"
    if curves.exists():
        catalogs["lightcurves"] = Table.read(curves, format="ascii.ecsv")
    return RunResult(ctx.target.path, summary, catalogs)
