"""One iteration of :func:`oasis_apps.fakes.sim_fakes`, a picklable task: inject fakes into
one aligned frame, subtract, detect, match, and write its table of fakes.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.fakes_inject import inject, to_mag
from oasis_core.engine import io

__all__ = ["FakesIteration", "iteration_table", "run_iteration"]


@attrs.frozen(kw_only=True)
class FakesIteration:
    """One iteration: inject into one aligned frame, subtract, detect, match. Picklable."""

    index: int
    frame: str
    science: Path
    science_psf: Path
    template: Path
    template_psf: Path
    x: tuple[float, ...]
    y: tuple[float, ...]
    flux: tuple[float, ...]
    psf_model: str
    zero_point: float
    subtract_backend: Any
    subtract_options: Any
    subtract_settings: Mapping[str, Any]
    extract_backend: Any
    extract_options: Any
    filters: Mapping[str, Any]
    catalogs: tuple[Path, ...]
    output: Path
    workdir: Path
    key: str


def run_iteration(it: FakesIteration) -> dict[str, Any]:
    from astropy.table import Table

    from oasis_core.contracts.model import Template
    from oasis_core.engine.outputs import load_output
    from oasis_core.engine.pipeline import detect
    from oasis_core.engine.sources import filter_detections, match_catalogs
    from oasis_core.engine.subtraction import residual_cards, run_subtraction

    it.workdir.mkdir(parents=True, exist_ok=True)
    try:
        science = load_output(it.science, it.science_psf)
        template = load_output(it.template, it.template_psf, cls=Template)
        fwhm = float(science.fwhm or (science.psf.fwhm if science.psf else 3.0))
        x, y, flux = (np.asarray(v, float) for v in (it.x, it.y, it.flux))
        data = inject(science.data, x, y, flux, fwhm, it.psf_model)
        science = attrs.evolve(science, data=data)
        residual = run_subtraction(
            it.subtract_backend,
            science,
            template,
            options=it.subtract_options,
            workdir=it.workdir,
            settings=it.subtract_settings,
        )
        header = residual.header.copy()
        for key, value in residual_cards(residual, science, template).items():
            header[key] = value
        residual = attrs.evolve(
            residual,
            header=header,
            name=f"{it.frame}_residual",
            science=it.frame,
            template=template.name,
            psf=science.psf,
        )
        # a residual the quality rules reject (Q below the floor: no weight left) is an
        # outcome, as in the pipeline: its fakes count, none found
        usable = bool(residual.meta.get("usable", True)) and bool((residual.weight > 0).any())
        if usable:
            found = detect(
                it.extract_backend,
                residual,
                options=it.extract_options,
                workdir=it.workdir,
                template=template.data,
            )
            others = [Table.read(p, format="ascii.ecsv") for p in it.catalogs]
            positives = [t[np.asarray(t["sign"]) > 0] for t in others]
            positives.append(found[np.asarray(found["sign"]) > 0])
            found = filter_detections(
                found, catalogs=positives, n_residuals=len(positives), **it.filters
            )
            kept = found[found["reason"] == "kept"]
        else:
            kept = Table(
                {"x": np.zeros(0), "y": np.zeros(0), "flux": np.zeros(0), "snr": np.zeros(0)}
            )
        fakes = Table(
            {
                "iteration": np.full(len(x), it.index, dtype=np.int32),
                "image": np.full(len(x), it.frame),
                "x": x,
                "y": y,
                "flux": flux,
                "mag": to_mag(flux, it.zero_point),
            }
        )
        match = match_catalogs(fakes, kept, float(it.filters["match_radius"]))
        hit = match >= 0
        fakes["detected"] = hit
        # nothing kept (the faint end) is an outcome, 0 recovered: index only the matches
        for col, name in (("flux_out", "flux"), ("snr_out", "snr")):
            values = np.full(len(x), np.nan)
            values[hit] = np.asarray(kept[name], float)[match[hit]]
            fakes[col] = values
        ix = np.clip(np.rint(x).astype(int), 0, residual.noise.shape[1] - 1)
        iy = np.clip(np.rint(y).astype(int), 0, residual.noise.shape[0] - 1)
        fakes["noise"] = residual.noise[iy, ix].astype(float)
        fakes["fwhm"] = np.full(len(x), fwhm)
        fakes["q"] = np.full(len(x), float(residual.q))
        fakes["usable"] = np.full(len(x), usable)
        fakes.meta["OASFAKES"] = it.key
        io.write_table(fakes, it.output)
    finally:
        shutil.rmtree(it.workdir, ignore_errors=True)
    return {"detected": int(hit.sum()), "n": len(x)}


def iteration_table(path: Path, key: str) -> Any:
    """The fakes of a finished iteration whose key is ``key`` (meta cleared), or None."""
    from astropy.table import Table

    if not path.exists():
        return None
    table = Table.read(path, format="ascii.ecsv")
    if table.meta.get("OASFAKES") != key:
        return None
    table.meta.clear()
    return table
