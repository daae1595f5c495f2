"""One pair outside a target: ``oasis subtract-pair`` and :func:`oasis_core.subtract_pair`.

:func:`plan_pair` reads the configuration and resolves the backend once,
:func:`subtract_frames` measures what the backend needs (background, noise, FWHM, PSF)
exactly as the pipeline does and subtracts through
:func:`~oasis_core.engine.subtraction.run_subtraction`, and :func:`subtract_pair` is the
command: two aligned FITS files in, a residual (its noise image, its catalog of candidates
from the extract stage's detection and the core's filters) out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core.contracts.errors import StageError
from oasis_core.contracts.model import Frame, Residual, Template
from oasis_core.engine.auto import auto_cards, provenance_options, select_subtract
from oasis_core.engine.subtraction import residual_cards, run_subtraction, unnamed

__all__ = ["PairPlan", "plan_pair", "subtract_frames", "subtract_pair"]

log = logging.getLogger("oasis")


def subtract_pair(
    science: Path,
    template: Path,
    output: Path,
    *,
    method: str = "ois",
    noise: Path | None = None,
    catalog: Path | None = None,
    options: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> Residual:
    """Subtract one already aligned pair, outside any target tree (``oasis subtract-pair``).

    Gain, read noise and saturation come from the headers; the PSF of each frame is
    measured with the configured psf backend when the subtract backend says it needs one
    (``needs_psf``), and the science frame's when a catalog is asked for. ``options`` are
    dotted keys as on the command line, e.g. ``{"subtract.ois.deg_spatial": 1}``,
    ``{"extract.native.thresh": 4}`` or ``{"deg_spatial": 1}`` (taken as the chosen
    subtract backend's). The residual (with ``NOISE`` and ``WEIGHT`` extensions) is
    written to ``output``; with ``noise`` the noise image is also written there on its
    own. ``method="auto"`` tries every subtract backend that can run here and keeps the
    best Q (as ``[subtract] backend = "auto"``).

    With ``catalog``, the residual's candidates are written there (ECSV, whatever the
    name) as a pipeline run gives them for that
    residual: the configured extract backend's detections and the core's filters
    (:func:`oasis_core.engine.pipeline.filter_sources`; the majority filter needs three residuals
    or more, so it plays no part), one row per detection with its ``reason`` (``kept``...)
    and ``ra``/``dec`` when the science frame has a WCS. A residual below the Q floor
    gives an empty catalog (its metadata says why).

    Returns
    -------
    Residual
        As written; ``meta["choice_*"]`` records the choices made (see the module doc).

    Raises
    ------
    UnknownBackend
        ``method`` is not an installed subtract backend (the message lists them).
    InputError
        Before any work: ``output``, ``noise`` or ``catalog`` is an input or another
        output, or cannot be written (see :func:`oasis_core.engine.io.check_outputs`); unreadable
        frames or frames of different shapes.
    """
    from oasis_core.engine import io

    plan = plan_pair(method, options, registry, catalog=catalog is not None)
    io.check_outputs(
        inputs=[Path(science), Path(template)],
        outputs={
            "output": Path(output),
            "--noise file": None if noise is None else Path(noise),
            "--catalog file": None if catalog is None else Path(catalog),
        },
    )
    sci = io.read_frame(Path(science))
    tpl = io.read_frame(Path(template))
    residual, _ = subtract_frames(
        plan,
        sci,
        tpl,
        inputs={"science": Path(science), "template": Path(template)},
        output=Path(output),
        noise=None if noise is None else Path(noise),
        catalog=None if catalog is None else Path(catalog),
    )
    return residual


@attrs.frozen(kw_only=True)
class PairPlan:
    """The choices of one pair subtraction, resolved and checked before any work
    (:func:`plan_pair`).

    Attributes
    ----------
    registry : oasis_core.engine.plugins.Registry
    config : oasis_core.engine.config.Config
        The defaults with the options given.
    method : str
        The subtract backend's name (``"auto"`` included).
    backend : SubtractBackend or AutoSubtract
    needs_psf : bool
        Whether the frames' PSFs are measured first.
    extractor : ExtractBackend or None
        When a catalog is asked for.
    """

    registry: Any
    config: Any
    method: str
    backend: Any
    needs_psf: bool
    extractor: Any = None


def plan_pair(
    method: str,
    options: Mapping[str, Any] | None = None,
    registry: Any = None,
    *,
    catalog: bool = False,
    source: str = "command line",
) -> PairPlan:
    """Resolve and check the backends and options of a pair subtraction, before any work.

    Parameters
    ----------
    method : str
        A subtract backend's name, or ``"auto"``.
    options : mapping, optional
        Dotted keys (``{"subtract.ois.deg_spatial": 1}``) or the subtract backend's own
        (``{"deg_spatial": 1}``), checked by the configuration's validators.
    registry : oasis_core.engine.plugins.Registry, optional
    catalog : bool
        Whether a catalog will be made (the extract backend is then checked too).
    source : {"command line", "argument"}
        What an error about an option names as its origin.

    Raises
    ------
    UnknownBackend, BackendUnavailable, ConfigError
        One line naming the backend or option and what is wrong.
    """
    from oasis_core.engine.config import load_config
    from oasis_core.engine.plugins import Registry

    registry = registry or Registry()
    registry.get("subtract", method)  # an unknown name lists the installed ones
    flat: dict[str, Any] = {"subtract.backend": method}
    for key, value in (options or {}).items():
        flat[key if "." in key else f"subtract.{method}.{key}"] = value
    if source == "argument":
        config = load_config(None, registry, use_config_file=False, arguments=flat)
    else:
        config = load_config(None, registry, use_config_file=False, cli=flat)
    backend = select_subtract(registry, config, method)
    needs_psf = bool(getattr(backend, "needs_psf", False))
    if needs_psf or catalog:
        registry.get("psf", config.backend("psf"))  # an unknown name lists the installed ones
    extractor = None
    if catalog:  # a bad name or a missing program fails before any work
        registry.get("extract", config.backend("extract"))
        extractor = registry.select(
            "extract", config.backend("extract"), config.backend_options("extract")
        )
    return PairPlan(
        registry=registry,
        config=config,
        method=method,
        backend=backend,
        needs_psf=needs_psf,
        extractor=extractor,
    )


def subtract_frames(
    plan: PairPlan,
    sci: Frame,
    tpl: Frame,
    *,
    inputs: Mapping[str, Path | None],
    output: Path | None = None,
    noise: Path | None = None,
    catalog: Path | None = None,
) -> tuple[Residual, dict[str, Any]]:
    """Subtract one aligned pair of frames as ``oasis subtract-pair`` does, whichever way
    the frames came in (files through :func:`oasis_core.engine.io.read_frame`, arrays through
    :func:`oasis_core.engine.io.frame_from_arrays`), and write only the outputs named.

    Parameters
    ----------
    plan : PairPlan
    sci, tpl : Frame
        The science and template frames.
    inputs : mapping
        ``{"science": ..., "template": ...}``: the file each frame was read from, or None
        for a frame given in memory (its provenance card then records the digest of its
        pixels).
    output, noise, catalog : Path, optional
        Where to write the residual, its noise image and its catalog (checked by the
        caller with :func:`oasis_core.engine.io.check_outputs`).

    Returns
    -------
    residual : Residual
    cards : dict
        The header cards added to the residual's (provenance, PSF widths, auto's
        choice): ``io.residual_header(residual, cards)`` is the header written.

    Raises
    ------
    InputError
        The frames differ in shape.
    """
    import shutil
    import tempfile

    from oasis_core.contracts.errors import InputError
    from oasis_core.engine import io

    if sci.shape != tpl.shape:
        raise InputError(
            f"{inputs.get('template') or tpl.name}: shape {tpl.shape} differs from the "
            f"science frame's {sci.shape}; subtract-pair needs aligned frames (run the "
            "pipeline to align them)"
        )
    registry, config, method, backend = plan.registry, plan.config, plan.method, plan.backend
    workdir = Path(tempfile.mkdtemp(prefix="oasis-pair-"))
    try:
        if plan.needs_psf:
            sci, tpl = (_measure_psf(f, registry, config, workdir) for f in (sci, tpl))
        template_obj = Template(
            **{f.name: getattr(tpl, f.name) for f in attrs.fields(Frame)}, inputs=()
        )
        settings = config.settings["subtract"]
        residual = run_subtraction(
            backend,
            sci,
            template_obj,
            options=config.backend_options("subtract"),
            workdir=workdir,
            settings=settings,
        )
        residual = attrs.evolve(residual, name=sci.name, science=sci.name, template=tpl.name)
        prov = _pair_provenance(registry, config, method, backend, inputs, (sci, tpl))
        cards = {**prov, **residual_cards(residual, sci, tpl)}
        cards.update(auto_cards(residual))
        if output is not None:
            io.write_residual(Path(output), residual, header_extra=cards)
        if noise is not None:
            from astropy.io import fits

            # the noise image as the residual's NOISE extension: its unit and WCS
            header = io.residual_header(residual, cards)
            ext = io.image_extension(
                residual.noise,
                "NOISE",
                wcs_from=header,
                bunit=str(header["BUNIT"]) if "BUNIT" in header else None,
            )
            with io.atomic_write(Path(noise)) as tmp:
                fits.PrimaryHDU(ext.data, ext.header).writeto(tmp)
        if catalog is not None and output is not None:
            if sci.psf is None:
                sci = _measure_psf(sci, registry, config, workdir)
            _pair_catalog(
                Path(output),
                Path(catalog),
                sci,
                plan.extractor,
                registry,
                config,
                workdir,
                template=tpl.data,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return residual, cards


def _measure_psf(frame: Frame, registry: Any, config: Any, workdir: Path) -> Frame:
    """``frame`` with its PSF measured by the configured psf backend (unchanged, with a
    warning, when the backend cannot measure one)."""
    name = config.backend("psf")
    backend = registry.select("psf", name, config.backend_options("psf"))
    try:
        return backend.psf(frame, options=config.backend_options("psf"), workdir=workdir)  # type: ignore[no-any-return]
    except StageError as err:
        log.warning("%s: no PSF measured (%s)", frame.path, unnamed(err, frame.name))
        return frame


def _pair_provenance(
    registry: Any,
    config: Any,
    method: str,
    backend: Any,
    inputs: Mapping[str, Path | None],
    frames: tuple[Frame, Frame],
) -> dict[str, Any]:
    """The provenance header cards of a pair's residual; an input given in memory (None in
    ``inputs``) is recorded by the sha256 of its pixels (float32) instead of its file's."""
    import hashlib

    from oasis_core.engine.io import sha256
    from oasis_core.engine.provenance import Provenance

    files = {k: Path(v) for k, v in inputs.items() if v is not None}
    record = registry.get("subtract", method)
    prov = Provenance(
        stage="subtract",
        backend=method,
        plugin=f"{record.dist}=={record.version}",
        inputs=files,
        options=provenance_options(backend, config.backend_options("subtract", method)),
        settings=config.settings["subtract"],
    )
    cards: dict[str, Any] = prov.header_cards()
    if len(files) == len(inputs):
        return cards
    digests = dict(zip(("science", "template"), frames, strict=True))
    entries = []
    for name, path in sorted(inputs.items()):
        if path is not None:
            entries.append(f"{name[:32]}:{sha256(Path(path))[:32]}")
        else:
            pixels = np.ascontiguousarray(digests[name].data, np.float32).tobytes()
            entries.append(f"{name[:32]}:{hashlib.sha256(pixels).hexdigest()[:32]}")
    cards = {k: v for k, v in cards.items() if not k.startswith("OASIN")}
    cards.update({f"OASIN{i}": entry for i, entry in enumerate(entries)})
    return cards


