"""A small stand-in for the LCO science archive, for tests: a real HTTP server on 127.0.0.1.

``/frames/`` answers like the archive's API (paged JSON: count, next, previous, results with
id, basename, filename, url, filesize, version_set[md5], OBJECT, FILTER, DATE_OBS, PROPID,
RLEVEL) and ``/files/NAME`` serves the bytes, honouring ``Range: bytes=N-``. Each file can be
given a misbehaviour (:class:`Behaviour`) and every request is logged.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

__all__ = ["Archive", "Behaviour", "Served", "fits_bytes", "running_archive"]


def fits_bytes(shape=(40, 48), *, seed=0, compressed=False, header=None) -> bytes:
    """A small FITS image (float32 noise) as bytes; fpacked (RICE) into a ``SCI`` HDU when
    ``compressed``, like the archive's ``.fits.fz`` frames."""
    import io

    import numpy as np
    from astropy.io import fits

    data = np.random.default_rng(seed).normal(100.0, 5.0, shape).astype(np.float32)
    hdr = fits.Header(header or {})
    if compressed:
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr, name="SCI")])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data, header=hdr)])
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


@attrs.define
class Behaviour:
    """How the server misbehaves for one file."""

    fail_first: int = 0  # answer HTTP 500 to the first n requests
    always_500: bool = False
    truncate_first: int = 0  # send only half the body (full Content-Length) n times
    truncate_always: bool = False
    ranges: bool = True  # honour Range requests
    corrupt: bool = False  # flip one byte (same size: the MD5 does not match)
    filesize_extra: int = 0  # the API claims this many more bytes than the file has
    api_md5: str | None = None  # MD5 the API claims (default: the true one)
    forbidden: bool = False  # HTTP 403, like an expired pre-signed link


@attrs.define
class Served:
    name: str
    payload: bytes
    meta: dict[str, Any]
    behaviour: Behaviour = attrs.field(factory=Behaviour)
    host: str | None = None  # serve the link under another host name (e.g. localhost)
    redirect_to: str | None = None  # the link answers 302 to /files/NAME on this host


