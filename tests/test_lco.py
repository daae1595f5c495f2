"""``oasis get --mode dl``: the LCO archive client against a local stand-in archive."""

from __future__ import annotations

import hashlib
import io as pyio
import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from oasis_apps import lco, lco_client
from oasis_core.contracts.errors import InputError, StageError
from oasis_core.engine import io
from oasis_core.engine.tree import Target, init_root
from tests.lco_server import Archive, Behaviour, fits_bytes, running_archive

FAST = {"backoff": 0.0, "timeout": 10.0, "progress": False}


@pytest.fixture
def target(tmp_path):
    return Target(init_root(tmp_path) / "targets" / "m51")


@pytest.fixture
def archive():
    with running_archive(Archive(page_size=2)) as arch:
        yield arch


def manifest_rows(target):
    path = target.configs / "data_manifest.ecsv"
    return {str(r["file"]): r for r in Table.read(path, format="ascii.ecsv")}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _nan_block() -> bytes:
    """The data block of a 40x48 float32 image whose every pixel is NaN (big-endian)."""
    data = np.full(40 * 48, np.nan, dtype=">f4").tobytes()
    return data + b"\0" * (-len(data) % 2880)


def frame_names_in(directory):
    """Names in data/ that look like finished frames (not atomic-write temporaries)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------- query


def test_query_sends_criteria_and_follows_pages(archive):
    for i in range(5):
        archive.add(f"ogg-{i}-e91.fits.fz", fits_bytes(seed=i, compressed=True))
    archive.add("other-e91.fits.fz", fits_bytes(seed=9, compressed=True), OBJECT="NGC 300")
    frames = lco.query(
        object_name="m51",
        filter_name="rp",
        proposal="LCO2020A-001",
        start="2020-01-01",
        end="2020-01-05",
        api_url=archive.api_url,
        backoff=0,
    )
    # the end date is inclusive: frames of 2020-01-05 03:00 are in
    assert [f.filename for f in frames] == [f"ogg-{i}-e91.fits.fz" for i in range(5)]
    calls = archive.api_requests()
    assert len(calls) == 3  # pages of 2 + 2 + 1, following `next`
    first = calls[0]["query"]
    assert first["target_name"] == "m51"
    assert first["primary_optical_element"] == "rp"
    assert first["proposal_id"] == "LCO2020A-001"
    assert first["reduction_level"] == "91"
    assert first["start"] == "2020-01-01T00:00:00"
    assert first["end"] == "2020-01-05T23:59:59"
    assert calls[1]["query"]["offset"] == "2"
    f0 = frames[0]
    assert f0.id == 1000 and f0.object == "M51" and f0.filter == "rp"
    assert f0.proposal == "LCO2020A-001" and f0.reduction == 91
    assert f0.md5 == hashlib.md5(archive.files[0].payload).hexdigest()
    assert f0.filesize == len(archive.files[0].payload)
    assert f0.record_url == f"{archive.api_url}1000/"
    assert f0.fits_name == "ogg-0-e91.fits" and f0.compressed

    limited = lco.query(object_name="M51", limit=3, api_url=archive.api_url, backoff=0)
    assert len(limited) == 3
    assert len(archive.api_requests()) == 3 + 2  # stops once 3 frames are listed
    assert archive.api_requests()[-2]["query"]["limit"] == "3"


def test_query_retries_server_errors_then_fails(archive):
    archive.add("a-e91.fits.fz", fits_bytes(compressed=True))
    archive.api_fail_first = 2
    assert len(lco.query(object_name="M51", api_url=archive.api_url, retries=2, backoff=0)) == 1
    archive.api_fail_first = 10
    with pytest.raises(StageError, match=r"HTTP 500 .*after 3 attempts") as err:
        lco.query(object_name="M51", api_url=archive.api_url, retries=2, backoff=0)
    assert archive.api_url in str(err.value) and "\n" not in str(err.value)


def test_query_no_results_names_the_query(archive):
    archive.add("a-e91.fits.fz", fits_bytes(compressed=True))
    with pytest.raises(InputError, match=r"LCO archive: no frames match .*target_name=Vega"):
        lco.query(object_name="Vega", api_url=archive.api_url, backoff=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give an object"),
        ({"object_name": "M51", "start": "2020-13-01"}, "start '2020-13-01' is not an ISO date"),
        ({"object_name": "M51", "start": "2020-02-01", "end": "2020-01-01"}, "before start"),
        ({"object_name": "M51", "limit": 0}, "limit must be at least 1"),
        ({"object_name": "M51", "api_url": "file:///etc/"}, "not an http"),
    ],
)
def test_query_rejects_bad_criteria(kwargs, message):
    with pytest.raises(InputError, match=message):
        lco.query(**{"api_url": "http://127.0.0.1:9/frames/", **kwargs})


def test_frame_record_shapes():
    api = "https://archive-api.lco.global/frames/"
    new_style = {
        "id": 7,
        "basename": "coj1m011-fa12-20200101-0100-e91",
        "version_set": [
            {"md5": "ABC", "extension": ".fits.fz", "url": "https://s3/x?sig=1"},
            {"md5": "old", "extension": ".fits.fz", "url": "https://s3/old"},
        ],
        "target_name": "SN 2020abc",
        "primary_optical_element": "gp",
        "observation_date": "2020-01-01T01:00:00Z",
        "proposal_id": "P1",
        "reduction_level": 91,
    }
    frame = lco.LcoFrame.from_record(new_style, api_url=api, page=api)
    assert frame.filename == "coj1m011-fa12-20200101-0100-e91.fits.fz"
    assert frame.url == "https://s3/x?sig=1" and frame.md5 == "abc"  # the latest version
    assert (frame.object, frame.filter, frame.proposal, frame.reduction) == (
        "SN 2020abc",
        "gp",
        "P1",
        91,
    )
    assert frame.filesize is None and frame.record_url == api + "7/"
    for bad, why in [
        ({"id": 8, "filename": "x.fits"}, "no id, filename or url"),
        ({"id": 8, "filename": "../x.fits", "url": "https://h/x"}, "unsafe file name"),
        ({"id": 8, "filename": ".hidden.fits", "url": "https://h/x"}, "unsafe file name"),
        ({"id": 8, "filename": "x.fits", "url": "file:///etc/passwd"}, "not http"),
    ]:
        with pytest.raises(InputError, match=why):
            lco.LcoFrame.from_record(bad, api_url=api, page=api + "?page=2")


# ---------------------------------------------------------------------------- download


def test_download_resumes_retries_unpacks_and_records(archive, target, caplog):
    plain = fits_bytes(seed=1, header={"OBJECT": "M51"})
    packed = fits_bytes(seed=2, compressed=True, header={"OBJECT": "M51", "FILTER": "rp"})
    archive.add("f1-e91.fits", plain)
    archive.add("f2-e91.fits.fz", packed)
    archive.add(
        "f3-e91.fits.fz", fits_bytes(seed=3, compressed=True), behaviour=Behaviour(fail_first=2)
    )
    archive.add(
        "f4-e91.fits.fz", fits_bytes(seed=4, compressed=True), behaviour=Behaviour(truncate_first=1)
    )
    archive.add(
        "f5-e91.fits",
        fits_bytes(seed=5, shape=(64, 64)),
        behaviour=Behaviour(truncate_first=1, ranges=False),
    )

    # what data/ holds while each frame's body is half sent
    snapshots = {}
    archive.during_body = lambda name: snapshots.setdefault(name, []).append(
        frame_names_in(target.data)
    )

    with caplog.at_level(logging.INFO, logger="oasis"):
        report = lco.download(target, object_name="M51", api_url=archive.api_url, retries=3, **FAST)
    assert report.failed == []
    assert report.present == []
    names = ["f1-e91.fits", "f2-e91.fits", "f3-e91.fits", "f4-e91.fits", "f5-e91.fits"]
    assert [p.name for p in report.downloaded] == names
    assert frame_names_in(target.data) == [
        "f1-e91.fits",
        "f2-e91.fits",
        "f3-e91.fits",
        "f4-e91.fits",
        "f5-e91.fits",
    ]

    # nothing half-downloaded ever sat in data/ under a frame name
    assert snapshots["f5-e91.fits"][0] == names[:4]  # the earlier frames were there already
    for name, seen in snapshots.items():
        final = name.removesuffix(".fz")
        for listing in seen:
            assert final not in listing, f"{final} in data/ while downloading"
            assert all(n in names for n in listing)

    # the plain frame arrives byte for byte; the fpacked one is uncompressed to a plain FITS
    assert (target.data / "f1-e91.fits").read_bytes() == plain
    with fits.open(target.data / "f2-e91.fits") as out, fits.open(pyio.BytesIO(packed)) as src:
        assert not any(isinstance(h, fits.CompImageHDU) for h in out)
        assert out[1].name == "SCI" and out[1].header["FILTER"] == "rp"
        np.testing.assert_array_equal(out[1].data, src[1].data)
    assert io.read_frame(target.data / "f2-e91.fits", warn=False).data.shape == (40, 48)

    # retried after HTTP 500, resumed with Range, restarted when Range is ignored
    assert len(archive.file_requests("f3-e91.fits.fz")) == 3
    f4 = archive.file_requests("f4-e91.fits.fz")
    assert len(f4) == 2 and "Range" not in f4[0]["headers"]
    half = len(archive.files[3].payload) // 2
    assert f4[1]["headers"]["Range"] == f"bytes={half}-"
    assert len(archive.file_requests("f5-e91.fits")) == 2
    assert (target.data / "f5-e91.fits").read_bytes() == archive.files[4].payload

    # recorded in the --unpack manifest, with the archive record as the original
    rows = manifest_rows(target)
    assert sorted(rows) == names
    for i, name in enumerate(names):
        assert rows[name]["sha256"] == io.sha256(target.data / name)
        assert rows[name]["original"] == f"{archive.api_url}{1000 + i}/"
    assert not list((target.work / "download").iterdir())  # no partial file left
    assert any("f4-e91.fits.fz: resuming at byte" in r.getMessage() for r in caplog.records)

    # a second run downloads nothing
    before = len(archive.requests)
    again = lco.download(target, object_name="M51", api_url=archive.api_url, **FAST)
    assert again.downloaded == [] and again.failed == []
    assert [p.name for p in again.present] == names
    assert all(r["path"] == "/frames/" for r in archive.requests[before:])


def test_failures_are_per_frame_and_never_reach_data(archive, target):
    good = fits_bytes(seed=1, compressed=True)
    archive.add("good-e91.fits.fz", good)
    archive.add(
        "down-e91.fits.fz",
        fits_bytes(seed=2, compressed=True),
        behaviour=Behaviour(always_500=True),
    )
    cut = archive.add(
        "cut-e91.fits.fz",
        fits_bytes(seed=3, compressed=True),
        behaviour=Behaviour(truncate_always=True),
    )
    archive.add(
        "bad-e91.fits.fz", fits_bytes(seed=4, compressed=True), behaviour=Behaviour(corrupt=True)
    )
    archive.add(
        "short-e91.fits.fz",
        fits_bytes(seed=5, compressed=True),
        behaviour=Behaviour(filesize_extra=10),
    )
    archive.add("html-e91.fits", b"<html>" + b"x" * 3000, behaviour=Behaviour())
    archive.add("nan-e91.fits", fits_bytes(header={"OBJECT": "M51"})[:2880] + _nan_block())
    archive.add("cut-on-disk-e91.fits", fits_bytes(seed=6)[:4000])  # the archive's copy is short

    report = lco.download(target, object_name="M51", api_url=archive.api_url, retries=2, **FAST)
    assert [p.name for p in report.downloaded] == ["good-e91.fits"]
    reasons = dict(report.failed)
    assert sorted(reasons) == sorted(
        [
            "down-e91.fits.fz",
            "cut-e91.fits.fz",
            "bad-e91.fits.fz",
            "short-e91.fits.fz",
            "html-e91.fits",
            "nan-e91.fits",
            "cut-on-disk-e91.fits",
        ]
    )
    for name, reason in reasons.items():
        assert "\n" not in reason and reason.startswith(f"{name} (http://127.0.0.1:")
        assert "secret" not in reason  # the pre-signed query string is never printed
    assert (
        "HTTP 500 Internal Server Error: Server Error after 3 attempts"
        in reasons["down-e91.fits.fz"]
    )
    # each attempt resumes where the last stopped and gets half of what is left
    size, got, starts = len(cut.payload), 0, []
    for _ in range(3):
        starts.append(got)
        got += (size - got) // 2
    assert f"truncated: got {got} of {size} bytes after 3 attempts" in reasons["cut-e91.fits.fz"]
    assert "MD5 mismatch" in reasons["bad-e91.fits.fz"]
    assert (
        f"size mismatch: the server has {len(archive.files[4].payload)} bytes"
        in reasons["short-e91.fits.fz"]
    )
    assert "not a usable FITS image (not a readable FITS file" in reasons["html-e91.fits"]
    assert reasons["nan-e91.fits"].endswith(
        "not a usable FITS image (every pixel is NaN or infinite); file removed"
    )
    cut_reason = reasons["cut-on-disk-e91.fits"]
    assert "not a usable FITS image (truncated: HDU 0 declares 7680 bytes of data" in cut_reason

    # only the verified frame is in data/ and in the manifest
    assert frame_names_in(target.data) == ["good-e91.fits"]
    assert sorted(manifest_rows(target)) == ["good-e91.fits"]
    # the truncated download is kept for resuming; the corrupt ones are removed
    partial = sorted(p.name for p in (target.work / "download").iterdir())
    assert partial == ["cut-e91.fits.fz.part"]
    assert (target.work / "download" / "cut-e91.fits.fz.part").stat().st_size == got
    ranges = [c["headers"].get("Range") for c in archive.file_requests("cut-e91.fits.fz")]
    assert ranges == [None] + [f"bytes={n}-" for n in starts[1:]]

    # next run: the server is fixed; the kept partial file is resumed, not fetched again
    archive.files[2].behaviour.truncate_always = False
    archive.files[1].behaviour.always_500 = False
    before = len(archive.file_requests("cut-e91.fits.fz"))
    second = lco.download(target, object_name="M51", api_url=archive.api_url, retries=0, **FAST)
    assert sorted(p.name for p in second.downloaded) == ["cut-e91.fits", "down-e91.fits"]
    assert [p.name for p in second.present] == ["good-e91.fits"]
    resumed = archive.file_requests("cut-e91.fits.fz")[before:]
    assert [r["headers"].get("Range") for r in resumed] == [f"bytes={got}-"]
    with (
        fits.open(target.data / "cut-e91.fits") as hdul,
        fits.open(pyio.BytesIO(cut.payload)) as src,
    ):
        np.testing.assert_array_equal(hdul[1].data, src[1].data)


def test_token_is_checked_and_kept_on_the_archive_host(archive, target):
    archive.token = "s3cret"
    archive.add("p1-e91.fits.fz", fits_bytes(seed=1, compressed=True))
    with pytest.raises(
        InputError, match=r"^LCO archive refused the token: HTTP 401 .*Invalid token"
    ):
        lco.download(target, object_name="M51", api_url=archive.api_url, token="wrong", **FAST)
    with pytest.raises(InputError, match=r"proprietary data need an API token \(--token\)"):
        lco.download(target, object_name="M51", api_url=archive.api_url, **FAST)
    assert not target.path.exists()  # a refused query leaves no trace

    report = lco.download(
        target, object_name="M51", api_url=archive.api_url, token="s3cret", **FAST
    )
    assert [p.name for p in report.downloaded] == ["p1-e91.fits"]
    assert all(r["headers"].get("Authorization") == "Token s3cret" for r in archive.requests[-2:])


def test_token_not_sent_to_another_host(archive, target):
    archive.add("s3-e91.fits.fz", fits_bytes(seed=1, compressed=True), host="localhost")
    report = lco.download(target, object_name="M51", api_url=archive.api_url, token="tok", **FAST)
    assert [p.name for p in report.downloaded] == ["s3-e91.fits"]
    (call,) = archive.file_requests("s3-e91.fits.fz")
    assert "Authorization" not in call["headers"]
    assert archive.api_requests()[0]["headers"]["Authorization"] == "Token tok"


def test_expired_link_fails_only_that_frame(archive, target):
    archive.add(
        "old-e91.fits.fz",
        fits_bytes(seed=1, compressed=True),
        host="localhost",
        behaviour=Behaviour(forbidden=True),
    )
    archive.add("new-e91.fits.fz", fits_bytes(seed=2, compressed=True))
    report = lco.download(target, object_name="M51", api_url=archive.api_url, token="t", **FAST)
    assert [p.name for p in report.downloaded] == ["new-e91.fits"]
    ((name, reason),) = report.failed
    assert name == "old-e91.fits.fz"
    assert reason.endswith(
        "HTTP 403 Forbidden: Request has expired (the download link may have expired; run again)"
    )
    assert "refused the token" not in reason


def test_redirect_to_another_host_drops_the_token(archive, target):
    archive.add("rd-e91.fits.fz", fits_bytes(seed=1, compressed=True), redirect_to="localhost")
    report = lco.download(target, object_name="M51", api_url=archive.api_url, token="tok", **FAST)
    assert [p.name for p in report.downloaded] == ["rd-e91.fits"]
    (hop,) = [r for r in archive.requests if r["path"].startswith("/redirect/")]
    (final,) = archive.file_requests("rd-e91.fits.fz")
    assert hop["headers"]["Authorization"] == "Token tok"  # same host as the API
    assert "Authorization" not in final["headers"]


# ------------------------------------------------------------------ the token never in clear


@pytest.mark.parametrize(
    "api_url",
    [
        "http://archive-api.lco.global/frames/",
        "http://10.0.0.5:8000/frames/",
        "http://[2001:db8::1]/frames/",
        "http://localhost.example.org/frames/",
        "HTTP://archive-api.lco.global/frames/",
    ],
)
def test_token_over_plain_http_is_refused_before_any_request(api_url, target, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a request was made")

    monkeypatch.setattr(lco_client.urllib.request.OpenerDirector, "open", no_network)
    message = r"^LCO archive: api_url .* is not https and a token is given: the token would"
    with pytest.raises(InputError, match=message) as err:
        lco.query(object_name="M51", api_url=api_url, token="s3cret", backoff=0)
    assert "\n" not in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(InputError, match=message):
        lco.download(target, object_name="M51", api_url=api_url, token="s3cret", **FAST)
    frame = lco.LcoFrame(id=1, filename="a.fits", url=api_url + "1/a.fits", record_url="")
    with pytest.raises(InputError, match=message):  # frames listed earlier: the same rule
        lco.download(target, frames=[frame], api_url=api_url, token="s3cret", **FAST)
    assert not target.path.exists()


def test_plain_http_is_allowed_without_a_token_or_on_the_loopback(archive, target):
    # public data over http: nothing secret to protect
    lco_client.Client(
        api_url="http://archive.example.org/frames/", token=None, retries=0, backoff=0, timeout=1
    )
    for host in ("127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST"):
        lco_client.Client(
            api_url=f"http://{host}:8000/frames/", token="t", retries=0, backoff=0, timeout=1
        )
    archive.token = "tok"  # the local test server (http on 127.0.0.1) takes the token
    archive.add("lo-e91.fits.fz", fits_bytes(seed=1, compressed=True))
    report = lco.download(target, object_name="M51", api_url=archive.api_url, token="tok", **FAST)
    assert [p.name for p in report.downloaded] == ["lo-e91.fits"]


def test_the_token_goes_only_to_the_archive_origin_over_https():
    client = lco_client.Client(
        api_url="https://archive-api.lco.global/frames/",
        token="tok",
        retries=0,
        backoff=0,
        timeout=1,
    )
    sent = {
        "https://archive-api.lco.global/frames/?offset=2": True,
        "https://ARCHIVE-API.lco.global:443/frames/1/": True,
        "http://archive-api.lco.global/frames/?offset=2": False,  # same host, plain http
        "https://archive-api.lco.global:8443/frames/": False,  # another port
        "https://archive-lco-global.s3.amazonaws.com/x.fits.fz?sig=1": False,  # storage
        "https://archive-api.lco.global.evil.org/frames/": False,
    }
    for url, with_token in sent.items():
        assert ("Authorization" in client.headers(url)) is with_token, url


@pytest.mark.parametrize(
    ("to", "kept"),
    [
        ("https://archive-api.lco.global/frames/2/", True),
        ("http://archive-api.lco.global/frames/2/", False),  # down to plain http
        ("https://s3.example.org/bucket/x.fits.fz", False),  # to the storage host
        ("http://127.0.0.1:8000/frames/", False),  # another origin, even the loopback
    ],
)
def test_a_redirect_keeps_the_token_only_on_the_encrypted_origin(to, kept):
    import email.message
    import urllib.request

    req = urllib.request.Request(
        "https://archive-api.lco.global/frames/1/",
        headers={"Authorization": "Token tok", "User-Agent": "x"},
    )
    new = lco_client.KeepAuthOnOrigin().redirect_request(
        req, None, 302, "Found", email.message.Message(), to
    )
    assert new is not None and new.full_url == to
    assert new.has_header("Authorization") is kept


def test_a_next_link_to_another_origin_stops_the_query_without_the_token(archive):
    for i in range(3):
        archive.add(f"n{i}-e91.fits.fz", fits_bytes(seed=i, compressed=True))
    archive.next_base = archive.base.replace("127.0.0.1", "localhost")  # another origin
    with pytest.raises(StageError, match=r"the next page points to another origin") as err:
        lco.query(object_name="M51", api_url=archive.api_url, token="tok", backoff=0)
    assert "\n" not in str(err.value)
    (only,) = archive.api_requests()  # the second page was never asked for
    assert only["headers"]["Authorization"] == "Token tok"


# ------------------------------------------------------------- unsafe archive file names


def test_unsafe_file_names_fail_only_their_frame(archive, target, tmp_path):
    good = fits_bytes(seed=1, compressed=True)
    archive.page_size = 10
    archive.add("ok-e91.fits.fz", good)
    unsafe = [
        "nul\x00byte-e91.fits.fz",
        "../escape-e91.fits.fz",
        "sub/dir-e91.fits.fz",
        "..",
        "line\nbreak-e91.fits.fz",
        "para\u2029graph-e91.fits.fz",  # a line break to str.splitlines
        "x" * 300 + ".fits.fz",
    ]
    for i, name in enumerate(unsafe):
        archive.add(name, fits_bytes(seed=10 + i, compressed=True))
    archive.add("ok2-e91.fits", fits_bytes(seed=2))
    report = lco.download(target, object_name="M51", api_url=archive.api_url, **FAST)
    assert [p.name for p in report.downloaded] == ["ok-e91.fits", "ok2-e91.fits"]
    assert len(report.failed) == len(unsafe)
    for (name, reason), bad in zip(report.failed, unsafe, strict=True):
        assert name.isprintable() and "\x00" not in reason and "\n" not in reason
        assert "unsafe file name" in reason and "frame not downloaded" in reason
        assert name == "".join(c if c.isprintable() else repr(c)[1:-1] for c in bad)
        assert len(f"{name}: {reason}".splitlines()) == 1
    # nothing asked for, nothing written beside data/ (or anywhere else)
    assert [r["path"] for r in archive.requests if r["path"] != "/frames/"] == [
        "/files/ok-e91.fits.fz",
        "/files/ok2-e91.fits",
    ]
    assert frame_names_in(target.data) == ["ok-e91.fits", "ok2-e91.fits"]
    assert not (target.path / "escape-e91.fits").exists()
    assert sorted(manifest_rows(target)) == ["ok-e91.fits", "ok2-e91.fits"]


def test_oasis_get_dl_with_a_nul_byte_name_one_line_per_frame(archive, tmp_path, capfd):
    import subprocess
    import sys

    archive.add("a\x00b-e91.fits.fz", fits_bytes(seed=1, compressed=True))
    archive.add("good-e91.fits", fits_bytes(seed=2))
    argv = [
        "get",
        "--mode",
        "dl",
        "--target",
        "t",
        "--object",
        "M51",
        "--root",
        str(tmp_path),
        "--api-url",
        archive.api_url,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "oasis_apps.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "\x00" not in proc.stderr
    assert "1 downloaded, 0 already there, 1 failed" in proc.stdout
    lines = proc.stderr.splitlines()
    (bad,) = [ln for ln in lines if "unsafe file name" in ln]  # one line for the frame
    assert bad.startswith("warning: ") and "'a\\x00b-e91.fits.fz'" in bad
    assert lines[-1].startswith("error: oasis get: 1 frame(s) not downloaded into ")
    data = tmp_path / "OASIS" / "targets" / "t" / "data"
    assert frame_names_in(data) == ["good-e91.fits"]


def test_retries_back_off_exponentially(archive, monkeypatch):
    delays = []
    monkeypatch.setattr(lco_client.time, "sleep", delays.append)
    archive.add("a-e91.fits.fz", fits_bytes(compressed=True))
    archive.api_fail_first = 3
    lco.query(object_name="M51", api_url=archive.api_url, retries=3, backoff=0.5)
    assert delays == [0.5, 1.0, 2.0]


def test_existing_unrecorded_file_is_not_overwritten(archive, target):
    archive.add("x-e91.fits.fz", fits_bytes(seed=1, compressed=True))
    target.create()
    mine = target.data / "x-e91.fits"
    mine.write_bytes(b"mine")
    report = lco.download(target, object_name="M51", api_url=archive.api_url, **FAST)
    ((name, reason),) = report.failed
    assert name == "x-e91.fits.fz" and "exists but is not the recorded download" in reason
    assert mine.read_bytes() == b"mine"
    assert archive.file_requests("x-e91.fits.fz") == []


def test_rich_progress_bars_run(archive, target):
    archive.add("r-e91.fits.fz", fits_bytes(seed=1, compressed=True))
    archive.add(
        "r2-e91.fits.fz", fits_bytes(seed=2, compressed=True), behaviour=Behaviour(truncate_first=1)
    )
    report = lco.download(
        target, object_name="M51", api_url=archive.api_url, backoff=0, progress=True
    )
    assert [p.name for p in report.downloaded] == ["r-e91.fits", "r2-e91.fits"]


# ----------------------------------------------------------------------- the command line


def test_oasis_get_mode_dl_downloads_into_the_target(archive, tmp_path, capsys):
    from oasis_apps.cli import main

    archive.add("g1-e91.fits", fits_bytes(seed=11))
    archive.add("g2-e91.fits.fz", fits_bytes(seed=12, compressed=True))
    argv = ["get", "--mode", "dl", "--target", "ngc", "--object", "M51", "--root", str(tmp_path)]
    argv += ["--api-url", archive.api_url]
    assert main(argv) == 0
    data = tmp_path / "OASIS" / "targets" / "ngc" / "data"
    assert frame_names_in(data) == ["g1-e91.fits", "g2-e91.fits"]
    assert "2 downloaded, 0 already there, 0 failed" in capsys.readouterr().out
    assert main(argv) == 0  # again: nothing to fetch
    assert "0 downloaded, 2 already there" in capsys.readouterr().out
    # neither mode nor frames: a one-line error
    assert main(["get", "--target", "ngc", "--root", str(tmp_path)]) == 1
    assert "--mode" in capsys.readouterr().err
