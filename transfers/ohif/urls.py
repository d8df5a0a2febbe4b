"""URLs of the OHIF viewer: every path under /ohif/ (its files and its app's routes)."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

urlpatterns: list[URLPattern] = [
    path("ohif/", views.ohif, name="ohif"),
    path("ohif/<path:path>", views.ohif, name="ohif_file"),
]
