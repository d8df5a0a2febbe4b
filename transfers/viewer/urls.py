"""URLs of the study viewer, for signed-in users and for verified patient links.

The data endpoints hang below the page's own address, so the page hands its JavaScript one base
URL and the same script serves both doors.
"""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views as v

STUDY = "studies/<uuid:study_uuid>/view/"
PATIENT = "p/<str:token>/studies/<uuid:study_uuid>/view/"

urlpatterns: list[URLPattern] = [
    path(STUDY, v.viewer, name="viewer"),
    path(STUDY + "study.json", v.viewer_study_json, name="viewer_study_json"),
    path(STUDY + "frames/<str:sop_uid>/<int:frame>/", v.viewer_frame, name="viewer_frame"),
    path(STUDY + "thumbs/<str:series_uid>/", v.viewer_thumbnail, name="viewer_thumbnail"),
    path(STUDY + "geometry.json", v.viewer_geometry_json, name="viewer_geometry_json"),
    path(STUDY + "tags/<str:sop_uid>/", v.viewer_tags, name="viewer_tags"),
    path(PATIENT, v.patient_viewer, name="patient_viewer"),
    path(PATIENT + "study.json", v.patient_viewer_study_json, name="patient_viewer_study_json"),
    path(
        PATIENT + "frames/<str:sop_uid>/<int:frame>/",
        v.patient_viewer_frame,
        name="patient_viewer_frame",
    ),
    path(
        PATIENT + "geometry.json",
        v.patient_viewer_geometry_json,
        name="patient_viewer_geometry_json",
    ),
    path(PATIENT + "tags/<str:sop_uid>/", v.patient_viewer_tags, name="patient_viewer_tags"),
    path(
        PATIENT + "thumbs/<str:series_uid>/",
        v.patient_viewer_thumbnail,
        name="patient_viewer_thumbnail",
    ),
]
