"""DICOM networking: routing rules for studies from a PACS, PACS destinations and pushes."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from portal.models import Facility

from .sharing import Share
from .studies import Instance, Study


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
    # DICOM TLS (PS3.15 B.9, BCP 195): the PACS's certificate is checked against these CA
    # certificates (PEM; blank: the system's trust store) and its host name; Relay presents its
    # own certificate (DICOM_TLS_CERTIFICATE) when the PACS asks for one.
    tls = models.BooleanField("use TLS", default=False)
    tls_ca_certificates = models.TextField("CA certificates (PEM)", blank=True)
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
    CANCELLED = "cancelled", "Cancelled"


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
    # While a run that could not reach the PACS waits for Celery's retry: when, and which
    # attempt of the run it will be. Cleared when an attempt starts or the push ends.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    next_attempt = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"Push {self.uuid} -> {self.destination}"

    @property
    def is_pending(self) -> bool:
        """Queued, sending, or waiting for its next attempt: its page keeps refreshing."""
        return self.status in (PushStatus.QUEUED, PushStatus.RUNNING)


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
