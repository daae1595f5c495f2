"""``oasis sim fakes`` on the demo target: wall time and the completeness figures.

Run: ``python benchmarks/fakes.py [--fakes 500] [--per-iteration 20] [--frames 12]
[--size 1024] [--jobs 0] [--dir /tmp/oasis-bench-fakes]``.

Simulates the demo target (as ``oasis demo``), runs the pipeline on it (not timed: a user
runs ``sim fakes`` on a target already processed), then times ``sim_fakes`` as a whole
(the copy of the target, the shared run there, which resumes, and every iteration) and
prints the 50 % / 90 % completeness fluxes against 5 sigma of the residual noise in the
PSF aperture. Nothing here is asserted by the tests; the numbers are for this machine.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fakes", type=int, default=500)
    parser.add_argument("--per-iteration", type=int, default=20)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/oasis-bench-fakes"))
    args = parser.parse_args()

    from oasis_apps.demo import simulate_target
    from oasis_apps.fakes import sim_fakes
    from oasis_core.engine.pipeline import pipeline

    target = simulate_target(
        args.dir, "demo", n_frames=args.frames, shape=(args.size, args.size), seed=1
    )
    t0 = time.perf_counter()
    pipeline(target.path, jobs=args.jobs)
    t_pipeline = time.perf_counter() - t0
    shutil.rmtree(args.dir / "OASIS" / "simulations" / "demo_fakes", ignore_errors=True)
    iterations = -(-args.fakes // args.per_iteration)
    t0 = time.perf_counter()
    result = sim_fakes(
        target.path,
        n_fakes=args.per_iteration,
        iterations=iterations,
        f_min=50,
        f_max=20000,
        flux_scale="log",
        jobs=args.jobs,
    )
    t_fakes = time.perf_counter() - t0
    print(f"pipeline on the demo target: {t_pipeline:.1f} s (not part of the figure)")
    print(f"sim fakes, {len(result.table)} fakes in {iterations} iterations: {t_fakes:.1f} s")
    print(result.line())
    print(
        f"90 % completeness / 5 sigma in the PSF aperture: "
        f"{result.flux_90 / result.flux_5sigma:.2f}; plot: {result.plot}"
    )


if __name__ == "__main__":
    main()
