"""The target of a same-field simulation (:mod:`oasis_apps.samefield`): where it goes, the
real frame it starts from, its frames' headers and files, and the marker that lets a rerun
with the same parameters keep its frames.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oasis_apps.samefield_draw import (
    FrameDraw,
)
from oasis_core.contracts.errors import InputError
from oasis_core.engine import io
from oasis_core.engine.lock import LOCK_NAME

__all__ = [
    "frame_header",
    "mark",
    "prepare_target",
    "resolve_source",
    "simulations_dir",
    "write_fits",
]


def resolve_source(location: str | Path, frame: str | Path | None) -> tuple[Path, Any]:
    """(the real frame's file, its target or None)."""
    from oasis_core.engine.pipeline import input_frames
    from oasis_core.engine.tree import find_target

    path = Path(location)
    if path.is_file():
        return path, None
    target = find_target(location)
    if frame is not None:
        f = Path(frame)
        for candidate in (f, target.data / f, target.data / f"{f}.fits"):
            if candidate.is_file():
                return candidate, target
        raise InputError(f"frame {frame!s}: no such file (in {target.data} nor as a path)")
    frames = input_frames(target)
    if not frames:
        raise InputError(f"{target.data}: no FITS frame to simulate from")
    return frames[0][1], target


def simulations_dir(target: Any) -> Path:
    from oasis_core.engine.tree import init_root

    if target is not None and target.path.parent.name == "targets":
        return target.path.parent.parent / "simulations"
    return init_root(Path.cwd()) / "simulations"


def frame_header(
    source_header: Any,
    draw: FrameDraw,
    wcs: dict[str, Any],
    *,
    index: int,
    mode: str,
    source: Path,
    n_sources: int,
    gain: float,
    saturation: float,
) -> Any:
    from astropy.io import fits

    header = fits.Header()
    for key in ("OBJECT", "TELESCOP", "INSTRUME", "FILTER", "EXPTIME"):
        if key in source_header:
            header[key] = source_header[key]
    mjd0 = source_header.get("MJD-OBS")
    mjd0 = float(mjd0) if isinstance(mjd0, (int, float)) else 60000.0
    mjd = mjd0 + index / 1440.0  # one frame a minute
    from astropy.time import Time

    header["DATE-OBS"] = Time(mjd, format="mjd", scale="utc").isot
    header["MJD-OBS"] = (mjd, "MJD at start of exposure")
    header["GAIN"] = (gain / draw.scale, "e-/ADU (after the rescale)")
    header["RDNOISE"] = (draw.noise * gain, "e-")
    header["SATURATE"] = (
        float(np.float32(np.float64(saturation) * draw.scale + draw.offset)),
        "ADU, level of saturated pixels",
    )
    header["BUNIT"] = "adu"
    header.update(wcs)
    header["SFMODE"] = (mode, "same-field simulation: rendering mode")
    header["SFSOURCE"] = (source.name, "real frame the sources come from")
    header["SFNSRC"] = (n_sources, "sources rendered")
    header["SFFWHM"] = (round(draw.fwhm, 4), "FWHM [px]")
    header["SFROT"] = (round(draw.rotation, 5), "rotation about the centre [deg]")
    header["SFDX"] = (round(draw.shift_x, 4), "shift along x [px]")
    header["SFDY"] = (round(draw.shift_y, 4), "shift along y [px]")
    header["SFSKYMAG"] = (round(draw.sky_mag, 4), "sky [mag/px]")
    header["SFSKY"] = (round(draw.sky, 4), "sky [ADU/px] before the rescale")
    header["SFSCALE"] = (round(draw.scale, 6), "rescale: data = SFSCALE * image + SFOFFSET")
    header["SFOFFSET"] = (round(draw.offset, 4), "rescale offset [ADU]")
    return header


def write_fits(path: Path, data: np.ndarray, header: Any) -> None:
    from astropy.io import fits

    with io.atomic_write(path) as tmp:
        fits.PrimaryHDU(data=data, header=header).writeto(tmp, overwrite=True)


def prepare_target(
    sim_dir: Path, params: Mapping[str, Any], source_target: Any, registry: Any
) -> tuple[Any, bool]:
    """The simulation's target, emptied unless it holds this very simulation already
    (``configs/samefield.json``: the parameters and whether every frame was written);
    returns (target, whether its frames are current)."""
    from oasis_core.engine.config import render_config
    from oasis_core.engine.tree import Target

    marker = sim_dir / "configs" / "samefield.json"
    # the lock file and the run's scratch are this run's; anything else is a simulation's
    held = (LOCK_NAME, ".work")
    content = [p for p in sim_dir.iterdir() if p.name not in held] if sim_dir.exists() else []
    if content:
        if not marker.is_file():
            raise InputError(
                f"{sim_dir}: exists and is not a same-field simulation; remove it or move it"
            )
        done = json.loads(marker.read_text())
        if done.get("params") == json.loads(json.dumps(params)) and done.get("complete"):
            return Target(sim_dir), True
        for path in content:  # other parameters, or an interrupted rendering
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    target = Target(sim_dir).create()
    mark(target, params, complete=False)
    user_config = source_target.config_file if source_target is not None else None
    if user_config is not None and user_config.is_file():
        io.write_text(target.config_file, user_config.read_text())
    else:
        io.write_text(target.config_file, render_config(registry))
    return target, False


def mark(target: Any, params: Mapping[str, Any], *, complete: bool) -> None:
    text = json.dumps({"params": params, "complete": complete}, indent=1)
    io.write_text(target.configs / "samefield.json", text + "\n")
