"""URLs of downloads: the study as a ZIP (signed in, or through a verified patient link) and
disc images."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

STUDY = "studies/<uuid:study_uuid>/"

urlpatterns: list[URLPattern] = [
    path(STUDY + "download/", views.study_download, name="study_download"),
    path(
        "p/<str:token>/studies/<uuid:study_uuid>/download/",
        views.patient_study_download,
        name="patient_study_download",
    ),
    path(STUDY + "cd/", views.media_export_new, name="media_export_new"),
    path(STUDY + "cd/<uuid:export_uuid>/", views.media_export_page, name="media_export"),
    path(
        STUDY + "cd/<uuid:export_uuid>/download/",
        views.media_export_download,
        name="media_export_download",
    ),
]
