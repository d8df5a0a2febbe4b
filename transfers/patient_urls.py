"""URLs of patient links (filled in by the patient-link work)."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
