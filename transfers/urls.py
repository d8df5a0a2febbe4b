"""URLs of studies, sharing, upload and the upload API."""

from __future__ import annotations

from django.urls import include, path

from . import (
    api,
    download_views,
    pacs_views,
    reconcile_views,
    routing_views,
    share_views,
    views,
)

urlpatterns = [
    path("studies/", views.study_list, name="studies"),
    path("studies/<uuid:study_uuid>/", views.study_detail, name="study_detail"),
    path("studies/<uuid:study_uuid>/reports/", views.report_add, name="report_add"),
    path(
        "studies/<uuid:study_uuid>/reports/<uuid:report_uuid>/",
        views.report_download,
        name="report_download",
    ),
    path(
        "studies/<uuid:study_uuid>/download/",
        download_views.study_download,
        name="study_download",
    ),
    path("studies/<uuid:study_uuid>/pacs/", pacs_views.study_pacs, name="study_pacs"),
    path(
        "studies/<uuid:study_uuid>/reconcile/",
        reconcile_views.study_reconcile_view,
        name="study_reconcile",
    ),
    path("studies/<uuid:study_uuid>/cd/", download_views.media_export_new, name="media_export_new"),
    path(
        "studies/<uuid:study_uuid>/cd/<uuid:export_uuid>/",
        download_views.media_export_page,
        name="media_export",
    ),
    path(
        "studies/<uuid:study_uuid>/cd/<uuid:export_uuid>/download/",
        download_views.media_export_download,
        name="media_export_download",
    ),
    path("upload/", views.upload_page, name="upload"),
    path("facilities/<slug:slug>/dicom/", routing_views.routing_rules, name="routing_rules"),
    path(
        "facilities/<slug:slug>/dicom/rules/<uuid:rule_uuid>/delete/",
        routing_views.routing_rule_delete,
        name="routing_rule_delete",
    ),
    path("share/", share_views.share_new, name="share_new"),
    path("inbox/", share_views.inbox, name="inbox"),
    path("sent/", share_views.sent, name="sent"),
    path("shares/<uuid:share_uuid>/", share_views.share_detail, name="share_detail"),
    path("shares/<uuid:share_uuid>/revoke/", share_views.share_revoke_view, name="share_revoke"),
    path("shares/<uuid:share_uuid>/extend/", share_views.share_extend_view, name="share_extend"),
    path("", include("transfers.patient_urls")),
    path("", include("transfers.viewer_urls")),
    path("api/v1/facilities", api.facilities, name="api_facilities"),
    path("api/v1/instances", api.instances_upload, name="api_instances"),
    path("api/v1/instances/known", api.instances_known, name="api_instances_known"),
    path("api/v1/manifests", api.manifest, name="api_manifest"),
]
