"""The issue's same-field figure: false detections per frame for modes moffat, gauss, sky.

Run: ``python benchmarks/samefield.py [--frames 30] [--modes moffat,gauss,sky]
[--frame PATH] [--section X0,Y0,NX,NY] [--jobs 2]``. The real frame (default: the
ProperImage frame of ``../shared/data``, read in place; ``--section`` renders from a part
of it, written to the temporary directory) gives the sources; for each mode
:func:`oasis_apps.samefield.sim_same_field` renders the frames with the issue's default
parameters in a temporary directory and runs the pipeline. One row per mode: frames used,
mean and maximum false detections per frame, the time to render the frames and the
total. Numbers are for this machine; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _section(src: Path, dest: Path, spec: str) -> Path:
    import numpy as np
    from astropy.io import fits

    x0, y0, nx, ny = (int(v) for v in spec.split(","))
    with fits.open(src) as hdul:
        data = np.asarray(hdul[0].data[y0 : y0 + ny, x0 : x0 + nx], np.float32)
        header = hdul[0].header.copy()
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    header.setdefault("SATURATE", 65535.0)
    fits.PrimaryHDU(data, header).writeto(dest)
    return dest


class _Clock:
    """A reporter that notes when each progress block (``render``, the stages) ends."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: dict[str, float] = {}

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None
        self.ends.setdefault(label, time.perf_counter() - self.start)

    def result(self, text: str) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--modes", default="moffat,gauss,sky")
    parser.add_argument(
        "--frame", type=Path, default=SHARED / "properimage_null" / "aligned_eso085-030-004.fit"
    )
    parser.add_argument("--section", default="", help="x0,y0,nx,ny of the real frame")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from oasis_apps.samefield import sim_same_field

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        frame = args.frame
        if args.section:
            frame = _section(frame, Path(tmp) / f"{frame.stem}_section.fits", args.section)
        for mode in args.modes.split(","):
            root = Path(tmp) / mode
            root.mkdir()
            clock = _Clock()
            cwd = os.getcwd()
            os.chdir(root)  # the simulation goes to ./OASIS/simulations
            try:
                result = sim_same_field(
                    frame.resolve(),
                    numIms=args.frames,
                    mode=mode,
                    seed=args.seed,
                    jobs=args.jobs,
                    reporter=clock,
                )
            finally:
                os.chdir(cwd)
            total = time.perf_counter() - clock.start
            rows.append((mode, result, clock.ends.get("render", float("nan")), total))
            print(result.line(), flush=True)
    print(f"\nsame-field: {args.frames} frames from {args.frame.name} {args.section}")
    print(f"{'mode':<8} {'used':>4} {'mean':>6} {'max':>4} {'render s':>9} {'total s':>8}")
    for mode, result, render, total in rows:
        print(
            f"{mode:<8} {len(result.false_per_frame):>4} {result.mean_false:6.2f} "
            f"{result.max_false:>4} {render:9.1f} {total:8.1f}"
        )


if __name__ == "__main__":
    main()
