"""URLs of the study viewer, for signed-in users and for verified patient links."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
