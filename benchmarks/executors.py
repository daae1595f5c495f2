"""Wall time of the demo pipeline with the local executor and with Dask on 1 and 2 workers.

Run: ``python benchmarks/executors.py [--frames 12] [--size 1024] [--jobs 0]
[--scheduler tcp://host:8786]``. It simulates the demo series (``oasis demo``) into a
temporary directory once, then runs every stage on it with each executor in turn (with
``force``, so each run redoes all the work), and prints one row per stage and executor plus
the total. Dask's times include starting its local cluster (shown on its own row); with
``--scheduler`` the Dask rows use that cluster instead of local ones. The last line checks
that every executor produced the same catalog. Needs ``pip install 'oasis-dia[dask]'``.
Numbers are for this machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any


def _run(target: Path, executor: Any, label: str) -> tuple[list[tuple[str, float]], int]:
    from astropy.table import Table

    from oasis_core.contracts.backends import STAGES
    from oasis_core.engine.executor_dask import DaskExecutor
    from oasis_core.engine.pipeline import make_context, run_stages

    rows = []
    if isinstance(executor, DaskExecutor):
        t0 = time.perf_counter()
        executor.client  # noqa: B018 - starts the local cluster (or connects)
        rows.append(("startup", time.perf_counter() - t0))
    ctx = make_context(target, executor=executor, force=True)
    for stage in STAGES:
        t0 = time.perf_counter()
        run_stages(ctx, [stage])
        rows.append((stage, time.perf_counter() - t0))
    sources = Table.read(target / "sources" / "sources.ecsv", format="ascii.ecsv")
    print(f"  {label}: {sum(t for _, t in rows):.1f} s", flush=True)
    return rows, len(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=0, help="local executor processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scheduler", default="", help="dask scheduler address (optional)")
    args = parser.parse_args()

    from oasis_apps.demo import simulate_target
    from oasis_core.contracts.backends import STAGES
    from oasis_core.engine.executor import LocalExecutor
    from oasis_core.engine.executor_dask import DaskExecutor

    results: dict[str, tuple[list[tuple[str, float]], int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        target = simulate_target(
            Path(tmp), "demo", n_frames=args.frames, shape=(args.size, args.size), seed=args.seed
        ).path
        print(f"demo pipeline: {args.frames} frames of {args.size}x{args.size}", flush=True)
        local = LocalExecutor(args.jobs)
        results[f"local({local.workers})"] = _run(target, local, f"local, {local.workers} jobs")
        if args.scheduler:
            with DaskExecutor(scheduler=args.scheduler) as ex:
                results["dask(remote)"] = _run(target, ex, f"dask at {args.scheduler}")
        else:
            for n in (1, 2):
                with DaskExecutor(workers=n) as ex:
                    results[f"dask({n})"] = _run(target, ex, f"dask, {n} worker(s)")
    names = list(results)
    stages = ["startup", *STAGES]
    print(f"{'stage':<10}" + "".join(f"{n:>12}" for n in names))
    for stage in stages:
        cells = []
        for name in names:
            times = dict(results[name][0])
            cells.append(f"{times[stage]:12.2f}" if stage in times else f"{'-':>12}")
        print(f"{stage:<10}" + "".join(cells))
    totals = "".join(f"{sum(t for _, t in results[n][0]):12.2f}" for n in names)
    print(f"{'total':<10}" + totals)
    counts = {n: c for n, (_, c) in results.items()}
    same = len(set(counts.values())) == 1
    print(f"sources.ecsv rows: {counts} ({'identical counts' if same else 'DIFFERENT'})")


if __name__ == "__main__":
    main()
