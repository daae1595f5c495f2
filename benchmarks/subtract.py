"""Subtraction benchmark: every available subtract backend on the same simulated pairs.

Run: ``python benchmarks/subtract.py [--sizes 1024 2048 4096] [--ratios 1.4]
[--ratio-size 2048 --extra-ratios 1.1 1.8] [--seed 3]``.

Each pair comes from the project's simulator (``oasis_native.sim.simulate_pair``): a star
field and a galaxy through Moffat PSFs whose FWHM varies by 10 % across the chip, the
science seeing ``ratio`` times the template's (3 px), transients in the science frame.
Every backend is run the way a user runs it, as a whole process (imports included):
``oasis subtract-pair SCI TPL OUT --method NAME``; when the ``hotpants`` program is on
PATH it is also run bare, on the same pair, in the same table. Columns:

* ``wall s``: wall time of the process; ``peak MiB``: its peak resident memory
  (GNU ``time``; for ``--method hotpants`` the program is a grandchild, not counted);
* ``bg noise``: robust std of residual / noise away from sources (1.0 = the noise image
  is right);
* ``star rms``: normalised RMS inside 1-FWHM apertures on bright unsaturated stars, the
  standard figure of subtraction quality (1.0 = noise-limited; lower is better), each
  backend's residual divided by its own noise image;
* ``star/bg``: ``star rms`` / ``bg noise``: the same figure against the scatter the
  backend actually left in the background, so that a noise image that is too high (which
  lowers ``star rms``) does not flatter a backend;
* ``bg (common)`` and ``star rms (common)``: ``bg noise`` and ``star rms`` with every
  backend's residual divided by ONE noise image, the same for all the backends on a
  pair, so that no backend's own noise image (too high or too low) enters the figure.
  It is the noise of the difference from the simulation's known noise model: each
  frame's variance ``max(data, 0) / GAIN + (RDNOISE / GAIN)**2`` (the simulated frames
  keep their sky; GAIN and RDNOISE from the simulator's headers, the template's
  including its depth), the variance of the image with the narrower PSF (the template
  for ratios >= 1) convolved with ``K**2``, plus the other image's. ``K`` is the exact
  matching kernel between the two simulated PSFs at the chip centre (sampled Moffats
  of the headers' ``SIMFWHM`` and ``SIMBETA``, by Fourier division). ``star rms
  (common)`` is the column to compare backends by (1.0 = noise-limited, lower is
  better); ``bg (common)`` near 1.0 says the model describes the background the backend
  left (a kernel smoother than ``K`` leaves less template noise, a little below 1).
* ``flux``: recovered / injected flux of the transients with peak S/N >= 20 (aperture
  of 4 FWHM, local background);
* ``Q``: OasisPy's quality figure.

Nothing here is asserted by the tests; the numbers are for this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_pair(size: int, ratio: float, seed: int, directory: Path):  # type: ignore[no-untyped-def]
    from astropy.io import fits
    from oasis_native.sim import simulate_pair

    (sci, sh), (tpl, th), truth = simulate_pair(
        (size, size),
        seed=seed,
        fwhm_science=3.0 * ratio,
        fwhm_template=3.0,
        transients=max(6, size // 128),
        psf_gradient=0.1,
        template_depth=4.0,
        sky_subtracted=False,
    )
    paths = directory / f"sci_{size}_{ratio}.fits", directory / f"tpl_{size}_{ratio}.fits"
    fits.PrimaryHDU(sci, sh).writeto(paths[0], overwrite=True)
    fits.PrimaryHDU(tpl, th).writeto(paths[1], overwrite=True)
    return paths, truth, 3.0 * ratio


def timed(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd``; return wall seconds, peak RSS (MiB), exit code and stderr's tail.

    The peak comes from GNU time when it is installed (``/usr/bin/time -f %M``): a forked
    child's own ``ru_maxrss`` would include this script's memory at the fork.
    """
    gnu_time = shutil.which("time") if Path("/usr/bin/time").exists() else None
    report = Path(tempfile.mktemp(suffix=".rss"))
    full = [gnu_time, "-q", "-f", "%M", "-o", str(report), *cmd] if gnu_time else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    peak = usage.ru_maxrss / 1024
    if gnu_time and report.exists():
        text = report.read_text().strip().splitlines()
        if text and text[-1].isdigit():
            peak = int(text[-1]) / 1024
        report.unlink()
    return wall, peak, os.waitstatus_to_exitcode(status), err.strip()[-200:]


