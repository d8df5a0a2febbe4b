"""URLs of guest links (no sign-in): the link and its code, the studies, sign-out, and keeping
the studies in an account. Viewing, downloads and reports use the /p/<token>/ addresses shared
with patient links."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

urlpatterns: list[URLPattern] = [
    path("g/<str:token>/", views.guest_open, name="guest_open"),
    path("g/<str:token>/studies/", views.guest_studies, name="guest_studies"),
    path("g/<str:token>/sign-out/", views.guest_sign_out, name="guest_sign_out"),
    path("g/<str:token>/account/", views.guest_account, name="guest_account"),
]
