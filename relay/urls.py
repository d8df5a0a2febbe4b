"""Top-level URLs: each app's own, and the Django admin."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.urls import include, path

from portal.reauth import reauthentication_required
from portal.views import admin_login

# The admin site has no sign-in of its own: it sits behind Relay's (second factor included),
# and every change made there (plans, facilities, SSO) asks for the password or second factor
# again when the last confirmation is older than ACCOUNT_REAUTHENTICATION_TIMEOUT.
admin.site.login = admin_login  # type: ignore[method-assign,assignment]
_admin_view = admin.site.admin_view


def _admin_view_reauthenticated(view: Any, cacheable: bool = False) -> Any:
    return _admin_view(reauthentication_required(view, allow_get=True), cacheable)


admin.site.admin_view = _admin_view_reauthenticated  # type: ignore[method-assign]

urlpatterns = [
    path("", include("portal.urls")),
    path("", include("billing.urls")),
    path("", include("transfers.urls")),
    path("accounts/", include("allauth.urls")),
    path("admin/", admin.site.urls),
]
