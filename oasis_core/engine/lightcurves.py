"""Light curves from the photometry stage's per-frame tables, the variables they show,
and their pages.

:func:`write_outputs` writes

- ``lightcurves/lightcurves.ecsv``: long format, one row per source per frame
  (:data:`COLUMNS`: difference flux in template ADU, the reference flux measured on the
  template, the frame's mid-exposure MJD);
- ``sources/variables.ecsv``: one row per source with its statistics (reduced chi-square
  about the weighted mean, Stetson's J, amplitude), its period (astropy's Lomb-Scargle
  over ``[photometry] period_min``-``period_max``, reported when its false-alarm
  probability is below ``fap_max``) and its ``kind`` (:func:`classify`);
- a PNG per source (``lightcurves/source_<id>.png``: the light curve with its errors, and
  folded at the period when one is significant) and ``lightcurves/index.html``, a
  self-contained page linking them, which marks ``<body data-images="ok">`` once every
  image has loaded (a headless browser checks it).

The kind comes from the light curve (:func:`classify`); a source found on the
variability image (:mod:`oasis_core.engine.variability`) is never called ``constant``:
when its light curve does not show the variation, the image's kind stands.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.engine import io

__all__ = [
    "COLUMNS",
    "KINDS",
    "classify",
    "describe",
    "light_curves",
    "one_time",
    "outputs_exist",
    "period_search",
    "read_frame_table",
    "read_summary",
    "stetson_j",
    "time_axis_problem",
    "variables",
    "write_frame_table",
    "write_outputs",
]

log = logging.getLogger("oasis")

#: Column name -> (unit, description) of the light-curve outputs.
COLUMNS: dict[str, tuple[str | None, str]] = {
    "source_id": (None, "the source's number in this target's light curves"),
    "x": ("pix", "0-based x of the source on the template grid"),
    "y": ("pix", "0-based y of the source on the template grid"),
    "ra": ("deg", "right ascension (template WCS; NaN without one)"),
    "dec": ("deg", "declination (template WCS; NaN without one)"),
    "origin": (None, "where the position comes from: catalog (extract stage), user (--at)"),
    "image_kind": (
        None,
        "kind of the variability image's source there (extract stage); '' when none",
    ),
    "frame": (None, "the frame whose residual was measured"),
    "mjd": ("d", "the frame's mid-exposure time, MJD (scale in the table's TIMESCALE)"),
    "flux": ("adu", "difference flux (frame minus template), template ADU"),
    "flux_err": ("adu", "1-sigma error of flux, from the residual's noise image"),
    "ref_flux": ("adu", "flux of the source on the template (template PSF), template ADU"),
    "ref_flux_err": ("adu", "1-sigma error of ref_flux"),
    "flag": (
        None,
        "0: clean; bits: 1 masked pixel near the source, 2 off the edge, 4 no fit, "
        "8 poor fit, 16 residual flagged by the subtraction",
    ),
    "mag": ("mag", "magnitude of the total flux ref_flux + flux with the zero point"),
    "mag_err": ("mag", "1-sigma error of mag"),
    "kind": (None, "constant, transient (appears), fading, or variable (both ways)"),
    "n_frames": (None, "frames with a clean measurement (flag 0)"),
    "chi2_dof": (None, "reduced chi-square of the difference flux about its weighted mean"),
    "stetson_j": (None, "Stetson's J variability index (single observations)"),
    "amplitude": ("adu", "5th to 95th percentile range of the difference flux"),
    "period": ("d", "best Lomb-Scargle period; masked when not significant"),
    "period_fap": (None, "false-alarm probability of the best Lomb-Scargle peak (Baluev)"),
}

#: The kinds :func:`classify` gives.
KINDS = ("constant", "transient", "fading", "variable")

#: Fewest clean frames for a period search.
MIN_PERIOD_FRAMES = 10


def describe(table: Any) -> Any:
    """Units and descriptions of :data:`COLUMNS` on ``table``'s columns (in place)."""
    import astropy.units as u

    for name in table.colnames:
        if name in COLUMNS:
            unit, text = COLUMNS[name]
            table[name].info.description = text
            if unit is not None:
                table[name].info.unit = u.Unit(unit)
    return table


