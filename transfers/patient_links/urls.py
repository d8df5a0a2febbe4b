"""URLs of patient links: the sender's handout, unlock and re-issue, and the patient's pages
(no sign-in)."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

urlpatterns: list[URLPattern] = [
    path("shares/<uuid:share_uuid>/handout/", views.patient_handout, name="patient_handout"),
    path(
        "shares/<uuid:share_uuid>/unlock/",
        views.patient_link_unlock_view,
        name="patient_link_unlock",
    ),
    path(
        "shares/<uuid:share_uuid>/reissue/",
        views.patient_link_reissue_view,
        name="patient_link_reissue",
    ),
    path("p/<str:token>/", views.patient_open, name="patient_open"),
    path("p/<str:token>/studies/", views.patient_studies, name="patient_studies"),
    path("p/<str:token>/sign-out/", views.patient_sign_out, name="patient_sign_out"),
    path("p/<str:token>/forward/", views.patient_forward, name="patient_forward"),
    path(
        "p/<str:token>/forwards/<uuid:share_uuid>/revoke/",
        views.patient_forward_revoke,
        name="patient_forward_revoke",
    ),
    path(
        "p/<str:token>/studies/<uuid:study_uuid>/summary/",
        views.patient_summary,
        name="patient_summary",
    ),
    path(
        "p/<str:token>/studies/<uuid:study_uuid>/reports/<uuid:report_uuid>/",
        views.patient_report_download,
        name="patient_report_download",
    ),
]
