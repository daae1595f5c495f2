"""The detection efficiency of :func:`oasis_apps.fakes.sim_fakes`: completeness per flux
bin, the 50 % and 90 % limits, where the next pass of fakes goes, and the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from oasis_apps.fakes_inject import APERTURE_FWHM, to_mag
from oasis_core.engine import io

__all__ = [
    "EfficiencyBins",
    "efficiency_bins",
    "efficiency_figure",
    "efficiency_limits",
    "efficiency_plot",
    "flux_5sigma",
    "next_range",
    "pass_sizes",
]


def _logistic(logf: np.ndarray, top: float, mu: float, width: float) -> np.ndarray:
    from scipy.special import expit  # no overflow far from the transition

    return top * expit((logf - mu) / width)


def _fit_curve(flux: np.ndarray, detected: np.ndarray) -> tuple[float, float, float] | None:
    """Logistic fit in log10 flux, ``(top, mu, width)``, or None (too few fakes, all
    detected or none, or no convergence)."""
    from scipy.optimize import curve_fit

    flux = np.asarray(flux, float)
    good = np.isfinite(flux) & (flux > 0)
    logf, det = np.log10(flux[good]), np.asarray(detected, float)[good]
    if len(logf) < 5 or det.min() == det.max():
        return None
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
        return None
    return float(top), float(mu), float(width)


@attrs.frozen
class EfficiencyBins:
    """Fakes binned by injected flux (equal numbers per bin, in log flux).

    Attributes
    ----------
    flux : ndarray
        Median injected flux of each bin's fakes (where the bin is plotted).
    low, high : ndarray
        The bin's flux edges.
    n, detected : ndarray
        Fakes injected and detected in the bin.
    """

    flux: np.ndarray = attrs.field(eq=False)
    low: np.ndarray = attrs.field(eq=False)
    high: np.ndarray = attrs.field(eq=False)
    n: np.ndarray = attrs.field(eq=False)
    detected: np.ndarray = attrs.field(eq=False)

    @property
    def fraction(self) -> np.ndarray:
        """Detected fraction of each bin."""
        return self.detected / np.maximum(self.n, 1)

    @property
    def monotone(self) -> np.ndarray:
        """The bins' fractions made non-decreasing with flux (weighted isotonic fit, pool
        adjacent violators): completeness as the data show it, without binomial wiggles."""
        blocks: list[list[float]] = []  # [detected, fakes, bins] (every bin has fakes)
        for k, n in zip(self.detected, self.n, strict=True):
            blocks.append([float(k), float(n), 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                k2, n2, c2 = blocks.pop()
                blocks[-1] = [blocks[-1][0] + k2, blocks[-1][1] + n2, blocks[-1][2] + c2]
        return np.concatenate([np.full(int(c), k / n) for k, n, c in blocks] or [np.zeros(0)])

    def crossing(self, level: float) -> tuple[int, int] | str:
        """The adjacent bins between which the completeness crosses ``level`` (indices:
        the first under it, the second at or above it, by :attr:`monotone`), or where the
        crossing lies when no bins bracket it: ``"below"`` (every bin at or above the
        level) or ``"above"`` (none reaches it)."""
        g = self.monotone
        if not len(g) or g[-1] < level:
            return "above"
        first = int(np.argmax(g >= level))
        return "below" if first == 0 else (first - 1, first)

    def brackets(self, flux: float, level: float) -> bool:
        """True when ``flux`` (a completeness ``level`` point) is measured, not
        extrapolated: a bin below it is under ``level`` and a bin above it reaches it."""
        if not np.isfinite(flux) or not len(self.n):
            return False
        frac = self.fraction
        below = (self.flux < flux) & (frac < level)
        above = (self.flux > flux) & (frac >= level)
        return bool(below.any() and above.any())

    def unmeasured(self, level: float, show: Any = None) -> str:
        """Why the ``level`` point is not measured, in words (``show`` formats a flux)."""
        show = show or (lambda f: f"{f:.4g} ADU")
        if not len(self.n):
            return "not measured (no fakes)"
        frac = self.fraction
        pct = f"{level:.0%}"
        if frac.min() >= level:
            return f"below the faintest bin ({show(self.flux[0])}: {frac[0]:.0%} detected)"
        if frac.max() < level:
            return f"not reached (at most {frac.max():.0%} detected, up to {show(self.flux[-1])})"
        return f"not bracketed by the bins (the {pct} crossing is not measured)"


def efficiency_bins(flux: np.ndarray, detected: np.ndarray) -> EfficiencyBins:
    """Bin fakes by injected flux: ``len // 25`` bins (5 to 20, fewer when there are fewer
    than 5 fakes) holding equal numbers of fakes (quantiles of log flux); empty bins are
    dropped. Fakes with a flux that is not positive are left out."""
    flux = np.asarray(flux, float)
    det = np.asarray(detected, bool)
    good = np.isfinite(flux) & (flux > 0)
    flux, det = flux[good], det[good]
    if not len(flux):
        empty = np.zeros(0)
        return EfficiencyBins(empty, empty, empty, empty.astype(int), empty.astype(int))
    logf = np.log10(flux)
    nbins = int(min(np.clip(len(flux) // 25, 5, 20), len(flux)))
    edges = np.unique(np.quantile(logf, np.linspace(0, 1, nbins + 1)))
    if len(edges) < 2:
        edges = np.array([logf[0], logf[0]])
    idx = np.clip(np.digitize(logf, edges) - 1, 0, len(edges) - 2)
    m = len(edges) - 1
    n = np.bincount(idx, minlength=m)
    k = np.bincount(idx, weights=det, minlength=m).astype(int)
    keep = np.flatnonzero(n > 0)
    centre = np.array([10 ** np.median(logf[idx == i]) for i in keep])
    return EfficiencyBins(centre, 10 ** edges[keep], 10 ** edges[keep + 1], n[keep], k[keep])


def efficiency_limits(flux: np.ndarray, detected: np.ndarray) -> tuple[float, float]:
    """Fluxes at 50 % and 90 % completeness, each measured between two adjacent bins of
    :func:`efficiency_bins` whose (monotone) completeness straddles the level, or ``nan``
    when no two bins do (never extrapolated).

    The value is the logistic fit's (in log flux) when the fit agrees with every bin
    (within 3 binomial sigma plus one fake) and crosses the level between those two bins;
    otherwise the straddling bins' completeness interpolated in log flux.
    """
    flux = np.asarray(flux, float)
    det = np.asarray(detected, bool)
    bins = efficiency_bins(flux, det)
    fit = _fit_curve(flux, det)
    if fit is not None and not _fit_agrees(fit, flux, det, bins):
        fit = None
    g = bins.monotone

    def at(level: float) -> float:
        where = bins.crossing(level)
        if isinstance(where, str):
            return float("nan")
        i, j = where
        lo, hi = float(bins.flux[i]), float(bins.flux[j])
        if fit is not None and fit[0] > level:
            top, mu, width = fit
            value = float(10 ** (mu - width * np.log(top / level - 1.0)))
            if lo < value < hi:
                return value
        t = (level - g[i]) / (g[j] - g[i])
        return float(10 ** (np.log10(lo) + t * (np.log10(hi) - np.log10(lo))))

    return at(0.5), at(0.9)


def _fit_agrees(
    fit: tuple[float, float, float], flux: np.ndarray, detected: np.ndarray, bins: EfficiencyBins
) -> bool:
    """True when the logistic ``fit`` predicts every bin's detections within 3 binomial
    sigma plus one fake (a fit across a gap in the fluxes can cross anywhere in it)."""
    good = np.isfinite(flux) & (flux > 0)
    flux, detected = flux[good], detected[good]
    p = _logistic(np.log10(flux), *fit)
    for low, high, k in zip(bins.low, bins.high, bins.detected, strict=True):
        inside = (flux >= low) & (flux <= high)
        expected = float(p[inside].sum())
        sigma = float(np.sqrt((p[inside] * (1 - p[inside])).sum()))
        if abs(k - expected) > 3.0 * sigma + 1.0:
            return False
    return True


def flux_5sigma(table: Any) -> float:
    """5 sigma of the residual noise summed over the catalogs' PSF aperture (radius
    :data:`APERTURE_FWHM` FWHM): ``5 sigma_pix sqrt(pi) r``."""
    radius = APERTURE_FWHM * float(np.median(table["fwhm"]))
    return float(5.0 * np.median(table["noise"]) * np.sqrt(np.pi) * radius)


def pass_sizes(iterations: int, adapt: bool) -> list[int]:
    """Iterations per pass: half over the requested range, then two passes placed around
    the transition measured so far (one pass without ``adapt``)."""
    if not adapt:
        return [iterations]
    first = -(-iterations // 2)
    rest = iterations - first
    second = -(-rest // 2)
    return [size for size in (first, second, rest - second) if size > 0]


def next_range(flux: np.ndarray, detected: np.ndarray, flux_5sigma: float) -> tuple[float, float]:
    """Flux range (ADU) for the next pass: from the last bin under 50 % to the first bin at
    90 % (by :meth:`EfficiencyBins.crossing`), widened by 25 % each way, so that the next
    fakes fall where the curve rises. When no bin is under 50 % the range starts a factor 3
    below the faintest fakes or the 5-sigma flux (where a point source's transition lies),
    whichever is fainter; when none reaches 90 % it ends a factor 3 above the brightest
    fakes or the 5-sigma flux, whichever is brighter."""
    bins = efficiency_bins(flux, detected)
    anchor = flux_5sigma if np.isfinite(flux_5sigma) and flux_5sigma > 0 else None
    faint, bright = float(bins.flux[0]), float(bins.flux[-1])
    c50, c90 = bins.crossing(0.5), bins.crossing(0.9)
    if isinstance(c50, tuple):
        lo = float(bins.flux[c50[0]])
    elif c50 == "below":
        lo = min(faint, anchor or faint) / 3.0
    else:  # never 50 %: from the brightest fakes up
        lo = bright
    if isinstance(c90, tuple):
        hi = float(bins.flux[c90[1]])
    elif c90 == "below":
        hi = faint
    else:
        hi = max(bright, anchor or bright) * 3.0
    hi = max(hi, 1.5 * lo)
    return lo / 1.25, hi * 1.25


def _tick_text(value: float) -> str:
    if 1e-2 <= abs(value) < 1e5:
        return f"{value:g}"
    return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round tick values for a log axis from ``lo`` to ``hi``: the first of 1-2-5, 1-3 or
    decades giving 3 to ``most`` ticks; else every few decades (a wide range) or linear
    steps (a narrow one); else 2 round values."""
    from matplotlib.ticker import MaxNLocator

    e0, e1 = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    tried = []
    for subs in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in range(e0, e1 + 1) for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if 3 <= len(ticks) <= most:
            return ticks
        tried.append(ticks)
    decades = tried[-1]
    if len(decades) > most:
        return decades[:: -(-len(decades) // most)]
    linear = [float(t) for t in MaxNLocator(nbins=5).tick_values(lo, hi) if lo <= t <= hi]
    if len(linear) >= 3:
        return linear
    for ticks in tried:
        if 2 <= len(ticks) <= most:
            return ticks
    return [lo, hi]


def _overlap(boxes: list[Any]) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _thin_ticks(fig: Any, axis: Any) -> None:
    """Drop every other tick of ``axis`` until no two tick labels overlap once drawn."""
    from matplotlib.ticker import FixedLocator

    for _ in range(8):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [
            t.get_window_extent(renderer)
            for t in axis.get_ticklabels()
            if t.get_visible() and t.get_text()
        ]
        if len(boxes) < 3 or not _overlap(boxes):
            return
        locs = list(axis.get_majorticklocs())
        axis.set_major_locator(FixedLocator(locs[::2]))


def efficiency_figure(
    table: Any,
    f50: float,
    f90: float,
    flux_5sigma: float,
    input_mode: str,
    zero_point: float,
) -> Any:
    """The efficiency figure (a matplotlib ``Figure``, Agg): the detected fraction of each
    bin of :func:`efficiency_bins` with Wilson binomial error bars, against injected flux
    (magnitude in ``mag`` mode), with the measured 50 % and 90 % points and the 5-sigma
    flux marked. Tick labels never overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.stats import binom_conf_interval
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    bins = efficiency_bins(np.asarray(table["flux"], float), np.asarray(table["detected"]))
    frac = bins.fraction
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    mag = input_mode == "mag"

    def x_of(flux: Any) -> Any:
        return to_mag(flux, zero_point) if mag else flux

    if len(bins.n):
        lo, hi = binom_conf_interval(bins.detected, bins.n, interval="wilson")
        ax.errorbar(
            x_of(bins.flux),
            frac,
            yerr=[np.clip(frac - lo, 0, None), np.clip(hi - frac, 0, None)],
            fmt="o-",
            capsize=3,
            label=f"{int(bins.n.sum())} fakes in {len(bins.n)} bins",
        )
    marks = [bins.low[0], bins.high[-1]] if len(bins.n) else []
    for value, style, label in (
        (f50, "--", "50%"),
        (f90, "-", "90%"),
        (flux_5sigma, ":", "5σ in the PSF aperture"),
    ):
        if np.isfinite(value) and value > 0:
            marks.append(value)
            xv = x_of(value)
            shown = f"{xv:.2f} mag" if mag else f"{xv:.4g} ADU"
            ax.axvline(xv, ls=style, color="0.3", label=f"{label}: {shown}")
    for level in (0.5, 0.9):
        ax.axhline(level, color="0.85", lw=0.8, zorder=0)
    ax.set_ylabel("fraction detected")
    ax.set_ylim(-0.03, 1.05)
    ax.yaxis.set_major_locator(FixedLocator([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]))
    if marks:
        f_lo, f_hi = min(marks) / 1.25, max(marks) * 1.25
    else:
        f_lo, f_hi = 1.0, 10.0
    if mag:
        ax.set_xlabel(f"injected magnitude (zero point {zero_point:.2f})")
        ax.set_xlim(x_of(f_lo), x_of(f_hi))  # bright to the right
    else:
        ax.set_xscale("log")
        ax.set_xlim(f_lo, f_hi)
        ax.xaxis.set_major_locator(FixedLocator(_log_ticks(f_lo, f_hi)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_text(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("injected flux [ADU]")
    ax.set_title("Detection efficiency of injected point sources")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _thin_ticks(fig, ax.xaxis)
    _thin_ticks(fig, ax.yaxis)
    return fig


def efficiency_plot(
    table: Any,
    path: Path,
    f50: float,
    f90: float,
    flux_5sigma: float,
    input_mode: str,
    zero_point: float,
) -> None:
    """Write :func:`efficiency_figure` to ``path`` (PNG, atomically)."""
    import matplotlib.pyplot as plt

    fig = efficiency_figure(table, f50, f90, flux_5sigma, input_mode, zero_point)
    try:
        with io.atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
