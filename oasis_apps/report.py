"""The HTML report of ``oasis compare`` and the figures in it.

:func:`write_report` writes ``compare/report.html`` and its PNGs in ``compare/figures/``
(referenced by relative paths, so the directory can be moved or zipped and viewed offline:
no script, no font, no style sheet is fetched). The report holds the summary, fakes,
per-frame and agreement tables, for each combination a thumbnail of its master residual
and the histogram of its normalised residual pixels against the unit Gaussian an ideal,
noise-limited subtraction gives, and a cutout strip (science, template, each
combination's residual) for every source kept by some combinations and not others.

:func:`markdown_table` renders an astropy table as a GitHub-flavoured Markdown table (the
``.md`` files of the comparison).
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oasis_core.engine import io

__all__ = [
    "cutout_strip",
    "format_rows",
    "markdown_table",
    "residual_histogram",
    "residual_thumbnail",
    "write_report",
]

#: Normalised residuals are shown on this symmetric scale (sigmas).
Z_RANGE = 5.0

_COLUMN_HELP = {
    "q": "OasisPy's Q = 1/(1+chi2/N) of the normalised residual against a unit Gaussian "
    "(1 is noise-limited)",
    "mean_q": "mean Q over the frames",
    "min_q": "worst Q over the frames",
    "noise_norm": "robust standard deviation of (R - median)/noise away from stars "
    "(1 when the noise image is right)",
    "star_rms": "RMS of R/noise in apertures of 1 FWHM on bright unsaturated template stars "
    "(1.0 is noise-limited)",
    "seconds": "subtraction run time, all configurations tried (summary: median per frame; "
    "a worker's first frame includes the backend's imports)",
    "peak_mb": "peak memory of the subtraction: tracemalloc in the worker (NumPy and Python "
    "allocations), or an external program's max RSS when larger (seen only when above the "
    "worker's earlier programs', so the summary's maximum is the reliable figure)",
    "detections": "sources kept by the core's filters in the residuals",
    "confirmed": "kept sources also kept in the master residual",
    "completeness": "fraction of the injected fakes matched by a kept source",
    "false": "kept sources matching no fake (a real transient counts too, for every "
    "combination alike)",
    "flux_50": "injected flux (ADU) at 50% completeness (logistic fit; nan: not reached)",
    "flux_90": "injected flux (ADU) at 90% completeness",
    "fakes_completeness": "completeness of the injected fakes (see the fakes table)",
    "fakes_false": "kept sources matching no fake, in the frames with fakes",
    "status": "ok, skipped (cannot run here: why) or failed (the stage and its error)",
    "directory": "the combination's outputs: compare/<directory>/",
}


def _cell(value: Any, fmt: str | None) -> str:
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "–"
        return format(float(value), fmt or ".3f")
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return str(value)


def format_rows(table: Any) -> list[list[str]]:
    """Every row of ``table`` as strings (floats in their column's format, nan as a dash)."""
    fmts = [col.info.format for col in table.itercols()]
    return [
        [_cell(row[name], fmt) for name, fmt in zip(table.colnames, fmts, strict=True)]
        for row in table
    ]


def markdown_table(table: Any) -> str:
    """``table`` as a Markdown table (floats with their column format, nan as a dash).

    Examples
    --------
    >>> from astropy.table import Table
    >>> print(markdown_table(Table({"a": ["x"], "q": [0.5]})))
    | a | q |
    |---|---|
    | x | 0.500 |
    """
    lines = ["| " + " | ".join(table.colnames) + " |", "|" + "---|" * len(table.colnames)]
    for cells in format_rows(table):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _html_table(table: Any, extra: Mapping[int, str] | None = None, css: str = "") -> str:
    head = "".join(
        f'<th title="{html.escape(_COLUMN_HELP.get(n, ""))}">{html.escape(n)}</th>'
        for n in table.colnames
    )
    if extra is not None:
        head += "<th>cutout</th>"
    body = []
    for i, cells in enumerate(format_rows(table)):
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        if extra is not None:
            tds += f"<td>{extra.get(i, '')}</td>"
        body.append(f"<tr>{tds}</tr>")
    return (
        f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>'
        + "\n".join(body)
        + "</tbody></table>"
    )


# ------------------------------------------------------------------------------ figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _pyplot().close(fig)


def _stamp(data: np.ndarray, x: float, y: float, half: int) -> np.ndarray:
    """A (2 half + 1)^2 stamp centred on (x, y); nan outside the image."""
    out = np.full((2 * half + 1, 2 * half + 1), np.nan, np.float32)
    ix, iy = round(x), round(y)
    y0, y1 = max(iy - half, 0), min(iy + half + 1, data.shape[0])
    x0, x1 = max(ix - half, 0), min(ix + half + 1, data.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - (iy - half) : y1 - (iy - half), x0 - (ix - half) : x1 - (ix - half)] = data[
            y0:y1, x0:x1
        ]
    return out


def cutout_strip(
    panels: Sequence[tuple[str, np.ndarray, bool]],
    x: float,
    y: float,
    half: int,
    path: Path,
    title: str = "",
) -> Path:
    """A PNG row of stamps centred on (``x``, ``y``), one per ``(label, image, is_z)``
    panel: images are scaled by their own 1st-99.5th percentiles, normalised residuals
    (``is_z``) on a fixed -5..5 sigma scale so that the residuals compare directly."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.9 * len(panels), 2.2), dpi=90)
    axes = np.atleast_1d(axes)
    for ax, (label, image, is_z) in zip(axes, panels, strict=True):
        stamp = _stamp(image, x, y, half)
        if is_z:
            lo, hi = -Z_RANGE, Z_RANGE
        else:
            finite = stamp[np.isfinite(stamp)]
            lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
        ax.imshow(stamp, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def residual_thumbnail(path: Path, png: Path, title: str, max_side: int = 600) -> Path:
    """A PNG of the normalised residual at ``path`` on a -5..5 sigma scale (binned down
    to about ``max_side`` pixels a side, keeping the largest |z| of each bin so that
    sources stay visible)."""
    plt = _pyplot()
    residual = io.read_residual(path)
    z = residual.normalized
    step = max(1, int(np.ceil(max(z.shape) / max_side)))
    if step > 1:
        ny, nx = (z.shape[0] // step) * step, (z.shape[1] // step) * step
        blocks = z[:ny, :nx].reshape(ny // step, step, nx // step, step)
        hi, lo = blocks.max(axis=(1, 3)), blocks.min(axis=(1, 3))
        z = np.where(hi >= -lo, hi, lo)
    fig, ax = plt.subplots(figsize=(4.2, 4.2 * z.shape[0] / z.shape[1] + 0.4), dpi=100)
    im = ax.imshow(z, origin="lower", cmap="gray", vmin=-Z_RANGE, vmax=Z_RANGE)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="σ")
    fig.tight_layout()
    _save(fig, png)
    return png


def residual_histogram(paths: Sequence[Path], png: Path, title: str) -> Path:
    """Histogram of the normalised pixels of the residuals at ``paths`` (pooled) against
    the unit Gaussian (log scale, so that the tails show)."""
    plt = _pyplot()
    rng = np.random.default_rng(0)
    pooled = []
    for p in paths:
        residual = io.read_residual(p)
        good = (residual.weight > 0) & (residual.noise > 0) & np.isfinite(residual.data)
        z = residual.normalized[good]
        if z.size > 500_000:
            z = rng.choice(z, 500_000, replace=False)
        pooled.append(z)
    z = np.concatenate(pooled) if pooled else np.zeros(0)
    fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=100)
    edges = np.linspace(-6, 6, 97)
    if z.size:
        ax.hist(
            np.clip(z, -6, 6),
            bins=edges,
            density=True,
            histtype="stepfilled",
            alpha=0.6,
            label=f"{len(paths)} residual(s)",
        )
        robust = 1.4826 * np.median(np.abs(z - np.median(z)))
        ax.text(
            0.02, 0.95, f"robust σ = {robust:.3f}", transform=ax.transAxes, fontsize=8, va="top"
        )
    xs = np.linspace(-6, 6, 400)
    ax.plot(xs, np.exp(-0.5 * xs**2) / np.sqrt(2 * np.pi), "k-", lw=1, label="unit Gaussian")
    ax.set_yscale("log")
    ax.set_ylim(1e-6, 1.0)
    ax.set_xlabel("(R - median) / noise  (clipped at ±6)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save(fig, png)
    return png


# ------------------------------------------------------------------------------ report


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;
max-width:1300px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:middle}
th{background:#f3f3f3;cursor:help}td:first-child,th:first-child{text-align:left}
tr:nth-child(even){background:#fafafa}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0}
figcaption{font-size:0.85em;text-align:center}
.note{font-size:0.85em;color:#555}.skip{color:#a33}
dl.help dt{font-weight:bold;float:left;clear:left;width:9em}dl.help dd{margin-left:10em}
img.cut{max-width:100%}
"""


def _residual_paths(run: Path, frames: Sequence[str]) -> list[Path]:
    return [p for p in (run / "residuals" / f"{f}_residual.fits" for f in frames) if p.exists()]


def write_report(result: Any, path: Path, *, max_cutouts: int = 100) -> Path:
    """Write the comparison's HTML report to ``path`` and its PNGs to ``figures/`` beside it.

    Parameters
    ----------
    result : oasis_apps.compare.CompareResult
    path : Path
        The HTML file (``compare/report.html``).
    max_cutouts : int
        Cutout strips for at most this many disagreements (the highest S/N first); the
        agreement table lists them all.

    Returns
    -------
    Path
        ``path``.
    """
    fig_dir = path.parent / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of an earlier report
        old.unlink()
    frames = sorted({str(f) for f in result.frames["frame"]})
    out = _report_head(result.directory.parent, len(frames))
    skipped = [c for c in result.combinations if c.skipped]
    if skipped:
        out.append("<h2>Skipped</h2><ul>")
        out += [
            f'<li class="skip"><b>{html.escape(c.name)}</b>: {html.escape(c.skipped)}</li>'
            for c in skipped
        ]
        out.append("</ul>")
    out.append("<h2>Summary</h2>")
    out.append(_html_table(result.summary))
    best = _best(result.summary)
    if best:
        out.append(f"<p>{html.escape(best)}</p>")
    if result.fakes is not None:
        out.append("<h2>Injected fakes</h2>")
        out.append(
            '<p class="note">The same fakes (positions and fluxes in '
            "<code>compare/fakes/fakes.ecsv</code>) were injected into every aligned frame "
            "once; each combination subtracted and searched those frames.</p>"
        )
        out.append(_html_table(result.fakes))
    out += _residual_section(result, frames, fig_dir)
    out.append("<h2>Per frame</h2>")
    out.append(_html_table(result.frames))
    out += _agreement_section(result, fig_dir, max_cutouts)
    out.append("<h2>Columns</h2><dl class='help'>")
    out += [f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in _COLUMN_HELP.items()]
    out.append("</dl></body></html>")
    io.write_text(path, "\n".join(out) + "\n")
    return path


def _report_head(target: Path, n_frames: int) -> list[str]:
    """The page's head, title and the line saying what was compared."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>OASIS compare: {html.escape(target.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Backend comparison for target <code>{html.escape(target.name)}</code></h1>",
        f'<p class="note">{html.escape(str(target))} · {n_frames} frame(s) · written '
        f"{time.strftime('%Y-%m-%d %H:%M')} by <code>oasis compare</code>. "
        "Every combination subtracted the same aligned frames against the same template; "
        "its outputs are in <code>compare/&lt;combination&gt;/</code>.</p>",
    ]


def _residual_section(result: Any, frames: list[str], fig_dir: Path) -> list[str]:
    """Per combination: its master residual and the histogram of its residual pixels."""
    out = ["<h2>Residuals</h2>"]
    out.append(
        '<p class="note">Left: the master residual, normalised (R - median)/noise on a '
        "±5σ scale. Right: every residual pixel of the combination, normalised, against the "
        "unit Gaussian of a noise-limited subtraction (log scale: excess wings are "
        "unsubtracted structure, a narrower core an overestimated noise image).</p>"
    )
    for name, run in result.runs.items():
        figs = []
        mr = run / "residuals" / "MR.fits"
        if mr.exists():
            png = residual_thumbnail(mr, fig_dir / f"mr_{_safe(name)}.png", f"{name}: MR")
            figs.append((png, "master residual"))
        paths = _residual_paths(run, frames)
        if paths:
            png = residual_histogram(paths, fig_dir / f"hist_{_safe(name)}.png", name)
            figs.append((png, "normalised residual pixels"))
        out.append(f"<h3>{html.escape(name)}</h3><div class='figs'>")
        for png, caption in figs:
            out.append(
                f'<figure><img src="{fig_dir.name}/{png.name}" '
                f'alt="{html.escape(name)} {caption}"><figcaption>{caption}</figcaption></figure>'
            )
        if not figs:
            out.append(
                f'<p class="skip">no residual ({html.escape(result.errors.get(name, ""))})</p>'
            )
        out.append("</div>")
    return out


def _agreement_section(result: Any, fig_dir: Path, max_cutouts: int) -> list[str]:
    """The sources some combinations kept and others did not, with cutout strips."""
    out = ["<h2>Agreement</h2>"]
    agreement = result.agreement
    if len(result.runs) < 2:
        out.append("<p>Only one combination ran: nothing to compare.</p>")
    elif len(agreement) == 0:
        out.append("<p>Every combination kept the same sources.</p>")
    else:
        out.append(
            f"<p>{len(agreement)} source(s) kept by some combinations and not others "
            "(matched within the extract stage's match radius). Each strip shows the "
            "science frame, the template and every combination's normalised residual "
            "(±5σ).</p>"
        )
        cutouts = _cutouts(result, fig_dir, max_cutouts)
        if len(cutouts) < len(agreement):
            out.append(
                f'<p class="note">Cutouts for the {len(cutouts)} highest-S/N disagreements '
                f"only (max_cutouts={max_cutouts}).</p>"
            )
        extra = {
            i: f'<img class="cut" src="{fig_dir.name}/{p.name}" alt="cutout {i + 1}">'
            for i, p in cutouts.items()
        }
        out.append(_html_table(agreement, extra, css="agree"))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _best(summary: Any) -> str:
    ok = [r for r in summary if str(r["status"]) == "ok" and np.isfinite(r["mean_q"])]
    if len(ok) < 2:
        return ""
    top = max(ok, key=lambda r: float(r["mean_q"]))
    return f"Highest mean Q: {top['combination']} ({float(top['mean_q']):.3f})."


def _cutouts(result: Any, fig_dir: Path, limit: int) -> dict[int, Path]:
    """Cutout strips of the ``limit`` highest-S/N disagreements; row index to PNG."""
    table = result.agreement
    snr = np.nan_to_num(np.asarray(table["snr"], float), nan=-np.inf)
    chosen = sorted(np.argsort(-snr, kind="stable")[: max(limit, 0)].tolist())
    frame_t = io.read_output_frame(result.template)
    template = frame_t.data
    fwhm = float(frame_t.fwhm or frame_t.header.get("FWHM", 3.0) or 3.0)
    half = int(max(12, 4 * fwhm))
    out: dict[int, Path] = {}
    cache: dict[str, list[tuple[str, np.ndarray, bool]]] = {}
    for i in chosen:
        row = table[i]
        frame = str(row["frame"])
        if frame not in cache:
            cache.clear()  # one frame's images at a time
            panels = [
                ("science", io.read_output_frame(result.aligned / f"{frame}.fits").data, False),
                ("template", template, False),
            ]
            for name, run in result.runs.items():
                p = run / "residuals" / f"{frame}_residual.fits"
                if p.exists():
                    panels.append((name, io.read_residual(p).normalized, True))
            cache[frame] = panels
        png = fig_dir / f"cutout_{int(row['id']):04d}.png"
        title = (
            f"#{int(row['id'])} {frame} ({float(row['x']):.0f}, {float(row['y']):.0f}): "
            f"kept by {row['found_by']}, not by {row['missing_from']}"
        )
        out[i] = cutout_strip(cache[frame], float(row["x"]), float(row["y"]), half, png, title)
    return out