@attrs.define
class Archive:
    """State of the stand-in archive (frames, page size, token, request log)."""

    files: list[Served] = attrs.field(factory=list)
    page_size: int = 2
    token: str | None = None
    api_fail_first: int = 0
    base: str = ""
    next_base: str | None = None  # the 'next' links point to this host instead (an origin)
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    during_body: Callable[[str], None] | None = None
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    @property
    def api_url(self) -> str:
        return f"{self.base}/frames/"

    def add(
        self, name: str, payload: bytes, *, behaviour=None, host=None, redirect_to=None, **meta
    ) -> Served:
        served = Served(name, payload, meta, behaviour or Behaviour(), host, redirect_to)
        self.files.append(served)
        return served

    def file_requests(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == f"/files/{name}"]

    def api_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/frames/"]

    def record(self, index: int, served: Served) -> dict[str, Any]:
        b = served.behaviour
        base = self.base
        if served.host:
            base = base.replace("127.0.0.1", served.host)
        basename = served.name.split(".fits")[0]
        kind = "redirect" if served.redirect_to else "files"
        return {
            "id": 1000 + index,
            "basename": basename,
            "filename": served.name,
            "url": f"{base}/{kind}/{served.name}?X-Amz-Signature=secret{index}",
            "filesize": len(served.payload) + b.filesize_extra,
            "version_set": [
                {
                    "id": 5000 + index,
                    "created": "2020-01-01T00:00:00Z",
                    "key": f"k{index}",
                    "md5": b.api_md5 or hashlib.md5(served.payload).hexdigest(),
                    "extension": served.name[len(basename) :],
                    "url": f"{base}/files/{served.name}",
                }
            ],
            "OBJECT": served.meta.get("OBJECT", "M51"),
            "FILTER": served.meta.get("FILTER", "rp"),
            "DATE_OBS": served.meta.get("DATE_OBS", f"2020-01-{index + 1:02d}T03:00:00.000Z"),
            "PROPID": served.meta.get("PROPID", "LCO2020A-001"),
            "RLEVEL": served.meta.get("RLEVEL", 91),
        }


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        archive: Archive = self.server.archive
        url = urllib.parse.urlsplit(self.path)
        with archive.lock:
            archive.requests.append(
                {
                    "path": url.path,
                    "query": dict(urllib.parse.parse_qsl(url.query)),
                    "headers": dict(self.headers.items()),
                }
            )
        if archive.token is not None and self.headers.get("Authorization") != (
            f"Token {archive.token}"
        ):
            self._json(401, {"detail": "Invalid token."})
            return
        if url.path == "/frames/":
            self._frames(archive, dict(urllib.parse.parse_qsl(url.query)))
        elif url.path.startswith("/files/"):
            self._file(archive, url.path[len("/files/") :])
        elif url.path.startswith("/redirect/"):
            name = url.path[len("/redirect/") :]
            served = next(s for s in archive.files if s.name == name)
            host = archive.base.replace("127.0.0.1", served.redirect_to or "127.0.0.1")
            self.send_response(302)
            self.send_header("Location", f"{host}/files/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._json(404, {"detail": "Not found."})

    def _frames(self, archive: Archive, query: dict[str, str]) -> None:
        if archive.api_fail_first > 0:
            archive.api_fail_first -= 1
            self._json(500, {"detail": "Server Error"})
            return
        records = [archive.record(i, s) for i, s in enumerate(archive.files)]
        if "target_name" in query:
            records = [r for r in records if query["target_name"].lower() in r["OBJECT"].lower()]
        if "primary_optical_element" in query:
            records = [r for r in records if r["FILTER"] == query["primary_optical_element"]]
        if "proposal_id" in query:
            records = [r for r in records if r["PROPID"] == query["proposal_id"]]
        if "reduction_level" in query:
            records = [r for r in records if str(r["RLEVEL"]) == query["reduction_level"]]
        if "start" in query:
            records = [r for r in records if r["DATE_OBS"][:19] >= query["start"]]
        if "end" in query:
            records = [r for r in records if r["DATE_OBS"][:19] <= query["end"]]
        size = min(int(query.get("limit", archive.page_size)), archive.page_size)
        offset = int(query.get("offset", 0))

        def link(new_offset: int) -> str:
            api = archive.api_url
            if archive.next_base is not None:
                api = api.replace(archive.base, archive.next_base)
            return f"{api}?{urllib.parse.urlencode({**query, 'offset': new_offset})}"

        self._json(
            200,
            {
                "count": len(records),
                "next": link(offset + size) if offset + size < len(records) else None,
                "previous": link(max(offset - size, 0)) if offset > 0 else None,
                "results": records[offset : offset + size],
            },
        )

    def _file(self, archive: Archive, name: str) -> None:
        served = next((s for s in archive.files if s.name == name), None)
        if served is None:
            self._json(404, {"detail": "Not found."})
            return
        b = served.behaviour
        if b.forbidden:
            self._json(403, {"detail": "Request has expired"})
            return
        if b.always_500 or b.fail_first > 0:
            b.fail_first = max(b.fail_first - 1, 0)
            self._json(500, {"detail": "Server Error"})
            return
        payload = served.payload
        if b.corrupt:
            payload = payload[:100] + bytes([payload[100] ^ 0xFF]) + payload[101:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and b.ranges:
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        if b.ranges:
            self.send_header("Accept-Ranges", "bytes")
        body = payload[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        if archive.during_body is not None:
            archive.during_body(name)
        if b.truncate_always or b.truncate_first > 0:
            b.truncate_first = max(b.truncate_first - 1, 0)
            return  # the connection closes: fewer bytes than Content-Length
        self.wfile.write(body[half:])


@contextmanager
def running_archive(archive: Archive | None = None) -> Iterator[Archive]:
    """Serve ``archive`` on 127.0.0.1 (a free port) in a thread for the ``with`` block."""
    archive = archive or Archive()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.archive = archive  # type: ignore[attr-defined]
    archive.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield archive
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
