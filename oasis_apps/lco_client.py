"""HTTP for the LCO archive (:mod:`oasis_apps.lco`): one GET with the token sent only to
the archive's own encrypted origin (redirects elsewhere drop it), transient failures
retried with exponential back-off, and one-line errors that never show a pre-signed link's
credentials.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import attrs

from oasis_core.contracts.errors import InputError, StageError

__all__ = [
    "RETRY_STATUS",
    "Client",
    "KeepAuthOnOrigin",
    "Transient",
    "encrypted",
    "http_detail",
    "origin",
    "safe_url",
]

log = logging.getLogger("oasis")


RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def safe_url(url: str) -> str:
    """``url`` without its query string (pre-signed links carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def origin(url: str) -> tuple[str, str, int | None]:
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


def encrypted(url: str) -> bool:
    """True when a token may travel to ``url``: https, or plain http to the loopback."""
    scheme, host, _ = origin(url)
    return scheme == "https" or (scheme == "http" and _loopback(host))


class KeepAuthOnOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping ``Authorization`` when the redirect leaves the origin (or
    goes to plain http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and (origin(newurl) != origin(req.full_url) or not encrypted(newurl)):
            new.remove_header("Authorization")
        return new


class Transient(Exception):
    """A failure worth retrying (HTTP 5xx, connection refused or reset, timeout)."""


def http_detail(err: urllib.error.HTTPError) -> str:
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
class Client:
    api_url: str
    token: str | None
    retries: int
    backoff: float
    timeout: float
    opener: Any = attrs.field(factory=lambda: urllib.request.build_opener(KeepAuthOnOrigin))

    def __attrs_post_init__(self) -> None:
        if self.token and not encrypted(self.api_url):
            raise InputError(
                f"LCO archive: api_url {safe_url(self.api_url)} is not https and a token is "
                "given: the token would travel unencrypted; use an https:// api_url (plain "
                "http is allowed without a token, or to this machine's loopback)"
            )

    def headers(self, url: str) -> dict[str, str]:
        """The request's headers: the token only to the archive's own (encrypted) origin."""
        out = {"User-Agent": "oasis-dia (LCO frames client)"}
        if self.token and origin(url) == origin(self.api_url) and encrypted(url):
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
        Transient
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
                detail = http_detail(err)
                if origin(final) == origin(self.api_url):
                    if self.token:
                        raise InputError(
                            f"LCO archive refused the token: {detail} ({safe_url(final)}); "
                            "check --token (your API token is on your LCO profile page)"
                        ) from err
                    raise InputError(
                        f"LCO archive: {detail} ({safe_url(final)}); proprietary data need "
                        "an API token (--token)"
                    ) from err
                raise StageError(
                    f"{safe_url(final)}: {detail} (the download link may have expired; run again)"
                ) from err
            if err.code in RETRY_STATUS:
                raise Transient(http_detail(err)) from err
            raise StageError(f"{safe_url(url)}: {http_detail(err)}") from err
        except urllib.error.URLError as err:
            raise Transient(f"cannot connect ({err.reason})") from err
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise Transient(f"connection failed ({type(err).__name__}: {err})") from err

    def get_json(self, url: str) -> Any:
        """GET ``url`` as JSON, retrying transient failures."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            self.pause(attempt)
            try:
                with self.open(url, extra={"Accept": "application/json"}) as resp:
                    body = resp.read()
            except Transient as err:
                last = str(err)
                log.debug("%s: %s (attempt %d of %d)", safe_url(url), last, attempt + 1, attempts)
                continue
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                last = f"connection failed ({type(err).__name__})"
                continue
            try:
                return json.loads(body)
            except ValueError as err:
                raise StageError(
                    f"{safe_url(url)}: the answer is not JSON (is api_url the LCO archive's "
                    "/frames/ endpoint?)"
                ) from err
        raise StageError(
            f"LCO archive query {safe_url(url)}: {last} after {attempts} attempts; try again later",
            metadata={"attempts": attempts},
        )
