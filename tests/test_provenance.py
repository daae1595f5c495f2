"""Provenance: what makes a unit of work current, and what redoes it.

An output is current only when its recorded stage, backend, options hash and inputs
(every one, no more, no fewer) match the present ones; the options hash covers the
contents of every file an option names (``option(..., path=True)``), and a file's digest
is never reused after its content changed, even when its size and modification time
were kept.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import attrs
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_core.contracts.backends import option
from oasis_core.engine.provenance import (
    MISSING,
    Provenance,
    is_current,
    option_files,
    options_hash,
    recorded,
)


@attrs.frozen(kw_only=True)
class FileOptions:
    level: float = option(1.0, "a number", range=(0, None))
    config: str = option("", "a configuration file", path=True)


def _prov(inputs, options=None, *, stage="subtract", backend="b") -> Provenance:
    return Provenance(
        stage=stage,
        backend=backend,
        plugin="p==1",
        inputs=inputs,
        options=options if options is not None else FileOptions(),
    )


def _write_fits(path: Path, prov: Provenance) -> Path:
    from oasis_core.engine.io import apply_cards

    hdu = fits.PrimaryHDU(np.zeros((4, 4), np.float32))
    apply_cards(hdu.header, prov.header_cards())
    hdu.writeto(path)
    return path


def _write_ecsv(path: Path, prov: Provenance) -> Path:
    table = Table({"x": [1.0]})
    table.meta.update(
        {k: str(v[0] if isinstance(v, tuple) else v) for k, v in prov.cards().items()}
    )
    table.write(path, format="ascii.ecsv")
    return path


def _edit_keeping_size_and_mtime(path: Path, text: str) -> None:
    """Rewrite ``path`` as ``cp -p`` / ``rsync -t`` / ``touch -r`` leave it: new content,
    same size, the old modification time."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


# ------------------------------------------------------------ files named by options


def test_the_options_hash_follows_the_content_of_a_named_file(tmp_path):
    cfg = tmp_path / "isis_config"
    cfg.write_text("deg_spatial 2\n")
    opts = FileOptions(config=str(cfg))
    first = _prov({}, opts).digest()
    assert _prov({}, opts).digest() == first, "the same content must give the same hash"
    cfg.write_text("deg_spatial 1\n")
    edited = _prov({}, opts).digest()
    assert edited != first, "editing the named file must change the options hash"
    cfg.write_text("deg_spatial 2\n")
    assert _prov({}, opts).digest() == first, "the hash is of the content, not of the edit"


def test_a_missing_named_file_has_its_own_marker(tmp_path):
    cfg = tmp_path / "isis_config"
    opts = FileOptions(config=str(cfg))
    assert option_files(opts) == {"config": MISSING}
    missing = _prov({}, opts).digest()
    cfg.write_text("deg_spatial 2\n")
    assert option_files(opts)["config"] not in (MISSING, "")
    assert _prov({}, opts).digest() != missing, "a file appearing must redo the work"


def test_no_file_named_keeps_the_plain_options_hash():
    opts = FileOptions(level=2.0)
    assert option_files(opts) == {}
    # outputs made before files were hashed stay current when no option names a file
    assert _prov({}, opts).digest() == options_hash(opts, None)


