"""Template context shared by every page: the facilities the user belongs to, for the menu, and
the current facility, which the top bar shows and the home page and upload page follow.

The current facility is the session's choice (`facility_switch` sets it), checked against the
user's memberships each time it is asked for: a membership removed since falls back to the first
that remains (the oldest, the user's home facility)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from .models import Membership

CURRENT_FACILITY = "current_facility"
# The memberships and the current one, worked out once per request (one query) and kept here.
_CACHE = "_relay_memberships"


def _memberships(request: HttpRequest) -> tuple[list[Membership], Membership | None]:
    cached = getattr(request, _CACHE, None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    from .access import memberships_of

    memberships = list(memberships_of(request.user).order_by("created_at", "pk"))  # type: ignore[arg-type]
    chosen = request.session.get(CURRENT_FACILITY)
    current = next((m for m in memberships if m.facility_id == chosen), None)
    if current is None and memberships:
        current = memberships[0]
    if current is None:
        request.session.pop(CURRENT_FACILITY, None)
    elif current.facility_id != chosen:
        request.session[CURRENT_FACILITY] = current.facility_id
    setattr(request, _CACHE, (memberships, current))
    return memberships, current


def current_membership(request: HttpRequest) -> Membership | None:
    """The signed-in user's membership of their current facility, or None (no membership, or
    nobody signed in)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    return _memberships(request)[1]


def current_membership_set(request: HttpRequest, membership: Membership) -> None:
    """Make `membership` (one of the signed-in user's) the current one, from this request on."""
    request.session[CURRENT_FACILITY] = membership.facility_id
    if hasattr(request, _CACHE):
        delattr(request, _CACHE)


def relay(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    # Callables, so that the query runs only for templates that show the menu (the template
    # engine calls them), and once per request however often they are used.
    return {
        "my_memberships": lambda: _memberships(request)[0],
        "current_membership": lambda: _memberships(request)[1],
        "can_upload_somewhere": lambda: any(m.can_upload for m in _memberships(request)[0]),
    }
