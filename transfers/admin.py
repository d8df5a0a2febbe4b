"""Django admin for studies: read-only browsing for staff."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from portal.audit import audit_record
from portal.models import AuditAction

from .models import Instance, Series, Study


class AuditedAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Staff browsing patient data here leave the same trail as everyone else: one event per
    list page (with the search) and per object opened."""

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        audit_record(
            action=AuditAction.STUDY_LIST,
            request=request,
            detail={"page": f"admin:{self.model._meta.model_name}", "q": request.GET.get("q", "")},
        )
        return response

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        response = super().change_view(request, object_id, form_url, extra_context)
        obj = self.get_object(request, object_id)
        study = obj if isinstance(obj, Study) else None
        if isinstance(obj, Series):
            study = obj.study
        elif isinstance(obj, Instance):
            study = obj.series.study
        audit_record(
            action=AuditAction.STUDY_VIEW,
            request=request,
            study=study,
            detail={"page": f"admin:{self.model._meta.model_name}", "object": str(object_id)},
        )
        return response


@admin.register(Study)
class StudyAdmin(AuditedAdmin):
    list_display = (
        "study_instance_uid",
        "facility",
        "patient_id",
        "study_date",
        "modalities",
        "num_instances",
        "status",
    )
    list_filter = ("status", "facility")
    search_fields = ("study_instance_uid", "patient_id", "accession_number")
    readonly_fields = [f.name for f in Study._meta.fields]


@admin.register(Series)
class SeriesAdmin(AuditedAdmin):
    list_display = ("series_instance_uid", "study", "modality", "series_number", "num_instances")
    readonly_fields = [f.name for f in Series._meta.fields]


@admin.register(Instance)
class InstanceAdmin(AuditedAdmin):
    list_display = (
        "sop_instance_uid",
        "facility",
        "transfer_syntax_uid",
        "size_bytes",
        "created_at",
    )
    search_fields = ("sop_instance_uid",)
    readonly_fields = [f.name for f in Instance._meta.fields]
