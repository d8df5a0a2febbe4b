"""Top-level URLs: each app's own, and the Django admin."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path
from django.views.decorators.http import require_safe

from portal.reauth import reauthentication_required
from portal.views import admin_login
from relay import health, metrics

# The admin site has no sign-in of its own: it sits behind Relay's (second factor included),
# and every change made there (plans, facilities, SSO) asks for the password or second factor
# again when the last confirmation is older than ACCOUNT_REAUTHENTICATION_TIMEOUT.
admin.site.login = admin_login  # type: ignore[method-assign,assignment]
_admin_view = admin.site.admin_view


def _admin_view_reauthenticated(view: Any, cacheable: bool = False) -> Any:
    return _admin_view(reauthentication_required(view, allow_get=True), cacheable)


admin.site.admin_view = _admin_view_reauthenticated  # type: ignore[method-assign]
admin.site.site_header = "Relay administration"
admin.site.site_title = "Relay administration"
admin.site.index_title = "Relay: facilities, people, plans and invoices"


@require_safe
def favicon(request: HttpRequest) -> HttpResponseRedirect:
    """/favicon.ico, which browsers ask for on pages without an icon link (the viewer, a PDF,
    an error page of a proxy): the SVG icon, by its static URL so WhiteNoise serves and caches it.
    Resolved per request, as the manifest's hashed name exists only after collectstatic."""
    return HttpResponseRedirect(static("favicon.svg"))


urlpatterns = [
    path("favicon.ico", favicon),
    # For load balancers and monitors (relay/health.py).
    path("health/live/", health.live, name="health_live"),
    path("health/ready/", health.ready, name="health_ready"),
    # For Prometheus, behind a token (relay/metrics.py; its middleware answers it first).
    path("metrics", metrics.metrics, name="metrics"),
    path("", include("portal.urls")),
    path("", include("billing.urls")),
    path("", include("transfers.urls")),
    path("accounts/", include("allauth.urls")),
    path("admin/", admin.site.urls),
]
