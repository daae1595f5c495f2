"""Probes of ``oasis get --unpack``: every file is read in full before it enters ``data/``.

A truncated file, a frame without a finite pixel, a file that is not FITS, an empty file and
a missing one are refused in one line each (then one ``error:`` line, exit 1) and nothing
reaches ``data/``; a real frame lacking only its final block padding (the shared ISIS
example) holds every pixel and is copied.
"""

from __future__ import annotations

import io as pyio
import subprocess
from collections.abc import Callable

import numpy as np

from tests.conftest import SHARED_DATA
from tests.integration.probe_kit import Probe, Workspace

ISIS_FRAME = SHARED_DATA / "isis_example" / "infile5.fits"


def _fits(data: np.ndarray) -> bytes:
    from astropy.io import fits

    buf = pyio.BytesIO()
    fits.PrimaryHDU(np.asarray(data, np.float32)).writeto(buf)
    return buf.getvalue()


def _incoming(name: str, payload: Callable[[], bytes]) -> Callable[[Workspace], None]:
    """A setup writing ``incoming/<name>`` (an input: it must not change)."""

    def setup(ws: Workspace) -> None:
        folder = ws.dir / "incoming"
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(payload())
        ws.inputs.append(folder / name)

    return setup


def _truncated() -> bytes:
    whole = _fits(np.random.default_rng(1).normal(100.0, 5.0, (64, 64)))
    return whole[: 2880 + 64 * 64 * 4 - 400]  # 100 pixels short (and no padding)


def _all_nan() -> bytes:
    data = np.full((64, 64), np.nan)
    data[0, :5] = np.inf
    return _fits(data)


def _unpack(name: str) -> Callable[[Workspace], list[object]]:
    return lambda ws: [
        "get",
        "--unpack",
        ws.dir / "incoming" / name,
        "--target",
        "t",
        "--root",
        ws.root,
        "-q",
    ]


def _refused(
    name: str, reason: str
) -> Callable[[Workspace, subprocess.CompletedProcess[str]], None]:
    """The warning line names the file and the reason; ``data/`` did not change."""

    def check(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
        first = proc.stderr.splitlines()[0]
        assert first.startswith(f"warning: {ws.dir / 'incoming' / name}: refused: "), first
        assert reason in first, first
        assert sorted(ws.frames) == sorted(p for p in ws.inputs if p.parent == ws.target / "data")

    return check


def _isis_setup(ws: Workspace) -> None:
    ws.inputs.append(ISIS_FRAME)


def _isis_copied(ws: Workspace, proc: subprocess.CompletedProcess[str]) -> None:
    copied = ws.target / "data" / ISIS_FRAME.name
    assert copied.read_bytes() == ISIS_FRAME.read_bytes()
    assert "1 copied, 0 already there, 0 refused" in proc.stdout


_ERROR = r"^error: oasis get: 1 file\(s\) refused \(see above\)"

PROBES = [
    Probe(
        id="get-unpack-truncated",
        setup=_incoming("short.fits", _truncated),
        argv=_unpack("short.fits"),
        stderr=_ERROR,
        max_lines=2,
        check=_refused(
            "short.fits",
            "truncated: HDU 0 declares 16384 bytes of data but the "
            "file stops 400 bytes short of them (pixels missing",
        ),
    ),
    Probe(
        id="get-unpack-all-nan",
        setup=_incoming("nan.fits", _all_nan),
        argv=_unpack("nan.fits"),
        stderr=_ERROR,
        max_lines=2,
        check=_refused("nan.fits", "every pixel is NaN or infinite"),
    ),
    Probe(
        id="get-unpack-not-fits",
        setup=_incoming("log.fits", lambda: b"2024-01-01 clouds all night\n" * 200),
        argv=_unpack("log.fits"),
        stderr=_ERROR,
        max_lines=2,
        check=_refused("log.fits", "not a FITS file (no SIMPLE card)"),
    ),
    Probe(
        id="get-unpack-empty",
        setup=_incoming("empty.fits", lambda: b""),
        argv=_unpack("empty.fits"),
        stderr=_ERROR,
        max_lines=2,
        check=_refused("empty.fits", "the file is empty"),
    ),
    Probe(
        id="get-unpack-named-not-fits-name",
        setup=_incoming("notes.txt", lambda: b"observing log"),
        argv=_unpack("notes.txt"),
        stderr=_ERROR,
        max_lines=2,
        check=_refused("notes.txt", "not a FITS file name"),
    ),
    Probe(
        id="get-unpack-missing",
        argv=_unpack("nowhere.fits"),
        stderr=r"incoming/nowhere\.fits: no such file or directory",
    ),
    Probe(
        id="get-unpack-isis-frame-without-padding",
        setup=_isis_setup,
        argv=lambda ws: ["get", "--unpack", ISIS_FRAME, "--target", "t", "--root", ws.root],
        exit=0,
        check=_isis_copied,
    ),
]
