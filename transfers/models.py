"""Studies, series and instances: the index of what a facility has stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from django.conf import settings
from django.db import models
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
        indexes = [
            models.Index(fields=["facility", "-study_date"], name="study_fac_date"),
            models.Index(fields=["facility", "-created_at"], name="study_fac_created"),
            models.Index(fields=["facility", "patient_id"], name="study_fac_patient"),
            models.Index(fields=["facility", "accession_number"], name="study_fac_accession"),
            models.Index(fields=["facility", "patient_name"], name="study_fac_name"),
            models.Index(fields=["status", "last_received_at"], name="study_status_received"),
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


class ShareKind(models.TextChoices):
    FACILITY = "facility", "Facility"
    PHYSICIAN = "physician", "Physician"
    PATIENT = "patient", "Patient"


class NotifyStatus(models.TextChoices):
    WAITING = "waiting", "Waiting for the study to complete"
    QUEUED = "queued", "Queued"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed (retrying)"
    NONE = "none", "No e-mail"


class SecondFactor(models.TextChoices):
    BIRTH_DATE = "birth_date", "Patient's birth date"
    PIN = "pin", "PIN set by the sender"


class Share(models.Model):
    """One or more studies of a facility, sent to a facility, a physician or a patient."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="shares_sent")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    studies = models.ManyToManyField(Study, related_name="shares")
    kind = models.CharField(max_length=10, choices=ShareKind.choices)
    recipient_facility = models.ForeignKey(
        Facility, on_delete=models.PROTECT, null=True, blank=True, related_name="shares_received"
    )
    recipient_email = models.EmailField(blank=True)
    recipient_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="shares_received",
    )
    message = models.TextField(blank=True, max_length=2000)
    can_view = models.BooleanField(default=True)
    can_download = models.BooleanField(default=False)
    can_import = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    notify_status = models.CharField(
        max_length=10, choices=NotifyStatus.choices, default=NotifyStatus.WAITING
    )
    notify_attempts = models.PositiveIntegerField(default=0)
    notify_error = models.CharField(max_length=300, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)
    first_opened_at = models.DateTimeField(null=True, blank=True)
    first_opened_by = models.CharField(max_length=254, blank=True)
    expiry_warned_at = models.DateTimeField(null=True, blank=True)
    # Patient links: a random token (stored hashed) and a second factor.
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    second_factor = models.CharField(max_length=10, choices=SecondFactor.choices, blank=True)
    pin_hash = models.CharField(max_length=128, blank=True)
    failed_attempts = models.PositiveIntegerField(default=0)
    locked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["recipient_facility", "-created_at"], name="share_to_facility"),
            models.Index(fields=["recipient_user", "-created_at"], name="share_to_user"),
            models.Index(fields=["facility", "-created_at"], name="share_from_facility"),
            models.Index(fields=["expires_at"], name="share_expires"),
        ]

    def __str__(self) -> str:
        return f"Share {self.uuid} from {self.facility} ({self.kind})"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and self.expires_at > timezone.now()

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "active"

    @property
    def recipient_label(self) -> str:
        if self.kind == ShareKind.FACILITY and self.recipient_facility is not None:
            return self.recipient_facility.name
        if self.kind == ShareKind.PATIENT:
            return f"Patient link{f' ({self.recipient_email})' if self.recipient_email else ''}"
        return self.recipient_email


class ShareEventKind(models.TextChoices):
    CREATED = "created", "Created"
    NOTIFIED = "notified", "Recipient notified"
    NOTIFY_FAILED = "notify_failed", "Notification failed"
    OPENED = "opened", "Opened"
    DOWNLOADED = "downloaded", "Downloaded"
    IMPORTED = "imported", "Imported"
    EXPIRED = "expired", "Expired"
    REVOKED = "revoked", "Revoked"
    EXTENDED = "extended", "Expiry extended"
    PURGED = "purged", "Images purged"


class ShareEvent(models.Model):
    """The share's timeline: the access receipts its sender reads on the Sent page."""

    share = models.ForeignKey(Share, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    kind = models.CharField(max_length=16, choices=ShareEventKind.choices)
    actor_label = models.CharField(max_length=254, blank=True)
    detail = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ("at", "id")

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M} {self.kind}"


