"""Subtraction benchmark: every available subtract backend on the same simulated pairs.

Run: ``python benchmarks/subtract.py [--sizes 1024 2048 4096] [--ratios 1.4]
[--ratio-size 2048 --extra-ratios 1.1 1.8] [--kinds field cutout sparse crowded]
[--cutouts 12] [--seed 3] [--repeat 5] [--no-bytecode-cache]``.

Each pair comes from the project's simulator (``oasis_native.sim.simulate_pair``): a star
field and a galaxy through Moffat PSFs, transients in the science frame. The kinds of
rows (``--kinds``):

``field``
    ``size``-square pairs whose FWHM varies by 10 % across the chip, the science seeing
    ``ratio`` times the template's (3 px);
``cutout``
    63 x 63 cutouts centred on the transients (peak S/N 10 or more) of sparse 256 x 256
    pairs (the shape survey alerts give: a transient at the centre, 0-3 stars), seeing
    ratio 1.3; each backend runs on ``--cutouts`` of them and the row gives the median
    time, star RMS and Q, and the median recovered / injected flux of the central
    transients;
``sparse``
    a 900 x 800 pair with 15 stars whose files carry no header keyword at all (no GAIN,
    RDNOISE, SATURATE, FWHM or WCS), seeing ratio 1.3;
``crowded``
    512 x 512 pairs with 2.5 stars per 100 px^2: one with the science seeing twice the
    template's (6 and 3 px), one with an elongated science PSF (ellipticity 0.5 along x,
    3.8 px) against a round template of the same FWHM (neither PSF contains the other).
    For the elongated pair the common noise (below) is the plain sum of the two frames'
    variances (no matching kernel exists): the same image for every backend still.

Every backend is run the way a user runs it, as a whole process (imports included):
``oasis subtract-pair SCI TPL OUT --subtract NAME``; when the ``hotpants`` program is on
PATH it is also run bare, on the same pair, in the same table (its masked pixels are its
fill value, 1e-30). With ``--repeat N`` every command runs N times, the commands of a
pair in turn (all the backends, then hotpants, N rounds), so that a drift of the
machine's speed hits them alike; the quality figures are those of the last round (the
runs are deterministic).

The project's packages are compiled to bytecode first (``__pycache__`` beside the
sources, which git ignores), as installing them does (pip compiles at install): in an
environment with ``PYTHONDONTWRITEBYTECODE`` set (or a read-only checkout) every start
would otherwise compile the project's modules again, about 0.25 s that no installed
copy spends; ``--no-bytecode-cache`` skips this step. Columns:

* ``wall s``: wall time of the process (the median of the ``--repeat`` runs);
  ``peak MiB``: its peak resident memory (GNU ``time``; for ``--subtract hotpants`` the
  program is a grandchild, not counted);
* ``x hp``: the wall time over bare hotpants' on the same pair, the median of the
  ratios of the runs of a round (1.00 on hotpants' own row; blank without hotpants);
* ``bg noise``: robust std of residual / noise away from sources (1.0 = the noise image
  is right);
* ``star rms``: normalised RMS inside 1-FWHM apertures on bright unsaturated stars (peak
  above 50 sigma in the template, 20 on a cutout), the
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
* ``Q``: OasisPy's quality figure;
* ``good``: fraction of the residual's pixels that are not masked.

Under each pair's rows a line gives every backend's wall time (min / median / max over
the runs) and its ratio to bare hotpants' (min / median / max over the rounds).

Nothing here is asserted by the tests; the numbers are for this machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass
class Case:
    """One pair (or set of cutouts) of the table."""

    label: str
    pairs: list[tuple[Path, Path]]  # the files the backends read
    truths: list[Any]  # per pair, the transients measured for ``flux``
    fwhm: float  # the broader PSF's FWHM (apertures)
    commons: list[np.ndarray]  # per pair, the common noise image
    templates: list[Path]  # per pair, the template with its headers (star list)


def make_pair(size: int, ratio: float, seed: int, directory: Path) -> Case:
    """A ``field`` pair (see the module doc)."""
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
    return Case(
        label=f"{size}^2 ratio {ratio}",
        pairs=[paths],
        truths=[truth],
        fwhm=3.0 * ratio,
        commons=[common_noise(*paths)],
        templates=[paths[1]],
    )


def make_cutouts(n: int, seed: int, directory: Path) -> Case:
    """``n`` 63 x 63 cutouts centred on transients of sparse 256 x 256 pairs."""
    from astropy.io import fits
    from astropy.table import Table
    from oasis_native.sim import simulate_pair

    half, pairs, truths, commons = 31, [], [], []
    k = 0
    while len(pairs) < n and k < 10 * n:
        (sci, sh), (tpl, th), truth = simulate_pair(
            (256, 256),
            seed=seed + k,
            fwhm_science=3.9,
            fwhm_template=3.0,
            n_stars=20,
            transients=4,
            template_depth=4.0,
        )
        k += 1
        whole = directory / f"cut_whole_sci_{k}.fits", directory / f"cut_whole_tpl_{k}.fits"
        fits.PrimaryHDU(sci, sh).writeto(whole[0], overwrite=True)
        fits.PrimaryHDU(tpl, th).writeto(whole[1], overwrite=True)
        common = common_noise(*whole)
        for row in truth:
            x, y = round(float(row["x"])), round(float(row["y"]))
            inside = half <= x < 256 - half and half <= y < 256 - half
            if not inside or float(row["peak_snr"]) < 10 or len(pairs) >= n:
                continue
            box = np.s_[y - half : y + half + 1, x - half : x + half + 1]
            paths = []
            for image, header, what in ((sci, sh, "sci"), (tpl, th, "tpl")):
                header = header.copy()
                header["CRPIX1"] = float(header["CRPIX1"]) - (x - half)
                header["CRPIX2"] = float(header["CRPIX2"]) - (y - half)
                path = directory / f"cut_{what}_{len(pairs)}.fits"
                fits.PrimaryHDU(image[box], header).writeto(path, overwrite=True)
                paths.append(path)
            one = Table(row)
            one["x"] = [float(row["x"]) - (x - half)]
            one["y"] = [float(row["y"]) - (y - half)]
            pairs.append((paths[0], paths[1]))
            truths.append(one)
            commons.append(common[box])
    return Case(
        label=f"cutout 63^2 x{len(pairs)}",
        pairs=pairs,
        truths=truths,
        fwhm=3.9,
        commons=commons,
        templates=[p[1] for p in pairs],
    )


def make_sparse(seed: int, directory: Path) -> Case:
    """A 900 x 800 pair with 15 stars and files with no header keyword at all."""
    from astropy.io import fits
    from oasis_native.sim import simulate_pair

    (sci, sh), (tpl, th), truth = simulate_pair(
        (800, 900),
        seed=seed,
        fwhm_science=3.9,
        fwhm_template=3.0,
        n_stars=15,
        transients=6,
        template_depth=4.0,
    )
    kept = directory / "sparse_sci_headers.fits", directory / "sparse_tpl_headers.fits"
    fits.PrimaryHDU(sci, sh).writeto(kept[0], overwrite=True)
    fits.PrimaryHDU(tpl, th).writeto(kept[1], overwrite=True)
    paths = directory / "sparse_sci.fits", directory / "sparse_tpl.fits"
    fits.PrimaryHDU(sci).writeto(paths[0], overwrite=True)  # no keyword at all
    fits.PrimaryHDU(tpl).writeto(paths[1], overwrite=True)
    return Case(
        label="sparse 900x800, 15 stars",
        pairs=[paths],
        truths=[truth],
        fwhm=3.9,
        commons=[common_noise(*kept)],
        templates=[kept[1]],
    )


def make_crowded(kind: str, seed: int, directory: Path) -> Case:
    """A crowded 512 x 512 pair (2.5 stars per 100 px^2): ``ratio2`` or ``elongated``."""
    from astropy.io import fits
    from oasis_native.sim import simulate_pair

    shape = (512, 512)
    stars = round(2.5 * shape[0] * shape[1] / 100)
    if kind == "ratio2":
        options = {"fwhm_science": 6.0, "fwhm_template": 3.0}
        label, fwhm = "crowded 512^2 ratio 2", 6.0
    else:
        options = {"fwhm_science": 3.8, "fwhm_template": 3.8, "ellipticity_science": 0.5}
        label, fwhm = "crowded 512^2 e=0.5", 3.8 / math.sqrt(0.5)
    (sci, sh), (tpl, th), truth = simulate_pair(
        shape, seed=seed, n_stars=stars, transients=8, template_depth=4.0, **options
    )
    paths = directory / f"crowded_{kind}_sci.fits", directory / f"crowded_{kind}_tpl.fits"
    fits.PrimaryHDU(sci, sh).writeto(paths[0], overwrite=True)
    fits.PrimaryHDU(tpl, th).writeto(paths[1], overwrite=True)
    common = common_noise(*paths) if kind == "ratio2" else summed_noise(*paths)
    return Case(
        label=label,
        pairs=[paths],
        truths=[truth],
        fwhm=fwhm,
        commons=[common],
        templates=[paths[1]],
    )


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


def compile_bytecode() -> int:
    """Compile the project's packages (``oasis_core`` and every installed backend's) to
    bytecode beside their sources, as installing them does; return the number of
    packages (see the module doc)."""
    import compileall
    import importlib.util

    from oasis_core.engine.plugins import Registry

    packages = {"oasis_core"}
    for record in Registry().all_records():
        packages.add(type(record.backend).__module__.split(".")[0])
    for name in sorted(packages):
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1)
    return len(packages)


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


def summed_noise(sci: Path, tpl: Path) -> np.ndarray:
    """The plain sum of the two frames' variances (for PSFs no kernel can match)."""
    from astropy.io import fits

    total = 0.0
    for path in (sci, tpl):
        data, header = fits.getdata(path, header=True)
        gain, rdnoise = float(header["GAIN"]), float(header["RDNOISE"])
        total = total + np.maximum(np.asarray(data, np.float64), 0.0) / gain
        total = total + (rdnoise / gain) ** 2
    return np.sqrt(total)


