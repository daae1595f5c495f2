"""False detections on a simulated null series (nothing varies), and how many lie by
bright stars: issue 14's check at a size the tests cannot afford.

Run: ``python benchmarks/null_series.py [--size 2048] [--frames 6] [--jobs 2] [--keep DIR]``.
It simulates the native simulator's series without transients, runs the whole pipeline
with the default configuration and prints the kept (hence false) detections per
megapixel per frame against ``[extract] false_per_mpix``, how many of them lie within
4 FWHM of a template star brighter than 100 times the detection threshold (at most 10 %
is the aim), and one line per false detection; then the sources kept on the master
residual and on the variability image (false too). ``tests/integration/test_null_series.py``
makes the same check on 3 frames of 256x256 with the same helpers
(:func:`oasis_apps.demo.null_false_detections`).
Numbers are for this machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    args = parser.parse_args()

    from astropy.table import Table

    from oasis_apps.demo import null_false_detections, simulate_target
    from oasis_core.engine.config import ExtractSettings
    from oasis_core.engine.pipeline import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        target = simulate_target(
            root,
            "null",
            n_frames=args.frames,
            shape=(args.size, args.size),
            seed=args.seed,
            transients=0,
        )
        pipeline(target.path, jobs=args.jobs)
        seconds = time.perf_counter() - start
        kept = null_false_detections(target)
        near = null_false_detections(target, factor=5.0, fwhms=6.0)["near"]
        others = {
            name: Table.read(target.path / "sources" / f"{name}_filtered_sources.ecsv")
            for name in ("MR", "VAR")
        }

    mpix_frames = args.frames * args.size * args.size / 1e6
    rate = ExtractSettings().false_per_mpix
    n_near = int(kept["near"].sum()) if len(kept) else 0
    print(
        f"null series: {args.frames} frames of {args.size}x{args.size}, seed {args.seed}, "
        f"jobs={args.jobs}, {seconds:.0f} s"
    )
    print(
        f"kept false detections: {len(kept)} = {len(kept) / mpix_frames:.3f} per Mpix per "
        f"frame (configured rate {rate}); within 4 FWHM of a star > 100x threshold: "
        f"{n_near} ({n_near / max(len(kept), 1):.0%}, at most 10 % wanted)"
    )
    columns = ["frame", "x", "y", "peak_norm", "threshold", "wing", "masked_frac", "extent"]
    for row, loose in zip(kept, near, strict=True):
        values = "  ".join(
            f"{c}={row[c]:.2f}" if c not in ("frame",) else str(row[c])
            for c in columns
            if c in kept.colnames
        )
        where = (
            "NEAR a star >100x threshold"
            if row["near"]
            else ("within 6 FWHM of a star >5x threshold" if loose else "away from stars")
        )
        print(f"  {values}  {where}")
    for name, table in others.items():
        image = "master residual" if name == "MR" else "variability image"
        print(f"kept on the {image} ({name}): {len(table)}")
        for row in table:
            print(f"  x={row['x']:.2f}  y={row['y']:.2f}  peak_norm={row['peak_norm']:.2f}")


if __name__ == "__main__":
    main()
