"""URLs of DICOM networking: sending a study to a PACS, and the facility admin's DICOM page
(gateway access, PACS destinations, routing rules), one POST URL per change."""

from __future__ import annotations

from django.urls import URLPattern, path

from . import views

DICOM = "facilities/<slug:slug>/dicom/"

urlpatterns: list[URLPattern] = [
    path("studies/<uuid:study_uuid>/pacs/", views.study_pacs, name="study_pacs"),
    path(DICOM, views.routing_rules, name="routing_rules"),
    path(DICOM + "gateway/", views.gateway_access_save, name="gateway_access_save"),
    path(DICOM + "destinations/", views.destination_new, name="destination_new"),
    path(
        DICOM + "destinations/<uuid:destination_uuid>/echo/",
        views.destination_echo_view,
        name="destination_echo",
    ),
    path(
        DICOM + "destinations/<uuid:destination_uuid>/edit/",
        views.destination_edit,
        name="destination_edit",
    ),
    path(
        DICOM + "destinations/<uuid:destination_uuid>/delete/",
        views.destination_delete,
        name="destination_delete",
    ),
    path(DICOM + "rules/", views.routing_rule_new, name="routing_rule_new"),
    path(
        DICOM + "rules/<uuid:rule_uuid>/delete/",
        views.routing_rule_delete,
        name="routing_rule_delete",
    ),
]
