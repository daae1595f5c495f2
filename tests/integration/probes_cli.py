"""Probes of the command line itself: output paths, unknown backends, plugin faults, broken
header cards, and the one-line rule for every error (the traceback only with ``--debug``)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

from tests.integration.probe_kit import Probe, Workspace

#: A plugin whose backends raise plain exceptions (a plugin author's bug), installed in the
#: workspace as a distribution with an entry point, so that the subprocess finds it the
#: way it finds any third-party plugin.
FAULTY_PLUGIN = textwrap.dedent(
    '''
    """Backends that raise plain exceptions."""
    from oasis_core.contracts.backends import MrBackend, SubtractBackend
    from oasis_core.contracts.hookspecs import hookimpl


    class FaultySubtract(SubtractBackend):
        name = "faulty"

        def subtract(self, science, template, *, options, workdir):
            raise RuntimeError("kernel exploded")


    class FaultyMr(MrBackend):
        name = "faulty"

        def master(self, residuals, *, options, workdir):
            return 1 / 0


    @hookimpl
    def oasis_subtract_backends():
        yield FaultySubtract()


    @hookimpl
    def oasis_mr_backends():
        yield FaultyMr()
    '''
)


def _plugin_dir(ws: Workspace) -> Path:
    return ws.dir / "plugin"


def install_faulty_plugin(ws: Workspace) -> None:
    """Install ``oasis-faulty 0.2`` (entry point ``faulty``) in the workspace."""
    where = _plugin_dir(ws)
    where.mkdir()
    (where / "oasis_faulty.py").write_text(FAULTY_PLUGIN)
    info = where / "oasis_faulty-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oasis-faulty\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text("[oasis.plugins]\nfaulty = oasis_faulty\n")


def faulty_env(ws: Workspace) -> dict[str, str]:
    """The plugin on the path; no ``__pycache__`` written beside it."""
    path = os.pathsep.join(p for p in (str(_plugin_dir(ws)), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}


def _out(ws: Workspace) -> Path:
    return ws.dir / "out.fits"


def _pair(ws: Workspace, output: Path, *more: object) -> list[object]:
    return ["subtract-pair", ws.science, ws.template, output, *more]


def _hard_link(ws: Workspace) -> None:
    link = ws.science.with_name("link.fits")
    os.link(ws.science, link)
    ws.inputs.append(link)


def _readonly_folder(ws: Workspace) -> None:
    (ws.dir / "ro").mkdir()
    (ws.dir / "ro").chmod(0o555)


def _a_file(ws: Workspace) -> None:
    (ws.dir / "notes.txt").write_text("a file, not a folder\n")
    ws.inputs.append(ws.dir / "notes.txt")


def nan_wcs_copy(ws: Workspace) -> Path:
    """A copy of the science frame whose ``CRVAL1`` card reads ``NaN``.

    astropy refuses to write such a card (it would turn it into the string 'NaN'); other
    writers do not, so the bytes are written as they would: a number field of ``NaN``.
    """
    data = bytearray(ws.science.read_bytes())
    at = data.index(b"CRVAL1  =")
    data[at : at + 80] = (b"CRVAL1  = " + b"NaN".rjust(20)).ljust(80)
    path = ws.science.with_name("sci_nan.fits")
    path.write_bytes(bytes(data))
    return path


def _nan_setup(ws: Workspace) -> None:
    ws.inputs.append(nan_wcs_copy(ws))
    ws.outputs.append(_out(ws))


def _nan_check(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    import warnings

    from astropy.io import fits

    warned = [ln for ln in proc.stderr.splitlines() if "CRVAL1" in ln]
    assert len(warned) == 1, proc.stderr
    assert "sci_nan.fits" in warned[0] and "NaN" in warned[0] and "WCS" in warned[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid file: no card astropy must fix
        with fits.open(_out(ws)) as hdul:
            hdul.verify("exception")
            assert "CRVAL1" not in hdul[0].header and "CTYPE1" not in hdul[0].header
            assert hdul[0].data.shape == (128, 128)
            assert [h.name for h in hdul[1:3]] == ["NOISE", "WEIGHT"]


def _plugin_setup(ws: Workspace) -> None:
    install_faulty_plugin(ws)


def _debug_check(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    # the chained original is part of the traceback, and the line still comes last
    assert "RuntimeError: kernel exploded" in proc.stderr
    assert "The above exception was the direct cause" in proc.stderr


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

PROBES = [
    Probe(
        id="pair-unknown-method",
        argv=lambda ws: _pair(ws, _out(ws), "--subtract", "nonexistent"),
        stderr=r"subtract backend 'nonexistent' is not installed; installed: .*ois",
    ),
    Probe(
        id="pair-output-is-science",
        argv=lambda ws: _pair(ws, ws.science),
        stderr=r"sci\.fits: the output is one of the inputs \(.*sci\.fits\)",
    ),
    Probe(
        id="pair-output-is-template",
        argv=lambda ws: _pair(ws, ws.template),
        stderr=r"tmpl\.fits: the output is one of the inputs \(.*tmpl\.fits\)",
    ),
    Probe(
        id="pair-output-hard-link-to-input",
        setup=_hard_link,
        argv=lambda ws: _pair(ws, ws.science.with_name("link.fits")),
        stderr=r"link\.fits: the output is one of the inputs \(.*sci\.fits\) through a hard link",
    ),
    Probe(
        id="pair-noise-is-input",
        argv=lambda ws: _pair(ws, _out(ws), "--noise", ws.template),
        stderr=r"tmpl\.fits: the --noise file is one of the inputs",
    ),
    Probe(
        id="pair-noise-is-output",
        argv=lambda ws: _pair(ws, _out(ws), "--noise", _out(ws)),
        stderr=r"out\.fits: the --noise file is also the output",
    ),
    Probe(
        id="pair-output-missing-folder",
        argv=lambda ws: _pair(ws, ws.dir / "nowhere" / "out.fits"),
        stderr=r"nowhere/out\.fits: the folder .*nowhere of the output does not exist",
    ),
    Probe(  # works as root too: no permission bit is involved
        id="pair-output-under-a-file",
        setup=_a_file,
        argv=lambda ws: _pair(ws, ws.dir / "notes.txt" / "out.fits"),
        stderr=r"notes\.txt/out\.fits: .*notes\.txt is not a folder",
    ),
    Probe(
        id="pair-output-read-only-folder",
        setup=_readonly_folder,
        argv=lambda ws: _pair(ws, ws.dir / "ro" / "out.fits"),
        stderr=r"ro/out\.fits: cannot write the output in .*ro \(Permission denied\)",
        skip="root writes into read-only folders" if _ROOT else "",
    ),
    Probe(
        id="pair-nan-in-wcs-card",
        setup=_nan_setup,
        argv=lambda ws: [
            "subtract-pair",
            ws.science.with_name("sci_nan.fits"),
            ws.template,
            _out(ws),
        ],
        exit=0,
        check=_nan_check,
    ),
    Probe(
        id="pair-plugin-raises",
        setup=_plugin_setup,
        env=faulty_env,
        argv=lambda ws: _pair(ws, _out(ws), "--subtract", "faulty"),
        stderr=(
            r"subtract backend 'faulty' \(oasis-faulty==0\.2\) failed in subtract\(\) on "
            r"frame sci .*: RuntimeError: kernel exploded"
        ),
    ),
    Probe(
        id="mr-plugin-raises",
        setup=_plugin_setup,
        env=faulty_env,
        argv=lambda ws: ["run", ws.target, "-q", "-j", "1", "--mr", "faulty"],
        stderr=(
            r"^error: mr backend 'faulty' \(oasis-faulty==0\.2\) failed in master\(\) on "
            r"\d residuals \(.*\): ZeroDivisionError: division by zero$"
        ),
        max_lines=None,  # the stages before mr may warn about frames
    ),
    Probe(
        id="pair-plugin-raises-oasis-debug",
        setup=_plugin_setup,
        env=lambda ws: {**faulty_env(ws), "OASIS_DEBUG": "1"},
        argv=lambda ws: _pair(ws, _out(ws), "--subtract", "faulty"),
        stderr=r"subtract backend 'faulty' \(oasis-faulty==0\.2\) failed",
        max_lines=None,
        traceback=True,
        check=_debug_check,
    ),
    Probe(
        id="pair-unknown-method-debug-flag",
        argv=lambda ws: ["--debug", *_pair(ws, _out(ws), "--subtract", "nonexistent")],
        stderr=r"subtract backend 'nonexistent' is not installed",
        max_lines=None,
        traceback=True,
    ),
]
