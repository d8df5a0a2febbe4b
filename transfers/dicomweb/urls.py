"""URLs of DICOMweb (PS3.18) under /dicom-web/, without trailing slashes as clients write them.

UIDs are checked by the views (400 for one that is not a UID). STOW-RS answers POST on
`dicomweb_studies` and `dicomweb_study` (see views._by_method); rendered and thumbnail
resources go beside the metadata ones.
"""

from __future__ import annotations

from django.urls import path

from . import rendered, views

S = "dicom-web/studies/<str:study>"
SE = S + "/series/<str:series>"
I = SE + "/instances/<str:instance>"  # noqa: E741

urlpatterns = [
    path("dicom-web/studies", views.studies, name="dicomweb_studies"),
    path("dicom-web/series", views.qido_series, name="dicomweb_series_search"),
    path("dicom-web/instances", views.qido_instances, name="dicomweb_instances_search"),
    path(S, views.study, name="dicomweb_study"),
    path(S + "/metadata", views.metadata_study, name="dicomweb_study_metadata"),
    path(S + "/series", views.qido_study_series, name="dicomweb_study_series"),
    path(S + "/instances", views.qido_study_instances, name="dicomweb_study_instances"),
    path(SE, views.wado_series, name="dicomweb_series"),
    path(SE + "/metadata", views.metadata_series, name="dicomweb_series_metadata"),
    path(SE + "/instances", views.qido_series_instances, name="dicomweb_series_instances"),
    path(I, views.wado_instance, name="dicomweb_instance"),
    path(I + "/metadata", views.metadata_instance, name="dicomweb_instance_metadata"),
    path(I + "/frames/<str:numbers>", views.frames, name="dicomweb_frames"),
    path(I + "/bulk/<str:tag>", views.bulk, name="dicomweb_bulk"),
    # Rendered and thumbnail resources (rendered.py)
    path(S + "/thumbnail", rendered.study_thumbnail, name="dicomweb_study_thumbnail"),
    path(SE + "/thumbnail", rendered.series_thumbnail, name="dicomweb_series_thumbnail"),
    path(I + "/rendered", rendered.instance_rendered, name="dicomweb_instance_rendered"),
    path(I + "/thumbnail", rendered.instance_thumbnail, name="dicomweb_instance_thumbnail"),
    path(
        I + "/frames/<str:numbers>/rendered",
        rendered.frame_rendered,
        name="dicomweb_frame_rendered",
    ),
    path(
        I + "/frames/<str:numbers>/thumbnail",
        rendered.frame_thumbnail,
        name="dicomweb_frame_thumbnail",
    ),
]
