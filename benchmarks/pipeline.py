"""Wall time and peak memory of the demo pipeline (``oasis demo``), stage by stage.

Run: ``python benchmarks/pipeline.py [--frames 12] [--size 1024] [--jobs 0]``. It
simulates the demo series into a temporary directory, runs the whole pipeline with the
local executor and prints one row per stage (wall seconds) plus the total, the peak
resident memory of the main process, and the demo's score.
Numbers are for this machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from astropy.table import Table

    from oasis_apps.demo import evaluate, simulate_target
    from oasis_core.contracts.backends import STAGES
    from oasis_core.engine.pipeline import make_context, run_stages

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        target = simulate_target(
            Path(tmp), "demo", n_frames=args.frames, shape=(args.size, args.size), seed=args.seed
        )
        simulated = time.perf_counter() - start
        ctx = make_context(target.path, jobs=args.jobs)
        rows = [("simulate", simulated)]
        for stage in STAGES:
            t0 = time.perf_counter()
            run_stages(ctx, [stage])
            rows.append((stage, time.perf_counter() - t0))
        truth = Table.read(Path(tmp) / "OASIS" / "simulations" / "demo" / "truth.ecsv")
        result = evaluate(target, truth)
    total = sum(t for _, t in rows)
    print(
        f"demo pipeline: {args.frames} frames of {args.size}x{args.size}, "
        f"jobs={ctx.config.run.jobs or 'all cores'}"
    )
    print(f"{'stage':<10} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<10} {seconds:8.2f}")
    print(f"{'total':<10} {total:8.2f}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # workers are children of the fork server, not of this process: not counted here
    print(f"peak RSS of the main process: {own:.0f} MiB")
    print(f"result: {result.line()}")


if __name__ == "__main__":
    main()
