"""Probes of the native align backend's choice of method (issue 12, item 3): a frame no
method can align fails with one line saying what each method found; a method forced by
``align.native.initial`` is the one recorded in the aligned frames' headers."""

from __future__ import annotations

import subprocess

from astropy.io import fits

from tests.integration.probe_kit import Probe, Workspace


def _aligned_by_pointset(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    reference = (ws.target / "aligned" / "reference.txt").read_text().strip()
    frames = sorted((ws.target / "aligned").glob("*.fits"))
    assert len(frames) == 4
    for path in frames:
        header = fits.getheader(path)
        if path.stem == reference:
            assert header["OAS ALIGN_METHOD"] == "identity"
            continue
        assert header["OAS ALIGN_METHOD"] == "pointset", path.name
        assert header["OAS N_MATCHED"] >= 3 and header["OAS ALIGN_RMS"] < 0.3, path.name
        assert header["OAS CHOICE_ALIGN"].startswith("pointset ("), path.name
        assert header["OAS FALLBACK"] == "", path.name


PROBES = [
    Probe(
        id="align-no-method-pairs-enough-stars",
        argv=lambda ws: [
            "run",
            ws.target,
            "-q",
            "-j",
            "1",
            "-o",
            "align.native.initial=astroalign",
            "-o",
            "align.native.min_matched=1000",
        ],
        stderr=r"^error: .*: only 1 usable frame\(s\) after alignment; .*align frame "
        r"'sim_\d+': no transform found \(\d+ stars on the frame, \d+ on the reference, "
        r"1000 must match; astroalign: \d+ stars matched\); check that the frames overlap, "
        r"or lower align\.native\.thresh \(more stars\) or align\.native\.min_matched$",
        max_lines=None,
    ),
    Probe(
        id="align-pointset-recorded-in-headers",
        argv=lambda ws: [
            "run",
            ws.target,
            "-q",
            "-j",
            "1",
            "-o",
            "align.native.initial=pointset",
        ],
        exit=0,
        max_lines=None,
        check=_aligned_by_pointset,
    ),
]