def measure(  # type: ignore[no-untyped-def]
    out: Path,
    noise_path: Path | None,
    truth,
    fwhm: float,
    tpl: Path,
    common: np.ndarray,
    min_snr: float = 20.0,
):
    import sep
    from astropy.io import fits

    from oasis_core.engine.quality import normalized_noise, q_value, star_aperture_rms

    with fits.open(out) as hdul:
        res = np.array(hdul[0].data, np.float64)
        names = [h.name for h in hdul]
        noise = np.array(hdul["NOISE"].data, np.float64) if "NOISE" in names else None
        weight = np.array(hdul["WEIGHT"].data, np.float64) if "WEIGHT" in names else None
    if noise is None and noise_path is not None:
        noise = np.array(fits.getdata(noise_path), np.float64)
    if weight is None:  # bare hotpants: its masked pixels hold its fill value, 1e-30
        fill = np.float64(np.float32(1e-30))
        weight = (np.isfinite(res) & (np.abs(res) < 1e20) & (res != fill)).astype(float)
        if noise is not None:
            weight[~np.isfinite(noise) | (noise <= 0)] = 0
    res = np.where(weight > 0, res, 0.0)
    template = np.array(fits.getdata(tpl), np.float64)
    small = min(template.shape) < 128
    bkg = sep.Background(template, bw=16 if small else 64, bh=16 if small else 64)
    sub = template - bkg.back()
    objs = sep.extract(sub, 20.0 if small else 50.0, err=bkg.globalrms)
    bright = objs[(objs["peak"] < 30000) & (objs["flag"] == 0)]
    from scipy import ndimage

    sources = ndimage.maximum_filter(
        ndimage.gaussian_filter(sub, 1.0) > 3 * bkg.globalrms / 2.5, size=int(2 * fwhm) | 1
    )
    if noise is None or not (weight > 0).any():
        keys = ("bg", "star", "q", "bg_common", "star_common", "flux")
        return {**dict.fromkeys(keys, float("nan")), "good": 0.0}
    out_row = {
        "good": float((weight > 0).mean()),
        "bg": normalized_noise(res, noise, weight, exclude=sources),
        "star": star_aperture_rms(res, noise, weight, bright["x"], bright["y"], fwhm),
        "q": q_value(res, noise, weight, exclude=sources),
        "bg_common": normalized_noise(res, common, weight, exclude=sources),
        "star_common": star_aperture_rms(res, common, weight, bright["x"], bright["y"], fwhm),
    }
    sel = truth[np.asarray(truth["peak_snr"]) >= min_snr]
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


