"""``oasis sim fakes``: how faint a transient the data can show (OasisPy's ``sim_fakes``).

The target is copied to ``OASIS/simulations/<name>_fakes/`` and run through the pipeline
once there (with the chosen subtract backend); this registration, template and set of
residuals are shared by every iteration. Each iteration then picks a frame at random,
injects ``n_fakes`` point sources (a Moffat or Gaussian profile with that frame's own
FWHM) at random unmasked positions into its *aligned* image, subtracts the template with
the subtract backend, detects with the extract backend and applies the core's filters
(the majority test against the other residuals' detections), and matches the fakes to
the kept sources. Iterations are independent tasks on the pipeline's executor, so they
run in parallel and an interrupted run resumes.

Outputs in ``<simulation>/fakes/``:

* ``fakes.ecsv`` / ``fakes.txt``: every fake: ``iteration``, ``image``, ``x``, ``y``,
  ``flux`` (injected, ADU), ``mag`` (with the zero point), ``detected``, ``flux_out``
  (measured), ``snr_out``, ``noise`` (residual noise at the position);
* ``efficiency.png``: detected fraction against injected flux (or magnitude) with
  binomial (Wilson) error bars and the 50 % and 90 % completeness limits marked;
* ``summary.txt``: those limits and ``flux_5sigma``: 5 sigma of the residual noise summed
  over the catalogs' PSF aperture (radius 1.5 FWHM), ``5 sigma_pix sqrt(pi) 1.5 FWHM``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_core import io
from oasis_core.errors import InputError

__all__ = ["FakesResult", "efficiency_limits", "inject", "render_stamps", "sim_fakes"]

log = logging.getLogger("oasis")

#: Radius of the PSF aperture of :attr:`FakesResult.flux_5sigma`, in FWHM (the aperture the
#: catalogs' fluxes are measured in).
APERTURE_FWHM = 1.5

#: Header keys read for the photometric zero point, in order.
ZERO_POINT_KEYS = ("MAGZERO", "MAGZP", "ZP", "ZEROPT", "PHOTZP")


@attrs.frozen
class FakesResult:
    """What :func:`sim_fakes` measured."""

    table: Any
    directory: Path
    plot: Path | None
    flux_50: float
    flux_90: float
    flux_5sigma: float
    input_mode: str

    def line(self) -> str:
        n = len(self.table)
        det = int(np.sum(self.table["detected"])) if n else 0
        unit = "mag" if self.input_mode == "mag" else "ADU"

        def show(flux: float) -> str:
            if not np.isfinite(flux):
                return "not reached"
            return f"{flux:.4g} ADU" + (
                f" ({_to_mag(flux, self.table.meta.get('zero_point', 25.0)):.2f} mag)"
                if unit == "mag"
                else ""
            )

        return (
            f"{det}/{n} fakes detected; 50% completeness at {show(self.flux_50)}, "
            f"90% at {show(self.flux_90)}; 5 sigma of the residual noise in the PSF "
            f"aperture (radius 1.5 FWHM): {self.flux_5sigma:.4g} ADU"
        )


# --------------------------------------------------------------------------- rendering


def _sigma(fwhm: float) -> float:
    return fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def render_stamps(
    dx: np.ndarray, dy: np.ndarray, fwhm: float, model: str = "moffat", beta: float = 2.5
) -> np.ndarray:
    """Unit-flux PSF stamps sampled at offsets ``dx``, ``dy`` (arrays broadcast to
    ``(n, k, k)``) from each source's centre, for a ``"moffat"`` or ``"gauss"`` profile of
    FWHM ``fwhm`` pixels; each stamp is normalised by the profile's analytic total flux,
    so flux falling outside the stamp is lost as it would be on the sky."""
    r2 = dx * dx + dy * dy
    if model in ("gauss", "gaussian"):
        s2 = _sigma(fwhm) ** 2
        return np.exp(-0.5 * r2 / s2) / (2.0 * np.pi * s2)
    if model == "moffat":
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        return (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)
    raise InputError(f"fake PSF {model!r} is not known; use 'moffat' or 'gauss'")


def inject(
    data: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float,
    model: str = "moffat",
) -> np.ndarray:
    """A copy of ``data`` with point sources of ``flux`` ADU added at (``x``, ``y``)
    (0-based pixel centres), all at once (no loop over sources)."""
    out = np.array(data, dtype=np.float32, copy=True)
    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux))
    if x.size == 0:
        return out
    half = int(np.ceil(4.0 * fwhm)) + 2
    offs = np.arange(-half, half + 1)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    px = ix[:, None, None] + offs[None, None, :]
    py = iy[:, None, None] + offs[None, :, None]
    stamps = render_stamps(px - x[:, None, None], py - y[:, None, None], fwhm, model)
    stamps *= flux[:, None, None]
    px, py = np.broadcast_arrays(px, py)
    inside = (px >= 0) & (px < out.shape[1]) & (py >= 0) & (py < out.shape[0])
    np.add.at(out, (py[inside], px[inside]), stamps[inside].astype(np.float32))
    return out


def _to_mag(flux: float | np.ndarray, zero_point: float) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return zero_point - 2.5 * np.log10(flux)


def _to_flux(mag: np.ndarray, zero_point: float) -> np.ndarray:
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - zero_point))


def zero_point_of(header: Mapping[str, Any], default: float) -> float:
    """The photometric zero point from the header (``MAGZERO``, ``MAGZP``...), else
    ``default``."""
    for key in ZERO_POINT_KEYS:
        value = header.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    return float(default)


# ------------------------------------------------------------------ one iteration (a task)


@attrs.frozen(kw_only=True)
class _Iteration:
    """One iteration: inject into one aligned frame, subtract, detect, match. Picklable."""

    index: int
    frame: str
    science: Path
    science_psf: Path
    template: Path
    template_psf: Path
    x: tuple[float, ...]
    y: tuple[float, ...]
    flux: tuple[float, ...]
    psf_model: str
    zero_point: float
    subtract_backend: Any
    subtract_options: Any
    subtract_settings: Mapping[str, Any]
    extract_backend: Any
    extract_options: Any
    filters: Mapping[str, Any]
    catalogs: tuple[Path, ...]
    output: Path
    workdir: Path
    key: str


def _run_iteration(it: _Iteration) -> dict[str, Any]:
    from astropy.table import Table

    from oasis_core.model import Template
    from oasis_core.pipeline import _load_output, detect
    from oasis_core.sources import filter_detections, match_catalogs
    from oasis_core.subtraction import residual_cards, run_subtraction

    it.workdir.mkdir(parents=True, exist_ok=True)
    try:
        science = _load_output(it.science, it.science_psf)
        template = _load_output(it.template, it.template_psf, cls=Template)
        fwhm = float(science.fwhm or (science.psf.fwhm if science.psf else 3.0))
        x, y, flux = (np.asarray(v, float) for v in (it.x, it.y, it.flux))
        data = inject(science.data, x, y, flux, fwhm, it.psf_model)
        science = attrs.evolve(science, data=data)
        residual = run_subtraction(
            it.subtract_backend,
            science,
            template,
            options=it.subtract_options,
            workdir=it.workdir,
            settings=it.subtract_settings,
        )
        header = residual.header.copy()
        for key, value in residual_cards(residual, science, template).items():
            header[key] = value
        residual = attrs.evolve(
            residual,
            header=header,
            name=f"{it.frame}_residual",
            science=it.frame,
            template=template.name,
            psf=science.psf,
        )
        found = detect(it.extract_backend, residual, options=it.extract_options, workdir=it.workdir)
        others = [Table.read(p, format="ascii.ecsv") for p in it.catalogs]
        positives = [t[np.asarray(t["sign"]) > 0] for t in others]
        positives.append(found[np.asarray(found["sign"]) > 0])
        found = filter_detections(
            found, catalogs=positives, n_residuals=len(positives), **it.filters
        )
        kept = found[found["reason"] == "kept"]
        fakes = Table(
            {
                "iteration": np.full(len(x), it.index, dtype=np.int32),
                "image": np.full(len(x), it.frame),
                "x": x,
                "y": y,
                "flux": flux,
                "mag": _to_mag(flux, it.zero_point),
            }
        )
        match = match_catalogs(fakes, kept, float(it.filters["match_radius"]))
        hit = match >= 0
        fakes["detected"] = hit
        fakes["flux_out"] = np.where(hit, np.asarray(kept["flux"], float)[match], np.nan)
        fakes["snr_out"] = np.where(hit, np.asarray(kept["snr"], float)[match], np.nan)
        ix = np.clip(np.rint(x).astype(int), 0, residual.noise.shape[1] - 1)
        iy = np.clip(np.rint(y).astype(int), 0, residual.noise.shape[0] - 1)
        fakes["noise"] = residual.noise[iy, ix].astype(float)
        fakes["fwhm"] = np.full(len(x), fwhm)
        fakes["q"] = np.full(len(x), float(residual.q))
        fakes.meta["OASFAKES"] = it.key
        io.write_table(fakes, it.output)
    finally:
        shutil.rmtree(it.workdir, ignore_errors=True)
    return {"detected": int(hit.sum()), "n": len(x)}


# ------------------------------------------------------------------------ the simulation


def _simulation_copy(target: Any, suffix: str) -> Any:
    """Copy ``target`` into ``OASIS/simulations/<name>_<suffix>`` (once); return it."""
    from oasis_core.tree import Target

    oasis = target.path.parent.parent
    base = oasis / "simulations" if target.path.parent.name == "targets" else target.path
    dest = (base / f"{target.name}_{suffix}").resolve()
    if not (dest / "data").is_dir():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(
            target.path,
            tmp,
            ignore=shutil.ignore_patterns("compare", ".work", "simulations"),
            symlinks=True,
        )
        tmp.rename(dest)
    return Target(dest)


def _positions(
    rng: np.random.Generator, weight: np.ndarray, n: int, fwhm: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions on unmasked pixels, away from edges and from each other."""
    from scipy import ndimage

    margin = int(np.ceil(4 * fwhm)) + 5
    # clear of masked pixels by more than the core's masked-pixel test radius (1.5 FWHM)
    usable = ndimage.binary_erosion(weight > 0, iterations=int(np.ceil(1.5 * fwhm)) + 1)
    usable[:margin] = usable[-margin:] = False
    usable[:, :margin] = usable[:, -margin:] = False
    yy, xx = np.nonzero(usable)
    if len(xx) == 0:
        raise InputError("no unmasked area left to inject fakes into")
    xs: list[float] = []
    ys: list[float] = []
    sep2 = (3.0 * fwhm) ** 2
    for _ in range(50):  # draw in batches; keep those far enough from the others
        pick = rng.integers(0, len(xx), size=4 * n)
        cx = xx[pick] + rng.uniform(-0.5, 0.5, pick.size)
        cy = yy[pick] + rng.uniform(-0.5, 0.5, pick.size)
        for px, py in zip(cx, cy, strict=True):
            if all((px - a) ** 2 + (py - b) ** 2 > sep2 for a, b in zip(xs, ys, strict=True)):
                xs.append(float(px))
                ys.append(float(py))
                if len(xs) == n:
                    return np.array(xs), np.array(ys)
    return np.array(xs), np.array(ys)