def test_the_files_are_hashed_before_the_work_and_travel_with_the_provenance(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("a 1\n")
    prov = _prov({}, FileOptions(config=str(cfg)))
    digest = prov.digest()
    cfg.write_text("a 2\n")  # edited while the unit runs: the recorded hash is the old one
    assert prov.digest() == digest
    assert pickle.loads(pickle.dumps(prov)).digest() == digest  # as a worker gets it
    assert _prov({}, FileOptions(config=str(cfg))).digest() != digest


def test_the_subtract_backend_auto_hashes_every_candidates_files(tmp_path):
    """``auto``'s options are a mapping of each candidate's options object."""
    cfg = tmp_path / "isis_config"
    cfg.write_text("deg_spatial 2\n")
    options = {"ois": FileOptions(config=str(cfg)), "zogy": FileOptions()}
    first = _prov({}, options, backend="auto").digest()
    assert set(option_files(options)) == {"ois.config"}
    cfg.write_text("deg_spatial 1\n")
    assert _prov({}, options, backend="auto").digest() != first


def test_the_ois_isis_config_is_declared_a_file():
    from oasis_ois.ois import OisOptions

    field = attrs.fields_dict(OisOptions)["isis_config"]
    assert field.metadata["path"] is True
    assert option_files(OisOptions(isis_config="/nonexistent")) == {"isis_config": MISSING}


def test_header_history_records_the_named_files(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("x\n")
    prov = _prov({}, FileOptions(config=str(cfg)))
    history = prov.header_cards()["HISTORY"]
    assert f"subtract.b.config: sha256 {prov.files['config']}"[:72] in history


# ------------------------------------------------------------ input file digests


def test_an_input_edited_keeping_size_and_mtime_is_seen_in_the_same_process(tmp_path):
    """The digest cache must not hand back the old content's digest (the hole that left
    an edited configs/default.sex "already up to date" in a long-lived process)."""
    src = tmp_path / "default.sex"
    src.write_text("DETECT_THRESH    1.5\n")
    prov = _prov({"cfg:default.sex": src})
    out = _write_fits(tmp_path / "out.fits", prov)
    assert is_current(out, _prov({"cfg:default.sex": src}))
    _edit_keeping_size_and_mtime(src, "DETECT_THRESH    2.5\n")
    assert not is_current(out, _prov({"cfg:default.sex": src}))


def test_a_file_replaced_by_another_with_the_same_stat_is_seen(tmp_path):
    """``rsync``/``mv`` of a same-size file with the old mtime onto the input."""
    src = tmp_path / "frame.fits"
    src.write_bytes(b"A" * 64)
    out = _write_fits(tmp_path / "out.fits", _prov({"data": src}))
    st = src.stat()
    other = tmp_path / "new"
    other.write_bytes(b"B" * 64)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    other.replace(src)
    assert not is_current(out, _prov({"data": src}))


# ------------------------------------------------------------ is_current


@pytest.mark.parametrize("write", [_write_fits, _write_ecsv], ids=["fits", "ecsv"])
def test_is_current_needs_the_same_inputs_options_stage_and_backend(tmp_path, write):
    a = tmp_path / "a.fits"
    b = tmp_path / "b.fits"
    a.write_bytes(b"a" * 10)
    b.write_bytes(b"b" * 10)
    suffix = ".fits" if write is _write_fits else ".ecsv"
    out = write(tmp_path / f"out{suffix}", _prov({"science": a, "template": b}))
    assert recorded(out) is not None
    assert is_current(out, _prov({"science": a, "template": b}))
    # a changed input (the template: resume must not keep stale residuals)
    b.write_bytes(b"c" * 10)
    assert not is_current(out, _prov({"science": a, "template": b}))
    b.write_bytes(b"b" * 10)
    assert is_current(out, _prov({"science": a, "template": b}))
    # fewer inputs, more inputs, another input under a recorded name
    assert not is_current(out, _prov({"science": a}))
    assert not is_current(out, _prov({"science": a, "template": b, "zz": a}))
    assert not is_current(out, _prov({"science": b, "template": b}))
    # other options, another backend, another stage
    assert not is_current(out, _prov({"science": a, "template": b}, FileOptions(level=2.0)))
    assert not is_current(out, _prov({"science": a, "template": b}, backend="c"))
    assert not is_current(out, _prov({"science": a, "template": b}, stage="extract"))


def test_an_ecsv_catalog_with_an_input_no_longer_used_is_not_current(tmp_path):
    """A catalog recorded with one more input (a user file since removed, sorting last)
    is stale: every recorded input counts, not only the expected ones."""
    res = tmp_path / "r.fits"
    res.write_bytes(b"r" * 10)
    extra = tmp_path / "z"
    extra.write_bytes(b"z")
    out = _write_ecsv(tmp_path / "d.ecsv", _prov({"residual": res, "zz:user": extra}))
    assert is_current(out, _prov({"residual": res, "zz:user": extra}))
    assert not is_current(out, _prov({"residual": res}))


def test_missing_or_unreadable_outputs_are_not_current(tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"x")
    assert not is_current(tmp_path / "nope.fits", _prov({"data": src}))
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not a FITS file at all")
    assert recorded(bad) is None
    assert not is_current(bad, _prov({"data": src}))
    bad_ecsv = tmp_path / "bad.ecsv"
    bad_ecsv.write_text("# %ECSV 1.0\n# ---\nnot: [valid\n")
    assert not is_current(bad_ecsv, _prov({"data": src}))
