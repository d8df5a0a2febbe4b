"""Logs carry no patient data and no secrets: paths that hold a patient-link, invitation or
password-reset token, and every query string (worklist searches hold patient names and IDs), are
redacted before a line is written, by the dev server and Django's own warnings (`RedactingFilter`
in settings.LOGGING) and by gunicorn's access log (`RedactingGunicornLogger`, see the README).

With RELAY_LOG_FORMAT=json every line is one JSON object (`JsonFormatter`): the time in UTC, the
level, the logger, the message (redacted as above) and the request's id while a request is
being answered (`RequestIdMiddleware`; also sent back as X-Request-ID)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from django.core.signals import request_finished, request_started
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from gunicorn.glogging import Logger

REDACTED = "[redacted]"
_TOKEN_PATHS = re.compile(
    r"(/p/|/g/|/invitations/|/accounts/reset/[^/\s?\"]+/|/accounts/reset/"
    # allauth's own links that carry a key (Relay sends none of them, but they answer)
    r"|/accounts/password/reset/key/|/accounts/confirm-email/)[^/\s?\"]+"
)
_QUERY = re.compile(r"\?[^\s\"]*")


def redact(text: str) -> str:
    """The text with tokens in paths and whole query strings replaced by [redacted]."""
    text = _TOKEN_PATHS.sub(lambda m: m.group(1) + REDACTED, text)
    return _QUERY.sub("?" + REDACTED, text)


class UtcFormatter(logging.Formatter):
    """Times in UTC, ISO 8601 with a Z (2026-12-04T15:10:00.123Z), in every process: the web
    workers, Celery's workers and beat, and the gateway wrote local (Denver) time without an
    offset while PostgreSQL and the proxies wrote UTC."""

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = time.strftime(datefmt or self.default_time_format, time.gmtime(record.created))
        return self.default_msec_format % (stamp, record.msecs) if not datefmt else stamp


class JsonFormatter(UtcFormatter):
    """One JSON object per line: time, level, logger, message, and request_id, exc_info and
    stack_info when there are any. A small subclass rather than python-json-logger: the fields
    are fixed (the library would copy any `extra=` a call passes into the line, a way for
    patient data to slip past the redaction), and it is twenty lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc_info"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# The id of the request this thread is answering ("" outside a request).
REQUEST_ID: ContextVar[str] = ContextVar("relay_request_id", default="")
# An id the proxy sent is kept when it looks like one (nginx's $request_id, a UUID), so that the
# proxy's log and ours name a request alike; anything else is replaced, never logged.
_GIVEN_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


class RequestIdMiddleware:
    """Gives each request an id (the proxy's X-Request-ID when it looks like one, otherwise a
    new one) that every log line written while answering it carries, and sends it back."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = given if _GIVEN_ID.fullmatch(given) else uuid.uuid4().hex
        # Kept until the request is finished, not reset on the way out: Django logs a 4xx or
        # 5xx ("Not Found: ...") after the middleware has returned.
        REQUEST_ID.set(request_id)
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


@receiver(request_started)
@receiver(request_finished)
def _request_id_clear(**_: object) -> None:
    """No id outside a request (a worker thread answers one request after another)."""
    REQUEST_ID.set("")


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class RedactingGunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with every access-log field that can hold a URL redacted; its error and
    access lines are JSON objects too when RELAY_LOG_FORMAT=json (gunicorn configures its own
    handlers, outside settings.LOGGING)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if os.environ.get("RELAY_LOG_FORMAT", "").strip().lower() == "json":
            for handler in (*self.error_log.handlers, *self.access_log.handlers):
                handler.setFormatter(JsonFormatter())
        else:
            # gunicorn's own lines ("Booting worker", "WORKER TIMEOUT") in UTC like every other
            # line, not in the portal's TIME_ZONE, which Django puts into TZ for the process.
            for handler in self.error_log.handlers:
                handler.setFormatter(
                    UtcFormatter("%(asctime)s %(levelname)s gunicorn [%(process)d] %(message)s")
                )

    def now(self) -> str:
        """The access log's %(t)s: UTC, ISO 8601 with a Z (gunicorn's is local time)."""
        return "[" + UtcFormatter().formatTime(logging.makeLogRecord({})) + "]"

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        # %(q)s is the bare query string (no "?" for redact() to find): QIDO-RS searches carry
        # patient names and IDs there.
        for key in ("q", "{query_string}e"):
            if atoms.get(key):
                atoms[key] = REDACTED
        return {k: redact(v) if isinstance(v, str) else v for k, v in atoms.items()}
