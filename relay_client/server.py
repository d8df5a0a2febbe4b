"""Talking to Relay's upload API (transfers/api.py) over HTTP.

The calls: the facilities a token may upload to, which SOP Instance UIDs a facility already
stores (so that a second run resumes instead of starting over), the announcement of what is
about to be sent, the upload of one file, and the manifest at the end.

When the server cannot be reached (connection refused, a name that does not resolve, a timeout)
or answers 5xx (a restarting server, a proxy in front of it, its database or image store down;
as JSON from Relay, or as an HTML error page from an older server or a proxy), the whole run
backs off once: one `Backoff` shared by every upload thread, so that while the server is down
one request at a time tries again, after waits that double from --retry-wait (or as long as
the server's Retry-After asks), within --retries attempts and --max-wait seconds of waiting for
the whole run. Then the run stops with what the server's state was. A 4xx is never retried: it
would only be refused again.

Retrying an upload is safe even if the first attempt did arrive: the server deduplicates by
SOP Instance UID and answers "duplicate" for the second copy.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import httpx

from . import __version__
from .files import LocalFile

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
    """No usable answer within the run's retries and wait: the network, or the server is down."""


class RequestFailed(ServerUnavailable):
    """This one request kept failing while the server answered others: give up on it alone."""


class Stopped(Exception):
    """The run is being stopped (a RelayError elsewhere, or Ctrl-C); give up this file quietly."""


@dataclass(frozen=True)
class Problem:
    """Why a request got no usable answer, as the user should read it."""

    text: str
    retry_after: float | None = None  # seconds, from the server's Retry-After header


