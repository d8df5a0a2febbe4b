"""Logs carry no patient data and no secrets: paths that hold a patient-link, invitation or
password-reset token, and every query string (worklist searches hold patient names and IDs), are
redacted before a line is written, by the dev server and Django's own warnings (`RedactingFilter`
in settings.LOGGING) and by gunicorn's access log (`RedactingGunicornLogger`, see the README)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

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


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class RedactingGunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with every access-log field that can hold a URL redacted."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        # %(q)s is the bare query string (no "?" for redact() to find): QIDO-RS searches carry
        # patient names and IDs there.
        for key in ("q", "{query_string}e"):
            if atoms.get(key):
                atoms[key] = REDACTED
        return {k: redact(v) if isinstance(v, str) else v for k, v in atoms.items()}
