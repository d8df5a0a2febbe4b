"""Talking to Relay's upload API (transfers/api.py) over HTTP.

The calls: the facilities a token may upload to, which SOP Instance UIDs a facility already
stores (so that a second run resumes instead of starting over), the announcement of what is
about to be sent, the upload of one file, and the manifest at the end.
Each is retried with exponential backoff on network errors and on 502/503/504, which is what a
restarting server, a proxy in between, or briefly unavailable storage answer; never on a 4xx,
which would only be refused again.

Retrying an upload is safe even if the first attempt did arrive: the server deduplicates by
SOP Instance UID and answers "duplicate" for the second copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import httpx

from . import __version__
from .files import LocalFile

RETRY_STATUSES = frozenset({502, 503, 504})
FILE_STATUSES = frozenset({"stored", "duplicate", "conflict", "rejected"})
MAX_KNOWN_UIDS = 10_000  # the server's limit per /instances/known request
MAX_MANIFEST = 20_000  # the server's limit per /manifests request
CHUNK = 256 * 1024  # small enough for a smooth progress bar, large enough to be cheap
MAX_BACKOFF = 30.0


class RelayError(Exception):
    """The server refused the whole run (bad token, wrong facility) or could not be reached.
    Every further request would fail the same way, so the uploader stops."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnavailable(RelayError):
    """No usable answer even after the retries: the network, or the server is down."""


class Stopped(Exception):
    """The run is being stopped (a RelayError elsewhere, or Ctrl-C); give up this file quietly."""


@dataclass
class Answer:
    """What became of one file: a server status, or "failed" when it never got a usable answer."""

    status: str
    reason: str = ""


