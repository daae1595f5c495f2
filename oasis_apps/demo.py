"""``oasis demo``: simulate a series, run the whole pipeline, and score it against the truth.

:func:`evaluate` is also what the tests use to check detection on simulated targets: a
transient counts as recovered in a frame when a kept source of that frame's residual lies
within ``radius`` pixels of its true position (mapped onto the template grid through the
WCS); every other kept source is a false detection.

:func:`null_false_detections` and :func:`near_bright_star` judge a run on a null series
(``simulate_target(..., transients=0)``: nothing varies, every kept source is false): how
many of its false detections lie by bright stars (issue 14's check, in
``tests/integration/test_null_series.py`` and ``benchmarks/null_series.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.get import unpack
from oasis_core.engine import io
from oasis_core.engine.lock import hold, holds_targets
from oasis_core.engine.tree import Target, init_root

__all__ = [
    "DemoResult",
    "check_demo",
    "demo_needs",
    "evaluate",
    "near_bright_star",
    "null_false_detections",
    "physical_memory",
    "run_demo",
    "simulate_target",
]

log = logging.getLogger("oasis")

#: Smallest frame side of the demo: the simulator places 8 transients away from the bright
#: stars, and the PSF and alignment stages need stars.
MIN_SIZE = 256

#: Fewest frames: the pipeline's default ``[run] min_frames``.
MIN_FRAMES = 3

#: What the demo needs, measured with ``oasis demo -j 1`` at 512 and 1024 px (peak
#: resident memory 257 and 470 MB with 6 frames, 499 MB with 12), with a margin: the
#: interpreter and its libraries, bytes per pixel for each process working on one frame,
#: and per pixel of each frame held at once (the simulated series, the template's stack).
BASE_BYTES = 250 * 2**20
WORKER_BYTES_PER_PIXEL = 320
FRAME_BYTES_PER_PIXEL = 16

#: Disk bytes per pixel of each frame (the simulation, data/ and every stage's outputs:
#: about 60 measured).
DISK_BYTES_PER_PIXEL = 80


def physical_memory() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def demo_needs(n_frames: int, shape: tuple[int, int], workers: int) -> tuple[int, int]:
    """(memory, disk) bytes a demo of ``n_frames`` frames of ``shape`` needs with
    ``workers`` worker processes (estimates, see the module constants).

    Examples
    --------
    >>> mem, disk = demo_needs(12, (1024, 1024), 1)
    >>> round(mem / 2**20), round(disk / 2**20)
    (762, 960)
    """
    pixels = int(shape[0]) * int(shape[1])
    processes = 1 if workers <= 1 else workers + 1  # the workers and the main process
    memory = BASE_BYTES + pixels * (
        WORKER_BYTES_PER_PIXEL * processes + FRAME_BYTES_PER_PIXEL * n_frames
    )
    return memory, pixels * DISK_BYTES_PER_PIXEL * n_frames


def _size(n: float) -> str:
    n = float(min(n, 2**100))  # an absurd request stays printable
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def check_demo(
    directory: Path,
    *,
    n_frames: int,
    shape: tuple[int, int],
    seed: int = 0,
    jobs: int | None = None,
) -> None:
    """Refuse, in one line and before anything is written, a demo that cannot run: too
    few frames, frames too small, a bad ``seed`` or ``jobs``, or more memory than the machine has or
    more disk than is free.

    Raises
    ------
    InputError
        Naming the parameter (``frames``, ``size``, ``seed``, ``jobs``), its value and its
        range, or what the demo needs and what there is.
    """
    import math
    import os
    import shutil

    from oasis_core.contracts.errors import InputError
    from oasis_core.contracts.validators import integer
    from oasis_core.engine.config import RunSettings

    where = "oasis demo"
    integer(MIN_FRAMES).require(n_frames, "frames", where)
    try:
        ny, nx = shape
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: shape = {shape!r}: must be two integers (ny, nx)") from err
    for side in (ny, nx):
        integer(MIN_SIZE).require(side, "size", where)
    integer(0).require(seed, "seed", where)
    if jobs is not None:
        check = attrs.fields(RunSettings).jobs.metadata["check"]  # [run] jobs' own range
        check.require(jobs, "jobs", where)
    workers = min(jobs or os.cpu_count() or 1, n_frames)
    memory, disk = demo_needs(n_frames, (ny, nx), workers)
    have = physical_memory()
    if have is not None and memory > have:
        per_pixel = (memory - BASE_BYTES) / (ny * nx)
        largest = math.isqrt(max(int((have - BASE_BYTES) / per_pixel), 0))
        hint = f"use --size {largest} or less" if largest >= MIN_SIZE else "use fewer --frames"
        raise InputError(
            f"{where}: --size {nx} with --frames {n_frames} and {workers} worker(s) needs "
            f"about {_size(memory)} of memory; this machine has {_size(have)}: {hint}"
        )
    existing = Path(directory).resolve()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if disk > free:
        raise InputError(
            f"{where}: --size {nx} with --frames {n_frames} needs about {_size(disk)} of "
            f"disk; {existing} has {_size(free)} free: use a smaller --size or fewer --frames"
        )


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
    transients: int | None = None,
) -> Target:
    """Simulate a series into ``root/OASIS/simulations/name`` and unpack it into a target.

    The truth table is saved as ``OASIS/simulations/<name>/truth.ecsv``. ``transients``
    is the simulator's number of transients (None: its default; 0: a null series, where
    nothing varies).
    """
    from oasis_core.engine.plugins import Registry

    registry = registry or Registry()
    base = init_root(root)
    sim_dir = base / "simulations" / name
    truth_path = sim_dir / "truth.ecsv"
    if not truth_path.exists():
        truth = registry.simulator(simulator).simulate(
            sim_dir / "frames", n_frames=n_frames, shape=shape, seed=seed, transients=transients
        )
        io.write_table(truth, truth_path)
    target = Target(base / "targets" / name).create()
    if not any(target.data.iterdir()):
        unpack([sim_dir / "frames"], target)
    _ensure_config(target, registry)
    return target


def _ensure_config(target: Target, registry: Any) -> None:
    from oasis_core.engine.config import render_config

    if not target.config_file.exists():
        io.write_text(target.config_file, render_config(registry))


def evaluate(
    target: Target, truth: Any, *, radius: float = 2.0, min_snr: float = 10.0
) -> DemoResult:
    """Score a finished run of ``target`` against the simulation's ``truth`` table."""
    from astropy.io import fits
    from astropy.table import Table

    from oasis_core.engine.outputs import usable_residuals
    from oasis_core.engine.pipeline import make_context

    ctx = make_context(target.path)
    good, _ = usable_residuals(ctx)
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


