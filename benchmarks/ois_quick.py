"""Time and peak memory of one ``ois`` subtraction of a synthetic 2048x2048 pair.

Not a test (no asserts on speed): run ``python benchmarks/ois_quick.py [size]`` and
compare with hotpants (~4 s, < 1 GB on the same size). Also times the optimisation
candidates (:mod:`oasis_ois.optimise`) and lists them with their cost. The pair: ~3000 Moffat stars,
template FWHM 3 px, science FWHM 4 -> 5 px across the field, flux scale 1.2, a sloped
differential background, sky-subtracted, Poisson-like noise.
"""

from __future__ import annotations

import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from oasis_ois.backend import OisOptions, OisSubtract
from oasis_ois.optimise import configuration_cost, describe_configuration

from oasis_core.contracts.model import Frame, Template


def _render(shape, x, y, flux, fwhm, beta=3.5, radius=15):  # type: ignore[no-untyped-def]
    fwhm = np.broadcast_to(np.asarray(fwhm, float), x.shape)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    off = np.arange(-radius, radius + 1)
    img = np.zeros(shape, np.float32)
    for lo in range(0, x.size, 1000):  # chunks of stars keep the stamp stack small
        sl = slice(lo, lo + 1000)
        px = ix[sl, None, None] + off[None, None, :]
        py = iy[sl, None, None] + off[None, :, None]
        r2 = (px - x[sl, None, None]) ** 2 + (py - y[sl, None, None]) ** 2
        alpha = fwhm[sl] / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        prof = (1.0 + r2 / alpha[:, None, None] ** 2) ** (-beta)
        prof *= (flux[sl] / prof.sum(axis=(1, 2)))[:, None, None]
        inside = (px >= 0) & (px < shape[1]) & (py >= 0) & (py < shape[0])
        pyb, pxb = np.broadcast_arrays(py, px)
        np.add.at(img, (pyb[inside], pxb[inside]), prof[inside].astype(np.float32))
    return img


def make_pair(n: int = 2048, nstars: int = 3000, seed: int = 3) -> tuple[Frame, Template]:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, n - 1, nstars), rng.uniform(0, n - 1, nstars)
    flux = 10 ** rng.uniform(3.0, 5.0, nstars)
    tpl = _render((n, n), x, y, flux, 3.0)
    sci = 1.2 * _render((n, n), x, y, flux, 4.0 + x / n)
    xx = np.arange(n, dtype=np.float32)[None, :]
    sci += 30.0 + 10.0 * xx / n
    sci += rng.standard_normal((n, n), np.float32) * np.sqrt((1000 + np.maximum(sci, 0)) / 4)
    tpl += rng.standard_normal((n, n), np.float32) * np.sqrt((300 + tpl) / 4)
    return Frame(data=sci, name="sci", gain=4.0), Template(data=tpl, name="tpl", gain=4.0)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    sci, tpl = make_pair(n)
    for a in (sci.data, sci.weight, tpl.data, tpl.weight):
        a.flags.writeable = False
    backend = OisSubtract()
    backend.subtract(sci, tpl, options=OisOptions(), workdir=Path("."))  # warm-up (imports)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t0 = time.perf_counter()
    res = backend.subtract(sci, tpl, options=OisOptions(), workdir=Path("."))
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{n}x{n}: {dt:.2f} s, peak numpy allocations {peak / 2**20:.0f} MiB "
        f"(inputs {4 * sci.data.nbytes / 2**20:.0f} MiB not included), "
        f"process max RSS {rss1:.0f} MiB (before: {rss0:.0f} MiB)"
    )
    print(dict(res.meta))
    # the optimisation ladder (the core calls it once per frame when [subtract] optimize)
    t0 = time.perf_counter()
    candidates = list(backend.candidates(sci, tpl, options=OisOptions()))
    print(
        f"candidates: {len(candidates)} in {time.perf_counter() - t0:.2f} s "
        "(FWHMs measured: the frames carry none)"
    )
    for opts in candidates:
        print(f"  cost {configuration_cost(opts):.2e}  {describe_configuration(opts)}")


if __name__ == "__main__":
    main()
