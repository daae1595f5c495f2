"""``oasis demo``: simulate a series, run the whole pipeline, and score it against the truth.

:func:`evaluate` is also what the tests use to check detection on simulated targets: a
transient counts as recovered in a frame when a kept source of that frame's residual lies
within ``radius`` pixels of its true position (mapped onto the template grid through the
WCS); every other kept source is a false detection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core import io
from oasis_core.get import unpack
from oasis_core.tree import Target, init_root

__all__ = ["DemoResult", "evaluate", "run_demo", "simulate_target"]

log = logging.getLogger("oasis")


@attrs.frozen
class DemoResult:
    """The one-line result of a demo or a simulated run."""

    target: Path
    frames_used: int
    mean_q: float
    detections: int
    recovered: int
    recoverable: int
    false_per_frame: Mapping[str, int]

    @property
    def max_false(self) -> int:
        return max(self.false_per_frame.values(), default=0)

    def line(self) -> str:
        return (
            f"{self.frames_used} frames used, mean Q {self.mean_q:.3f}, "
            f"{self.detections} detections, {self.recovered}/{self.recoverable} injected "
            f"transients (peak S/N >= 10) recovered, at most {self.max_false} false "
            "detection(s) per frame"
        )


def simulate_target(
    root: Path,
    name: str,
    *,
    n_frames: int,
    shape: tuple[int, int],
    seed: int,
    simulator: str = "native",
    registry: Any = None,
) -> Target:
    """Simulate a series into ``root/OASIS/simulations/name`` and unpack it into a target.

    The truth table is saved as ``OASIS/simulations/<name>/truth.ecsv``.
    """
    from oasis_core.plugins import Registry

    registry = registry or Registry()
    base = init_root(root)
    sim_dir = base / "simulations" / name
    truth_path = sim_dir / "truth.ecsv"
    if not truth_path.exists():
        truth = registry.simulator(simulator).simulate(
            sim_dir / "frames", n_frames=n_frames, shape=shape, seed=seed
        )
        io.write_table(truth, truth_path)
    target = Target(base / "targets" / name).create()
    if not any(target.data.iterdir()):
        unpack([sim_dir / "frames"], target)
    _ensure_config(target, registry)
    return target


def _ensure_config(target: Target, registry: Any) -> None:
    from oasis_core.config import render_config

    if not target.config_file.exists():
        io.write_text(target.config_file, render_config(registry))


def evaluate(
    target: Target, truth: Any, *, radius: float = 2.0, min_snr: float = 10.0
) -> DemoResult:
    """Score a finished run of ``target`` against the simulation's ``truth`` table."""
    from astropy.io import fits
    from astropy.table import Table

    from oasis_core.pipeline import _residuals, make_context

    ctx = make_context(target.path)
    good, _ = _residuals(ctx)
    template = ctx.target.stage_dir("combine") / "template.fits"
    wcs = io.header_wcs(fits.getheader(template))
    src_path = ctx.target.stage_dir("extract") / "filtered_sources.ecsv"
    kept = (
        Table.read(src_path, format="ascii.ecsv")
        if src_path.exists()
        else Table(names=("frame", "x", "y"))
    )
    truth = truth[[str(f) in set(good) for f in truth["frame"]]]
    if len(truth) and wcs is not None:
        tx, ty = wcs.all_world2pix(np.asarray(truth["ra"]), np.asarray(truth["dec"]), 0)
    else:
        tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    recovered = 0
    recoverable = 0
    false_per_frame: dict[str, int] = {}
    qs = [
        float(
            fits.getheader(ctx.target.stage_dir("subtract") / f"{n}_residual.fits").get(
                "OASQ", np.nan
            )
        )
        for n in good
    ]
    for name in good:
        rows = np.flatnonzero(np.asarray(truth["frame"]).astype(str) == name)
        det = kept[np.asarray(kept["frame"]).astype(str) == name] if len(kept) else kept
        dx = np.asarray(det["x"], float)[None, :] - tx[rows][:, None]
        dy = np.asarray(det["y"], float)[None, :] - ty[rows][:, None]
        close = np.hypot(dx, dy) <= radius
        bright = np.asarray(truth["peak_snr"], float)[rows] >= min_snr
        recoverable += int(bright.sum())
        recovered += int((close.any(axis=1) & bright).sum())
        false_per_frame[name] = int((~close.any(axis=0)).sum()) if len(det) else 0
    return DemoResult(
        target=target.path,
        frames_used=len(good),
        mean_q=float(np.nanmean(qs)) if qs else float("nan"),
        detections=len(kept),
        recovered=recovered,
        recoverable=recoverable,
        false_per_frame=false_per_frame,
    )


def run_demo(
    directory: Path,
    *,
    n_frames: int = 12,
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 1,
    **pipeline_kwargs: Any,
) -> DemoResult:
    """Simulate ``n_frames`` frames, run the pipeline on them and score the result."""
    from astropy.table import Table

    from oasis_core.pipeline import pipeline

    target = simulate_target(Path(directory), "demo", n_frames=n_frames, shape=shape, seed=seed)
    pipeline(target.path, **pipeline_kwargs)
    truth = Table.read(
        target.path.parent.parent / "simulations" / "demo" / "truth.ecsv", format="ascii.ecsv"
    )
    return evaluate(target, truth)
