"""URLs of sharing: the share form, Inbox, Sent, and a share's page and actions."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

urlpatterns: list[URLPattern] = [
    path("share/", views.share_new, name="share_new"),
    path("inbox/", views.inbox, name="inbox"),
    path("sent/", views.sent, name="sent"),
    path("shares/<uuid:share_uuid>/", views.share_detail, name="share_detail"),
    path("shares/<uuid:share_uuid>/revoke/", views.share_revoke_view, name="share_revoke"),
    path("shares/<uuid:share_uuid>/extend/", views.share_extend_view, name="share_extend"),
]
