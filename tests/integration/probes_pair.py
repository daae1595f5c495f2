"""Probes of ``oasis subtract-pair --catalog`` and of hotpants on a cutout (issue 12).

The catalog is an output like the others: never an input, never another output, never
in a missing folder; a run writes it and nothing else beyond the named outputs. A
cutout with no star and no FWHM for hotpants ends in one line saying why.
"""

from __future__ import annotations

import shutil
import subprocess

from tests.integration.probe_kit import Probe, Workspace


def _out(ws: Workspace):
    return ws.dir / "out.fits"


def _cat(ws: Workspace):
    return ws.dir / "cands.ecsv"


def _pair(ws: Workspace, *more: object) -> list[object]:
    return ["subtract-pair", ws.science, ws.template, _out(ws), *more]


def _outputs(ws: Workspace) -> None:
    ws.outputs += [_out(ws), _cat(ws)]


def _catalog_written(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    from astropy.table import Table

    table = Table.read(_cat(ws), format="ascii.ecsv")
    assert {"x", "y", "flux", "flux_err", "snr", "reason"} <= set(table.colnames)
    assert table.meta["OASSTAGE"] == "extract"
    assert f"{_cat(ws)}: {len(table)} detection(s)" in proc.stdout, proc.stdout


def _empty_cutout(ws: Workspace) -> None:
    """63 x 63 flat-sky frames (no star, no FWHM card) beside the pair."""
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(0)
    for name in ("sky_sci.fits", "sky_tpl.fits"):
        path = ws.science.with_name(name)
        header = fits.Header({"GAIN": 1.5, "RDNOISE": 5.0, "SATURATE": 60000.0})
        fits.PrimaryHDU(rng.normal(300.0, 10.0, (63, 63)).astype(np.float32), header).writeto(path)
        ws.inputs.append(path)


_NO_HOTPANTS = "" if shutil.which("hotpants") else "hotpants not on PATH"

PROBES = [
    Probe(
        id="pair-catalog-writes-only-its-outputs",
        setup=_outputs,
        argv=lambda ws: _pair(ws, "--catalog", _cat(ws)),
        exit=0,
        check=_catalog_written,
    ),
    Probe(
        id="pair-catalog-is-the-output",
        argv=lambda ws: _pair(ws, "--catalog", _out(ws)),
        stderr=r"out\.fits: the --catalog file is also the output",
    ),
    Probe(
        id="pair-catalog-is-an-input",
        argv=lambda ws: _pair(ws, "--catalog", ws.template),
        stderr=r"tmpl\.fits: the --catalog file is one of the inputs",
    ),
    Probe(
        id="pair-catalog-is-the-noise-file",
        argv=lambda ws: _pair(ws, "--noise", _cat(ws), "--catalog", _cat(ws)),
        stderr=r"cands\.ecsv: the --catalog file is also the --noise file",
    ),
    Probe(
        id="pair-catalog-missing-folder",
        argv=lambda ws: _pair(ws, "--catalog", ws.dir / "nowhere" / "c.ecsv"),
        stderr=r"nowhere/c\.ecsv: the folder .*nowhere of the --catalog file does not exist",
    ),
    Probe(
        id="pair-catalog-unknown-extract-backend",
        argv=lambda ws: _pair(ws, "--catalog", _cat(ws), "-o", "extract.backend=nope"),
        stderr=r"extract backend 'nope' is not installed",
    ),
    Probe(
        id="pair-catalog-unknown-psf-backend",
        argv=lambda ws: _pair(ws, "--catalog", _cat(ws), "-o", "psf.backend=nope"),
        stderr=r"psf backend 'nope' is not installed",
    ),
    Probe(
        id="pair-hotpants-empty-cutout-says-why",
        setup=_empty_cutout,
        argv=lambda ws: [
            "subtract-pair",
            ws.science.with_name("sky_sci.fits"),
            ws.science.with_name("sky_tpl.fits"),
            _out(ws),
            "--subtract",
            "hotpants",
        ],
        stderr=(
            r"no source can be a kernel stamp star in the 63x63 frame .* FWHMs are unknown, "
            r"so hotpants cannot fit a kernel here"
        ),
        max_lines=None,  # the psf stage's warnings about the starless frames come first
        skip=_NO_HOTPANTS,
    ),
]
