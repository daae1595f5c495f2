"""Fakes in a comparison (``oasis compare --fakes``, :mod:`oasis_apps.compare`): the same
fakes injected once into the shared aligned frames, every combination run on them,
completeness and false detections per combination.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.compare_choices import Combination
from oasis_apps.compare_stages import (
    Stars,
    combination_context,
    kept_sources,
    link,
    run_downstream,
    subtract_all,
    variant,
)
from oasis_apps.compare_tables import make_table
from oasis_core.engine import io, outputs

__all__ = ["run_fakes"]


def _sky_sigma(data: np.ndarray, weight: np.ndarray) -> float:
    good = data[(weight > 0) & np.isfinite(data)]
    if good.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(good - np.median(good))))


def _inject_shared(base: Any, n: int, seed: int) -> tuple[Path, Any]:
    """Write ``compare/fakes/aligned/*.fits`` (the aligned frames with ``n`` fakes each)
    and ``compare/fakes/fakes.ecsv`` once; reuse them when made with the same inputs."""
    from astropy.io import fits
    from astropy.table import Table, vstack

    from oasis_apps.fakes_inject import (
        APERTURE_FWHM,
        draw_fluxes,
        fake_positions,
        inject,
        weight_map,
    )

    names = outputs.aligned_frames(base)
    align_dir = base.target.stage_dir("align")
    template = outputs.template_path(base)
    fake_dir = base.target.path / "compare" / "fakes"
    table_path = fake_dir / "fakes.ecsv"
    inputs = {n_: io.sha256(align_dir / f"{n_}.fits")[:16] for n_ in names}
    key = hashlib.sha256(
        json.dumps(
            {"n": n, "seed": seed, "inputs": inputs, "provenance": 1}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    if table_path.exists():
        old = Table.read(table_path, format="ascii.ecsv")
        if old.meta.get("OASFAKES") == key and all(
            (fake_dir / "aligned" / f"{n_}.fits").exists() for n_ in names
        ):
            return fake_dir, old
    template_weight = weight_map(template)
    tables = []
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])
        frame = io.read_output_frame(align_dir / f"{name}.fits")
        fwhm = float(fits.getheader(outputs.psf_path(base, name)).get("FWHM", 3.0))
        weight = np.minimum(frame.weight, template_weight)
        xs, ys = fake_positions(rng, weight, n, fwhm)
        sigma = _sky_sigma(frame.data, weight)
        f5 = 5.0 * sigma * np.sqrt(np.pi) * APERTURE_FWHM * fwhm
        flux = draw_fluxes(rng, len(xs), "flux", 0.5 * f5, 20.0 * f5, "log", 25.0)
        data = inject(frame.data, xs, ys, flux, fwhm, "moffat")
        # the aligned frame's provenance (what it was made from) plus the fakes: the
        # pipeline uses an aligned frame only when its recorded inputs are current
        original = fits.getheader(align_dir / f"{name}.fits")
        cards = {k: original[k] for k in original if k.startswith(("OASIN", "OASREF"))}
        cards["OASFAKES"] = (len(xs), "fakes injected by oasis compare")
        io.write_frame(
            fake_dir / "aligned" / f"{name}.fits",
            attrs.evolve(frame, data=data),
            header_extra=cards,
        )
        tables.append(
            Table(
                {
                    "frame": np.full(len(xs), name),
                    "x": xs,
                    "y": ys,
                    "flux": flux,
                    "snr5_flux": np.full(len(xs), f5),
                }
            )
        )
    table = vstack(tables)
    table.meta["OASFAKES"] = key
    io.write_table(table, table_path)
    return fake_dir, table


def run_fakes(
    base: Any,
    runnable: Sequence[Combination],
    common: Mapping[str, Any],
    stars: Stars,
    n: int,
    seed: int,
    path: Any,
) -> Any:
    from oasis_apps.fakes_efficiency import efficiency_limits
    from oasis_core.engine.sources import match_catalogs

    fake_dir, truth = _inject_shared(base, n, seed)
    template_dir = outputs.template_path(base).parent
    radius = base.config.settings["extract"].match_radius
    measured: dict[tuple[str, str], dict[str, Any]] = {}
    first_dir: dict[str, Path] = {}
    rows = []
    for combo in runnable:
        ctx = variant(combination_context(path, combo, common), f"{combo.name}/fakes", "align")
        for f in (fake_dir / "aligned").glob("*.fits"):
            link(f, ctx.target.stage_dir("align") / f.name)
        for f in template_dir.iterdir():
            if f.is_file() and not f.name.startswith("."):
                link(f, ctx.target.stage_dir("combine") / f.name)
        choice = combo.backends.get("subtract") or ctx.config.backend("subtract")
        label = attrs.evolve(combo, name=f"{combo.name} (fakes)")
        subtract_all(ctx, label, stars, measured, first_dir.get(choice))
        first_dir.setdefault(choice, ctx.target.stage_dir("subtract"))
        run_downstream(ctx, f"{combo.name} (fakes)")
        kept, _ = kept_sources(ctx)
        frames = np.asarray(kept["frame"]).astype(str) if len(kept) else np.array([], str)
        found = np.zeros(len(truth), bool)
        false = 0
        tframes = np.asarray(truth["frame"]).astype(str)
        for name in np.unique(tframes):
            rows_t = np.flatnonzero(tframes == name)
            det = kept[frames == name]
            found[rows_t] = match_catalogs(truth[rows_t], det, radius) >= 0
            false += int(np.sum(match_catalogs(det, truth[rows_t], radius) < 0))
        f50, f90 = efficiency_limits(np.asarray(truth["flux"], float), found)
        rows.append(
            {
                "combination": combo.name,
                "injected": len(truth),
                "detected": int(found.sum()),
                "completeness": float(found.mean()) if len(found) else np.nan,
                "flux_50": f50,
                "flux_90": f90,
                "false": false,
            }
        )
    columns = [
        ("combination", str),
        ("injected", int),
        ("detected", int),
        ("completeness", float),
        ("flux_50", float),
        ("flux_90", float),
        ("false", int),
    ]
    table = make_table(rows, columns)
    table["flux_50"].info.format = ".4g"
    table["flux_90"].info.format = ".4g"
    return table