def near_bright_star(
    target: Path | Target, row: Any, *, factor: float = 100.0, fwhms: float = 4.0
) -> bool:
    """Whether a source (a catalog ``row``: ``frame``, ``x``, ``y``, ``fwhm``,
    ``threshold``) lies within ``fwhms`` FWHM of a template star whose peak above the
    template's median is ``factor`` times the row's detection threshold, in the noise of
    the row's residual: the stars whose imperfect subtraction a null series' false
    detections gather around, when they do (issue 14's check).
    """
    from scipy.ndimage import maximum_filter

    path = target.path if isinstance(target, Target) else Path(target)
    template = io.read_frame(path / "templates" / "template.fits").data
    stars = template - np.median(template)
    residual = io.read_residual(path / "residuals" / f"{row['frame']}_residual.fits")
    noise = float(np.median(residual.noise[residual.weight > 0]))
    bright = (stars == maximum_filter(stars, 5)) & (stars > factor * row["threshold"] * noise)
    ys, xs = np.nonzero(bright)
    return bool((np.hypot(xs - row["x"], ys - row["y"]) <= fwhms * row["fwhm"]).any())


def null_false_detections(
    target: Path | Target, *, factor: float = 100.0, fwhms: float = 4.0
) -> Any:
    """The kept sources of a finished run on a null series (nothing varies, so every one
    is false), with a column ``near``: :func:`near_bright_star` of each."""
    from astropy.table import Table

    path = target.path if isinstance(target, Target) else Path(target)
    sources = Table.read(path / "sources" / "sources.ecsv")
    kept = sources[sources["reason"] == "kept"]
    kept["near"] = [near_bright_star(path, r, factor=factor, fwhms=fwhms) for r in kept]
    return kept


@holds_targets
def run_demo(
    directory: Path,
    *,
    n_frames: int = 12,
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 1,
    **pipeline_kwargs: Any,
) -> DemoResult:
    """Simulate ``n_frames`` frames, run the pipeline on them and score the result.

    Raises
    ------
    InputError
        Before anything is written: ``n_frames``, ``shape``, ``seed`` or ``jobs`` out of
        range, or a demo too large for this machine's memory or for the free disk space
        (see :func:`check_demo`).
    """
    from astropy.table import Table

    from oasis_core.engine.pipeline import pipeline

    jobs = pipeline_kwargs.get("jobs")
    check_demo(Path(directory), n_frames=n_frames, shape=shape, seed=seed, jobs=jobs)
    hold(init_root(Path(directory)) / "targets" / "demo")  # one run per target, until the end
    target = simulate_target(Path(directory), "demo", n_frames=n_frames, shape=shape, seed=seed)
    pipeline(target.path, **pipeline_kwargs)
    truth = Table.read(
        target.path.parent.parent / "simulations" / "demo" / "truth.ecsv", format="ascii.ecsv"
    )
    return evaluate(target, truth)
