"""URL of patient reconciliation."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

urlpatterns: list[URLPattern] = [
    path(
        "studies/<uuid:study_uuid>/reconcile/",
        views.study_reconcile_view,
        name="study_reconcile",
    ),
]
