"""The tables of a comparison (:mod:`oasis_apps.compare`): per frame, per combination,
and the sources some combinations kept and others did not; saved as ECSV and Markdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oasis_apps.compare_choices import Combination
from oasis_apps.compare_stages import kept_sources
from oasis_core.engine import io

__all__ = [
    "FRAME_COLUMNS",
    "agreement_table",
    "make_table",
    "previous_rows",
    "save_table",
    "summary_table",
]

FRAME_COLUMNS = (
    ("frame", str),
    ("combination", str),
    ("subtract", str),
    ("q", float),
    ("noise_norm", float),
    ("star_rms", float),
    ("seconds", float),
    ("peak_mb", float),
    ("detections", int),
    ("confirmed", int),
    ("flag", str),
)


def previous_rows(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Combination -> frame -> row of an earlier ``frames.ecsv`` (empty when none)."""
    from astropy.table import Table

    if not path.exists():
        return {}
    try:
        table = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in table:
        values = {c: row[c] for c in ("seconds", "peak_mb") if c in table.colnames}
        out.setdefault(str(row["combination"]), {})[str(row["frame"])] = values
    return out


def make_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, type]]) -> Any:
    from astropy.table import Table

    names = [c for c, _ in columns]
    table = Table(
        rows=[[r.get(c) for c in names] for r in rows] or None,
        names=names,
        dtype=[t for _, t in columns],
    )
    for col in table.itercols():
        if col.dtype.kind == "f":
            col.info.format = ".3f"
    return table


def save_table(table: Any, stem: Path) -> None:
    from oasis_apps.report import markdown_table

    io.write_table(table, stem.with_suffix(".ecsv"))
    io.write_text(stem.with_suffix(".md"), markdown_table(table) + "\n")


def _nanmedian(values: Any) -> float:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def summary_table(
    combos: Sequence[Combination],
    frames: Any,
    fakes: Any,
    errors: Mapping[str, str],
    runs: Mapping[str, Path],
) -> Any:
    rows = []
    for c in combos:
        sel = frames[np.asarray(frames["combination"]).astype(str) == c.name]
        row: dict[str, Any] = {
            "combination": c.name,
            "status": (
                f"skipped: {c.skipped}"
                if c.skipped
                else f"failed {errors[c.name]}"
                if c.name in errors
                else "ok"
            ),
            "frames": len(sel),
            "mean_q": float(np.nanmean(sel["q"])) if len(sel) else np.nan,
            "min_q": float(np.nanmin(sel["q"])) if len(sel) else np.nan,
            "noise_norm": _nanmedian(sel["noise_norm"]),
            "star_rms": _nanmedian(sel["star_rms"]),
            "seconds": _nanmedian(sel["seconds"]),
            "peak_mb": float(np.nanmax(sel["peak_mb"]))
            if len(sel) and np.isfinite(sel["peak_mb"]).any()
            else np.nan,
            "detections": int(np.sum(sel["detections"])),
            "confirmed": int(np.sum(sel["confirmed"])),
            "directory": str(runs[c.name].name) if c.name in runs else "",
        }
        rows.append(row)
    columns = [
        ("combination", str),
        ("status", str),
        ("frames", int),
        ("mean_q", float),
        ("min_q", float),
        ("noise_norm", float),
        ("star_rms", float),
        ("seconds", float),
        ("peak_mb", float),
        ("detections", int),
        ("confirmed", int),
        ("directory", str),
    ]
    table = make_table(rows, columns)
    table["noise_norm"].info.description = "median over frames"
    table["star_rms"].info.description = "median over frames"
    table["seconds"].info.description = "median over frames"
    table["peak_mb"].info.description = "largest over frames"
    if fakes is not None:
        by = {str(r["combination"]): r for r in fakes}
        for col in ("completeness", "false"):
            dtype = float if col == "completeness" else int
            values = [
                by[c.name][col] if c.name in by else (np.nan if dtype is float else -1)
                for c in combos
            ]
            table[f"fakes_{col}"] = np.asarray(values, dtype)
        table["fakes_completeness"].info.format = ".3f"
    return table


def agreement_table(contexts: Mapping[str, Any], radius: float) -> Any:
    """Sources kept by some combinations and not others, one row per position and frame.

    Detections of different combinations within ``radius`` pixels in the same frame are
    the same source (grouped brightest first).
    """
    points: dict[str, list[tuple[float, float, float, str]]] = {}
    for name, ctx in contexts.items():
        kept, _ = kept_sources(ctx)
        for row in kept:
            snr = float(row["snr"]) if "snr" in kept.colnames else float("nan")
            points.setdefault(str(row["frame"]), []).append(
                (snr, float(row["x"]), float(row["y"]), name)
            )
    everyone = list(contexts)
    rows = []
    for frame in sorted(points):
        groups: list[dict[str, Any]] = []
        for snr, x, y, name in sorted(points[frame], key=lambda p: -np.nan_to_num(p[0])):
            for g in groups:
                if name not in g["by"] and (g["x"] - x) ** 2 + (g["y"] - y) ** 2 <= radius**2:
                    g["by"].append(name)
                    break
            else:
                groups.append({"x": x, "y": y, "snr": snr, "by": [name]})
        for g in groups:
            if len(g["by"]) < len(everyone):
                rows.append(
                    {
                        "frame": frame,
                        "x": g["x"],
                        "y": g["y"],
                        "snr": g["snr"],
                        "found_by": ",".join(n for n in everyone if n in g["by"]),
                        "missing_from": ",".join(n for n in everyone if n not in g["by"]),
                    }
                )
    columns = [
        ("frame", str),
        ("x", float),
        ("y", float),
        ("snr", float),
        ("found_by", str),
        ("missing_from", str),
    ]
    table = make_table(rows, columns)
    table.add_column(np.arange(1, len(table) + 1, dtype=int), name="id", index=0)
    return table
