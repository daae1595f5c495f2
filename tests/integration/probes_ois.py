"""Probes of the ``ois`` backend's kernel models (issue 12): an unknown model or a
negative regularisation is refused in one line; a starless cutout is subtracted (the
low-order kernel, flagged) instead of refused, and says so."""

from __future__ import annotations

import subprocess

from tests.integration.probe_kit import Probe, Workspace


def _out(ws: Workspace):
    return ws.dir / "out.fits"


def _pair(*options: str):
    return lambda ws: ["subtract-pair", ws.science, ws.template, _out(ws), *options]


def _starless_cutout(ws: Workspace) -> None:
    """63 x 63 flat-sky frames (no star) beside the pair, the science with a transient."""
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:63, :63]
    source = (
        4000.0 * np.exp(-0.5 * ((xx - 31) ** 2 + (yy - 31) ** 2) / 1.5**2) / (2 * np.pi * 1.5**2)
    )
    for name, extra in (("sky_sci.fits", source), ("sky_tpl.fits", 0.0)):
        path = ws.science.with_name(name)
        header = fits.Header({"GAIN": 1.5, "RDNOISE": 5.0, "SATURATE": 60000.0})
        data = rng.normal(300.0, 10.0, (63, 63)) + extra
        fits.PrimaryHDU(data.astype(np.float32), header).writeto(path)
        ws.inputs.append(path)
    ws.outputs.append(_out(ws))


def _low_kernel_flagged(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    from astropy.io import fits

    header = fits.getheader(_out(ws))
    assert header["KMODEL"] == "low"
    assert header["OAS CHOICE_KERNEL"] == "low"
    assert header["OAS FLAG"].startswith("fallback: low-order kernel: no star in both frames")
    assert header["OAS USABLE"]


PROBES = [
    Probe(
        id="ois-kernel-unknown",
        argv=_pair("-o", "subtract.ois.kernel=magic"),
        stderr=r"command line: \[subtract.ois\] kernel = 'magic': must be one of auto, isis, "
        r"delta, cross, low$",
    ),
    Probe(
        id="ois-delta-lambda-negative",
        argv=_pair("-o", "delta_lambda=-1"),
        stderr=r"command line: \[subtract.ois\] delta_lambda = -1.0: must be a finite number "
        r">= 0$",
    ),
    Probe(
        id="ois-starless-cutout-is-subtracted-and-flagged",
        setup=_starless_cutout,
        argv=lambda ws: [
            "subtract-pair",
            ws.science.with_name("sky_sci.fits"),
            ws.science.with_name("sky_tpl.fits"),
            _out(ws),
        ],
        exit=0,
        check=_low_kernel_flagged,
        max_lines=None,  # the warnings about the starless frames
    ),
]