def hotpants_bare(sci: Path, tpl: Path, out: Path, noise: Path) -> list[str]:
    """The hotpants command line a user would type for this pair (valid levels from the
    data, so that hotpants does not mask the sky; noise image out)."""
    from astropy.io import fits

    args = [
        "hotpants",
        "-inim",
        str(sci),
        "-tmplim",
        str(tpl),
        "-outim",
        str(out),
        "-oni",
        str(noise),
        "-n",
        "i",
        "-c",
        "t",
    ]
    for flag_u, flag_l, path in (("-iu", "-il", sci), ("-tu", "-tl", tpl)):
        data = fits.getdata(path)
        med = float(np.median(data))
        mad = float(1.4826 * np.median(np.abs(data - med)))
        args += [flag_u, f"{float(data.max()) + 1:.1f}", flag_l, f"{med - 10 * mad:.1f}"]
    return args


def matching_kernel(fwhm_from: float, fwhm_to: float, beta: float, half: int = 12) -> np.ndarray:
    """The kernel K (unit sum, ``(2 half + 1)**2``) with ``P_to = K * P_from`` for the
    simulator's sampled, unit-sum Moffat PSFs, by Fourier division on a large grid
    (``fwhm_to >= fwhm_from``: the quotient of the transforms decays, no regularisation
    needed)."""
    n = 256
    off = np.arange(n) - n // 2
    r2 = off[None, :] ** 2 + off[:, None] ** 2

    def moffat(fwhm: float) -> np.ndarray:
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        p = (1.0 + r2 / alpha**2) ** (-beta)
        return np.fft.ifftshift(p / p.sum())

    k = np.fft.fftshift(
        np.fft.irfft2(np.fft.rfft2(moffat(fwhm_to)) / np.fft.rfft2(moffat(fwhm_from)), s=(n, n))
    )
    k = k[n // 2 - half : n // 2 + half + 1, n // 2 - half : n // 2 + half + 1]
    return k / k.sum()


def common_noise(sci: Path, tpl: Path) -> np.ndarray:
    """The one noise image every backend's residual on this pair is divided by for the
    ``bg (common)`` and ``star rms (common)`` columns (see the module doc)."""
    from astropy.io import fits
    from scipy.signal import fftconvolve

    variances, fwhms = [], []
    for path in (sci, tpl):
        data, header = fits.getdata(path, header=True)
        gain, rdnoise = float(header["GAIN"]), float(header["RDNOISE"])
        level = np.asarray(data, np.float64)
        if header.get("SKYSUB", False):
            level = level + float(header["SIMSKY"])
        variances.append(np.maximum(level, 0.0) / gain + (rdnoise / gain) ** 2)
        fwhms.append(float(header["SIMFWHM"]))
        beta = float(header["SIMBETA"])
    conv = 1 if fwhms[0] >= fwhms[1] else 0  # the sharper image is convolved
    kernel = matching_kernel(fwhms[conv], fwhms[1 - conv], beta)
    matched = fftconvolve(variances[conv], kernel**2, mode="same")
    return np.sqrt(variances[1 - conv] + np.maximum(matched, 0.0))


def measure(out: Path, noise_path: Path | None, truth, fwhm: float, tpl: Path, common: np.ndarray):  # type: ignore[no-untyped-def]
    import sep
    from astropy.io import fits

    from oasis_core.quality import normalized_noise, q_value, star_aperture_rms

    with fits.open(out) as hdul:
        res = np.array(hdul[0].data, np.float64)
        names = [h.name for h in hdul]
        noise = np.array(hdul["NOISE"].data, np.float64) if "NOISE" in names else None
        weight = np.array(hdul["WEIGHT"].data, np.float64) if "WEIGHT" in names else None
    if noise is None and noise_path is not None:
        noise = np.array(fits.getdata(noise_path), np.float64)
    if weight is None:
        weight = (np.isfinite(res) & (np.abs(res) < 1e20)).astype(float)
        if noise is not None:
            weight[~np.isfinite(noise) | (noise <= 0)] = 0
    res = np.where(weight > 0, res, 0.0)
    template = np.array(fits.getdata(tpl), np.float64)
    bkg = sep.Background(template)
    sub = template - bkg.back()
    objs = sep.extract(sub, 50.0, err=bkg.globalrms)
    bright = objs[(objs["peak"] < 30000) & (objs["flag"] == 0)]
    from scipy import ndimage

    sources = ndimage.maximum_filter(
        ndimage.gaussian_filter(sub, 1.0) > 3 * bkg.globalrms / 2.5, size=int(2 * fwhm) | 1
    )
    out_row = {
        "bg": normalized_noise(res, noise, weight, exclude=sources),
        "star": star_aperture_rms(res, noise, weight, bright["x"], bright["y"], fwhm),
        "q": q_value(res, noise, weight, exclude=sources),
        "bg_common": normalized_noise(res, common, weight, exclude=sources),
        "star_common": star_aperture_rms(res, common, weight, bright["x"], bright["y"], fwhm),
    }
    sel = truth[np.asarray(truth["peak_snr"]) >= 20]
    if len(sel):
        r_ap, r_in, r_out = 4 * fwhm, 5 * fwhm, 7 * fwhm
        flux, _, _ = sep.sum_circle(
            np.ascontiguousarray(res),
            np.asarray(sel["x"], float),
            np.asarray(sel["y"], float),
            r_ap,
            bkgann=(r_in, r_out),
        )
        out_row["flux"] = float(np.sum(flux) / np.sum(sel["flux"]))
    else:
        out_row["flux"] = float("nan")
    return out_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.4])
    parser.add_argument("--ratio-size", type=int, default=2048)
    parser.add_argument("--extra-ratios", type=float, nargs="*", default=[1.1, 1.8])
    parser.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="subtract backends to run (default: every available one)",
    )
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    from oasis_core.plugins import Registry

    registry = Registry()
    names = args.backends or [
        r.name
        for r in registry.all_records()
        if r.stage == "subtract" and registry.status(r) == "available"
    ]
    cases = [(s, r) for s in args.sizes for r in args.ratios]
    cases += [(args.ratio_size, r) for r in args.extra_ratios if (args.ratio_size, r) not in cases]
    header = (
        f"{'size':>5} {'ratio':>5} {'backend':<14} {'wall s':>7} {'peak MiB':>8} "
        f"{'bg noise':>8} {'star rms':>8} {'star/bg':>7} {'bg (common)':>11} "
        f"{'star rms (common)':>17} "
        f"{'flux':>6} {'Q':>6}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        for size, ratio in cases:
            (sci, tpl), truth, fwhm = make_pair(size, ratio, args.seed, tmpdir)
            common = common_noise(sci, tpl)
            runs = [
                (
                    n,
                    [
                        sys.executable,
                        "-m",
                        "oasis_core.cli",
                        "subtract-pair",
                        str(sci),
                        str(tpl),
                        "{out}",
                        "--method",
                        n,
                    ],
                )
                for n in names
            ]
            if shutil.which("hotpants"):
                runs.append(("hotpants (bare)", None))
            for label, cmd in runs:
                out = tmpdir / f"out_{size}_{ratio}_{label.split()[0]}.fits"
                noise = out.with_suffix(".noise.fits")
                if cmd is None:
                    cmd = hotpants_bare(sci, tpl, out, noise)
                else:
                    cmd = [c.replace("{out}", str(out)) for c in cmd]
                wall, peak, code, err = timed(cmd)
                if code != 0 or not out.exists():
                    print(f"{size:>5} {ratio:>5} {label:<14} failed ({code}): {err}")
                    continue
                m = measure(out, noise if noise.exists() else None, truth, fwhm, tpl, common)
                print(
                    f"{size:>5} {ratio:>5} {label:<14} {wall:7.2f} {peak:8.0f} "
                    f"{m['bg']:8.3f} {m['star']:8.3f} {m['star'] / m['bg']:7.3f} "
                    f"{m['bg_common']:11.3f} {m['star_common']:17.3f} "
                    f"{m['flux']:6.3f} {m['q']:6.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