def _pair_catalog(
    residual_path: Path,
    catalog: Path,
    science: Frame,
    extractor: Any,
    registry: Any,
    config: Any,
    workdir: Path,
    *,
    template: np.ndarray | None = None,
) -> None:
    """Detect and filter on the residual as written (as the pipeline's extract stage reads
    it, with the science frame's PSF, and the ``template``'s stars for the wing test) and
    write the catalog."""
    from astropy.table import Table

    from oasis_core.engine import io
    from oasis_core.engine.provenance import Provenance
    from oasis_core.engine.tasks import detect, filter_sources

    name = config.backend("extract")
    record = registry.get("extract", name)
    settings = config.settings["extract"]
    prov = Provenance(
        stage="extract",
        backend=name,
        plugin=f"{record.dist}=={record.version}",
        inputs={"residual": residual_path},
        options=config.backend_options("extract"),
        settings=settings,
    )
    residual = io.read_residual(residual_path)
    if science.psf is not None:
        residual = attrs.evolve(residual, psf=science.psf)
    wcs = io.header_wcs(science.header) if science.header is not None else None
    note = ""
    if bool(residual.meta.get("usable", True)) and bool((residual.weight > 0).any()):
        table = detect(
            extractor,
            residual,
            options=config.backend_options("extract"),
            workdir=workdir,
            template=template,
        )
        positives = table[np.asarray(table["sign"]) > 0]
        table = filter_sources(
            table,
            settings=settings,
            catalogs=[positives],
            n_residuals=1,
            frame=residual.science or residual.name,
            wcs=wcs,
        )
    else:
        note = f"residual not usable ({residual.meta.get('flag') or 'no weight left'})"
        log.warning("%s: no candidates: %s", catalog, note)
        columns = ("x", "y", "flux", "flux_err", "snr", "sign", "reason")
        table = Table({c: np.zeros(0, "U10" if c == "reason" else float) for c in columns})
        table.add_column(np.zeros(0, "U1"), name="frame", index=0)
    table.meta.clear()
    table.meta.update(
        {k: str(v[0] if isinstance(v, tuple) else v) for k, v in prov.cards().items()}
    )
    if note:
        table.meta["OASNOTE"] = note
    io.write_table(table, catalog, fmt="ascii.ecsv")
