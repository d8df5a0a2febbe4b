"""Django admin for studies: read-only browsing for staff."""

from __future__ import annotations

from django.contrib import admin

from .models import Instance, Series, Study


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
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
class SeriesAdmin(admin.ModelAdmin):
    list_display = ("series_instance_uid", "study", "modality", "series_number", "num_instances")
    readonly_fields = [f.name for f in Series._meta.fields]


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = (
        "sop_instance_uid",
        "facility",
        "transfer_syntax_uid",
        "size_bytes",
        "created_at",
    )
    search_fields = ("sop_instance_uid",)
    readonly_fields = [f.name for f in Instance._meta.fields]
