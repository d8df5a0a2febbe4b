"""Shares of studies with a facility, a physician or a patient, and their timelines."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Facility, User, hash_token

from .studies import Study


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


# The raw tokens made by share_create are 32 characters; anything far longer is not one of ours
# and is refused before it is hashed.
MAX_TOKEN_LENGTH = 100


class ShareQuerySet(models.QuerySet["Share"]):
    """The read-only questions asked of shares on every request (transfers.access and the
    pages): which shares are live, which reach a user, which patient link a token opens."""

    def active(self) -> ShareQuerySet:
        """Neither revoked nor past their expiry: a lapsed share stops working at once."""
        return self.filter(revoked_at__isnull=True, expires_at__gt=timezone.now())

    def received_by(self, user: User) -> ShareQuerySet:
        """Active shares addressed to the user or to a facility they belong to."""
        return (
            self.filter(
                Q(recipient_user=user)
                | Q(recipient_facility__memberships__user=user)
                | Q(
                    kind=ShareKind.PHYSICIAN,
                    recipient_user__isnull=True,
                    recipient_email__iexact=user.email,
                )
            )
            .active()
            .distinct()
        )

    def patient_link(self, token: str) -> Share | None:
        """The active patient share the raw token opens, or None.

        Unknown, revoked, expired and non-patient shares all answer None from the same single
        query, so the pages built on this cannot tell anyone which of them it was.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return (
            self.filter(token_hash=hash_token(token), kind=ShareKind.PATIENT)
            .active()
            .select_related("facility")
            .first()
        )


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

    objects = ShareQuerySet.as_manager()

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
