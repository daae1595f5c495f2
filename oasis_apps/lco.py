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
import errno
import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from oasis_apps.lco_client import Client, Transient, safe_url
from oasis_apps.lco_query import ARCHIVE_URL, RAW, REDUCED, LcoFrame, list_frames, query
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

CHUNK = 1 << 16
MANIFEST_NAME = "data_manifest.ecsv"
MANIFEST_COLUMNS = ("file", "original", "sha256", "copied")


# ---------------------------------------------------------------------------- records


@attrs.frozen
class DownloadReport:
    """What :func:`download` did: frames written to ``data/``, already there, and failed
    (archive file name, one-line reason)."""

    downloaded: list[Path]
    present: list[Path]
    failed: list[tuple[str, str]]


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


def _fetch(client: Client, frame: LcoFrame, part: Path, bar: Any) -> None:
    """Bring ``part`` up to the frame's full size, resuming what is there.

    Raises
    ------
    _FrameFailed
        After ``client.retries`` retries, or when the server has fewer bytes than the API says.
    """
    attempts = client.retries + 1
    where = f"{frame.filename} ({safe_url(frame.url)})"
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
        except Transient as err:
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
    where = f"{frame.filename} ({safe_url(frame.url)})"
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
    client = Client(api_url=api_url, token=token, retries=retries, backoff=backoff, timeout=timeout)
    refused: list[tuple[str, str]] = []
    if frames is None:
        frames, refused = list_frames(
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
            why = _download_frame(client, frame, partial_dir / f"{frame.filename}.part", dest, bar)
            if why is not None:
                fail(frame, why)
                continue
            manifest.add_row(
                (dest.name, frame.record_url, io.sha256(dest), time.strftime("%Y-%m-%dT%H:%M:%S"))
            )
            io.write_table(manifest, manifest_path)
            downloaded.append(dest)
    return DownloadReport(downloaded, present, failed)


def _download_frame(
    client: Client, frame: LcoFrame, part: Path, dest: Path, bar: Any
) -> str | None:
    """Fetch ``frame`` into ``part``, check it and install it as ``dest``; why it failed
    (None when it is in place)."""
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
        return str(err)
    bar.finish(True)
    return None
