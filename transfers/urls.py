"""URLs of studies, upload and the upload API."""

from __future__ import annotations

from django.urls import path

from . import api, views

urlpatterns = [
    path("studies/", views.study_list, name="studies"),
    path("studies/<uuid:study_uuid>/", views.study_detail, name="study_detail"),
    path("upload/", views.upload_page, name="upload"),
    path("api/v1/facilities", api.facilities, name="api_facilities"),
    path("api/v1/instances", api.instances_upload, name="api_instances"),
    path("api/v1/instances/known", api.instances_known, name="api_instances_known"),
]