def write_frame_table(
    path: Path, table: Any, cards: Mapping[str, Any], meta: Mapping[str, Any]
) -> None:
    """One unit's photometry, atomically: an empty primary HDU with the provenance
    ``cards`` (what :func:`~oasis_core.engine.provenance.is_current` reads) and the backend's
    numbers (``meta``, e.g. ``ERRSCALE``), then the table (extension ``PHOT``)."""
    from astropy.io import fits

    header = fits.Header()
    io.apply_cards(header, dict(cards))
    for key, value in meta.items():
        if isinstance(value, (int, float, str)) and len(key) <= 8:
            io.set_card(header, key.upper(), value)
    hdul = fits.HDUList([fits.PrimaryHDU(header=header), fits.table_to_hdu(table)])
    hdul[1].name = "PHOT"
    with io.atomic_write(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def read_frame_table(path: Path) -> Any:
    """A table :func:`write_frame_table` wrote."""
    from astropy.table import Table

    return Table.read(path, hdu="PHOT")


def light_curves(
    positions: Any,
    frame_tables: Mapping[str, Path],
    times: Mapping[str, float | None],
    *,
    zero_point: float = 0.0,
) -> Any:
    """The long table: one row per source per frame (frames in time order, those without
    a time last), with the reference flux from ``frame_tables["template"]``."""
    from astropy.table import MaskedColumn, Table

    ref = read_frame_table(frame_tables["template"])
    names = sorted(
        (n for n in frame_tables if n != "template"),
        key=lambda n: (times.get(n) is None, times.get(n) or 0.0, n),
    )
    n_src = len(positions)
    tables = [read_frame_table(frame_tables[n]) for n in names]
    rep = len(names)
    idx = np.tile(np.arange(n_src), rep)
    col = {c: np.asarray(positions[c])[idx] for c in ("source_id", "x", "y", "ra", "dec")}
    out = Table(col)
    out["frame"] = np.repeat(np.asarray(names, dtype=f"U{max([1, *map(len, names)])}"), n_src)
    mjd = np.repeat(np.array([times.get(n) or 0.0 for n in names], float), n_src)
    missing = np.repeat(np.array([times.get(n) is None for n in names], bool), n_src)
    out["mjd"] = MaskedColumn(mjd, mask=missing) if missing.any() else mjd
    for c in ("flux", "flux_err"):
        out[c] = np.concatenate([np.asarray(t[c], float) for t in tables]) if tables else []
    out["ref_flux"] = np.asarray(ref["flux"], float)[idx]
    out["ref_flux_err"] = np.asarray(ref["flux_err"], float)[idx]
    out["flag"] = (
        np.concatenate([np.asarray(t["flag"], np.int16) for t in tables])
        if tables
        else np.zeros(0, np.int16)
    )
    if zero_point > 0:
        total = np.asarray(out["ref_flux"]) + np.asarray(out["flux"])
        with np.errstate(invalid="ignore", divide="ignore"):
            mag = zero_point - 2.5 * np.log10(total)
            err = 2.5 / math.log(10) * np.asarray(out["flux_err"]) / total
        bad = ~np.isfinite(mag) | (total <= 0)
        out["mag"] = MaskedColumn(np.where(bad, 0.0, mag), mask=bad)
        out["mag_err"] = MaskedColumn(np.where(bad, 0.0, err), mask=bad)
    for c in ("x", "y", "flux", "flux_err", "ref_flux", "ref_flux_err"):
        out[c].info.format = ".3f"
    for c in ("ra", "dec", "mjd"):
        out[c].info.format = ".6f"
    return describe(out)


def stetson_j(flux: np.ndarray, err: np.ndarray) -> float:
    """Stetson's J for unpaired observations: the mean of sign(P) sqrt(|P|) with
    P = delta**2 - 1, delta = sqrt(n/(n-1)) (f - weighted mean) / err."""
    n = len(flux)
    if n < 2:
        return float("nan")
    w = 1.0 / err**2
    mean = float(np.sum(w * flux) / np.sum(w))
    delta = math.sqrt(n / (n - 1)) * (flux - mean) / err
    p = delta**2 - 1.0
    return float(np.mean(np.sign(p) * np.sqrt(np.abs(p))))


def period_search(
    t: np.ndarray,
    flux: np.ndarray,
    err: np.ndarray,
    *,
    period_min: float,
    period_max: float = 0.0,
) -> tuple[float, float]:
    """The best Lomb-Scargle period (days) between ``period_min`` and ``period_max``
    (0: half the time span) and its false-alarm probability (Baluev's approximation,
    over that frequency range); ``(nan, nan)`` when the range or the data allow none."""
    from astropy.timeseries import LombScargle

    if len(t) < MIN_PERIOD_FRAMES:
        return float("nan"), float("nan")
    span = float(np.ptp(t))
    longest = period_max if period_max > 0 else span / 2.0
    if span <= 0 or longest <= period_min:
        return float("nan"), float("nan")
    fmin, fmax = 1.0 / longest, 1.0 / period_min
    ls = LombScargle(t - t.min(), flux, err)  # no MJD offset: the fast method's grid is finer
    # five samples per peak over the range (Press & Rybicki's fast method), then refined
    freq, power = ls.autopower(
        minimum_frequency=fmin, maximum_frequency=fmax, samples_per_peak=5, method="fast"
    )
    best = int(np.nanargmax(power))
    fine = np.linspace(freq[max(best - 1, 0)], freq[min(best + 1, len(freq) - 1)], 201)
    fine_power = ls.power(fine)
    k = int(np.nanargmax(fine_power))
    fap = ls.false_alarm_probability(fine_power[k], minimum_frequency=fmin, maximum_frequency=fmax)
    return 1.0 / float(fine[k]), float(fap)


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (no ties expected)."""
    if len(a) < 5:
        return 0.0
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else 0.0


def classify(
    t: np.ndarray,
    flux: np.ndarray,
    err: np.ndarray,
    ref_flux: float,
    ref_err: float,
    *,
    chi2_dof: float,
    periodic: bool,
) -> str:
    """The kind of a light curve (difference flux ``flux`` at times ``t``).

    ``constant`` unless it varies (reduced chi-square above 3, or a significant period);
    ``transient`` when it rises from about nothing on the template (reference flux below
    3 sigma or a fifth of the peak difference) and never falls significantly below it
    (by more than 3 sigma and a tenth of its peak: a transient that was on during a
    template night leaves a little of itself in the template);
    ``fading`` when it declines through the series (rank correlation with time below
    -0.6); ``transient`` again when it only ever rises above the template (it appears on
    a star); else ``variable`` (varies both ways, or is brighter on the template).
    """
    if not (chi2_dof > 3.0 or periodic) or len(flux) < 2:
        return "constant"
    peak = float(np.max(flux))
    up = int(np.sum(flux > 3.0 * err))
    # a transient that was on during some template nights leaves a little of itself in
    # the template (a median of a few frames, two of them bright, is pulled up by about a
    # pixel's noise): its other frames dip below the template by a few percent of its
    # peak, which is not a source that varies both ways
    down = int(np.sum(flux < -np.maximum(3.0 * err, 0.1 * max(peak, 0.0))))
    nothing = not np.isfinite(ref_flux) or ref_flux < max(3.0 * ref_err, 0.2 * peak)
    if nothing and up and not down:
        return "transient"
    if _rank_correlation(t, flux) < -0.6:
        return "fading"
    if up and not down:
        return "transient"
    return "variable"


def variables(
    curves: Any,
    positions: Any,
    *,
    settings: Any,
    image_kinds: Mapping[int, str] | None = None,
) -> Any:
    """One row per source: its statistics, period and kind (see :data:`COLUMNS`).

    Statistics use the clean measurements (flag 0; all finite ones when fewer than three
    are clean). ``image_kinds`` (source id to kind), from a detection on the variability
    image, replaces the light curve's verdict when that is ``constant``: the image saw
    the source vary.
    """
    from astropy.table import MaskedColumn, Table

    sid = np.asarray(curves["source_id"])
    flux_all = np.asarray(curves["flux"], float)
    err_all = np.asarray(curves["flux_err"], float)
    flag_all = np.asarray(curves["flag"])
    mjd = curves["mjd"]
    has_time = ~np.ma.getmaskarray(mjd)
    t_all = np.asarray(np.ma.getdata(mjd), float)
    order_all = np.arange(len(curves), dtype=float)  # frame order when there is no time
    rows: dict[str, list[Any]] = {
        k: [] for k in ("kind", "n_frames", "chi2_dof", "stetson_j", "amplitude", "period", "fap")
    }
    ref_all = np.asarray(curves["ref_flux"], float)
    ref_err_all = np.asarray(curves["ref_flux_err"], float)
    by_source = np.argsort(sid, kind="stable")  # each source's rows, in frame order
    sorted_sid = sid[by_source]
    for source in np.asarray(positions["source_id"]):  # one light curve each
        rows_of = by_source[
            np.searchsorted(sorted_sid, source, "left") : np.searchsorted(
                sorted_sid, source, "right"
            )
        ]
        finite = rows_of[
            np.isfinite(flux_all[rows_of]) & np.isfinite(err_all[rows_of]) & (err_all[rows_of] > 0)
        ]
        use = finite[flag_all[finite] == 0]
        if len(use) < 3:
            use = finite
        f, e = flux_all[use], err_all[use]
        n = len(f)
        timed = bool(has_time[use].all()) and n > 0
        t = t_all[use] if timed else order_all[use]
        if n >= 2:
            w = 1.0 / e**2
            mean = float(np.sum(w * f) / np.sum(w))
            chi2 = float(np.sum(((f - mean) / e) ** 2) / (n - 1))
            amp = float(np.percentile(f, 95) - np.percentile(f, 5))
        else:
            chi2 = amp = float("nan")
        period, fap = (
            period_search(t, f, e, period_min=settings.period_min, period_max=settings.period_max)
            if timed
            else (float("nan"), float("nan"))
        )
        periodic = bool(np.isfinite(fap) and fap < settings.fap_max)
        ref = (
            (float(ref_all[rows_of[0]]), float(ref_err_all[rows_of[0]]))
            if len(rows_of)
            else (float("nan"), float("nan"))
        )
        kind = classify(t, f, e, ref[0], ref[1], chi2_dof=chi2, periodic=periodic)
        if kind == "constant" and image_kinds and image_kinds.get(int(source)):
            kind = image_kinds[int(source)]
        rows["kind"].append(kind)
        rows["n_frames"].append(n)
        rows["chi2_dof"].append(chi2)
        rows["stetson_j"].append(stetson_j(f, e))
        rows["amplitude"].append(amp)
        rows["period"].append(period if periodic else np.nan)
        rows["fap"].append(fap)
    out = Table({c: positions[c] for c in ("source_id", "x", "y", "ra", "dec")})
    out["kind"] = np.asarray(rows["kind"], dtype="U9")
    out["n_frames"] = np.asarray(rows["n_frames"], np.int32)
    for c in ("chi2_dof", "stetson_j", "amplitude"):
        out[c] = np.asarray(rows[c], float)
        out[c].info.format = ".3f"
    period = np.asarray(rows["period"], float)
    out["period"] = MaskedColumn(np.nan_to_num(period), mask=~np.isfinite(period), format=".6f")
    fap = np.asarray(rows["fap"], float)
    out["period_fap"] = MaskedColumn(np.nan_to_num(fap), mask=~np.isfinite(fap), format=".3g")
    for c in ("x", "y"):
        out[c].info.format = ".3f"
    for c in ("ra", "dec"):
        out[c].info.format = ".6f"
    return describe(out)


def _plot(path: Path, row: Any, curve: Any, timed: bool) -> None:
    """One source's PNG: the light curve with errors; folded at the period too."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    f = np.asarray(curve["flux"], float)
    e = np.asarray(curve["flux_err"], float)
    t = np.asarray(np.ma.getdata(curve["mjd"]), float) if timed else np.arange(len(curve))
    xlabel = "MJD" if timed else "frame"
    if timed and len(t) and np.ptp(t) == 0:  # the headers give every frame one time
        xlabel = f"frame (every header: MJD {t[0]:.5f})"
        t, timed = np.arange(len(curve), dtype=float), False
    period = row["period"]
    folded = not np.ma.is_masked(period) and np.isfinite(float(period)) and timed
    fig = Figure(figsize=(9.0 if folded else 6.0, 3.2), dpi=80)
    axes = fig.subplots(1, 2 if folded else 1, squeeze=False)[0]
    clean = np.asarray(curve["flag"]) == 0
    axes[0].errorbar(t[clean], f[clean], yerr=e[clean], fmt="o", ms=3, lw=0.8, color="tab:blue")
    if (~clean).any():  # flagged measurements, in grey
        axes[0].errorbar(
            t[~clean],
            f[~clean],
            yerr=e[~clean],
            fmt="o",
            mfc="none",
            ms=3,
            lw=0.6,
            color="0.6",
            label="flagged",
        )
        axes[0].legend(fontsize=7, loc="best")
    axes[0].axhline(0.0, color="0.6", lw=0.8)
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel("difference flux [template ADU]")
    axes[0].set_title(f"source {row['source_id']}: {row['kind']}", fontsize=10)
    if folded:
        p = float(period)
        phase = np.mod(t - t.min(), p) / p
        phase, f, e = phase[clean], f[clean], e[clean]
        axes[1].errorbar(
            np.r_[phase, phase + 1],
            np.r_[f, f],
            yerr=np.r_[e, e],
            fmt="o",
            ms=3,
            lw=0.8,
            color="tab:orange",
        )
        axes[1].set_xlabel(f"phase (P = {p:.5f} d)")
        axes[1].set_title(f"folded, FAP {float(row['period_fap']):.2g}", fontsize=10)
    fig.tight_layout()
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")


def _index_html(table: Any, images: Mapping[int, str], title: str) -> str:
    """The overview page: a table of the sources, linking and showing their PNGs."""
    head = "".join(
        f"<th>{c}</th>"
        for c in (
            "source",
            "kind",
            "x",
            "y",
            "ra",
            "dec",
            "n",
            "chi2/dof",
            "J",
            "amplitude",
            "period [d]",
            "FAP",
            "light curve",
        )
    )
    lines = []
    for row in table:
        sid = int(row["source_id"])

        def num(v: Any, fmt: str) -> str:
            return "" if np.ma.is_masked(v) or not np.isfinite(float(v)) else format(float(v), fmt)

        img = images.get(sid)
        cell = (
            f'<a href="{html.escape(img)}"><img src="{html.escape(img)}" alt="source {sid}" '
            'height="120"></a>'
            if img
            else ""
        )
        lines.append(
            f'<tr class="{html.escape(str(row["kind"]))}"><td>{sid}</td>'
            f"<td>{html.escape(str(row['kind']))}</td>"
            f"<td>{num(row['x'], '.1f')}</td><td>{num(row['y'], '.1f')}</td>"
            f"<td>{num(row['ra'], '.6f')}</td><td>{num(row['dec'], '.6f')}</td>"
            f"<td>{int(row['n_frames'])}</td><td>{num(row['chi2_dof'], '.2f')}</td>"
            f"<td>{num(row['stetson_j'], '.2f')}</td><td>{num(row['amplitude'], '.1f')}</td>"
            f"<td>{num(row['period'], '.5f')}</td><td>{num(row['period_fap'], '.2g')}</td>"
            f"<td>{cell}</td></tr>"
        )
    counts = Counter(str(k) for k in table["kind"])
    summary = ", ".join(f"{counts[k]} {k}" for k in KINDS if counts[k])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
tr.transient td:nth-child(2) {{ color: #b00; }}
tr.fading td:nth-child(2) {{ color: #06c; }}
tr.variable td:nth-child(2) {{ color: #c60; }}
</style></head>
<body data-images="pending" data-errors="0">
<h1>{html.escape(title)}</h1>
<p>{len(table)} source(s): {html.escape(summary or "none")}. Difference flux in template ADU;
data in <a href="lightcurves.ecsv">lightcurves.ecsv</a> and
<a href="../sources/variables.ecsv">variables.ecsv</a>.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(lines)}
</tbody></table>
<script>
window.addEventListener("error", function () {{
  document.body.dataset.errors = String(Number(document.body.dataset.errors) + 1);
}}, true);
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.dataset.images = ok === imgs.length ? "ok" : ok + "/" + imgs.length;
}});
</script>
</body></html>
"""


def outputs_exist(target: Any, settings: Any) -> bool:
    """Are the stage's summaries all there (``lightcurves.ecsv``, ``variables.ecsv``,
    and ``index.html`` when plots are on)?"""
    out = target.stage_dir("photometry")
    need = [out / "lightcurves.ecsv", target.stage_dir("extract") / "variables.ecsv"]
    if settings.plots:
        need.append(out / "index.html")
    return all(p.is_file() for p in need)


def read_summary(target: Any) -> dict[str, Any]:
    """The kinds and periods of ``sources/variables.ecsv`` (what :func:`write_outputs`
    returned when it wrote it)."""
    from astropy.table import Table

    table = Table.read(target.stage_dir("extract") / "variables.ecsv", format="ascii.ecsv")
    return _summary(table)


def _summary(table: Any) -> dict[str, Any]:
    counts = Counter(str(k) for k in table["kind"])
    periods = int((~np.ma.getmaskarray(table["period"])).sum()) if len(table) else 0
    return {"kinds": {k: counts[k] for k in KINDS if counts[k]}, "periods": periods}


def one_time(times: Mapping[str, float | None]) -> float | None:
    """The time every frame of ``times`` has, when there are several frames and their
    headers all give the same one (cutouts whose headers were copied from one frame):
    such a series has no time axis. ``None`` otherwise."""
    known = set(times.values())
    return next(iter(known)) if len(times) > 1 and len(known) == 1 and None not in known else None


def time_axis_problem(times: Mapping[str, float | None]) -> str | None:
    """What keeps the light curves of frames of ``times`` (their MJD, None when the
    header gives none) from a time axis, as a sentence; None when nothing does."""
    missing = sorted(n for n, t in times.items() if t is None)
    same = one_time(times)
    if same is not None:
        return (
            f"every frame's header gives the same time (MJD {same:.5f}): the light curves "
            "are in frame order and no period can be searched"
        )
    if missing and len(missing) == len(times):
        return (
            "no frame's header gives a time (MJD-OBS, DATE-OBS, JD or HJD): the light "
            "curves are in frame order and no period can be searched"
        )
    if missing:
        return (
            f"{len(missing)} of {len(times)} frames' headers give no time (MJD-OBS, "
            f"DATE-OBS, JD or HJD), e.g. {missing[0]}: their rows have no mjd"
        )
    return None


def write_outputs(
    target: Any,
    positions: Any,
    frame_tables: Mapping[str, Path],
    times: Mapping[str, float | None],
    *,
    settings: Any,
    scale: str = "utc",
    provenance: Mapping[str, str] | None = None,
    image_kinds: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Write the light curves, the variables and (with ``settings.plots``) the PNGs and
    ``index.html`` of a target; return ``{"kinds": {...}, "periods": n}``."""
    out_dir = target.stage_dir("photometry")
    why = time_axis_problem(times)
    if why is not None:
        log.warning("%s: %s", target.path, why)
    curves = light_curves(positions, frame_tables, times, zero_point=settings.zero_point)
    curves.meta["TIMESCALE"] = scale
    table = variables(curves, positions, settings=settings, image_kinds=image_kinds)
    table.meta["TIMESCALE"] = scale
    table.meta["PERIOD_RANGE"] = json.dumps([settings.period_min, settings.period_max])
    if provenance:
        table.meta.update(provenance)
    var_path = target.stage_dir("extract") / "variables.ecsv"
    var_path.parent.mkdir(parents=True, exist_ok=True)
    io.write_table(table, var_path)
    if settings.plots:
        images: dict[int, str] = {}
        sid = np.asarray(curves["source_id"])
        for old in out_dir.glob("source_*.png"):
            old.unlink(missing_ok=True)
        for row in table:
            source = int(row["source_id"])
            curve = curves[sid == source]
            timed = bool(len(curve)) and not np.ma.getmaskarray(curve["mjd"]).any()
            name = f"source_{source}.png"
            _plot(out_dir / name, row, curve, timed)
            images[source] = name
        title = f"Light curves: {Path(target.path).name}"
        io.write_text(out_dir / "index.html", _index_html(table, images, title))
    if provenance:  # last: the light curves count as current only once everything is there
        curves.meta.update(provenance)
    io.write_table(curves, out_dir / "lightcurves.ecsv")
    return _summary(table)
