"""Where each stage's outputs are in a target and whether they are current.

A stage reads an upstream output only when it was made from its inputs as they are now
(:func:`made_from`: their sha256 among its provenance cards); a unit that fails loses its
previous output (:func:`invalidate`), and a run that stops at a stage removes the summaries
of the later ones (:func:`drop_after`). Applications find a target's files through these
functions (``outputs.residual_path(ctx, name)``), never by building paths themselves.

Stage order and outputs (see :mod:`oasis_core.engine.tree`)::

    mask     data/NAME      -> masks/NAME.weight.fits
    psf      + mask         -> psf/NAME.psf.fits, psf/psf.ecsv; outliers moved to archive/
    align    + psf, ref     -> aligned/NAME.fits, aligned/reference.txt
    combine  best seeing    -> templates/template.fits, template.psf.fits, log.txt
    subtract aligned, tmpl  -> residuals/NAME_residual.fits, residuals/log.txt
    mr       residuals      -> residuals/MR.fits, residuals/VAR.fits
    extract  residuals, MR  -> sources/*.txt, *.ecsv
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from oasis_core.contracts.backends import STAGES
from oasis_core.contracts.errors import InputError, OasisError
from oasis_core.contracts.model import Frame
from oasis_core.engine import io
from oasis_core.engine.tree import Target

if TYPE_CHECKING:
    from oasis_core.engine.context import Context

__all__ = [
    "align_inputs",
    "aligned_frames",
    "drop_after",
    "header_choices",
    "input_frames",
    "invalidate",
    "load_frame",
    "load_output",
    "made_from",
    "mask_inputs",
    "mask_path",
    "masked_frames",
    "mr_path",
    "psf_inputs",
    "psf_path",
    "read_header",
    "read_psf_stats",
    "residual_path",
    "residual_verdict",
    "stopped",
    "subtract_inputs",
    "summaries",
    "template_current",
    "template_path",
    "template_wcs",
    "usable_residuals",
    "var_path",
    "with_psf",
]

log = logging.getLogger("oasis")


def mask_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("mask") / f"{name}.weight.fits"


def psf_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("psf") / f"{name}.psf.fits"


def mask_inputs(path: Path) -> dict[str, Path]:
    return {"data": path}


def psf_inputs(ctx: Context, name: str, path: Path) -> dict[str, Path]:
    return {"data": path, "mask": mask_path(ctx, name)}


def align_inputs(
    ctx: Context, name: str, reference: str, paths: Mapping[str, Path]
) -> dict[str, Path]:
    return {
        "data": paths[name],
        "mask": mask_path(ctx, name),
        "psf": psf_path(ctx, name),
        "ref_data": paths[reference],
        "ref_mask": mask_path(ctx, reference),
        "ref_psf": psf_path(ctx, reference),
    }


def template_path(ctx: Context) -> Path:
    return ctx.target.stage_dir("combine") / "template.fits"


def residual_path(ctx: Context, name: str) -> Path:
    return ctx.target.stage_dir("subtract") / f"{name}_residual.fits"


def subtract_inputs(ctx: Context, name: str) -> dict[str, Path]:
    template = template_path(ctx)
    return {
        "science": ctx.target.stage_dir("align") / f"{name}.fits",
        "template": template,
        "psf": psf_path(ctx, name),
        "template_psf": template.with_name("template.psf.fits"),
    }


def mr_path(ctx: Context) -> Path:
    return ctx.target.stage_dir("mr") / "MR.fits"


def var_path(ctx: Context) -> Path:
    """The variability image (:mod:`oasis_core.engine.variability`), beside the master
    residual."""
    return ctx.target.stage_dir("mr") / "VAR.fits"


def read_header(path: Path) -> Any:
    """The primary header of a FITS output (None when unreadable)."""
    from astropy.io import fits

    try:
        return fits.getheader(path)
    except (OSError, ValueError):
        return None


def made_from(output: Path, inputs: Mapping[str, Path], header: Any = None) -> bool:
    """Was ``output`` made from ``inputs`` as they are now? True when it exists and the
    name and sha256 of every input are among its provenance cards (``OASINn``; the
    backend's options are the stage's business, not its readers')."""
    from oasis_core.engine.provenance import Provenance

    output = Path(output)
    if not output.is_file() or not all(Path(p).is_file() for p in inputs.values()):
        return False
    if output.suffix == ".ecsv":
        from astropy.table import Table

        try:
            recorded = dict(Table.read(output, format="ascii.ecsv").meta)
        except (OSError, ValueError):
            return False
    else:
        recorded = header if header is not None else read_header(output)
        if recorded is None:
            return False
    found = {str(recorded[k]) for k in recorded if k.startswith("OASIN") and k[5:].isdigit()}
    expected = Provenance(stage="", backend="", plugin="", inputs=dict(inputs)).input_cards()
    return set(expected) <= found


def invalidate(output: Path) -> None:
    """Remove a unit's previous output (and the files its header names, ``OASFILES``),
    so that nothing downstream takes it for this run's. Each removal is atomic."""
    output = Path(output)
    extra: list[Path] = []
    if output.suffix == ".fits" and output.is_file():
        from astropy.io import fits

        try:
            named = str(fits.getheader(output).get("OASFILES", ""))
        except (OSError, ValueError):
            named = ""
        extra = [output.parent / n for n in named.split(",") if n and Path(n).name == n]
    for path in (output, *extra):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def summaries(ctx: Context, stage: str) -> list[Path]:
    """The outputs of ``stage`` that sum up the whole target rather than one unit."""
    directory = ctx.target.stage_dir(stage)
    if stage == "align":
        return [directory / "reference.txt"]
    if stage == "combine":
        template = template_path(ctx)
        return [template, template.with_name("template.psf.fits")]
    if stage == "mr":
        return [mr_path(ctx), var_path(ctx)]
    if stage == "extract":
        stems = (
            "sources",
            "filtered_sources",
            "MR_sources",
            "MR_filtered_sources",
            "VAR_sources",
            "VAR_filtered_sources",
        )
        return [
            *(directory / f"{stem}{suffix}" for stem in stems for suffix in (".txt", ".ecsv")),
            directory / "total_sources.txt",
            directory / "detections",
        ]
    if stage == "photometry":
        return [
            directory / "lightcurves.ecsv",
            directory / "index.html",
            ctx.target.stage_dir("extract") / "variables.ecsv",
        ]
    return []


def drop_after(ctx: Context, stage: str) -> None:
    """Remove the summaries of every stage after ``stage``: a run that stops at ``stage``
    leaves no template, master residual or catalog of an earlier run looking like this
    one's."""
    for later in STAGES[STAGES.index(stage) + 1 :]:
        for path in summaries(ctx, later):
            invalidate(path)


def stopped(ctx: Context, stage: str, err: OasisError) -> OasisError:
    """``err``, to raise, after :func:`drop_after` (``stage``)."""
    drop_after(ctx, stage)
    return err


def input_frames(target: Target) -> list[tuple[str, Path]]:
    """The frames in ``data/``: (name, path), sorted; non-FITS files warned about."""
    if not target.data.is_dir():
        raise InputError(f"{target.path}: no data/ directory (is this a target? see `oasis init`)")
    frames = []
    for path in sorted(target.data.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not io.is_fits_name(path):
            log.warning("%s: not a FITS file name; ignored", path)
            continue
        frames.append((io.frame_name(path), path))
    return frames


def masked_frames(ctx: Context) -> list[tuple[str, Path]]:
    """The frames of ``data/`` whose weight map was made from them as they are now."""
    out = []
    for name, path in input_frames(ctx.target):
        mask = mask_path(ctx, name)
        if not mask.exists():
            log.warning("%s: no weight map (%s; run `oasis mask`); frame left out", name, mask)
        elif not made_from(mask, mask_inputs(path)):
            log.warning(
                "%s: its weight map %s was made from other data (run `oasis mask`); left out",
                name,
                mask,
            )
        else:
            out.append((name, path))
    return out


def read_psf_stats(ctx: Context) -> Any:
    from astropy.table import Table

    path = ctx.target.stage_dir("psf") / "psf.ecsv"
    if not path.exists():
        raise InputError(f"{path}: missing; run `oasis psf` first")
    table = Table.read(path, format="ascii.ecsv")
    present = dict(input_frames(ctx.target))
    keep = []
    for f, usable in zip(table["frame"], table["usable"], strict=True):
        name = str(f)
        ok = bool(usable) and name in present
        if ok and not made_from(psf_path(ctx, name), psf_inputs(ctx, name, present[name])):
            log.warning(
                "%s: its PSF was not measured from its current data and weight map (run "
                "`oasis psf`); frame left out",
                name,
            )
            ok = False
        keep.append(ok)
    return table[np.array(keep, bool)] if len(table) else table


def aligned_frames(ctx: Context) -> list[str]:
    """The frames whose aligned image was made from their current data, weight map and
    PSF and from those of the reference it records (``OASREF``)."""
    stats = read_psf_stats(ctx)
    out_dir = ctx.target.stage_dir("align")
    paths = dict(input_frames(ctx.target))
    names, missing, stale = [], [], []
    for n in stats["frame"]:
        name = str(n)
        out = out_dir / f"{name}.fits"
        header = read_header(out) if out.exists() else None
        if header is None:
            missing.append(name)
            continue
        reference = str(header.get("OASREF", ""))
        if reference not in paths or not made_from(
            out, align_inputs(ctx, name, reference, paths), header
        ):
            stale.append(name)
            continue
        names.append(name)
    if missing:
        log.warning("no aligned frame for %s (run `oasis align`); left out", ", ".join(missing))
    if stale:
        log.warning(
            "the aligned frames of %s were made from other inputs than the current ones (run "
            "`oasis align`); left out",
            ", ".join(stale),
        )
    return names


def template_current(ctx: Context, aligned: Sequence[str]) -> bool:
    """Was the template (and its PSF) made from aligned frames that are current now?"""
    template = template_path(ctx)
    header = read_header(template) if template.exists() else None
    if header is None or not template.with_name("template.psf.fits").exists():
        return False
    used = list(io.template_inputs(header))
    align_dir = ctx.target.stage_dir("align")
    return (
        bool(used)
        and set(used) <= set(aligned)
        and made_from(template, {n: align_dir / f"{n}.fits" for n in used}, header)
    )


def residual_verdict(header: Any) -> bool:
    """A residual's own recorded verdict: usable (its Q reached the ``q_floor`` of the run
    that made it), from its ``OAS USABLE`` card; a residual written before that card
    existed is judged by its weights (a residual below the floor has none left)."""
    if "OAS USABLE" in header:
        return bool(header["OAS USABLE"])
    try:
        return float(header.get("OAS GOOD_FRACTION", 1.0)) > 0
    except (TypeError, ValueError):
        return False


def usable_residuals(ctx: Context) -> tuple[list[str], list[str]]:
    """(usable residual names, names that could not be subtracted or are flagged out).

    A residual is usable when it was made from the current aligned frame, template and
    PSFs and its own recorded verdict says so (:func:`residual_verdict`); the ``q_floor``
    of the current command plays no part."""
    good, bad, stale = [], [], []
    for name in aligned_frames(ctx):
        path = residual_path(ctx, name)
        header = read_header(path) if path.exists() else None
        if header is None:
            bad.append(name)
        elif not made_from(path, subtract_inputs(ctx, name), header):
            stale.append(name)
            bad.append(name)
        elif residual_verdict(header):
            good.append(name)
        else:
            bad.append(name)
    if stale:
        log.warning(
            "the residuals of %s were made from another template or aligned frame than the "
            "current ones (run `oasis subtract`); left out",
            ", ".join(stale),
        )
    return good, bad


def header_choices(header: Any) -> str:
    """The choices recorded in a residual's header (``OAS CHOICE_*`` cards) as the log
    shows them, ``kernel=delta, align=wcs``; the backend 'auto' chose is in the backend
    column already."""
    from oasis_core.engine.subtraction import CHOICE_PREFIX, choice_text

    prefix = "OAS " + CHOICE_PREFIX.upper()
    meta = {
        CHOICE_PREFIX + str(k)[len(prefix) :].lower(): header[k]
        for k in header
        if str(k).startswith(prefix) and str(k) != prefix + "BACKEND"
    }
    return choice_text(meta)


def template_wcs(ctx: Context) -> Any:
    from astropy.io import fits

    path = template_path(ctx)
    return io.header_wcs(fits.getheader(path)) if path.exists() else None


def load_output(path: Path, psf_path: Path | None, *, cls: type[Frame] = Frame) -> Frame:
    frame = io.read_output_frame(path, cls=cls)
    if psf_path is not None and Path(psf_path).exists():
        model = io.read_psf(psf_path)
        frame = attrs.evolve(frame, psf=model)
    return frame


def load_frame(inputs: Mapping[str, Path], prefix: str = "") -> Frame:
    """A frame from ``data`` (+ ``mask`` weight, + ``psf`` model) inputs."""
    frame = io.read_frame(
        inputs[prefix + "data"], weight_path=inputs.get(prefix + "mask"), warn=False
    )
    psf_path = inputs.get(prefix + "psf")
    if psf_path is not None:
        frame = with_psf(frame, psf_path)
    return frame


def with_psf(frame: Frame, psf_path: Path) -> Frame:
    from astropy.io import fits

    model = io.read_psf(psf_path)
    hdr = fits.getheader(psf_path)
    values = {attr: float(hdr[key]) for attr, (key, _) in io.MEASURED_KEYS.items() if key in hdr}
    return attrs.evolve(frame, psf=model, **values)
