"""Unit tests of oasis_core.engine.provenance through its public functions: the cards an output
carries, the options hash, and the resume rule (:func:`is_current`) for every way an output
can go stale. tests/test_provenance.py covers the files named by options and the digest
cache; this module the rest of the table, on outputs written the way the core writes them
(:func:`oasis_core.engine.io.apply_cards`).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import attrs
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.utils.exceptions import AstropyWarning

from oasis_core import __version__
from oasis_core.contracts.backends import option
from oasis_core.engine.io import apply_cards
from oasis_core.engine.provenance import (
    Provenance,
    is_current,
    option_files,
    options_dict,
    options_hash,
    recorded,
)


@attrs.frozen(kw_only=True)
class Inner:
    width: float = option(2.0, "a width", range=(0, None))
    table: str = option("", "a file", path=True)


@attrs.frozen(kw_only=True)
class Opts:
    level: int = option(3, "a level", range=(0, None))
    name: str = option("x" * 80, "a long string")
    inner: Inner = attrs.field(factory=Inner)


def prov(inputs, *, options=None, settings=None, stage="psf", backend="native") -> Provenance:
    return Provenance(
        stage=stage,
        backend=backend,
        plugin="oasis-dia==0.1.0",
        inputs=inputs,
        options=Opts() if options is None else options,
        settings=settings,
    )


def write_fits(path: Path, p: Provenance) -> Path:
    hdu = fits.PrimaryHDU(np.zeros((3, 3), np.float32))
    apply_cards(hdu.header, p.header_cards())
    hdu.writeto(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Three input files and the names the unit knows them by."""
    files = {}
    for name, content in (("science", b"S" * 100), ("template", b"T" * 100), ("mask", b"M")):
        files[name] = tmp_path / f"{name}.fits"
        files[name].write_bytes(content)
    return files


# ------------------------------------------------------------------ the cards


def test_cards_record_version_stage_backend_plugin_options_and_inputs(inputs):
    p = prov(inputs)
    cards = p.cards()
    assert cards["OASVER"][0] == __version__
    assert (cards["OASSTAGE"][0], cards["OASBACK"][0]) == ("psf", "native")
    assert cards["OASPLUG"][0] == "oasis-dia==0.1.0"
    assert cards["OASOPTH"][0] == p.digest() == options_hash(Opts(), None)
    assert len(cards["OASOPTH"][0]) == 16
    # one card per input, sorted by name: name:sha256, each cut to 32 characters
    sha = {n: hashlib.sha256(f.read_bytes()).hexdigest() for n, f in inputs.items()}
    assert [cards[f"OASIN{i}"] for i in range(3)] == [
        f"mask:{sha['mask'][:32]}",
        f"science:{sha['science'][:32]}",
        f"template:{sha['template'][:32]}",
    ]
    assert "OASIN3" not in cards
    for key in ("OASVER", "OASSTAGE", "OASBACK", "OASPLUG", "OASOPTH"):
        assert cards[key][1], key  # each with a comment


def test_long_input_names_are_cut_to_32_characters(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"a")
    long = "n" * 40
    [card] = prov({long: f}).input_cards()
    name, digest = card.split(":")
    assert (name, len(digest)) == ("n" * 32, 32)


def test_history_has_every_option_cut_to_72_characters(inputs):
    history = prov(inputs).header_cards()["HISTORY"]
    assert history[0] == "psf.native.level = 3"
    assert history[1] == f"psf.native.name = {'x' * 80!r}"[:72]
    assert len(history[1]) == 72
    assert history[2].startswith("psf.native.inner = {'width': 2.0, 'table': ''}"[:72])
    assert len(history) == 3  # no file is named (table = "")


# ------------------------------------------------------------------ the options hash


def test_options_dict_of_attrs_mappings_and_nothing():
    assert options_dict(Opts(level=4)) == {
        "level": 4,
        "name": "x" * 80,
        "inner": {"width": 2.0, "table": ""},
    }
    assert options_dict({"ois": Inner(width=1.0), "k": 2}) == {
        "ois": {"width": 1.0, "table": ""},
        "k": 2,
    }
    assert options_dict(None) == {}
    assert options_dict({}) == {}