def _cases(args: argparse.Namespace, directory: Path) -> list[Case]:
    cases: list[Case] = []
    if "field" in args.kinds:
        sizes = [(s, r) for s in args.sizes for r in args.ratios]
        sizes += [
            (args.ratio_size, r) for r in args.extra_ratios if (args.ratio_size, r) not in sizes
        ]
        cases += [make_pair(s, r, args.seed, directory) for s, r in sizes]
    if "cutout" in args.kinds:
        cases.append(make_cutouts(args.cutouts, args.seed, directory))
    if "sparse" in args.kinds:
        cases.append(make_sparse(args.seed, directory))
    if "crowded" in args.kinds:
        cases += [make_crowded(k, args.seed, directory) for k in ("ratio2", "elongated")]
    return cases


def _median(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.4])
    parser.add_argument("--ratio-size", type=int, default=2048)
    parser.add_argument("--extra-ratios", type=float, nargs="*", default=[1.1, 1.8])
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["field", "cutout", "sparse", "crowded"],
        choices=["field", "cutout", "sparse", "crowded"],
        help="kinds of rows (see the module doc)",
    )
    parser.add_argument("--cutouts", type=int, default=12, help="cutouts per backend")
    parser.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="subtract backends to run (default: every available one)",
    )
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of every command, in rounds (medians)"
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="do not compile the project's bytecode first (see the module doc)",
    )
    args = parser.parse_args()

    from oasis_core.engine.plugins import Registry

    registry = Registry()
    names = args.backends or [
        r.name
        for r in registry.all_records()
        if r.stage == "subtract" and registry.status(r) == "available"
    ]
    header = (
        f"{'pair':<26} {'backend':<15} {'wall s':>7} {'x hp':>5} {'peak MiB':>8} "
        f"{'bg noise':>8} {'star rms':>8} {'star/bg':>7} {'bg (common)':>11} "
        f"{'star rms (common)':>17} {'flux':>6} {'Q':>6} {'good':>5}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        packages = 0 if args.no_bytecode_cache else compile_bytecode()
        print(
            "bytecode: "
            + (f"{packages} packages compiled, as installed" if packages else "not compiled")
            + f"; {max(1, args.repeat)} run(s) per command, in rounds"
        )
        print(header)
        print("-" * len(header))
        for case in _cases(args, tmpdir):
            run_case(case, names, args, tmpdir)


def run_case(case: Case, names: list[str], args: argparse.Namespace, tmpdir: Path) -> None:
    """Run every command of ``case`` ``args.repeat`` times in rounds; print its rows and
    its wall-time summary line."""
    labels = [*names, *(["hotpants (bare)"] if shutil.which("hotpants") else [])]
    bare = "hotpants (bare)"
    # walls[label][round][pair], peaks[label], rows[label] (the last round's), failures
    walls: dict[str, list[list[float]]] = {label: [] for label in labels}
    peaks: dict[str, list[float]] = {label: [] for label in labels}
    rows: dict[str, list[dict[str, float]]] = {}
    failures: dict[str, list[str]] = {}
    rounds = max(1, args.repeat)
    for round_ in range(rounds):
        last = round_ == rounds - 1
        for label in labels:
            if last:
                rows[label], failures[label] = [], []
            walls[label].append([])
            for i, (sci, tpl) in enumerate(case.pairs):
                out = tmpdir / f"out_{label.split()[0]}_{i}.fits"
                noise = out.with_suffix(".noise.fits")
                for stale in (out, noise):
                    stale.unlink(missing_ok=True)
                if label == bare:
                    cmd = hotpants_bare(sci, tpl, out, noise)
                else:
                    cmd = [
                        sys.executable, "-m", "oasis_apps.cli", "subtract-pair",
                        str(sci), str(tpl), str(out), "--subtract", label,
                    ]  # fmt: skip
                wall, peak, code, err = timed(cmd)
                walls[label][-1].append(wall)
                peaks[label].append(peak)
                if not last:
                    continue
                if code != 0 or not out.exists():
                    failures[label].append(err.splitlines()[-1] if err else f"exit {code}")
                    continue
                rows[label].append(
                    measure(
                        out,
                        noise if noise.exists() else None,
                        case.truths[i],
                        case.fwhm,
                        case.templates[i],
                        case.commons[i],
                        min_snr=10.0 if len(case.pairs) > 1 else 20.0,
                    )
                )

    def ratios(label: str) -> list[float]:
        """Per round, the median over the pairs of the wall time over hotpants'."""
        if bare not in walls:
            return []
        return [
            float(np.median(np.asarray(mine) / np.asarray(theirs)))
            for mine, theirs in zip(walls[label], walls[bare], strict=True)
        ]

    summary = []
    for label in labels:
        per_round = [float(np.median(w)) for w in walls[label]]
        ratio = ratios(label)
        x_hp = f"{np.median(ratio):5.2f}" if ratio else " " * 5
        times = f"{min(per_round):.2f}/{np.median(per_round):.2f}/{max(per_round):.2f} s"
        summary.append(
            f"{label} {times}"
            + (
                f" ({min(ratio):.2f}/{np.median(ratio):.2f}/{max(ratio):.2f}x)"
                if ratio and label != bare
                else ""
            )
        )
        if not rows[label]:
            print(f"{case.label:<26} {label:<15} failed: {failures[label][0][:120]}")
            continue
        m = {k: _median([r[k] for r in rows[label]]) for k in rows[label][0]}
        note = f"  ({len(failures[label])} failed)" if failures[label] else ""
        print(
            f"{case.label:<26} {label:<15} {np.median(per_round):7.2f} {x_hp} "
            f"{max(peaks[label]):8.0f} "
            f"{m['bg']:8.3f} {m['star']:8.3f} {m['star'] / m['bg']:7.3f} "
            f"{m['bg_common']:11.3f} {m['star_common']:17.3f} "
            f"{m['flux']:6.3f} {m['q']:6.3f} {m['good']:5.2f}{note}",
            flush=True,
        )
    what = f"  wall min/median/max over {rounds} round(s)"
    if bare in walls:
        what += " (in brackets: the ratio to hotpants (bare), min/median/max)"
    print(f"{what}: " + "; ".join(summary))


if __name__ == "__main__":
    main()
