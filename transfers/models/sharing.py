"""Shares of studies with a facility, a physician or a patient, and their timelines."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models, transaction
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
    EMAIL_CODE = "email_code", "One-time code e-mailed to the recipient"


# Patient links lock in rounds. A round is PATIENT_LINK_TRIES wrong answers to the second factor;
# the lock after round n lasts PATIENT_LINK_LOCKS[n - 1], and the round after the last of them
# locks the link for good, until the sender unlocks or re-issues it. Waiting does not reset the
# rounds; only a right answer or the sender does. So a link takes at most 15 guesses in all.
PATIENT_LINK_TRIES = 5
PATIENT_LINK_LOCKS: tuple[timedelta, ...] = (timedelta(minutes=30), timedelta(hours=4))
PATIENT_LINK_ROUNDS = len(PATIENT_LINK_LOCKS) + 1


@dataclass(frozen=True)
class LinkLock:
    """A patient link's lock: until when, or for good (`until` None)."""

    round: int
    until: datetime | None

    @property
    def for_good(self) -> bool:
        return self.until is None


@dataclass(frozen=True)
class AttemptClaim:
    """One answer to a patient link's second factor, counted before it is looked at."""

    # Set when the link was locked: the answer is refused unread.
    refused: LinkLock | None = None
    # Wrong answers this round, this one included, and the lock it set (if it is wrong).
    failed: int = 0
    locks: LinkLock | None = None
    rounds: int = 0


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

    def link(self, token: str) -> Share | None:
        """The active share a link's raw token opens: a patient link, or a guest link (a share
        to a physician without an account). Same single query and answers as patient_link."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return (
            self.filter(token_hash=hash_token(token))
            .filter(
                Q(kind=ShareKind.PATIENT)
                | Q(kind=ShareKind.PHYSICIAN, second_factor=SecondFactor.EMAIL_CODE)
            )
            .active()
            .select_related("facility")
            .first()
        )

    def guest_link(self, token: str) -> Share | None:
        """The active guest link the raw token opens, or None (unknown, revoked, expired, or a
        patient link: one answer for all)."""
        share = self.link(token)
        return share if share is not None and share.is_guest_link else None

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
    # How many images of its studies the recipients were told of: the first notice's count,
    # then each "images added" notice's. Images that arrive after the first notice (a late
    # series, a resend with more) are told once they settle, as the difference to this.
    notified_instances = models.PositiveIntegerField(default=0)
    first_opened_at = models.DateTimeField(null=True, blank=True)
    first_opened_by = models.CharField(max_length=254, blank=True)
    expiry_warned_at = models.DateTimeField(null=True, blank=True)
    # Patient links: a random token (stored hashed) and a second factor.
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    second_factor = models.CharField(max_length=10, choices=SecondFactor.choices, blank=True)
    pin_hash = models.CharField(max_length=128, blank=True)
    # Wrong answers in the current round, the rounds locked since the last right answer (or the
    # sender's unlock), and the end of a lock in time (None when open or locked for good).
    failed_attempts = models.PositiveIntegerField(default=0)
    locked_until = models.DateTimeField(null=True, blank=True)
    lock_rounds = models.PositiveSmallIntegerField(default=0)
    # Guest links (a physician without an account): the link's token, encrypted with the
    # secrets key so the notification task can put it in the e-mail (a copy of the database
    # alone does not give it), and the one-time code e-mailed on request: its hash, its end,
    # and the sends counted since `code_sends_since` (a mailbox is not flooded).
    link_token_encrypted = models.TextField(blank=True)
    # A share a patient made from their own patient link, to send their study to a doctor
    # (a guest link); it never outlives that link, and revoking the link revokes it.
    forwarded_from = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="forwards"
    )
    code_hash = models.CharField(max_length=128, blank=True)
    code_expires_at = models.DateTimeField(null=True, blank=True)
    code_sent_at = models.DateTimeField(null=True, blank=True)
    code_sends = models.PositiveSmallIntegerField(default=0)
    code_sends_since = models.DateTimeField(null=True, blank=True)

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
    def is_guest_link(self) -> bool:
        """A share to a physician without an account, opened by its link and an e-mailed code."""
        return self.kind == ShareKind.PHYSICIAN and self.second_factor == SecondFactor.EMAIL_CODE

    @property
    def link_label(self) -> str:
        """Who opens a link, for receipts and audit: the guest's address or "patient link"."""
        return self.recipient_email if self.is_guest_link else "patient link"

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "active"

    def patient_lock(self, now: datetime | None = None) -> LinkLock | None:
        """The patient link's lock as this object holds it, or None when it takes answers."""
        if self.lock_rounds >= PATIENT_LINK_ROUNDS:
            return LinkLock(round=self.lock_rounds, until=None)
        if self.locked_until is not None and self.locked_until > (now or timezone.now()):
            return LinkLock(round=self.lock_rounds, until=self.locked_until)
        return None

    @property
    def patient_link_lock(self) -> LinkLock | None:
        """For templates: the lock now."""
        return self.patient_lock()

    def patient_attempt_claim(self) -> AttemptClaim:
        """Count one answer against the lock *before* it is checked, under a row lock.

        A locked link refuses the answer unread. Otherwise the answer is counted (the first after
        a lapsed lock starts a new round), and the one that completes a round sets the next lock
        at once, so parallel answers cannot squeeze in more than a round's worth; a right answer
        then clears it all again (patient_lock_clear).
        """
        now = timezone.now()
        with transaction.atomic():
            row = (
                Share.objects.select_for_update()
                .only("failed_attempts", "locked_until", "lock_rounds")
                .get(pk=self.pk)
            )
            refused = row.patient_lock(now)
            if refused is not None:
                return AttemptClaim(refused=refused, rounds=row.lock_rounds)
            failed = 1 if row.locked_until is not None else row.failed_attempts + 1
            rounds, locked_until, locks = row.lock_rounds, None, None
            if failed >= PATIENT_LINK_TRIES:
                rounds += 1
                if rounds < PATIENT_LINK_ROUNDS:
                    locked_until = now + PATIENT_LINK_LOCKS[rounds - 1]
                locks = LinkLock(round=rounds, until=locked_until)
            Share.objects.filter(pk=self.pk).update(
                failed_attempts=failed, locked_until=locked_until, lock_rounds=rounds
            )
        self.failed_attempts, self.locked_until, self.lock_rounds = failed, locked_until, rounds
        return AttemptClaim(failed=failed, locks=locks, rounds=rounds)

    def patient_lock_clear(self) -> None:
        """A right answer, or the sender: no wrong answers, no rounds, no lock."""
        Share.objects.filter(pk=self.pk).update(failed_attempts=0, lock_rounds=0, locked_until=None)
        self.failed_attempts, self.lock_rounds, self.locked_until = 0, 0, None

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
    UPDATED = "updated", "Images added"
    NOTIFY_FAILED = "notify_failed", "Notification failed"
    OPENED = "opened", "Opened"
    DOWNLOADED = "downloaded", "Downloaded"
    IMPORTED = "imported", "Imported"
    EXPIRED = "expired", "Expired"
    REVOKED = "revoked", "Revoked"
    EXTENDED = "extended", "Expiry extended"
    PURGED = "purged", "Images purged"
    LOCKED = "locked", "Patient link locked"
    UNLOCKED = "unlocked", "Patient link unlocked"
    REISSUED = "reissued", "Patient link re-issued"
    CODE_SENT = "code_sent", "Code e-mailed"
    FORWARDED = "forwarded", "Forwarded by the patient"


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