def test_options_hash_follows_values_not_their_order():
    assert options_hash({"a": 1, "b": 2}) == options_hash({"b": 2, "a": 1})
    assert options_hash({"a": 1}) != options_hash({"a": 2})
    assert options_hash(Opts(level=1)) != options_hash(Opts(level=2))
    assert options_hash(Opts(inner=Inner(width=1.0))) != options_hash(Opts())
    # two objects hash as a pair: which one a value belongs to matters
    assert options_hash({"a": 1}, None) != options_hash(None, {"a": 1})
    # values JSON cannot encode are hashed by their text
    assert options_hash({"p": Path("/a")}) == options_hash({"p": "/a"})
    digest = options_hash({"a": 1})
    assert len(digest) == 16 and int(digest, 16) >= 0
    expected = hashlib.sha256(b'[{"a": 1}]').hexdigest()[:16]
    assert digest == expected


def test_nested_options_name_their_files_with_a_dotted_prefix(tmp_path):
    table = tmp_path / "t.txt"
    table.write_text("1 2 3\n")
    digest = hashlib.sha256(b"1 2 3\n").hexdigest()[:32]
    assert option_files(Opts(inner=Inner(table=str(table)))) == {"inner.table": digest}
    assert option_files({"a": Inner(table=str(table))}) == {"a.table": digest}
    assert option_files(Inner(table=table)) == {"table": digest}  # a Path too
    assert option_files(Opts()) == {}
    assert option_files(None) == {}
    p = prov({}, options=Opts(inner=Inner(table=str(table))))
    assert p.files == {"inner.table": digest}
    assert p.digest() != options_hash(p.options, None)
    assert p.header_cards()["HISTORY"][-1] == f"psf.native.inner.table: sha256 {digest}"[:72]


# ------------------------------------------------------------------ the resume rule


def stale(inputs, tmp_path, how: str) -> tuple[Path, Provenance]:
    """An output made from ``inputs``, then one thing changed; the current provenance."""
    out = write_fits(tmp_path / "out.fits", prov(inputs))
    current = dict(inputs)
    kwargs: dict = {}
    if how == "input bytes":
        inputs["template"].write_bytes(b"U" * 100)  # same size
    elif how == "input replaced":
        current["template"] = inputs["science"]
    elif how == "input added":
        extra = tmp_path / "extra"
        extra.write_bytes(b"e")
        current["weight"] = extra
    elif how == "input dropped":
        del current["mask"]
    elif how == "input renamed":
        current["flat"] = current.pop("mask")
    elif how == "option":
        kwargs["options"] = Opts(level=4)
    elif how == "nested option":
        kwargs["options"] = Opts(inner=Inner(width=2.5))
    elif how == "settings":
        kwargs["settings"] = {"snr_min": 6.0}
    elif how == "stage":
        kwargs["stage"] = "align"
    elif how == "backend":
        kwargs["backend"] = "psfex"
    elif how == "missing output":
        out.unlink()
    elif how == "unreadable header":
        out.write_bytes(b"SIMPLE  =                    T" + b"\x00" * 100)
    elif how == "empty output":
        out.write_bytes(b"")
    elif how == "no provenance":
        out.unlink()
        fits.PrimaryHDU(np.zeros((3, 3))).writeto(out)
    elif how == "a folder":
        out.unlink()
        out.mkdir()
    else:
        assert how == "nothing"
    return out, prov(current, **kwargs)


@pytest.mark.parametrize(
    "how",
    [
        "input bytes",
        "input replaced",
        "input added",
        "input dropped",
        "input renamed",
        "option",
        "nested option",
        "settings",
        "stage",
        "backend",
        "missing output",
        "unreadable header",
        "empty output",
        "no provenance",
        "a folder",
    ],
)
def test_an_output_is_stale_when_anything_it_was_made_from_changed(inputs, tmp_path, how):
    out, current = stale(inputs, tmp_path, how)
    with warnings.catch_warnings():  # astropy warns about a broken header, then refuses it
        warnings.simplefilter("ignore", AstropyWarning)
        assert not is_current(out, current)


def test_an_untouched_output_is_current_whatever_the_order_of_the_inputs(inputs, tmp_path):
    out, current = stale(inputs, tmp_path, "nothing")
    assert is_current(out, current)
    reordered = dict(reversed(list(inputs.items())))
    assert is_current(out, prov(reordered))
    # inputs restored to their old bytes make it current again
    inputs["template"].write_bytes(b"U" * 100)
    assert not is_current(out, prov(inputs))
    inputs["template"].write_bytes(b"T" * 100)
    assert is_current(out, prov(inputs))


