"""When the database (or a disk) is down: a 503 that says so, never a 500 with a traceback.

With the database unreachable every page fails, the sign-in page first (the session, the
lockout check and the audit trail all need it), and Django answers 500 with a traceback in the
log. This middleware answers 503 with `Retry-After` instead: JSON ({"status": "unavailable",
"reason": ...}, the shape of the upload API's own 503s) under /api/, so the uploader waits and
sends again; a plain maintenance page elsewhere, rendered without the request so that nothing
in it (the signed-in user, the facility menu) needs the database. The log gets one error line.

Two places catch it:
- before anything else needs the database, the connection is opened (or, kept open, checked
  as CONN_HEALTH_CHECKS would at the first query): a database that is down is seen here;
- a database error while a view runs (the database went away mid-request) and a full or
  failing disk (ENOSPC, EFBIG...) raised by a view end in the same answers.

The middleware stands after the ones that add headers (no-store, CSP), so that its answers get
them, and before the session, the sign-in and everything else that reads the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

log = logging.getLogger(__name__)

# Paths whose clients are programs: they get JSON.
API_PATHS = ("/api/",)
DATABASE_ERRORS = (OperationalError, InterfaceError)
DATABASE_DOWN = "Relay's database is unavailable; nothing was done. Try again shortly."
DISK_DOWN = "Relay could not write to its disk; nothing was stored. Try again shortly."


def _summary(exc: BaseException) -> str:
    # The first line only: a driver's message goes on with hints, never with what was asked.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def unavailable_response(request: HttpRequest, reason: str) -> HttpResponse:
    retry_after = str(settings.RELAY_RETRY_AFTER_SECONDS)
    response: HttpResponse
    if request.path.startswith(API_PATHS):
        response = JsonResponse({"status": "unavailable", "reason": reason}, status=503)
    else:
        page = render_to_string("maintenance.html", {"reason": reason, "retry_after": retry_after})
        response = HttpResponse(page, status=503)
    response["Retry-After"] = retry_after
    # Logged once, by us: Django would add a "Service Unavailable: <path>" line.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


class ServiceUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            # No query of its own: opening the cursor connects, or runs the health check the
            # first query of the request would run anyway.
            connection.cursor().close()
        except DATABASE_ERRORS as exc:
            log.error("database unavailable: %s", _summary(exc))
            return unavailable_response(request, DATABASE_DOWN)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, DATABASE_ERRORS):
            log.error("database unavailable during a request: %s", _summary(exception))
            return unavailable_response(request, DATABASE_DOWN)
        # The upload's list of disk errors, imported only now: transfers.ingest loads pydicom,
        # which a web worker serving pages never needs (tests/relay/test_lean_imports.py).
        from transfers.ingest import DISK_ERRNOS

        if isinstance(exception, OSError) and exception.errno in DISK_ERRNOS:
            log.error("disk write failed during a request: %s", _summary(exception))
            return unavailable_response(request, DISK_DOWN)
        return None
