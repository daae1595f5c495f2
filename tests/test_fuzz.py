"""Property-based probes of the command line: whatever FITS files a user feeds
``oasis subtract-pair`` and a 3-frame ``oasis run`` (random shapes down to 1xN, every
BITPIX with and without BZERO/BSCALE, tile-compressed files, NaN/inf patterns, constant
and empty images, bad-pixel masks of the wrong shape, and header cards holding NaN, 1e999,
strings or nonsense in GAIN, SATURATE, RDNOISE, CRVAL1, EXPTIME, MJD-OBS...), the command
ends with a result or with one ``error: ...`` line naming an OASIS error: never a
traceback, never an unexpected exception reported by the catch-all, never a hang.

The examples are derandomized and no example database is kept, so every run (and CI)
draws the same ones.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oasis_apps.cli import main

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Header cards a user's frames may get wrong, and what the core reads them for.
CARDS = ("GAIN", "RDNOISE", "SATURATE", "EXPTIME", "MJD-OBS", "CRVAL1", "CD1_1", "FWHM")


@attrs.frozen
class Raw:
    """A card value written as raw text (``NaN``, ``1E999``): astropy would not write it."""

    text: str


#: A value of None deletes the card.
ODD_VALUES = st.sampled_from(
    [
        None,
        Raw("NaN"),
        Raw("1E999"),
        Raw("-1E999"),
        Raw("INF"),
        Raw("1.2.3"),
        Raw(""),  # an undefined value
        1e300,
        -1e300,
        0.0,
        -5.0,
        "fast",
        "",
        True,
        99999999999999999999999,
    ]
)

#: Mostly the star field's own size (the deepest runs), else down to 1xN.
SHAPES = st.integers(0, 5).flatmap(
    lambda pick: (
        st.just((128, 128))
        if pick < 3
        else st.sampled_from([(1, 1), (1, 96), (96, 1), (2, 2), (3, 128), (128, 5), (64, 128)])
        if pick == 3
        else st.tuples(st.integers(1, 128), st.integers(1, 128))
    )
)

BITPIX = st.sampled_from(
    ["float32", "float64", "int16", "uint16", "int32", "uint8", "int64", "int16-scaled"]
)

NAN_PATTERNS = st.sampled_from(
    ["none", "none", "pixels", "row", "column", "half", "all", "inf", "-inf", "one-finite"]
)


@attrs.frozen
class FrameSpec:
    """The recipe of one FITS frame (drawn by hypothesis, made by :func:`write_frame`)."""

    kind: str  # sim (a simulated star field), noise, constant, empty, cube
    shape: tuple[int, int]
    level: float
    nan: str
    bitpix: str
    compressed: bool
    bpm: str  # none, good, wrong-shape
    cards: tuple[tuple[str, Any], ...]
    seed: int


def rarely(common: Any, *rare: Any) -> Any:
    """``common`` most of the time, each of ``rare`` about one time in 12. (Hypothesis
    favours the bounds of a range, so the rare values sit inside it.)"""
    n = 12 * len(rare)
    return st.integers(0, n).map(lambda i: rare[i // 12] if i % 12 == 6 else common)


@st.composite
def frame_specs(
    draw: Any, *, shape: tuple[int, int] | None = None, kind: str | None = None, clean: bool = False
) -> Any:
    """A frame's recipe; ``clean``: only its storage varies (BITPIX, compression)."""
    # the common case first: hypothesis favours the first choices, which go deepest
    kind = kind or draw(rarely("sim", "noise", "constant", "empty", "cube"))
    return FrameSpec(
        kind=kind,
        shape=shape or draw(SHAPES),
        level=draw(st.sampled_from([0.0, 1.0, -7.5, 1e4, 6e4, 1e30])),
        nan="none" if clean else draw(NAN_PATTERNS),
        bitpix=draw(BITPIX),
        compressed=draw(rarely(False, True)),
        bpm="none" if clean else draw(rarely("none", "good", "wrong-shape")),
        cards=()
        if clean
        else tuple(
            (key, draw(ODD_VALUES))
            for key in draw(st.lists(st.sampled_from(CARDS), max_size=4, unique=True))
        ),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def pairs(draw: Any) -> tuple[FrameSpec, FrameSpec, str]:
    science = draw(frame_specs())
    if draw(rarely(False, True)):  # now and then, two unrelated files
        template = draw(frame_specs())
    else:  # mostly a pair that can be subtracted, each with its own faults
        template = draw(frame_specs(shape=science.shape, kind=science.kind))
    return science, template, draw(st.sampled_from(["ois", "ois", "ois", "zogy"]))


@st.composite
def series(draw: Any) -> list[FrameSpec]:
    """Three star fields: each stored its own way, one of them (at most) faulty."""
    frames = [draw(frame_specs(shape=(128, 128), kind="sim", clean=True)) for _ in range(3)]
    odd = draw(st.integers(0, 3))
    if odd < 3:
        frames[odd] = draw(frame_specs(shape=draw(st.one_of(st.just((128, 128)), SHAPES))))
    return frames


# ------------------------------------------------------------------------ making files


@pytest.fixture(scope="module")
def star_fields(tmp_path_factory: Any) -> list[np.ndarray]:
    """Three simulated 128x128 star fields (float64), the raw material of ``sim`` frames."""
    from astropy.io import fits

    from oasis_core.engine.plugins import Registry

    directory = tmp_path_factory.mktemp("fuzzsim")
    Registry().simulator("native").simulate(
        directory, n_frames=3, shape=(128, 128), seed=5, transients=0
    )
    return [np.asarray(fits.getdata(p), np.float64) for p in sorted(directory.glob("*.fits"))]


def _image(spec: FrameSpec, field: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    ny, nx = spec.shape
    if spec.kind == "sim":
        data = field[:ny, :nx].copy()
    elif spec.kind == "noise":
        data = spec.level + rng.normal(0.0, 10.0, (ny, nx))
    else:
        data = np.full((ny, nx), spec.level)
    if spec.nan == "pixels":
        data[rng.random(data.shape) < 0.02] = np.nan
    elif spec.nan == "row":
        data[ny // 2, :] = np.nan
    elif spec.nan == "column":
        data[:, nx // 2] = np.nan
    elif spec.nan == "half":
        data[: max(1, ny // 2), :] = np.nan
    elif spec.nan == "all":
        data[:] = np.nan
    elif spec.nan == "one-finite":
        keep = data[0, 0]
        data[:] = np.nan
        data[0, 0] = keep
    elif spec.nan in ("inf", "-inf"):
        data[rng.random(data.shape) < 0.02] = np.inf if spec.nan == "inf" else -np.inf
    return data


def _hdu(spec: FrameSpec, data: np.ndarray) -> Any:
    from astropy.io import fits

    if spec.bitpix.startswith("float"):
        return fits.PrimaryHDU(data.astype(spec.bitpix))
    if spec.bitpix == "int16-scaled":
        hdu = fits.PrimaryHDU(
            np.nan_to_num(data, nan=0.0, posinf=1e4, neginf=-1e4).astype(np.float32)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdu.scale("int16", "minmax")
        return hdu
    info = np.iinfo(spec.bitpix)
    low, high = max(info.min, -(2**53)), min(info.max, 2**53)  # exact as float64
    clean = np.clip(np.round(np.nan_to_num(data, nan=0.0, posinf=high, neginf=low)), low, high)
    return fits.PrimaryHDU(clean.astype(spec.bitpix))


def write_frame(spec: FrameSpec, field: np.ndarray, path: Path) -> Path:
    """Write the frame ``spec`` describes (star field ``field`` for ``sim``) to ``path``."""
    from astropy.io import fits

    if spec.kind == "empty":
        hdul = fits.HDUList([fits.PrimaryHDU()])
    elif spec.kind == "cube":
        hdul = fits.HDUList([fits.PrimaryHDU(np.zeros((2, *spec.shape), np.float32))])
    else:
        data = _image(spec, field)
        hdu = _hdu(spec, data)
        hdu.header["GAIN"] = 1.5
        hdu.header["RDNOISE"] = 5.0
        hdu.header["EXPTIME"] = 60.0
        hdu.header["MJD-OBS"] = 60000.0 + spec.seed / 1e4
        for key, value in (
            ("CTYPE1", "RA---TAN"),
            ("CTYPE2", "DEC--TAN"),
            ("CRVAL1", 150.0),
            ("CRVAL2", 2.0),
            ("CRPIX1", spec.shape[1] / 2),
            ("CRPIX2", spec.shape[0] / 2),
            ("CD1_1", -1e-4),
            ("CD2_2", 1e-4),
        ):
            hdu.header[key] = value
        if spec.compressed:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hdu = fits.CompImageHDU(np.asarray(hdu.data), hdu.header)
            hdul = fits.HDUList([fits.PrimaryHDU(), hdu])
        else:
            hdul = fits.HDUList([hdu])
        raws = {}
        for i, (key, value) in enumerate(spec.cards):
            target = hdul[-1].header
            if value is None:
                target.remove(key, ignore_missing=True)
            elif isinstance(value, Raw):
                raws[key] = (f"RAW{i}XYZ", value.text)
                target[key] = raws[key][0]
            else:
                target[key] = value
        if spec.bpm != "none":
            shape = spec.shape if spec.bpm == "good" else (spec.shape[0] + 1, spec.shape[1])
            bpm = np.zeros(shape, np.uint8)
            bpm[0, 0] = 1
            hdul.append(fits.ImageHDU(bpm, name="BPM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdul.writeto(path, overwrite=True)
    if spec.kind not in ("empty", "cube"):
        _patch_raw_cards(path, raws)
    return path


def _patch_raw_cards(path: Path, raws: dict[str, tuple[str, str]]) -> None:
    """Replace each placeholder card by the raw text astropy would not write."""
    blob = bytearray(path.read_bytes())
    for key, (placeholder, text) in raws.items():
        at = blob.index(f"'{placeholder}".encode())
        start = at - 10  # "KEYWORD = " precedes the value
        assert blob[start : start + len(key)] == key.encode()
        card = f"{key:<8}= {text:>20}" if text else f"{key:<8}="
        blob[start : start + 80] = card.ljust(80).encode()
    path.write_bytes(bytes(blob))


# ----------------------------------------------------------------------- running oasis


class Hang(Exception):
    """The command ran longer than the fuzz allows."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_oasis(argv: Sequence[str], *, seconds: int = 120) -> tuple[int, str]:
    """``oasis *argv`` in this process; return the exit status and stderr."""
    err, out = io.StringIO(), io.StringIO()
    with (
        time_limit(seconds),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # the CLI prints warnings; here only errors count
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def assert_result_or_one_line(code: int, stderr: str, argv: Sequence[Any]) -> None:
    where = f"oasis {' '.join(map(str, argv))}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, where
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if code == 0:
        assert not errors, where
        event("result")
        return
    event(re.sub(r"/\S*/", "", " ".join(errors[-1].split()[:5])) if errors else f"exit {code}")
    assert code == 1, f"exit {code}; {where}"
    assert len(errors) == 1 and lines[-1] == errors[0], where
    # the catch-all names an unexpected exception: each one is a fault to fix at its root
    assert "oasis --debug shows the traceback" not in errors[0], where


def _valid_fits(path: Path, shape: tuple[int, int]) -> None:
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(path) as hdul:
            hdul.verify("exception")
            assert hdul[0].data.shape == shape


@settings(FUZZ, max_examples=30)
@given(case=pairs())
def test_subtract_pair_ends_in_a_result_or_one_error_line(case, star_fields):
    science, template, method = case
    with tempfile.TemporaryDirectory(prefix="oasis-fuzz-") as tmp:
        sci = write_frame(science, star_fields[0], Path(tmp) / "sci.fits")
        tpl = write_frame(template, star_fields[1], Path(tmp) / "tmpl.fits")
        before = (sci.read_bytes(), tpl.read_bytes())
        out = Path(tmp) / "out.fits"
        noise = Path(tmp) / "n.fits"
        argv = ["subtract-pair", sci, tpl, out, "--subtract", method, "--noise", noise]
        code, stderr = run_oasis(argv)
        assert_result_or_one_line(code, stderr, argv)
        assert (sci.read_bytes(), tpl.read_bytes()) == before
        if code == 0:
            _valid_fits(out, science.shape)
            _valid_fits(Path(tmp) / "n.fits", science.shape)
        else:
            assert not out.exists()


@settings(FUZZ, max_examples=8)
@given(frames=series())
def test_three_frame_pipeline_ends_in_a_result_or_one_error_line(frames, star_fields):
    from oasis_core.engine.tree import Target, init_root

    with tempfile.TemporaryDirectory(prefix="oasis-fuzz-") as tmp:
        target = Target(init_root(Path(tmp)) / "targets" / "t").create()
        for i, spec in enumerate(frames):
            write_frame(spec, star_fields[i], target.data / f"f{i}.fits")
        argv = ["run", target.path, "-q", "-j", "1"]
        code, stderr = run_oasis(argv, seconds=240)
        assert_result_or_one_line(code, stderr, argv)
        if code == 0:
            assert (target.path / "sources" / "total_sources.txt").is_file()


def test_a_broken_pair_through_the_real_command(star_fields, tmp_path):
    """The same promise in a subprocess: big-endian integers with BZERO, NaN cards in the
    WCS and the gain, a NaN row: a result, a warning per file, no traceback."""
    base: dict[str, Any] = {
        "kind": "sim",
        "shape": (128, 128),
        "level": 0.0,
        "compressed": False,
        "bpm": "none",
        "seed": 1,
    }
    sci = FrameSpec(
        nan="row", bitpix="uint16", cards=(("CRVAL1", Raw("NaN")), ("GAIN", Raw("NaN"))), **base
    )
    tpl = FrameSpec(nan="none", bitpix="int16-scaled", cards=(("SATURATE", Raw("1E999")),), **base)
    paths = [
        write_frame(sci, star_fields[0], tmp_path / "sci.fits"),
        write_frame(tpl, star_fields[1], tmp_path / "tmpl.fits"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", "subtract-pair", *map(str, paths), "out.fits"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    dropped = [ln for ln in proc.stderr.splitlines() if "cannot be used" in ln]
    assert len(dropped) == 2, proc.stderr
    assert "sci.fits" in dropped[0] and "CRVAL1 = NaN" in dropped[0] and "GAIN = NaN" in dropped[0]
    assert "tmpl.fits" in dropped[1] and "SATURATE = inf" in dropped[1]
    _valid_fits(tmp_path / "out.fits", (128, 128))