def test_more_than_ten_inputs_are_compared_in_order(tmp_path):
    # OASIN10 sorts before OASIN2 as text: the cards must be read by number
    files = {}
    for i in range(12):
        files[f"frame{i:02d}"] = tmp_path / f"f{i}"
        files[f"frame{i:02d}"].write_bytes(bytes([i]) * 8)
    out = write_fits(tmp_path / "out.fits", prov(files))
    assert fits.getheader(out)["OASIN11"].startswith("frame11:")
    assert is_current(out, prov(files))
    swapped = dict(files)
    swapped["frame02"], swapped["frame10"] = files["frame10"], files["frame02"]
    assert not is_current(out, prov(swapped))


def test_ecsv_catalogs_carry_the_cards_in_their_metadata(inputs, tmp_path):
    p = prov(inputs)
    table = Table({"x": [1.0, 2.0]})
    table.meta.update({k: str(v[0] if isinstance(v, tuple) else v) for k, v in p.cards().items()})
    out = tmp_path / "det.ecsv"
    table.write(out, format="ascii.ecsv")
    assert recorded(out)["OASOPTH"] == p.digest()
    assert is_current(out, prov(inputs))
    assert not is_current(out, prov(inputs, options=Opts(level=0)))
    inputs["mask"].write_bytes(b"N")
    assert not is_current(out, prov(inputs))


def test_recorded_reads_fits_headers_and_nothing_else(inputs, tmp_path):
    out = write_fits(tmp_path / "out.fits", prov(inputs))
    assert recorded(out)["OASSTAGE"] == "psf"
    assert recorded(tmp_path / "missing.fits") is None
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"\x00\x01" * 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        assert recorded(garbage) is None


def test_with_a_named_file_the_hash_still_covers_options_and_settings(tmp_path):
    table = tmp_path / "t.txt"
    table.write_text("1\n")
    base = prov({}, options=Opts(inner=Inner(table=str(table))), settings={"snr_min": 6})
    assert base.files  # the hash includes a file's digest
    for other in (
        prov({}, options=Opts(level=9, inner=Inner(table=str(table))), settings={"snr_min": 6}),
        prov({}, options=Opts(inner=Inner(table=str(table))), settings={"snr_min": 5}),
    ):
        assert other.files == base.files
        assert other.digest() != base.digest()
    table.write_text("2\n")
    edited = prov({}, options=Opts(inner=Inner(table=str(table))), settings={"snr_min": 6})
    assert edited.digest() != base.digest()


def test_a_folder_named_by_an_option_is_no_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    assert option_files(Inner(table=str(tmp_path / "cfg"))) == {"table": "missing"}


def test_history_lines_of_named_files_fit_a_card(tmp_path):
    table = tmp_path / "t.txt"
    table.write_text("x\n")
    backend = "b" * 30  # stage.backend.key: sha256 <32 hex> is then 88 characters
    p = prov({}, options=Opts(inner=Inner(table=str(table))), stage="subtract", backend=backend)
    line = p.header_cards()["HISTORY"][-1]
    assert line == f"subtract.{backend}.inner.table: sha256 {p.files['inner.table']}"[:72]
    assert len(line) == 72


def test_digests_handed_over_are_used_while_the_file_stays_the_same(tmp_path, monkeypatch):
    """A worker hashes the file it wrote and hands the digest back; the main process
    hands the digests it knows to the next tasks: nobody hashes that file again, until
    it changes."""
    from oasis_core.engine import provenance

    path = tmp_path / "a.fits"
    path.write_bytes(b"x" * 5000)
    handed = provenance.digest_of(path)  # the writer's
    provenance._HASH_CACHE.clear()  # another process
    assert provenance.digests_known([path]) == {}
    provenance.remember_digests(handed)
    assert provenance.digests_known([path]) == handed

    def no_hashing(p):
        raise AssertionError(f"{p} hashed again")

    monkeypatch.setattr(provenance, "sha256", no_hashing)
    cards = provenance.Provenance(stage="s", backend="b", plugin="p", inputs={"a": path})
    assert cards.input_cards() == [f"a:{next(iter(handed.values()))[:32]}"]
    path.write_bytes(b"y" * 5000)  # rewritten: its key changes, the digest is made again
    with pytest.raises(AssertionError, match="hashed again"):
        cards.input_cards()