def _weight(path: Path) -> np.ndarray:
    """The ``WEIGHT`` extension of an aligned frame or template (ones when it has none)."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        if "WEIGHT" in hdul:
            return np.asarray(hdul["WEIGHT"].data, np.float32)
        return np.ones(hdul[0].shape, np.float32)


def _draw_fluxes(
    rng: np.random.Generator, n: int, mode: str, lo: float, hi: float, scale: str, zp: float
) -> np.ndarray:
    if mode == "mag":
        return _to_flux(rng.uniform(min(lo, hi), max(lo, hi), n), zp)
    if scale == "log":
        lo = max(lo, 1e-3 * hi, 1e-6)
        return 10.0 ** rng.uniform(np.log10(lo), np.log10(hi), n)
    return rng.uniform(lo, hi, n)


def sim_fakes(
    location: str | Path,
    n_fakes: int = 20,
    iterations: int = 50,
    input_mode: str = "flux",
    PSF: str = "moffat",
    subtract_method: str = "ois",
    f_min: float = 0,
    f_max: float = 40000,
    *,
    flux_scale: str = "linear",
    zero_point: float = 25.0,
    seed: int = 0,
    jobs: int | None = None,
    plot: bool = True,
    registry: Any = None,
    reporter: Any = None,
    use_config_file: bool = True,
) -> FakesResult:
    """Inject fakes into a target's frames, run the pipeline, and measure completeness.

    Parameters follow OasisPy's ``sim_fakes``: ``n_fakes`` per iteration, ``iterations``,
    ``input_mode`` ``"flux"`` (``f_min``..``f_max`` in ADU) or ``"mag"`` (magnitudes with
    the frame's zero point: a ``MAGZERO``/``MAGZP``/``ZP`` card, else ``zero_point``),
    ``PSF`` ``"moffat"`` or ``"gauss"``, ``subtract_method`` the subtract backend.
    ``flux_scale="log"`` draws fluxes uniformly in log (more fakes near the limit);
    ``seed`` makes the run repeatable (and resumable).

    Returns
    -------
    FakesResult
        The table of every fake, the 50 % and 90 % completeness fluxes (``nan`` when not
        reached) and the 5-sigma flux of a point source in the residual noise.
    """
    from astropy.io import fits
    from astropy.table import Table, vstack

    from oasis_core.pipeline import Reporter, make_context, run_stages
    from oasis_core.provenance import options_dict
    from oasis_core.sources import filter_options
    from oasis_core.tree import find_target

    if input_mode not in ("flux", "mag"):
        raise InputError(f"input_mode {input_mode!r}: use 'flux' or 'mag'")
    if PSF not in ("moffat", "gauss", "gaussian"):
        raise InputError(f"PSF {PSF!r}: use 'moffat' or 'gauss'")
    if n_fakes < 1 or iterations < 1:
        raise InputError("n_fakes and iterations must be at least 1")
    source = find_target(location)
    sim = _simulation_copy(source, "fakes")
    ctx = make_context(
        sim.path,
        backends={"subtract": subtract_method},
        jobs=jobs,
        registry=registry,
        reporter=reporter or Reporter(),
        use_config_file=use_config_file,
    )
    run_stages(ctx)  # the shared run: resumes, so a second call costs nothing
    from oasis_core.pipeline import _aligned, _psf_path, _residual_path, _template_path

    names = [n for n in _aligned(ctx) if _residual_path(ctx, n).exists()]
    if not names:
        raise InputError(f"{sim.path}: no residual to inject fakes against")
    template = _template_path(ctx)
    align_dir = ctx.target.stage_dir("align")
    det_dir = ctx.target.stage_dir("extract") / "detections"
    settings = ctx.config.settings["extract"]
    filters = filter_options(settings)
    params = {
        "n_fakes": n_fakes,
        "input_mode": input_mode,
        "psf": PSF,
        "subtract": subtract_method,
        "f_min": f_min,
        "f_max": f_max,
        "scale": flux_scale,
        "seed": seed,
        "options": options_dict(ctx.config.backend_options("subtract")),
        "extract": ctx.config.backend("extract"),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out_dir = sim.path / "fakes"
    it_dir = out_dir / "iterations"
    it_dir.mkdir(parents=True, exist_ok=True)
    headers = {n: fits.getheader(align_dir / f"{n}.fits") for n in names}
    template_weight = _weight(template)
    fwhms = {n: float(fits.getheader(_psf_path(ctx, n)).get("FWHM", 3.0)) for n in names}
    tasks = []
    for i in range(iterations):
        rng = np.random.default_rng([seed, i])
        frame = names[int(rng.integers(len(names)))]
        output = it_dir / f"iter_{i:04d}.ecsv"
        zp = zero_point_of(headers[frame], zero_point)
        if output.exists() and Table.read(output, format="ascii.ecsv").meta.get("OASFAKES") == key:
            continue
        weight = np.minimum(_weight(align_dir / f"{frame}.fits"), template_weight)
        xs, ys = _positions(rng, weight, n_fakes, fwhms[frame])
        flux = _draw_fluxes(rng, len(xs), input_mode, f_min, f_max, flux_scale, zp)
        tasks.append(
            _Iteration(
                index=i,
                frame=frame,
                science=align_dir / f"{frame}.fits",
                science_psf=_psf_path(ctx, frame),
                template=template,
                template_psf=template.with_name("template.psf.fits"),
                x=tuple(xs),
                y=tuple(ys),
                flux=tuple(flux),
                psf_model="gauss" if PSF.startswith("gauss") else "moffat",
                zero_point=zp,
                subtract_backend=ctx.backend("subtract"),
                subtract_options=ctx.config.backend_options("subtract"),
                subtract_settings=options_dict(ctx.config.settings["subtract"]),
                extract_backend=ctx.backend("extract"),
                extract_options=ctx.config.backend_options("extract"),
                filters=filters,
                catalogs=tuple(det_dir / f"{n}.ecsv" for n in names if n != frame),
                output=output,
                workdir=ctx.target.work / "fakes" / f"iter_{i:04d}",
                key=key,
            )
        )
    failed = []
    with ctx.reporter.progress("fakes", iterations) as advance:
        for _ in range(iterations - len(tasks)):
            advance()
        for outcome in ctx.executor.run(_run_iteration, [(f"{t.index}", t) for t in tasks]):
            advance()
            if not outcome.ok:
                failed.append(outcome.key)
                log.warning("fakes: iteration %s failed: %s", outcome.key, outcome.error)
    tables = []
    for i in range(iterations):
        path = it_dir / f"iter_{i:04d}.ecsv"
        if path.exists():
            t = Table.read(path, format="ascii.ecsv")
            if t.meta.get("OASFAKES") == key:
                t.meta.clear()
                tables.append(t)
    if not tables:
        raise InputError(f"{sim.path}: every fakes iteration failed (first: {failed[:1]})")
    table = vstack(tables)
    zp_all = float(np.median([zero_point_of(h, zero_point) for h in headers.values()]))
    table.meta.update({"zero_point": zp_all, "input_mode": input_mode, "psf": PSF})
    f50, f90 = efficiency_limits(np.asarray(table["flux"], float), np.asarray(table["detected"]))
    # 5 sigma of the residual noise inside the catalogs' PSF aperture (radius 1.5 FWHM)
    radius = APERTURE_FWHM * float(np.median(table["fwhm"]))
    flux_5sigma = float(5.0 * np.median(table["noise"]) * np.sqrt(np.pi) * radius)
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".4g"
    io.write_table(table, out_dir / "fakes.txt")
    io.write_table(table, out_dir / "fakes.ecsv")
    png = None
    if plot:
        png = out_dir / "efficiency.png"
        efficiency_plot(table, png, f50, f90, flux_5sigma, input_mode, zp_all)
    result = FakesResult(table, out_dir, png, f50, f90, flux_5sigma, input_mode)
    io.write_text(out_dir / "summary.txt", result.line() + "\n")
    ctx.reporter.result("fakes: " + result.line())
    return result


# -------------------------------------------------------------------- efficiency and plot


def _logistic(logf: np.ndarray, top: float, mu: float, width: float) -> np.ndarray:
    return top / (1.0 + np.exp(-(logf - mu) / width))


def efficiency_limits(flux: np.ndarray, detected: np.ndarray) -> tuple[float, float]:
    """Fluxes at 50 % and 90 % completeness from a logistic fit in log flux (``nan``
    when the curve never reaches the level)."""
    from scipy.optimize import curve_fit

    good = np.isfinite(flux) & (flux > 0)
    logf, det = np.log10(flux[good]), np.asarray(detected, float)[good]
    if len(logf) < 5 or det.min() == det.max():
        if len(det) and det.min() == 1.0:
            return float(flux[good].min()), float(flux[good].min())
        return float("nan"), float("nan")
    p0 = (max(det.mean(), 0.5), float(np.median(logf)), 0.1)
    try:
        (top, mu, width), _ = curve_fit(
            _logistic,
            logf,
            det,
            p0=p0,
            bounds=([0.0, logf.min() - 2, 1e-3], [1.0, logf.max() + 2, 5.0]),
            maxfev=5000,
        )
    except (RuntimeError, ValueError):
        return float("nan"), float("nan")

    def at(level: float) -> float:
        if top <= level:
            return float("nan")
        return float(10 ** (mu - width * np.log(top / level - 1.0)))

    return at(0.5), at(0.9)


def efficiency_plot(
    table: Any,
    path: Path,
    f50: float,
    f90: float,
    flux_5sigma: float,
    input_mode: str,
    zero_point: float,
) -> None:
    """PNG of the detected fraction against injected flux (magnitude in ``mag`` mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.stats import binom_conf_interval

    flux = np.asarray(table["flux"], float)
    det = np.asarray(table["detected"], bool)
    good = flux > 0
    flux, det = flux[good], det[good]
    nbins = int(np.clip(len(flux) // 25, 5, 20))
    edges = np.unique(np.quantile(np.log10(flux), np.linspace(0, 1, nbins + 1)))
    idx = np.clip(np.digitize(np.log10(flux), edges) - 1, 0, len(edges) - 2)
    n = np.bincount(idx, minlength=len(edges) - 1)
    k = np.bincount(idx, weights=det, minlength=len(edges) - 1)
    keep = n > 0
    frac = np.where(keep, k / np.maximum(n, 1), np.nan)
    lo, hi = binom_conf_interval(k[keep].astype(int), n[keep], interval="wilson")
    centres = 10 ** (0.5 * (edges[:-1] + edges[1:]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = centres[keep] if input_mode != "mag" else _to_mag(centres[keep], zero_point)
    ax.errorbar(
        xs,
        frac[keep],
        yerr=[np.clip(frac[keep] - lo, 0, None), np.clip(hi - frac[keep], 0, None)],
        fmt="o-",
        capsize=3,
        label=f"{len(flux)} fakes",
    )
    for value, style, label in (
        (f50, "--", "50%"),
        (f90, "-", "90%"),
        (flux_5sigma, ":", "5σ in the PSF aperture"),
    ):
        if np.isfinite(value):
            xv = value if input_mode != "mag" else _to_mag(value, zero_point)
            shown = f"{xv:.3g} ADU" if input_mode != "mag" else f"{xv:.2f} mag"
            ax.axvline(xv, ls=style, color="0.3", label=f"{label}: {shown}")
    for level in (0.5, 0.9):
        ax.axhline(level, color="0.85", lw=0.8, zorder=0)
    if input_mode == "mag":
        ax.set_xlabel(f"injected magnitude (zero point {zero_point:.2f})")
        ax.invert_xaxis()
    else:
        ax.set_xscale("log")
        ax.set_xlabel("injected flux [ADU]")
    ax.set_ylabel("fraction detected")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title("Detection efficiency of injected point sources")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def fakes_summary(results: Sequence[FakesResult]) -> str:
    """One line per result (for several targets)."""
    return "\n".join(r.line() for r in results)
