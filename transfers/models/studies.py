"""Studies, series, instances and their reports: the index of what a facility has stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models.functions import Upper
from django.utils import timezone

from portal.models import Facility


class StudyStatus(models.TextChoices):
    RECEIVING = "receiving", "Receiving"
    COMPLETE = "complete", "Complete"
    FAILED = "failed", "Failed"


class Study(models.Model):
    """One DICOM study as held by one facility.

    The same Study Instance UID may be held by two facilities (a patient's CD brought to both);
    each copy is its own row, so one facility never sees or changes the other's.
    """

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="studies")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    study_instance_uid = models.CharField(max_length=64)
    patient_name = models.CharField(max_length=324, blank=True)
    patient_id = models.CharField(max_length=64, blank=True)
    issuer_of_patient_id = models.CharField(max_length=64, blank=True)
    patient_birth_date = models.DateField(null=True, blank=True)
    patient_sex = models.CharField(max_length=16, blank=True)
    accession_number = models.CharField(max_length=16, blank=True)
    study_id = models.CharField(max_length=16, blank=True)
    study_date = models.DateField(null=True, blank=True)
    study_time = models.TimeField(null=True, blank=True)
    description = models.CharField(max_length=64, blank=True)
    referring_physician = models.CharField(max_length=324, blank=True)
    # Every modality of the study's series between commas (",CT,SR,"), so that a filter for
    # "US" can match ",US," and never "IVUS".
    modalities = models.CharField(max_length=200, blank=True)
    num_series = models.PositiveIntegerField(default=0)
    num_instances = models.PositiveIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0)
    status = models.CharField(
        max_length=12, choices=StudyStatus.choices, default=StudyStatus.RECEIVING
    )
    created_at = models.DateTimeField(default=timezone.now)
    last_received_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    # A purged study stays as a tombstone: what it was, when its images went, bytes freed.
    purged_at = models.DateTimeField(null=True, blank=True)
    purged_bytes = models.PositiveBigIntegerField(default=0)
    # The calling AE title of the PACS that sent it through the DICOM gateway (blank: uploaded).
    received_from_ae = models.CharField(max_length=16, blank=True)
    # Patient reconciliation of a disc from elsewhere: while it runs the study cannot be shared
    # or pushed; what it was before is in the audit trail and in each file's Original
    # Attributes Sequence.
    reconcile_running = models.BooleanField(default=False)
    reconciled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "studies"
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "study_instance_uid"], name="study_unique_per_facility"
            )
        ]
        # What the worklist, the home page and DICOMweb ask at scale (issue 17, measured by
        # bench/index_scale.py on 100,000 studies). The worklist's default order, whole, so a
        # page is the first 25 entries of the index; a Study or Patient ID across facilities
        # (retrievals, shares, QIDO); the search box's exact IDs as it compares them (upper
        # case). Migration 0018 adds, on PostgreSQL only, trigram indexes for the name search
        # and QIDO's date order (NULLS LAST), which SQLite cannot have.
        indexes = [
            models.Index(
                fields=["facility", "-study_date", "-study_time", "-id"],
                name="study_fac_date_order",
            ),
            models.Index(fields=["facility", "-created_at"], name="study_fac_created"),
            models.Index(fields=["facility", "patient_id"], name="study_fac_patient"),
            models.Index(fields=["facility", "accession_number"], name="study_fac_accession"),
            models.Index(fields=["facility", "patient_name"], name="study_fac_name"),
            models.Index(fields=["status", "last_received_at"], name="study_status_received"),
            models.Index(
                fields=["facility", "-last_received_at"],
                condition=models.Q(reconcile_running=True),
                name="study_fac_reconciling",
            ),
            models.Index(fields=["study_instance_uid"], name="study_uid"),
            models.Index(fields=["patient_id"], name="study_patient_id"),
            models.Index(Upper("patient_id"), name="study_patient_id_upper"),
            models.Index(Upper("accession_number"), name="study_accession_upper"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.patient_name_display or '(no name)'} {self.study_date or ''} {self.description}"
        )

    @property
    def modality_list(self) -> list[str]:
        return [m for m in self.modalities.split(",") if m]

    @property
    def patient_name_display(self) -> str:
        return person_name_display(self.patient_name)

    @property
    def referring_physician_display(self) -> str:
        return person_name_display(self.referring_physician)


def person_name_display(value: str) -> str:
    """DICOM PN 'Family^Given^Middle^Prefix^Suffix' as 'Family, Given Middle'."""
    alphabetic = value.split("=")[0]
    parts = [p.strip() for p in alphabetic.split("^")]
    family = parts[0] if parts else ""
    rest = " ".join(p for p in parts[1:3] if p)
    return f"{family}, {rest}" if family and rest else family or rest


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField(max_length=64)
    modality = models.CharField(max_length=16, blank=True)
    series_number = models.IntegerField(null=True, blank=True)
    description = models.CharField(max_length=64, blank=True)
    body_part = models.CharField(max_length=16, blank=True)
    num_instances = models.PositiveIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "series"
        ordering = ("series_number", "created_at")
        constraints = [
            models.UniqueConstraint(
                fields=["study", "series_instance_uid"], name="series_unique_per_study"
            )
        ]

    def __str__(self) -> str:
        return f"{self.modality} #{self.series_number} {self.description}"


UID_BATCH = 500  # SOP Instance UIDs per IN (...) list: short statements on every database


class InstanceQuerySet(models.QuerySet["Instance"]):
    def rows_by_uid(
        self, facility: Facility, uids: Sequence[str], *fields: str
    ) -> Iterator[tuple[Any, ...]]:
        """The `fields` of the facility's instances among `uids`, asked a batch at a time."""
        for start in range(0, len(uids), UID_BATCH):
            batch = uids[start : start + UID_BATCH]
            yield from self.filter(facility=facility, sop_instance_uid__in=batch).values_list(
                *fields
            )


class Instance(models.Model):
    """One stored DICOM object. `facility` is repeated here so that SOP Instance UIDs are
    unique per facility by a database constraint, which is what makes deduplication race-free."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    sop_instance_uid = models.CharField(max_length=64)
    sop_class_uid = models.CharField(max_length=64)
    transfer_syntax_uid = models.CharField(max_length=64)
    instance_number = models.IntegerField(null=True, blank=True)
    size_bytes = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    # The SHA-256 of the bytes as they first arrived, when the stored copy was since rewritten
    # (patient reconciliation): the same file sent again is then still "already stored".
    original_sha256 = models.CharField(max_length=64, blank=True)
    storage_key = models.CharField(max_length=400, unique=True)
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    number_of_frames = models.PositiveIntegerField(default=1)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = InstanceQuerySet.as_manager()

    class Meta:
        ordering = ("instance_number", "id")
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "sop_instance_uid"], name="instance_unique_per_facility"
            )
        ]

    def __str__(self) -> str:
        return self.sop_instance_uid


class Report(models.Model):
    """A radiology report attached to a study: a PDF (kept in storage) or text typed in.

    Who reads it: the facility holding the study always; a recipient when the report was
    attached to the study for everyone (`share` empty) or to a share they receive; a patient
    only when it is also marked `for_patient` (an ER physician's preliminary read is not).
    """

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="reports")
    share = models.ForeignKey(
        "transfers.Share",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="reports",
        help_text="the share it was attached with; empty: every recipient of the study",
    )
    for_patient = models.BooleanField(
        default=False, help_text="patient links show it (those of its share, or all when empty)"
    )
    text = models.TextField(blank=True, max_length=50_000)
    storage_key = models.CharField(max_length=400, blank=True)
    filename = models.CharField(max_length=200, blank=True)
    size_bytes = models.PositiveBigIntegerField(default=0)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("created_at", "id")

    def __str__(self) -> str:
        return self.filename or "Report (text)"

    @property
    def is_pdf(self) -> bool:
        return bool(self.storage_key)


class StorageVerifyRun(models.Model):
    """One pass of `manage.py storage_verify` (the scrub): where it got to, so a killed or
    time-boxed run carries on from there, and what it found, for staff's report."""

    facility = models.ForeignKey(
        Facility, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    since = models.DateField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Progress: instances are checked in id order, then storage is listed folder by folder.
    last_instance_id = models.BigIntegerField(default=0)
    instances_done = models.BooleanField(default=False)
    last_folder = models.CharField(max_length=400, blank=True)
    extras_done = models.BooleanField(default=False)
    checked = models.PositiveIntegerField(default=0)
    checked_bytes = models.PositiveBigIntegerField(default=0)
    missing = models.PositiveIntegerField(default=0)
    corrupt = models.PositiveIntegerField(default=0)
    extra = models.PositiveIntegerField(default=0)
    # The first problems found ({"kind", "key", "facility", "reason"}); the counts go on.
    problems = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ("-started_at", "-id")

    def __str__(self) -> str:
        return f"Storage check #{self.pk} ({'finished' if self.finished_at else 'unfinished'})"
