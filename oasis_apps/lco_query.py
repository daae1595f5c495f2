"""Querying the LCO archive's ``/frames/`` API (:mod:`oasis_apps.lco`): the query's URL,
its pages, and each record as an :class:`LcoFrame`.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from oasis_apps.lco_client import Client, origin, safe_url
from oasis_core.contracts.errors import InputError, StageError
from oasis_core.engine import io

__all__ = [
    "ARCHIVE_URL",
    "COMPRESSED_SUFFIXES",
    "MAX_NAME_BYTES",
    "MAX_PAGE",
    "RAW",
    "REDUCED",
    "LcoFrame",
    "list_frames",
    "query",
]

log = logging.getLogger("oasis")


ARCHIVE_URL = "https://archive-api.lco.global/frames/"
REDUCED = 91  # LCO reduction_level of BANZAI-reduced frames
RAW = 0  # LCO reduction_level of raw frames
MAX_PAGE = 1000  # the archive's largest page
COMPRESSED_SUFFIXES = (".fz", ".gz")
MAX_NAME_BYTES = 200  # longer archive file names are refused (a file system allows 255)


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
        where = f"{safe_url(page)}: frame {frame_id!r}"
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
            raise InputError(f"{where}: download link is not http(s): {safe_url(str(url))}")
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
    client: Client, url: str, limit: int | None
) -> tuple[list[LcoFrame], list[tuple[str, str]]]:
    """The frames listed (up to ``limit``) and the entries refused: (name, one-line reason)."""
    frames: list[LcoFrame] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    page_url: str | None = url
    count = None
    while page_url and (limit is None or len(frames) < limit):
        if page_url in seen:
            raise StageError(f"{safe_url(page_url)}: the archive's pages loop back; query stopped")
        if origin(page_url) != origin(client.api_url):
            raise StageError(
                f"{safe_url(url)}: the next page points to another origin ({safe_url(page_url)}: "
                "another scheme, host or port than api_url); query stopped"
            )
        seen.add(page_url)
        page = client.get_json(page_url)
        if not isinstance(page, Mapping) or not isinstance(page.get("results"), list):
            raise StageError(
                f"{safe_url(page_url)}: no 'results' list in the answer (is api_url the LCO "
                "archive's /frames/ endpoint?)"
            )
        if count is None:
            count = page.get("count")
        for record in page["results"]:
            if not isinstance(record, Mapping):
                raise StageError(f"{safe_url(page_url)}: a result is not a JSON object")
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


def list_frames(
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
    client = Client(api_url=api_url, token=token, retries=retries, backoff=backoff, timeout=timeout)
    frames, refused = _query(client, url, criteria["limit"])
    if not frames and not refused:
        raise InputError(f"LCO archive: no frames match {safe_url(api_url)}?{url.split('?', 1)[1]}")
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
    for _name, why in refused:
        log.warning("%s", why)
    return frames
