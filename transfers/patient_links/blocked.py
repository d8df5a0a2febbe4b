"""The answer to a second-factor attempt from a blocked address, shared by the patient and guest
link pages: refused unread, before the link's own count (the address is blocked for all links),
audited, and a 429 page saying until when, with Retry-After."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from ..models import Share
from .services import patient_factor_refused
from .throttle import address_blocked_until


def address_blocked_response(request: HttpRequest, share: Share) -> HttpResponse | None:
    """The 429 page when this client's address is blocked; None when it may answer."""
    blocked_until = address_blocked_until(request)
    if blocked_until is None:
        return None
    patient_factor_refused(share=share, request=request, reason="address blocked")
    response = render(
        request,
        "transfers/patient_throttled.html",
        {"share": share, "blocked_until": blocked_until},
        status=429,
    )
    wait = (blocked_until - timezone.now()).total_seconds()
    response["Retry-After"] = str(max(int(wait), 1))
    return response
