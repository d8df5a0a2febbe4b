"""Response headers that keep patient data out of caches and limit what a page may do.

Nearly every answer Relay gives carries PHI or a secret: worklists, studies, reports, frames,
thumbnails, ZIPs, audit logs, invoices, the profile page showing a new API token, a patient
link's handout, even a sign-in form's CSRF token. So `Cache-Control: no-store` is the rule
and the exceptions are listed (static assets, by path prefix), not the other way round: a new
view cannot forget it (a view that serves files without PHI, OHIF's, marks its answers with
`CACHEABLE_ATTRIBUTE`). A view's own, weaker caching (the viewer's `private, max-age` frames) is
replaced, so a browser on a shared computer keeps no copy of a patient's images on disk; the
viewer holds what it fetched in memory for the page's lifetime anyway.

Permissions-Policy turns off the browser features no Relay page uses. The Content-Security-Policy
comes from django-csp (settings.CONTENT_SECURITY_POLICY) and Cross-Origin-Opener-Policy from
Django's SecurityMiddleware (SECURE_CROSS_ORIGIN_OPENER_POLICY); tests/relay/test_headers.py
checks all four on every URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import patch_cache_control

# Features a page could ask for that Relay never needs: none for any origin. The viewer may go
# full screen; security keys and passkeys (WebAuthn) work on Relay's own pages only.
PERMISSIONS_POLICY = ", ".join(
    [
        "accelerometer=()",
        "autoplay=()",
        "camera=()",
        "display-capture=()",
        "encrypted-media=()",
        "fullscreen=(self)",
        "geolocation=()",
        "gyroscope=()",
        "hid=()",
        "idle-detection=()",
        "magnetometer=()",
        "microphone=()",
        "midi=()",
        "payment=()",
        "picture-in-picture=()",
        "publickey-credentials-create=(self)",
        "publickey-credentials-get=(self)",
        "screen-wake-lock=()",
        "serial=()",
        "usb=()",
        "xr-spatial-tracking=()",
    ]
)


# Set to True on a response that holds no PHI and keeps its own caching: the files of the OHIF
# build under /ohif/ (transfers/ohif/views.py), the same code for every user.
CACHEABLE_ATTRIBUTE = "relay_cacheable"


def cacheable_prefixes() -> tuple[str, ...]:
    """Path prefixes whose answers keep their own caching: static assets (no PHI, fingerprinted
    names) and whatever the operator adds in RELAY_CACHEABLE_PATH_PREFIXES."""
    static = str(settings.STATIC_URL or "")
    if not static.startswith("/"):
        static = "/" + static
    extra = getattr(settings, "RELAY_CACHEABLE_PATH_PREFIXES", ())
    return (static, *extra)


def no_store(response: HttpResponseBase) -> None:
    """Forbid every cache (browser disk, proxy) to keep the answer."""
    if "no-store" not in response.get("Cache-Control", ""):
        # Replaces `private, max-age=...`: no-store beside max-age would be read by some caches
        # as a contradiction, and nothing of that header should survive.
        del response["Cache-Control"]
        patch_cache_control(response, no_store=True)


class SecurityHeadersMiddleware:
    """`Cache-Control: no-store` on every answer outside the cacheable prefixes, and
    Permissions-Policy on every answer. Sits near the top of MIDDLEWARE so that redirects and
    refusals made by the middleware below it (sign-in, second factor, lockout) get them too."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.cacheable = cacheable_prefixes()
        self.permissions_policy = getattr(settings, "RELAY_PERMISSIONS_POLICY", PERMISSIONS_POLICY)

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if not request.path.startswith(self.cacheable) and not getattr(
            response, CACHEABLE_ATTRIBUTE, False
        ):
            no_store(response)
        if self.permissions_policy:
            response.setdefault("Permissions-Policy", self.permissions_policy)
        return response


_Response = TypeVar("_Response", bound=HttpResponseBase)


def answered_first(response: _Response) -> _Response:
    """The headers every Relay answer carries (this module, django-csp, SecurityMiddleware), on
    an answer given by a middleware above them (the health checks, /metrics)."""
    no_store(response)
    response.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
    response.setdefault(
        "Content-Security-Policy", "default-src 'none'; object-src 'none'; frame-ancestors 'none'"
    )
    response.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    response.setdefault("X-Content-Type-Options", "nosniff")
    return response
