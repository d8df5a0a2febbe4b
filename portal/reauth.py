"""Asking again who it is before a sensitive change (new API tokens, members, DICOM settings,
the admin site).

allauth's `reauthentication_required` asks for the password or the second factor unless one
was confirmed within ACCOUNT_REAUTHENTICATION_TIMEOUT; a sign-in itself counts as one
(portal.adapters.AccountAdapter.post_login), so nobody is asked again right after signing in. Someone who signed in through their
facility's identity provider and has neither has nothing allauth can ask, and allauth then lets
the change through; here such a person must have signed in within that time, or is sent to sign
in again (at their provider) and comes back to the page.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from allauth.account.decorators import reauthentication_required as allauth_required
from allauth.account.internal.flows.login import get_authentication_records
from allauth.account.internal.flows.reauthentication import get_reauthentication_flows
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse


def _signed_in_recently(request: HttpRequest) -> bool:
    records = get_authentication_records(request, request.user)  # type: ignore[arg-type]
    last = max((float(r.get("at", 0)) for r in records), default=0.0)
    return time.time() - last < settings.ACCOUNT_REAUTHENTICATION_TIMEOUT


def reauthentication_required(
    view: Callable[..., HttpResponse] | None = None, *, allow_get: bool = False
) -> Any:
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        guarded = allauth_required(view, allow_get=allow_get)

        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            user = request.user
            if (
                user.is_authenticated
                and not (allow_get and request.method == "GET")
                and not get_reauthentication_flows(user)
                and not _signed_in_recently(request)
            ):
                messages.info(request, "Sign in again to confirm this change.")
                path = request.path
                logout(request)
                return redirect_to_login(path)
            return guarded(request, *args, **kwargs)

        return wrapper

    return decorate(view) if view is not None else decorate