class Backoff:
    """The run's one backoff, shared by the main thread and every upload thread.

    The first failure of an outage decides a wait; requests that were already on their way add
    no wait of their own: they fail too, or they succeed, which ends the outage. When the wait is
    over and none of them is still on its way, one request (the probe) goes; the others wait for
    its answer. A usable answer ends the outage for everyone; another failure doubles the wait.
    The run gives up after `retries` failed attempts in a row, or when the next wait would take
    the waits of the whole run beyond `max_wait` seconds.
    """

    def __init__(
        self,
        *,
        retries: int,
        base: float,
        max_wait: float,
        url: str,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.retries = retries
        self.base = base
        self.max_wait = max_wait
        self.url = url
        self.waited = 0.0  # seconds of waiting decided so far, every outage of the run together
        self.successes = 0
        self._on_wait = on_wait
        self._cond = threading.Condition()
        self._stopped = False
        self._step = 0  # bumped at every wait decided: a failure of an older step adds none
        self._failures = 0  # failed attempts of the current outage; 0 when there is none
        self._resume_at = 0.0
        self._probing = False
        self._in_flight = 0  # requests sent and not yet answered
        self._gave_up: str | None = None

    def enter(self) -> tuple[int, bool]:
        """Wait until this request may go: (the step it goes in, whether it is the probe)."""
        with self._cond:
            while True:
                if self._stopped:
                    raise Stopped
                if self._gave_up is not None:
                    raise ServerUnavailable(self._gave_up)
                if not self._failures:
                    self._in_flight += 1
                    return self._step, False
                remaining = self._resume_at - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                elif not self._probing and not self._in_flight:
                    self._probing = True
                    self._in_flight += 1
                    return self._step, True
                else:
                    self._cond.wait()

    def succeeded(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self.successes += 1
            self._failures = 0  # the outage, if any, is over
            self._probing = False
            self._cond.notify_all()

    def failed(self, step: int, problem: Problem) -> None:
        """Count a failed attempt. Raises ServerUnavailable when the run gives up."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()
            if self._gave_up is not None:
                raise ServerUnavailable(self._gave_up)
            if step != self._step:
                return  # on its way before the current wait was decided: the same outage
            self._failures += 1
            self._probing = False
            attempts = f"{self._failures} attempt{'s' if self._failures > 1 else ''}"
            if self._failures > self.retries:
                self._give_up(f"{problem.text}. Gave up after {attempts}")
            delay = min(self.base * 2 ** (self._failures - 1), MAX_BACKOFF)
            asked = problem.retry_after is not None and problem.retry_after >= delay
            if problem.retry_after is not None:
                delay = max(delay, problem.retry_after)
            if self.waited + delay > self.max_wait:
                left = max(self.max_wait - self.waited, 0)
                self._give_up(
                    f"{problem.text}. The next wait, {delay:g} s"
                    f"{' as the server asked (Retry-After)' if asked else ''}, is more than the "
                    f"{left:g} s left of --max-wait. Gave up after {attempts}"
                )
            self.waited += delay
            self._resume_at = time.monotonic() + delay
            self._step += 1
            self._cond.notify_all()
            if self._on_wait is not None:
                why = " as the server asked (Retry-After)" if asked else ""
                self._on_wait(
                    f"{self.url} is unavailable: {problem.text}. Trying again in {delay:g} s{why}"
                    f" (attempt {self._failures + 1} of {self.retries + 1})."
                )

    def abandon(self, probe: bool) -> None:
        """A request ended without an answer that says anything about the server (its file
        unreadable, the run stopped, a file the server fails on): if it was the probe, let
        another request be the next one."""
        with self._cond:
            self._in_flight -= 1
            if probe:
                self._probing = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _give_up(self, text: str) -> None:
        self._gave_up = f"{self.url} is unavailable: {text} and {self.waited:g} s of waiting."
        self._cond.notify_all()
        raise ServerUnavailable(self._gave_up)


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
        retries: int = 6,
        retry_wait: float = 1.0,
        max_wait: float = 300.0,
        connections: int = 4,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = Backoff(
            retries=retries, base=retry_wait, max_wait=max_wait, url=self.url, on_wait=on_wait
        )
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
        self.backoff.stop()

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
            with file.open() as fp:
                # A member of a ZIP or disc image: the size it declares, which is exactly what
                # its reader yields (archives.py); a file on disk: its size now.
                size = os.fstat(fp.fileno()).st_size if file.opener is None else file.size
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
            return self._answer(response)
        except RequestFailed as exc:
            return Answer("failed", str(exc))
        except OSError as exc:
            return Answer("failed", f"The file could not be read: {exc.strerror or exc}.")
        except RelayError:
            # The server is unavailable for good, or refuses the run: stop here rather than in
            # the main thread, so that this worker does not start on its next file (into the
            # same answer) before the main thread hears of it.
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
        """`send()` within the run's shared backoff. Raises ServerUnavailable when the run gives
        up, RequestFailed when this request kept failing while the server answered others."""
        tries = 0
        served_before = 0  # the server's usable answers when this request first failed
        while True:
            step, probe = self.backoff.enter()
            try:
                response = send()
                problem = _transient(response)
            except httpx.TransportError as exc:
                problem = Problem(_describe(exc))
            except BaseException:
                self.backoff.abandon(probe)  # every request that entered leaves, or others hang
                raise
            if problem is None:
                self.backoff.succeeded()
                return response
            tries += 1
            if tries == 1:
                served_before = self.backoff.successes
            elif tries > self.retries and self.backoff.successes > served_before:
                # Not an outage: the server answered other requests since this one first
                # failed. Something about this request (a file the server fails on): give up
                # on it alone, and spend none of the run's wait on it.
                self.backoff.abandon(probe)
                raise RequestFailed(f"{problem.text} (after {tries} attempts)")
            self.backoff.failed(step, problem)

    def _json_or_raise(self, response: httpx.Response) -> dict[str, Any]:
        body = _json(response)
        if response.is_success and body is not None:
            return body
        raise RelayError(_reason(response, body), status=response.status_code)

    def _answer(self, response: httpx.Response) -> Answer:
        body = _json(response)
        status = body.get("status") if body else None
        if response.status_code == 401 or status == "error":
            # About the request, not this file (token, facility, permissions): every other file
            # would get the same answer.
            raise RelayError(_reason(response, body), status=response.status_code)
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


def _transient(response: httpx.Response) -> Problem | None:
    """Why the answer is worth trying again later (a 5xx, or a 429 that says when), or None."""
    status = response.status_code
    if status < 500 and not (status == 429 and "retry-after" in response.headers):
        return None
    body = _json(response)
    if body and body.get("reason"):
        text = f"HTTP {status} {response.reason_phrase}: {str(body['reason']).rstrip('.')}"
    else:
        # An older server's or a proxy's error page: the server's state, not a foreign server.
        text = f"HTTP {status} {response.reason_phrase} (an error page, not a Relay answer)"
    return Problem(text, retry_after=_retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds: a number of seconds, or an HTTP date (RFC 9110, 10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.now(tz=UTC)).total_seconds(), 0.0)


def _describe(exc: httpx.TransportError) -> str:
    """The network failure in words: refused, no such name, no answer in time, or else."""
    cause: BaseException | None = exc
    for _ in range(10):  # httpx -> httpcore -> the socket's own error; never a long chain
        if cause is None:
            break
        if isinstance(cause, socket.gaierror):
            return "its name could not be resolved (DNS)"
        if isinstance(cause, ConnectionRefusedError):
            return "the connection was refused (is the server running?)"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    text = str(exc).strip()
    return (
        f"no answer ({type(exc).__name__}: {text})" if text else f"no answer ({type(exc).__name__})"
    )
