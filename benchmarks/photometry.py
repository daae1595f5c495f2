"""Forced photometry of 1,000 positions on 100 residuals of 1024x1024: the time.

Run: ``python benchmarks/photometry.py [--frames 100] [--size 1024] [--positions 1000]
[--jobs 2] [--no-files]``. Two measures:

- *in memory*: the native backend (:class:`oasis_native.photometry.NativePhotometry`,
  with its error calibration at 400 random positions) and the residual's PSF (the
  template PSF convolved with the kernel) on residuals already in memory, in this
  process;
- *stage tasks*: the photometry stage's per-residual task
  (:func:`oasis_core.engine.photometry.task`: read the residual FITS with its ``NOISE``,
  ``WEIGHT`` and ``KERNEL`` extensions, build its PSF, fit, write its table with its
  provenance) on residual files in a temporary directory, through the local executor
  with ``--jobs`` worker processes (the target is <= 10 s on 2 cores).

The residuals are noise with 1,000 PSF sources of random flux; the script checks the fluxes
against the truth (median pull) so a fast wrong answer does not pass. Numbers are for this
machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _moffat(fwhm: float, half: int = 15, beta: float = 3.0) -> np.ndarray:
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    psf = (1 + (x**2 + y**2) / alpha**2) ** -beta
    return psf / psf.sum()


def _residuals(n_frames: int, size: int, xy: np.ndarray, flux: np.ndarray, seed: int) -> Any:
    """Yield (residual, truth flux) for each frame: sky noise plus the sources' difference
    flux convolved to the frame's PSF (a template PSF of FWHM 3 and a Gaussian kernel)."""
    from scipy.signal import fftconvolve

    from oasis_core.contracts.model import KernelSolution, Residual

    rng = np.random.default_rng(seed)
    template_psf = _moffat(3.0)
    ix, iy = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    for k in range(n_frames):
        sigma_k = rng.uniform(0.5, 1.5)
        ky, kx = np.mgrid[-8:9, -8:9]
        kernel = np.exp(-(kx**2 + ky**2) / (2 * sigma_k**2))
        kernel /= kernel.sum()
        psf = fftconvolve(template_psf, kernel, mode="full")
        change = flux * rng.normal(0, 0.3, len(flux))
        image = np.zeros((size, size))
        np.add.at(image, (iy, ix), change)  # sources on pixel centres
        image = fftconvolve(image, psf, mode="same")
        noise = 10.0
        image += rng.normal(0, noise, image.shape)
        yield (
            Residual(
                data=image.astype(np.float32),
                noise=np.full(image.shape, noise, np.float32),
                weight=np.ones(image.shape, np.float32),
                name=f"frame_{k:03d}_residual",
                kernel=KernelSolution(image=kernel.astype(np.float32), direction="template"),
            ),
            change,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-files", action="store_true", help="only the in-memory measure")
    args = parser.parse_args()

    from astropy.table import Table
    from oasis_native.photometry import NativePhotometry

    from oasis_core.contracts.model import PsfModel
    from oasis_core.engine import io
    from oasis_core.engine.photometry import residual_psf

    rng = np.random.default_rng(args.seed)
    margin = 20
    xy = np.rint(rng.uniform(margin, args.size - margin, (args.positions, 2)))
    flux = rng.uniform(2000, 20000, args.positions)
    template_psf = PsfModel(image=_moffat(3.0), fwhm=3.0)
    backend = NativePhotometry()
    options = backend.Options()

    print(f"{args.frames} residuals of {args.size}x{args.size}, {args.positions} positions")
    spent, pulls = 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        files = []
        for residual, truth in _residuals(args.frames, args.size, xy, flux, args.seed):
            t0 = time.perf_counter()
            psf = residual_psf(residual, template_psf, None)
            table = backend.photometry(residual, xy, psf=psf, options=options, workdir=tmpdir)
            spent += time.perf_counter() - t0
            pulls.append((np.asarray(table["flux"]) - truth) / np.asarray(table["flux_err"]))
            if not args.no_files:
                path = tmpdir / f"{residual.name}.fits"
                io.write_residual(path, residual)
                files.append(path)
        pull = np.concatenate(pulls)
        print(
            f"  in memory: {spent:.2f} s ({1000 * spent / args.frames:.1f} ms a frame); "
            f"pulls: median {np.median(pull):+.3f}, robust scatter "
            f"{1.4826 * np.median(np.abs(pull - np.median(pull))):.3f}"
        )
        if args.no_files:
            return
        io.write_psf(tmpdir / "template.psf.fits", template_psf)
        positions = Table({"source_id": np.arange(1, len(xy) + 1), "x": xy[:, 0], "y": xy[:, 1]})
        io.write_table(positions, tmpdir / "positions.ecsv")
        _stage_tasks(tmpdir, files, backend, options, args.jobs, positions)


def _stage_tasks(
    tmpdir: Path, files: list[Path], backend: Any, options: Any, jobs: int, positions: Any
) -> None:
    from oasis_core.engine.executor import LocalExecutor
    from oasis_core.engine.provenance import Provenance
    from oasis_core.engine.tasks import Task, run_task

    out = tmpdir / "frames"
    out.mkdir()
    todo = []
    for path in files:
        inputs = {
            "residual": path,
            "template_psf": tmpdir / "template.psf.fits",
            "positions": tmpdir / "positions.ecsv",
        }
        prov = Provenance(
            stage="photometry", backend=backend.name, plugin="bench", inputs=inputs, options=options
        )
        task = Task(
            stage="photometry",
            name=path.stem,
            backend=backend,
            options=options,
            inputs=inputs,
            output=out / f"{path.stem}.fits",
            provenance=prov,
            workdir=tmpdir / "work" / path.stem,
            extra={c: np.asarray(positions[c]) for c in ("source_id", "x", "y")},
        )
        todo.append((task.name, task))
    executor = LocalExecutor(jobs)
    try:
        list(executor.run(run_task, todo[:jobs]))  # start the workers (imports) first
        t0 = time.perf_counter()
        outcomes = list(executor.run(run_task, todo))
        spent = time.perf_counter() - t0
    finally:
        executor.close()
    failed = [o.key for o in outcomes if not o.ok]
    print(
        f"  stage tasks ({jobs} worker processes; read FITS, PSF, fit, write the FITS table): "
        f"{spent:.2f} s for {len(todo)} residuals"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )


if __name__ == "__main__":
    main()
