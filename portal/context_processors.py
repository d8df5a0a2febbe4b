"""Template context shared by every page: the facilities the user belongs to, for the menu."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest


def relay(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    # Lazy: evaluated only by templates that show the menu.
    from .access import memberships_of

    return {"my_memberships": memberships_of(user)}  # type: ignore[arg-type]