class Report(models.Model):
    """A radiology report attached to a study: a PDF (kept in storage) or text typed in."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="reports")
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


class RoutingRule(models.Model):
    """A facility admin's standing order: studies arriving through the DICOM gateway that match
    (from calling AE, referring physician, modality; blank matches anything) are shared with a
    facility or a physician as soon as they are complete."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="routing_rules")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    calling_ae = models.CharField("from calling AE title", max_length=16, blank=True)
    referring_physician = models.CharField(
        "referring physician contains", max_length=64, blank=True
    )
    modality = models.CharField(max_length=16, blank=True)
    recipient_facility = models.ForeignKey(
        Facility, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    recipient_email = models.EmailField(blank=True)
    can_download = models.BooleanField(default=True)
    can_import = models.BooleanField(default=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("created_at", "id")

    def __str__(self) -> str:
        return f"Rule {self.uuid} of {self.facility}"

    def matches(self, study: Study) -> bool:
        if not study.received_from_ae:
            return False
        if self.calling_ae and self.calling_ae.strip() != study.received_from_ae:
            return False
        if self.modality and self.modality.upper() not in study.modality_list:
            return False
        wanted = self.referring_physician.strip().lower().replace(",", " ").split()
        have = study.referring_physician.lower().replace("^", " ")
        return all(word in have for word in wanted)


class RoutedStudy(models.Model):
    """One rule applied to one study: the unique pair makes routing happen once."""

    rule = models.ForeignKey(RoutingRule, on_delete=models.CASCADE, related_name="routed")
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="+")
    share = models.ForeignKey(Share, on_delete=models.SET_NULL, null=True, related_name="+")
    error = models.CharField(max_length=300, blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "study"], name="routed_once_per_rule")
        ]

    def __str__(self) -> str:
        return f"{self.rule} -> study {self.study_id}"


class PacsDestination(models.Model):
    """A PACS of a facility that Relay pushes studies into with C-STORE."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="destinations")
    name = models.CharField(max_length=100)
    ae_title = models.CharField("AE title", max_length=16)
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField()
    last_echo_at = models.DateTimeField(null=True, blank=True)
    last_echo_ok = models.BooleanField(default=False)
    last_echo_message = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("name", "id")

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class PushStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Sending"
    DONE = "done", "Done"
    PARTIAL = "partial", "Some images failed"
    FAILED = "failed", "Failed"


class Push(models.Model):
    """One study sent to one destination; its instances' results are PushInstance rows."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="pushes")
    destination = models.ForeignKey(
        PacsDestination, on_delete=models.PROTECT, related_name="pushes"
    )
    share = models.ForeignKey(
        Share, on_delete=models.SET_NULL, null=True, blank=True, related_name="pushes"
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    status = models.CharField(max_length=10, choices=PushStatus.choices, default=PushStatus.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    sent = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"Push {self.uuid} -> {self.destination}"


class PushInstance(models.Model):
    """What became of one instance of a push: the DIMSE status the destination answered."""

    push = models.ForeignKey(Push, on_delete=models.CASCADE, related_name="items")
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="+")
    sent = models.BooleanField(default=False)
    status = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64, blank=True)
    error = models.CharField(max_length=300, blank=True)
    at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("id",)
        constraints = [
            models.UniqueConstraint(fields=["push", "instance"], name="push_instance_once")
        ]

    def __str__(self) -> str:
        return f"{self.push_id}/{self.instance_id}: {self.status}"


class ExportStatus(models.TextChoices):
    QUEUED = "queued", "Waiting"
    BUILDING = "building", "Building"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"


class MediaExport(models.Model):
    """A CD/DVD image (ISO 9660 + Joliet) of a study, built by a task and kept in storage
    until the study's images are purged."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="exports")
    share = models.ForeignKey(
        Share, on_delete=models.SET_NULL, null=True, blank=True, related_name="exports"
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    status = models.CharField(
        max_length=10, choices=ExportStatus.choices, default=ExportStatus.QUEUED
    )
    media = models.CharField(max_length=4, blank=True)  # "CD" or "DVD"
    volume_label = models.CharField(max_length=32, blank=True)
    done_bytes = models.PositiveBigIntegerField(default=0)
    total_bytes = models.PositiveBigIntegerField(default=0)
    image_bytes = models.PositiveBigIntegerField(default=0)
    images = models.PositiveIntegerField(default=0)
    storage_key = models.CharField(max_length=400, blank=True)
    error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"Export {self.uuid} ({self.status})"

    @property
    def percent(self) -> int:
        if self.status == ExportStatus.READY:
            return 100
        return int(100 * self.done_bytes / self.total_bytes) if self.total_bytes else 0
