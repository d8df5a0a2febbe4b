"""Top-level URLs: each app's own, and the Django admin."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("portal.urls")),
    path("", include("billing.urls")),
    path("", include("transfers.urls")),
    path("admin/", admin.site.urls),
]
