"""Downloading frames from the Las Cumbres Observatory science archive: ``oasis get --mode dl``.

The archive's public API (https://archive-api.lco.global/frames/) answers a query with pages
of JSON, ``{"count", "next", "previous", "results": [...]}``; each result describes one frame
(``id``, ``filename``/``basename``, ``url``, ``version_set`` with the file's MD5, and the
header values ``OBJECT``/``target_name``, ``FILTER``/``primary_optical_element``,
``DATE_OBS``/``observation_date``, ``PROPID``/``proposal_id``, ``RLEVEL``/``reduction_level``;
both spellings are read). :func:`query` follows ``next`` up to ``limit`` frames.

:func:`download` brings each frame into ``TARGET/data/`` safely:

1. the bytes go to ``NAME.part`` in the target's temp area (``Target.work / "download"``);
   a partial file left by an earlier run is resumed with an HTTP ``Range`` request when the
   server allows it (a server that ignores ``Range`` makes the download start over);
2. the size (``filesize`` when the API gives it, else ``Content-Length``) and the MD5 of
   ``version_set[0]`` are checked; a short file is kept for the next attempt, a corrupt one
   is removed;
3. only then the frame is moved into ``data/`` under its final name, atomically: ``.fz``
   (and ``.gz``) files are uncompressed with astropy ("funpack") so ``data/`` holds a plain
   ``NAME.fits``;
4. the frame is recorded in ``configs/data_manifest.ecsv``, the manifest ``oasis get
   --unpack`` keeps (file, original, sha256, copied); ``original`` is the frame's archive
   record, ``<api_url><id>/``.

A frame already in ``data/`` whose SHA-256 matches its manifest row is skipped. Server errors
(HTTP 5xx, refused or broken connections, truncated bodies) are retried ``retries`` times
with exponential back-off; a frame that still fails is reported in
:attr:`DownloadReport.failed` and the others go on. So is an archive entry that cannot be
brought in safely: a file name that is a path, ``..``, a hidden name, too long, or holds a
control character (a NUL byte), or a link that is not http(s). A refused token (HTTP
401/403) stops the run.

The token is sent (``Authorization: Token <token>``) only to the archive's own origin (scheme,
host and port), never to the storage host a download link may point to nor after a redirect
that leaves that origin, and never over plain http: an ``http://`` ``api_url`` with a token
is refused before any request, except on this machine's loopback (``127.0.0.1``, ``::1``,
``localhost``: test servers). Messages never print a link's query string (the real archive's
links are pre-signed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_core.contracts.errors import InputError, StageError
from oasis_core.engine import io
from oasis_core.engine.tree import Target

__all__ = [
    "ARCHIVE_URL",
    "RAW",
    "REDUCED",
    "DownloadReport",
    "LcoFrame",
    "download",
    "query",
]

log = logging.getLogger("oasis")

ARCHIVE_URL = "https://archive-api.lco.global/frames/"
REDUCED = 91  # LCO reduction_level of BANZAI-reduced frames
RAW = 0  # LCO reduction_level of raw frames

MAX_PAGE = 1000  # the archive's largest page
CHUNK = 1 << 16
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
COMPRESSED_SUFFIXES = (".fz", ".gz")
MANIFEST_NAME = "data_manifest.ecsv"
MANIFEST_COLUMNS = ("file", "original", "sha256", "copied")
MAX_NAME_BYTES = 200  # longer archive file names are refused (a file system allows 255)


# ---------------------------------------------------------------------------- records


@attrs.frozen(kw_only=True)
class LcoFrame:
    """One frame as the archive's ``/frames/`` API describes it.

    Parameters
    ----------
    id : int
        The archive's frame id.
    filename : str
        File name as served (``...-e91.fits.fz``).
    url : str
        Download link (the real archive's are pre-signed and expire after 48 h).
    record_url : str
        The frame's API record, ``<api_url><id>/`` (what the manifest calls ``original``).
    md5 : str or None
        MD5 of the served bytes (``version_set[0].md5``).
    filesize : int or None
        Size of the served bytes, when the API gives it.
    object, filter, date_obs, proposal : str
        Header values (``OBJECT``, ``FILTER``, ``DATE_OBS``, ``PROPID``).
    reduction : int or None
        ``RLEVEL`` (91 = BANZAI reduced, 0 = raw).
    """

    id: int
    filename: str
    url: str
    record_url: str
    md5: str | None = None
    filesize: int | None = None
    object: str = ""
    filter: str = ""
    date_obs: str = ""
    proposal: str = ""
    reduction: int | None = None

    @property
    def fits_name(self) -> str:
        """Name of the frame in ``data/``: always a plain ``.fits``."""
        return io.frame_name(Path(self.filename)) + ".fits"

    @property
    def compressed(self) -> bool:
        return self.filename.lower().endswith(COMPRESSED_SUFFIXES)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, api_url: str, page: str) -> LcoFrame:
        """Build from one entry of a page's ``results``.

        Raises
        ------
        InputError
            When the entry has no usable file name or link (naming ``page``).
        """

        def pick(*keys: str) -> Any:
            for key in keys:
                if record.get(key) not in (None, ""):
                    return record[key]
            return None

        versions = record.get("version_set") or []
        latest = versions[0] if versions and isinstance(versions[0], Mapping) else {}
        frame_id = record.get("id")
        filename = pick("filename")
        if filename is None and record.get("basename"):
            filename = f"{record['basename']}{latest.get('extension') or '.fits.fz'}"
        url = pick("url") or latest.get("url")
        where = f"{_safe(page)}: frame {frame_id!r}"
        if not isinstance(frame_id, int) or not filename or not url:
            raise InputError(
                f"{where}: no id, filename or url in the record (is api_url the archive's "
                "/frames/ endpoint?)"
            )
        filename = str(filename)
        if (
            Path(filename).name != filename
            or filename.startswith(".")
            or "\\" in filename
            or not filename.isprintable()  # NUL, newlines, other control characters
            or len(filename.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
        ):
            raise InputError(
                f"{where}: unsafe file name {filename!r} (a path, '..', a hidden or too long "
                "name, or a control character such as NUL); frame not downloaded"
            )
        if urllib.parse.urlsplit(str(url)).scheme not in ("http", "https"):
            raise InputError(f"{where}: download link is not http(s): {_safe(str(url))}")
        size = pick("filesize", "size")
        rlevel = pick("RLEVEL", "reduction_level")
        return cls(
            id=frame_id,
            filename=filename,
            url=str(url),
            record_url=urllib.parse.urljoin(api_url, f"{frame_id}/"),
            md5=str(latest["md5"]).lower() if latest.get("md5") else None,
            filesize=int(size) if size is not None else None,
            object=str(pick("OBJECT", "target_name") or ""),
            filter=str(pick("FILTER", "primary_optical_element") or ""),
            date_obs=str(pick("DATE_OBS", "observation_date") or ""),
            proposal=str(pick("PROPID", "proposal_id") or ""),
            reduction=int(rlevel) if rlevel is not None else None,
        )


@attrs.frozen
class DownloadReport:
    """What :func:`download` did: frames written to ``data/``, already there, and failed
    (archive file name, one-line reason)."""

    downloaded: list[Path]
    present: list[Path]
    failed: list[tuple[str, str]]


# ---------------------------------------------------------------------------- HTTP


def _safe(url: str) -> str:
    """``url`` without its query string (pre-signed links carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a malformed port: an origin nothing else has
        port = -1
    port = port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _loopback(host: str) -> bool:
    """True for this machine's loopback: ``localhost``, 127.0.0.0/8, ``::1``."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _encrypted(url: str) -> bool:
    """True when a token may travel to ``url``: https, or plain http to the loopback."""
    scheme, host, _ = _origin(url)
    return scheme == "https" or (scheme == "http" and _loopback(host))


class _KeepAuthOnOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping ``Authorization`` when the redirect leaves the origin (or
    goes to plain http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (_origin(newurl) != _origin(req.full_url) or not _encrypted(newurl)):
            new.remove_header("Authorization")
        return new


class _Transient(Exception):
    """A failure worth retrying (HTTP 5xx, connection refused or reset, timeout)."""


def _detail(err: urllib.error.HTTPError) -> str:
    """One-line reason from an HTTP error (the API's ``{"detail": ...}`` when there is one)."""
    try:
        body = err.read(2000)
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        err.close()
    text = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body)
        if isinstance(parsed, Mapping) and parsed.get("detail"):
            text = str(parsed["detail"])
    reason = f"HTTP {err.code} {err.reason}".strip()
    text = " ".join(text.split())[:200]
    return f"{reason}: {text}" if text else reason


@attrs.frozen(kw_only=True)
class _Client:
    api_url: str
    token: str | None
    retries: int
    backoff: float
    timeout: float
    opener: Any = attrs.field(factory=lambda: urllib.request.build_opener(_KeepAuthOnOrigin))

    def __attrs_post_init__(self) -> None:
        if self.token and not _encrypted(self.api_url):
            raise InputError(
                f"LCO archive: api_url {_safe(self.api_url)} is not https and a token is "
                "given: the token would travel unencrypted; use an https:// api_url (plain "
                "http is allowed without a token, or to this machine's loopback)"
            )

    def headers(self, url: str) -> dict[str, str]:
        """The request's headers: the token only to the archive's own (encrypted) origin."""
        out = {"User-Agent": "oasis-dia (LCO frames client)"}
        if self.token and _origin(url) == _origin(self.api_url) and _encrypted(url):
            out["Authorization"] = f"Token {self.token}"
        return out

    def pause(self, attempt: int) -> None:
        """Sleep before retry number ``attempt`` (1, 2, ...): backoff, 2 x backoff, ..."""
        if attempt > 0 and self.backoff > 0:
            time.sleep(self.backoff * 2 ** (attempt - 1))

    def open(
        self, url: str, *, extra: Mapping[str, str] | None = None, accept: tuple[int, ...] = ()
    ) -> Any:
        """One GET. Returns the response (or an HTTP error whose code is in ``accept``).

        Raises
        ------
        _Transient
            On errors worth retrying.
        InputError
            When the archive refuses the token (or asks for one).
        StageError
            On any other HTTP error (404...).
        """
        req = urllib.request.Request(url, headers={**self.headers(url), **(extra or {})})
        try:
            return self.opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code in accept:
                return err
            if err.code in (401, 403):
                final = err.geturl() or url  # after redirects
                detail = _detail(err)
                if _origin(final) == _origin(self.api_url):
                    if self.token:
                        raise InputError(
                            f"LCO archive refused the token: {detail} ({_safe(final)}); "
                            "check --token (your API token is on your LCO profile page)"
                        ) from err
                    raise InputError(
                        f"LCO archive: {detail} ({_safe(final)}); proprietary data need "
                        "an API token (--token)"
                    ) from err
                raise StageError(
                    f"{_safe(final)}: {detail} (the download link may have expired; run again)"
                ) from err
            if err.code in RETRY_STATUS:
                raise _Transient(_detail(err)) from err
            raise StageError(f"{_safe(url)}: {_detail(err)}") from err
        except urllib.error.URLError as err:
            raise _Transient(f"cannot connect ({err.reason})") from err
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Transient(f"connection failed ({type(err).__name__}: {err})") from err

    def get_json(self, url: str) -> Any:
        """GET ``url`` as JSON, retrying transient failures."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            self.pause(attempt)
            try:
                with self.open(url, extra={"Accept": "application/json"}) as resp:
                    body = resp.read()
            except _Transient as err:
                last = str(err)
                log.debug("%s: %s (attempt %d of %d)", _safe(url), last, attempt + 1, attempts)
                continue
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                last = f"connection failed ({type(err).__name__})"
                continue
            try:
                return json.loads(body)
            except ValueError as err:
                raise StageError(
                    f"{_safe(url)}: the answer is not JSON (is api_url the LCO archive's "
                    "/frames/ endpoint?)"
                ) from err
        raise StageError(
            f"LCO archive query {_safe(url)}: {last} after {attempts} attempts; try again later",
            metadata={"attempts": attempts},
        )


# ---------------------------------------------------------------------------- query


def _iso(value: str | None, name: str, *, end: bool = False) -> str | None:
    """Check an ISO date/time; a bare end date means the end of that day."""
    if value is None or value == "":
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as err:
        raise InputError(
            f"LCO query: {name} {value!r} is not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)"
        ) from err
    if end and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        parsed = parsed.replace(hour=23, minute=59, second=59)
    return parsed.strftime("%Y-%m-%dT%H:%M:%S")


def _query_url(
    api_url: str,
    *,
    object_name: str | None,
    filter_name: str | None,
    proposal: str | None,
    start: str | None,
    end: str | None,
    reduction: int | None,
    limit: int | None,
) -> str:
    if not (object_name or proposal):
        raise InputError("LCO query: give an object (--object) or a proposal (--proposal)")
    if limit is not None and limit < 1:
        raise InputError(f"LCO query: limit must be at least 1 (got {limit})")
    if reduction is not None and reduction < 0:
        raise InputError(f"LCO query: reduction level must be >= 0 (got {reduction})")
    start_iso, end_iso = _iso(start, "start"), _iso(end, "end", end=True)
    if start_iso and end_iso and end_iso < start_iso:
        raise InputError(f"LCO query: end {end!r} is before start {start!r}")
    if urllib.parse.urlsplit(api_url).scheme not in ("http", "https"):
        raise InputError(f"LCO query: api_url {api_url!r} is not an http(s) URL")
    params = {
        "target_name": object_name,
        "primary_optical_element": filter_name,
        "proposal_id": proposal,
        "start": start_iso,
        "end": end_iso,
        "reduction_level": reduction,
        "exclude_calibrations": "true",
        "limit": min(limit or MAX_PAGE, MAX_PAGE),
    }
    query_string = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return f"{api_url}?{query_string}"


def _printable(text: str) -> str:
    """``text`` with control characters (NUL, newlines) escaped: safe on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _entry_name(record: Mapping[str, Any]) -> str:
    """What to call an archive entry that could not be read: its file name, else its id."""
    name = record.get("filename") or record.get("basename")
    if isinstance(name, str) and name:
        return _printable(name)
    return f"frame {_printable(repr(record.get('id')))}"


def _query(
    client: _Client, url: str, limit: int | None
) -> tuple[list[LcoFrame], list[tuple[str, str]]]:
    """The frames listed (up to ``limit``) and the entries refused: (name, one-line reason)."""
    frames: list[LcoFrame] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    page_url: str | None = url
    count = None
    while page_url and (limit is None or len(frames) < limit):
        if page_url in seen:
            raise StageError(f"{_safe(page_url)}: the archive's pages loop back; query stopped")
        if _origin(page_url) != _origin(client.api_url):
            raise StageError(
                f"{_safe(url)}: the next page points to another origin ({_safe(page_url)}: "
                "another scheme, host or port than api_url); query stopped"
            )
        seen.add(page_url)
        page = client.get_json(page_url)
        if not isinstance(page, Mapping) or not isinstance(page.get("results"), list):
            raise StageError(
                f"{_safe(page_url)}: no 'results' list in the answer (is api_url the LCO "
                "archive's /frames/ endpoint?)"
            )
        if count is None:
            count = page.get("count")
        for record in page["results"]:
            if not isinstance(record, Mapping):
                raise StageError(f"{_safe(page_url)}: a result is not a JSON object")
            try:
                frames.append(LcoFrame.from_record(record, api_url=client.api_url, page=page_url))
            except InputError as err:  # this entry only: the others go on
                refused.append((_entry_name(record), _printable(str(err))))
        nxt = page.get("next")
        page_url = urllib.parse.urljoin(page_url, str(nxt)) if nxt else None
    if limit is not None:
        frames = frames[:limit]
    log.info("LCO archive: %s frame(s) match; %d listed", count, len(frames))
    return frames, refused


def _list(
    *,
    api_url: str,
    token: str | None,
    retries: int,
    backoff: float,
    timeout: float,
    **criteria: Any,
) -> tuple[list[LcoFrame], list[tuple[str, str]]]:
    """:func:`query`'s work: the frames listed and the entries refused (name, reason)."""
    url = _query_url(api_url, **criteria)
    client = _Client(
        api_url=api_url, token=token, retries=retries, backoff=backoff, timeout=timeout
    )
    frames, refused = _query(client, url, criteria["limit"])
    if not frames and not refused:
        raise InputError(f"LCO archive: no frames match {_safe(api_url)}?{url.split('?', 1)[1]}")
    return frames, refused


def query(
    *,
    object_name: str | None = None,
    filter_name: str | None = None,
    proposal: str | None = None,
    start: str | None = None,
    end: str | None = None,
    reduction: int | None = REDUCED,
    limit: int | None = None,
    token: str | None = None,
    api_url: str = ARCHIVE_URL,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> list[LcoFrame]:
    """List the archive's frames matching the criteria (following ``next`` up to ``limit``).

    Parameters
    ----------
    object_name : str, optional
        Target name (the archive matches it case-insensitively, as a substring).
    filter_name : str, optional
        Filter (``primary_optical_element``), e.g. ``rp``, ``V``.
    proposal : str, optional
        Proposal id. At least one of ``object_name`` and ``proposal`` is required.
    start, end : str, optional
        ISO dates or date-times of observation; a bare ``end`` date includes that whole day.
    reduction : int or None
        ``reduction_level``: :data:`REDUCED` (91, BANZAI, the default), :data:`RAW` (0),
        None for any.
    limit : int, optional
        Largest number of frames; all matches when None.
    token : str, optional
        LCO API token, for proprietary data.
    api_url : str
        The ``/frames/`` endpoint (tests point it at a local server).
    retries, backoff, timeout : int, float, float
        Retries of server errors, first back-off delay [s] (doubling), socket timeout [s].

    Returns
    -------
    list of LcoFrame
        The entries that cannot be brought in safely (see :meth:`LcoFrame.from_record`)
        are left out, with one warning line each.

    Raises
    ------
    InputError
        Invalid criteria, no frame matching, a refused token, or a token with a plain
        http ``api_url`` (loopback excepted).
    StageError
        The archive keeps failing or answers something that is not a frame list.
    """
    frames, refused = _list(
        api_url=api_url,
        token=token,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        object_name=object_name,
        filter_name=filter_name,
        proposal=proposal,
        start=start,
        end=end,
        reduction=reduction,
        limit=limit,
    )
    for _name, why in refused:
        log.warning("%s", why)
    return frames


# ---------------------------------------------------------------------------- progress


class _LogProgress:
    """Progress as log lines (stderr is not a terminal)."""

    def __init__(self) -> None:
        self.name = ""

    def start(self, name: str, total: int | None, done: int) -> None:
        self.name = name
        size = f"{total} bytes" if total is not None else "size unknown"
        if done:
            log.info("%s: resuming at byte %d of %s", name, done, size)
        else:
            log.info("%s: downloading (%s)", name, size)

    def advance(self, n: int) -> None:
        pass

    def finish(self, ok: bool) -> None:
        if ok:
            log.info("%s: done", self.name)


class _RichProgress:
    """One rich progress bar per frame, on stderr."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.task: Any = None

    def start(self, name: str, total: int | None, done: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(name, total=total, completed=done)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def finish(self, ok: bool) -> None:
        if self.task is not None and not ok:
            self.bar.remove_task(self.task)
        self.task = None


@contextlib.contextmanager
def _progress(enabled: bool | None) -> Iterator[_LogProgress | _RichProgress]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield _LogProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        yield _RichProgress(bar)


# ---------------------------------------------------------------------------- download


class _FrameFailed(Exception):
    """This frame cannot be brought in now; the message is the one-line reason."""


_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_RANGE_TOTAL = re.compile(r"bytes\s+\*/(\d+)")


def _copy_body(resp: Any, fh: Any, bar: Any) -> None:
    """Copy a response body to ``fh`` until EOF. A broken connection just ends the copy (the
    caller compares the size it got with the size expected); errors writing ``fh`` propagate."""
    while True:
        try:
            block = resp.read(CHUNK)
        except http.client.IncompleteRead as err:
            fh.write(err.partial)
            return
        except (OSError, http.client.HTTPException) as err:  # reset, timeout, TLS error
            log.debug("download interrupted: %s", err)
            return
        if not block:
            return
        fh.write(block)
        bar.advance(len(block))


def _fetch(client: _Client, frame: LcoFrame, part: Path, bar: Any) -> None:
    """Bring ``part`` up to the frame's full size, resuming what is there.

    Raises
    ------
    _FrameFailed
        After ``client.retries`` retries, or when the server has fewer bytes than the API says.
    """
    attempts = client.retries + 1
    where = f"{frame.filename} ({_safe(frame.url)})"
    last = ""
    for attempt in range(attempts):
        client.pause(attempt)
        have = part.stat().st_size if part.exists() else 0
        if frame.filesize is not None and have > frame.filesize:
            part.unlink()
            have = 0
        if frame.filesize is not None and have == frame.filesize:
            return
        extra = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = client.open(frame.url, extra=extra, accept=(416,))
        except _Transient as err:
            last = str(err)
            log.debug("%s: %s (attempt %d of %d)", where, last, attempt + 1, attempts)
            continue
        except StageError as err:
            raise _FrameFailed(f"{frame.filename}: {err}") from err
        with resp:
            status = resp.status
            if status == 416:  # nothing beyond what we have
                match = _RANGE_TOTAL.search(resp.headers.get("Content-Range", ""))
                total = int(match.group(1)) if match else None
                if total == have and frame.filesize is None:
                    return  # complete: the checksum decides
                part.unlink()
                if total == have:
                    raise _FrameFailed(
                        f"{where}: size mismatch: the server has {total} bytes, the archive "
                        f"says {frame.filesize} (partial file removed)"
                    )
                last = f"the server has {total} bytes, the partial file {have}; started over"
                continue
            match = _RANGE.search(resp.headers.get("Content-Range", ""))
            resumed = status == 206 and match is not None and int(match.group(1)) == have
            if status == 206 and not resumed:
                part.unlink(missing_ok=True)
                last = f"the server sent another range than asked ({match and match.group(0)})"
                continue
            if not resumed:
                have = 0
            length = resp.headers.get("Content-Length")
            expected = frame.filesize
            if expected is None and length is not None and length.isdigit():
                expected = have + int(length)
            bar.start(frame.filename, expected, have)
            with open(part, "ab" if resumed else "wb") as fh:
                _copy_body(resp, fh, bar)
        size = part.stat().st_size
        if expected is not None and size < expected:
            last = f"truncated: got {size} of {expected} bytes"
            log.debug("%s: %s (attempt %d of %d)", where, last, attempt + 1, attempts)
            continue
        return
    raise _FrameFailed(f"{where}: {last} after {attempts} attempts")


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(frame: LcoFrame, part: Path) -> None:
    """Check size, MD5 and that the bytes are a frame the pipeline can read (the core's
    reader, data included: not truncated, some finite pixel); remove ``part`` when not."""
    where = f"{frame.filename} ({_safe(frame.url)})"
    size = part.stat().st_size
    if frame.filesize is not None and size != frame.filesize:
        part.unlink()
        raise _FrameFailed(
            f"{where}: size mismatch: got {size} bytes, the archive says {frame.filesize} "
            "(partial file removed)"
        )
    if frame.md5 is not None:
        got = _md5(part)
        if got != frame.md5:
            part.unlink()
            raise _FrameFailed(
                f"{where}: MD5 mismatch: got {got}, the archive says {frame.md5} "
                "(partial file removed)"
            )
    try:
        io.read_frame(part, warn=False)
    except InputError as err:
        part.unlink()
        reason = str(err).removeprefix(f"{part}: ")
        raise _FrameFailed(f"{where}: not a usable FITS image ({reason}); file removed") from err


def _funpack(src: Path, dest: Path) -> None:
    """Write ``src`` (fpacked or gzipped FITS) uncompressed to ``dest``, atomically."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        with fits.open(src, memmap=False) as hdul:
            out = fits.HDUList()
            for i, hdu in enumerate(hdul):
                if isinstance(hdu, fits.CompImageHDU):
                    header = hdu.header.copy()
                    new: Any = fits.ImageHDU(data=hdu.data, header=header, name=hdu.name)
                elif i == 0:
                    new = fits.PrimaryHDU(data=hdu.data, header=hdu.header.copy())
                else:
                    new = hdu.copy()
                for key in ("CHECKSUM", "DATASUM"):  # they described the compressed HDU
                    new.header.remove(key, ignore_missing=True, remove_all=True)
                out.append(new)
            if not isinstance(out[0], fits.PrimaryHDU):
                out.insert(0, fits.PrimaryHDU())
            with io.atomic_write(dest) as tmp:
                out.writeto(tmp, overwrite=True, output_verify="silentfix")


def _install(frame: LcoFrame, part: Path, dest: Path) -> None:
    """Move a verified ``part`` into ``data/`` under its final name (uncompressing it)."""
    if frame.compressed:
        _funpack(part, dest)
        part.unlink()
        return
    try:
        os.replace(part, dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        with io.atomic_write(dest) as tmp:  # temp area on another file system
            shutil.copyfile(part, tmp)
        part.unlink()


def _load_manifest(path: Path) -> Any:
    """The manifest ``oasis get --unpack`` keeps (same columns), or an empty one."""
    from astropy.table import Table

    if path.exists():
        return Table.read(path, format="ascii.ecsv")
    return Table(names=MANIFEST_COLUMNS, dtype=(str,) * len(MANIFEST_COLUMNS))


def download(
    target: Target,
    *,
    object_name: str | None = None,
    filter_name: str | None = None,
    proposal: str | None = None,
    start: str | None = None,
    end: str | None = None,
    reduction: int | None = REDUCED,
    limit: int | None = None,
    token: str | None = None,
    api_url: str = ARCHIVE_URL,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool | None = None,
    frames: list[LcoFrame] | None = None,
) -> DownloadReport:
    """Download the LCO frames matching the criteria into ``target``'s ``data/``.

    Parameters
    ----------
    target : Target
        Created if needed.
    object_name, filter_name, proposal, start, end, reduction, limit, token, api_url
        The query; see :func:`query`.
    retries, backoff, timeout : int, float, float
        Retries per request or frame, first back-off delay [s] (doubling), socket timeout [s].
    progress : bool, optional
        Rich progress bars on stderr (True) or log lines (False); None: bars when stderr
        is a terminal.
    frames : list of LcoFrame, optional
        Frames already listed by :func:`query` (then the criteria are not used).

    Returns
    -------
    DownloadReport
        Frames written to ``data/``, frames already there, frames that failed and why
        (including the archive entries refused as unsafe: a file name with a path, ``..``
        or a NUL byte, a link that is not http(s)).

    Raises
    ------
    InputError
        Invalid criteria, no frame matching, a refused token, or a token with a plain
        http ``api_url`` (loopback excepted).
    StageError
        The archive's frame list cannot be read.
    """
    client = _Client(
        api_url=api_url, token=token, retries=retries, backoff=backoff, timeout=timeout
    )
    refused: list[tuple[str, str]] = []
    if frames is None:
        frames, refused = _list(
            api_url=api_url,
            token=token,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            object_name=object_name,
            filter_name=filter_name,
            proposal=proposal,
            start=start,
            end=end,
            reduction=reduction,
            limit=limit,
        )
    target.create()
    partial_dir = target.work / "download"
    partial_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = target.configs / MANIFEST_NAME
    manifest = _load_manifest(manifest_path)
    downloaded: list[Path] = []
    present: list[Path] = []
    failed: list[tuple[str, str]] = []
    for name, why in refused:
        failed.append((name, why))
        log.warning("%s", why)

    def fail(frame: LcoFrame, reason: str) -> None:
        failed.append((frame.filename, reason))
        log.warning("%s", reason)

    with _progress(progress) as bar:
        for frame in frames:
            dest = target.data / frame.fits_name
            if dest.exists():
                known = {str(r["file"]): str(r["sha256"]) for r in manifest}
                if known.get(dest.name) == io.sha256(dest):
                    present.append(dest)
                    continue
                fail(
                    frame,
                    f"{frame.filename}: {dest} exists but is not the recorded download "
                    f"(not in {MANIFEST_NAME} or changed since); remove it to download again",
                )
                continue
            part = partial_dir / f"{frame.filename}.part"
            try:
                _fetch(client, frame, part, bar)
                _verify(frame, part)
                try:
                    _install(frame, part, dest)
                except (OSError, ValueError, TypeError) as err:
                    raise _FrameFailed(
                        f"{frame.filename}: cannot write {dest} ({type(err).__name__}: {err})"
                    ) from err
            except _FrameFailed as err:
                bar.finish(False)
                fail(frame, str(err))
                continue
            bar.finish(True)
            manifest.add_row(
                (dest.name, frame.record_url, io.sha256(dest), time.strftime("%Y-%m-%dT%H:%M:%S"))
            )
            io.write_table(manifest, manifest_path)
            downloaded.append(dest)
    return DownloadReport(downloaded, present, failed)
