"""URLs of patient links: the sender's handout and the patient's pages (no sign-in)."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import download_views, patient_views

urlpatterns: list[URLPattern] = [
    path(
        "shares/<uuid:share_uuid>/handout/",
        patient_views.patient_handout,
        name="patient_handout",
    ),
    path("p/<str:token>/", patient_views.patient_open, name="patient_open"),
    path("p/<str:token>/studies/", patient_views.patient_studies, name="patient_studies"),
    path(
        "p/<str:token>/studies/<uuid:study_uuid>/download/",
        download_views.patient_study_download,
        name="patient_study_download",
    ),
    path(
        "p/<str:token>/studies/<uuid:study_uuid>/reports/<uuid:report_uuid>/",
        download_views.patient_report_download,
        name="patient_report_download",
    ),
]
