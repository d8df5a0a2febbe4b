"""Limits every request meets before a view (or another middleware) reads it.

Two middlewares, at two places in MIDDLEWARE:

- `HostileRequestMiddleware`, first: a NUL in the path, the query string or any header, and a
  URL longer than RELAY_MAX_URL_CHARS, get 400 / 414. No honest client sends either; PostgreSQL
  cannot hold a NUL in text, so one reaching a query (a session cookie, a search, a user agent
  written to the audit trail) would end in a 500 instead of a clear answer.
- `AnonymousBodyLimitMiddleware`, after authentication and the session limits: a request from
  someone not signed in that declares a body larger than RELAY_ANONYMOUS_BODY_BYTES gets 413
  before a byte of it is read. Without it, the CSRF check of an anonymous 200 MB multipart POST
  to the sign-in page spools the whole body to a temporary file before answering 403. The upload
  API and DICOMweb (STOW-RS) with a bearer token are exempt: `transfers.api.api_view` checks the
  token before the view reads the body. Patient-link pages are not exempt: their forms (PIN,
  birth date) are small.

Each refusal is an `access_denied` audit event (the path with any NUL removed, no query string:
a query may hold what a patient typed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse

from portal.audit import audit_record, client_ip
from portal.models import AuditAction, Outcome

log = logging.getLogger(__name__)

ANONYMOUS_BODY_BYTES = 64 * 1024
MAX_URL_CHARS = 8192
# Paths whose views authenticate a bearer token before they read the body.
TOKEN_PATHS = ("/api/", "/dicom-web/")


def _refuse(request: HttpRequest, reason: str, status: int) -> HttpResponse:
    user = getattr(request, "user", None)
    actor = user if user is not None and user.is_authenticated else None
    try:
        audit_record(
            action=AuditAction.ACCESS_DENIED,
            actor=actor,  # type: ignore[arg-type]
            outcome=Outcome.FAILURE,
            # request=None: its user agent (and anything else from it) may be what was refused.
            address=client_ip(request),
            detail={
                "reason": reason,
                "path": request.path.replace("\x00", "")[:200],
                "method": request.method or "",
            },
        )
    except DatabaseError:
        # The refusal stands with the database down; the log keeps it instead (no path: it is
        # what was refused).
        log.error("database unavailable: could not audit a refused request (%s)", reason)
    if request.path.startswith(TOKEN_PATHS):
        return JsonResponse({"status": "error", "reason": reason}, status=status)
    return HttpResponse(reason, status=status, content_type="text/plain; charset=utf-8")


def _has_nul(request: HttpRequest) -> bool:
    query = request.META.get("QUERY_STRING", "")
    if "\x00" in request.path or "\x00" in query or "%00" in query:
        return True
    return any(
        "\x00" in str(value) for key, value in request.META.items() if key.startswith("HTTP_")
    )


class HostileRequestMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        max_url = getattr(settings, "RELAY_MAX_URL_CHARS", MAX_URL_CHARS)
        if len(request.path) + len(request.META.get("QUERY_STRING", "")) > max_url:
            return _refuse(request, f"The URL is longer than {max_url} characters.", 414)
        if _has_nul(request):
            return _refuse(request, "The request contains a NUL character.", 400)
        return self.get_response(request)


class AnonymousBodyLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = getattr(settings, "RELAY_ANONYMOUS_BODY_BYTES", ANONYMOUS_BODY_BYTES)
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _refuse(request, "The Content-Length header is not a number.", 400)
        if declared > limit and not self._authenticated(request):
            return _refuse(
                request,
                f"Sign in first: a request from someone not signed in may carry at most "
                f"{limit} bytes.",
                413,
            )
        return self.get_response(request)

    @staticmethod
    def _authenticated(request: HttpRequest) -> bool:
        if request.user.is_authenticated:
            return True
        # The token is checked by the view before it reads the body (transfers.api.api_view).
        header = request.META.get("HTTP_AUTHORIZATION", "")
        return request.path.startswith(TOKEN_PATHS) and header[:7].lower() == "bearer "
