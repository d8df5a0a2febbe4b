"""URLs of transfers: the study core (home, worklist, study page, reports, upload page and API) and
each feature package's own."""

from __future__ import annotations

from django.urls import include, path

from . import api, views

urlpatterns = [
    path("", views.home, name="home"),
    path("studies/", views.study_list, name="studies"),
    path("studies/<uuid:study_uuid>/", views.study_detail, name="study_detail"),
    path("studies/<uuid:study_uuid>/reports/", views.report_add, name="report_add"),
    path(
        "studies/<uuid:study_uuid>/complete/",
        views.study_complete_without,
        name="study_complete_without",
    ),
    path(
        "studies/<uuid:study_uuid>/reports/<uuid:report_uuid>/",
        views.report_download,
        name="report_download",
    ),
    path("upload/", views.upload_page, name="upload"),
    path("api/v1/facilities", api.facilities, name="api_facilities"),
    path("api/v1/instances", api.instances_upload, name="api_instances"),
    path("api/v1/instances/known", api.instances_known, name="api_instances_known"),
    path("api/v1/manifests", api.manifest, name="api_manifest"),
    path("", include("transfers.sharing.urls")),
    path("", include("transfers.patient_links.urls")),
    path("", include("transfers.guest_links.urls")),
    path("", include("transfers.viewer.urls")),
    path("", include("transfers.media.urls")),
    path("", include("transfers.dicom.urls")),
    path("", include("transfers.reconcile.urls")),
    path("", include("transfers.dicomweb.urls")),
    path("", include("transfers.ohif.urls")),
]
