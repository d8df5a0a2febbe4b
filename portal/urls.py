"""URLs of accounts (sign-in, password, profile, API tokens, invitations) and facility
administration (members, audit log)."""

from __future__ import annotations

from allauth.account import views as allauth_views
from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("facility/", views.facility_switch, name="facility_switch"),
    # allauth's sign-in (password, passkey, single sign-on; then the second factor), under the
    # name the rest of Relay uses. allauth's own URLs (relay/urls.py) come after these.
    path("accounts/login/", allauth_views.login, name="login"),
    # One address per account, the one invitations and SSO vouched for: no adding others.
    path("accounts/email/", RedirectView.as_view(pattern_name="profile"), name="account_email"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/password/change/", views.PasswordChangeView.as_view(), name="password_change"),
    path(
        "accounts/password/change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("accounts/password/reset/", views.PasswordResetView.as_view(), name="password_reset"),
    path(
        "accounts/password/reset/done/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "accounts/reset/<uidb64>/<token>/",
        views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "accounts/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    path("accounts/profile/", views.profile, name="profile"),
    path("accounts/tokens/", views.token_create, name="token_create"),
    path("accounts/tokens/<int:token_id>/revoke/", views.token_revoke, name="token_revoke"),
    path(
        "facilities/<slug:slug>/members/<int:member_id>/unlock/",
        views.member_unlock,
        name="member_unlock",
    ),
    path("facilities/<slug:slug>/security/", views.facility_security, name="facility_security"),
    path("invitations/<str:token>/", views.invitation_open, name="invitation_open"),
    path("facilities/<slug:slug>/members/", views.facility_members, name="facility_members"),
    path(
        "facilities/<slug:slug>/members/<int:member_id>/role/",
        views.member_role,
        name="member_role",
    ),
    path(
        "facilities/<slug:slug>/members/<int:member_id>/remove/",
        views.member_remove,
        name="member_remove",
    ),
    path(
        "facilities/<slug:slug>/invitations/<int:invitation_id>/revoke/",
        views.invitation_revoke,
        name="invitation_revoke",
    ),
    path("facilities/<slug:slug>/audit/", views.facility_audit, name="facility_audit"),
    path(
        "facilities/<slug:slug>/audit/export/",
        views.facility_audit_export,
        name="facility_audit_export",
    ),
    path("facilities/<slug:slug>/directory/", views.facility_listing, name="facility_listing"),
    path("accounts/session/ping/", views.session_ping, name="session_ping"),
]