class RelayServer:
    """One Relay server and one API token, shared by the upload threads."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        retries: int = 3,
        retry_wait: float = 1.0,
        connections: int = 4,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.retry_wait = retry_wait
        self._stop = threading.Event()
        self._client = httpx.Client(
            base_url=self.url,
            headers={
                "Authorization": f"Bearer {token}",
                "User-Agent": f"relay-uploader/{__version__}",
            },
            # The server reads and checks the whole file before it answers, which takes a while
            # for a large multi-frame image, hence the long read timeout.
            timeout=httpx.Timeout(60.0, connect=15.0, read=300.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def __enter__(self) -> RelayServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client.close()

    def stop(self) -> None:
        """Make every thread give up: waits before a retry end at once, bodies stop mid-stream."""
        self._stop.set()

    # --- the calls ------------------------------------------------------------------------------

    def facilities(self) -> list[dict[str, str]]:
        """The facilities this token may upload to, as [{"slug": ..., "name": ...}]."""
        body = self._json_or_raise(self._call(lambda: self._client.get("/api/v1/facilities")))
        return list(body.get("facilities") or [])

    def known(self, facility: str | None, uids: list[str]) -> tuple[str, dict[str, set[str]]]:
        """Which of `uids` the facility already stores (each with the SHA-256 of its stored
        copy, when the server says), and the facility the server used.

        With `facility` None the server picks the caller's only facility, or explains why it
        cannot (the caller belongs to several), which is the message the user should see.
        """
        if len(uids) > MAX_KNOWN_UIDS:
            raise ValueError(f"Ask about at most {MAX_KNOWN_UIDS} UIDs at a time.")
        payload = {"facility": facility, "sop_instance_uids": uids}
        response = self._call(lambda: self._client.post("/api/v1/instances/known", json=payload))
        body = self._json_or_raise(response)
        hashes = body.get("hashes")
        if isinstance(hashes, dict):
            known = {str(uid): {str(h) for h in (shas or [])} for uid, shas in hashes.items()}
        else:  # an older server: UIDs only
            known = {str(uid): set() for uid in body.get("known") or []}
        return str(body.get("facility", facility)), known

    def manifest(
        self, facility: str, entries: list[dict[str, str]], withdraw: list[str] | None = None
    ) -> dict[str, Any]:
        """Send what was to be sent; answers which studies are now complete. `withdraw`: SOP
        Instance UIDs announced but refused by the server, which their studies stop waiting for."""
        payload: dict[str, Any] = {"facility": facility, "instances": entries}
        if withdraw:
            payload["withdraw"] = withdraw
        return self._json_or_raise(
            self._call(lambda: self._client.post("/api/v1/manifests", json=payload))
        )

    def announce(self, facility: str, entries: list[dict[str, str]]) -> dict[str, Any]:
        """Say what is about to be sent, so that its studies wait for all of it."""
        payload = {"facility": facility, "announce": True, "instances": entries}
        return self._json_or_raise(
            self._call(lambda: self._client.post("/api/v1/manifests", json=payload))
        )

    def upload(self, file: LocalFile, *, facility: str, progress: Callable[[int], None]) -> Answer:
        """Send one file as the raw request body. Raises RelayError when the run must stop."""
        if self._stop.is_set():
            raise Stopped
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            progress(n)

        def attempt() -> httpx.Response:
            nonlocal sent
            # A retry sends the file from the start; take back what the failed attempt counted.
            progress(-sent)
            sent = 0
            with file.path.open("rb") as fp:
                size = os.fstat(fp.fileno()).st_size
                return self._client.post(
                    "/api/v1/instances",
                    params={"facility": facility},
                    # An iterator rather than bytes: a multi-frame study can be gigabytes.
                    content=self._chunks(fp, count),
                    headers={
                        "Content-Type": "application/dicom",
                        # Set explicitly, or httpx would send a streamed body chunked, which
                        # the Django development server (and some proxies) cannot read.
                        "Content-Length": str(size),
                        "X-Filename": quote(file.name, safe="/"),
                    },
                )

        try:
            response = self._call(attempt)
        except ServerUnavailable as exc:
            return Answer("failed", str(exc))
        except OSError as exc:
            return Answer("failed", f"The file could not be read: {exc.strerror or exc}.")
        try:
            return self._answer(response)
        except RelayError:
            # Stop here rather than in the main thread, so that this worker does not start
            # on its next file (into the same refusal) before the main thread hears of it.
            self.stop()
            raise

    # --- plumbing -------------------------------------------------------------------------------

    def _chunks(self, fp: IO[bytes], count: Callable[[int], None]) -> Iterator[bytes]:
        while chunk := fp.read(CHUNK):
            if self._stop.is_set():
                raise Stopped
            count(len(chunk))
            yield chunk

    def _call(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """`send()` with retries; raises ServerUnavailable when the last attempt got no answer."""
        attempt = 0
        while True:
            try:
                response = send()
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise ServerUnavailable(
                        f"No answer from {self.url} after {attempt + 1} attempts: {_describe(exc)}"
                    ) from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
                    return response
            delay = min(self.retry_wait * 2**attempt, MAX_BACKOFF)
            if self._stop.wait(delay):
                raise Stopped
            attempt += 1

    def _json_or_raise(self, response: httpx.Response) -> dict[str, Any]:
        body = _json(response)
        if response.is_success and body is not None:
            return body
        reason = _reason(response, body)
        if response.status_code in RETRY_STATUSES:
            raise ServerUnavailable(reason, status=response.status_code)
        raise RelayError(reason, status=response.status_code)

    def _answer(self, response: httpx.Response) -> Answer:
        body = _json(response)
        status = body.get("status") if body else None
        if response.status_code == 401 or status == "error":
            # About the request, not this file (token, facility, permissions): every other file
            # would get the same answer.
            raise RelayError(_reason(response, body), status=response.status_code)
        if response.status_code in RETRY_STATUSES:
            return Answer(
                "failed", f"{_reason(response, body)} (after {self.retries + 1} attempts)"
            )
        if status in FILE_STATUSES and body is not None:
            return Answer(str(status), str(body.get("reason") or ""))
        return Answer("failed", _reason(response, body))


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _reason(response: httpx.Response, body: dict[str, Any] | None) -> str:
    if body and body.get("reason"):
        return str(body["reason"])
    if response.status_code == 401:
        return "The API token was refused."
    if body is None:
        # Typically a proxy's error page, or --server pointing at something that is not Relay.
        return f"HTTP {response.status_code} {response.reason_phrase} from {response.url} (not a Relay answer)."
    return f"HTTP {response.status_code} {response.reason_phrase}."


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
