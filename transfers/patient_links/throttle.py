"""Throttling patient-link answers per client address, across all links.

Each link locks itself after five wrong answers (Share.patient_attempt_claim). This adds a limit
per address: PATIENT_LINK_ADDRESS_FAILURES wrong answers (default 20) within
PATIENT_LINK_ADDRESS_WINDOW seconds (10 minutes) block every answer from that address, to any
link, for PATIENT_LINK_ADDRESS_BLOCK seconds (1 hour). It stops one client working through many
links five guesses at a time.

The counts live in Django's cache (Redis in production, so every web process shares them; the
embedded default's local-memory cache counts per process). The window is fixed, started by the
first wrong answer; cache.incr is atomic in Redis. An IPv6 client usually holds a whole /64,
so IPv6 addresses count by that network. A request with no usable address is not throttled.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest
from django.utils import timezone

from portal.audit import client_ip


def _limits() -> tuple[int, int, int]:
    return (
        int(getattr(settings, "PATIENT_LINK_ADDRESS_FAILURES", 20)),
        int(getattr(settings, "PATIENT_LINK_ADDRESS_WINDOW", 600)),
        int(getattr(settings, "PATIENT_LINK_ADDRESS_BLOCK", 3600)),
    )


def _address(request: HttpRequest) -> str | None:
    raw = client_ip(request)
    if raw is None:
        return None
    address = ipaddress.ip_address(raw)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def address_blocked_until(request: HttpRequest) -> datetime | None:
    """When this client's block ends, or None when it may answer."""
    address = _address(request)
    if address is None:
        return None
    until = cache.get(f"patient-link:blocked:{address}")
    if until is None:
        return None
    return datetime.fromtimestamp(float(until), tz=timezone.get_current_timezone())


def address_failure_count(request: HttpRequest) -> datetime | None:
    """Count one wrong answer from this client. Returns the end of the block when this answer
    starts one (once per block, so the caller audits it once), else None."""
    address = _address(request)
    if address is None:
        return None
    failures, window, block = _limits()
    key = f"patient-link:failures:{address}"
    cache.add(key, 0, timeout=window)
    try:
        count = cache.incr(key)
    except ValueError:  # the window ran out between add and incr
        cache.add(key, 1, timeout=window)
        count = 1
    if count < failures:
        return None
    until = timezone.now() + timedelta(seconds=block)
    if not cache.add(f"patient-link:blocked:{address}", until.timestamp(), timeout=block):
        return None  # already blocked (a parallel answer started it)
    cache.delete(key)  # after the block, a fresh window
    return until
