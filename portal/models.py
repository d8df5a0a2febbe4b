"""Accounts, facilities, memberships, invitations, API tokens and the audit trail."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta
from typing import Any, ClassVar

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone


def hash_token(raw: str) -> str:
    """Tokens are stored as their SHA-256; the raw value is shown once and never kept."""
    return hashlib.sha256(raw.encode()).hexdigest()


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create(self, email: str, password: str | None, **extra: Any) -> User:
        if not email:
            raise ValueError("An e-mail address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create(email, password, **extra)

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        extra["is_staff"] = True
        extra["is_superuser"] = True
        return self._create(email, password, **extra)

    def get_by_natural_key(self, username: str | None) -> User:
        return self.get(email__iexact=username)


class User(AbstractBaseUser, PermissionsMixin):
    """A person who logs in with their e-mail address."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    email = models.EmailField(unique=True)
    full_name = models.CharField(max_length=150, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)
    date_joined = models.DateTimeField(default=timezone.now)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        ordering = ("email",)

    def __str__(self) -> str:
        return self.email

    def get_full_name(self) -> str:
        return self.full_name or self.email

    def get_short_name(self) -> str:
        return self.full_name.split(" ")[0] if self.full_name else self.email


ae_title_validator = RegexValidator(
    r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$",
    "An AE title is 1 to 16 printable ASCII characters, no backslash, no leading or trailing space.",
)

# Printed on patient handouts; loose on purpose (extensions, international forms), tight enough
# that a note ("call the front desk") is not mistaken for a number.
help_desk_phone_validator = RegexValidator(
    r"^[0-9+() .x-]{7,30}$",
    "Enter a phone number of 7 to 30 characters: digits, spaces and + ( ) - . x",
)


class Facility(models.Model):
    """A hospital, clinic or practice that sends and receives studies."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=60, unique=True)
    city = models.CharField(max_length=100, blank=True)
    # Printed on the facility's invoices under "Bill to" (billing reads it; portal owns the
    # facility's own details).
    billing_address = models.TextField(
        blank=True, help_text="Postal address for invoices, one line per line."
    )
    ae_title = models.CharField(
        "DICOM AE title",
        max_length=16,
        unique=True,
        null=True,
        blank=True,
        validators=[ae_title_validator],
    )
    has_pacs = models.BooleanField("has a PACS", default=False)
    # Who may send to the DICOM gateway under this facility's AE title, deny by default: a
    # caller needs a listed calling AE title, and either a listed address (or network) or a
    # listed client certificate on the gateway's TLS port. Blank lists let nobody in. Entries
    # are separated by spaces or commas; certificates are kept as SHA-256 fingerprints.
    gateway_calling_aes = models.CharField(
        "calling AE titles allowed at the gateway", max_length=400, blank=True
    )
    gateway_addresses = models.CharField(
        "addresses allowed at the gateway", max_length=400, blank=True
    )
    gateway_client_certificates = models.TextField(
        "client certificates allowed at the gateway (SHA-256 fingerprints)", blank=True
    )
    gateway_tls_required = models.BooleanField("senders must use TLS", default=False)
    share_default_days = models.PositiveIntegerField("default share expiry (days)", default=30)
    share_max_days = models.PositiveIntegerField("longest share expiry (days)", default=90)
    # Images stay at least this long after upload, even once every share has lapsed.
    retention_days = models.PositiveIntegerField("retention after upload (days)", default=30)
    # The directory senders choose a recipient facility from: a facility is in it only when its
    # admin (or the operator) lists it. An invited physician's own practice never is: its name
    # carries their e-mail address.
    listed = models.BooleanField(
        "listed in the directory",
        default=False,
        help_text="other facilities find it when they share a study",
    )
    is_practice = models.BooleanField("a physician's own practice", default=False, editable=False)
    # Printed on the facility's patient handouts: "Questions? Call <facility> at <phone>".
    help_desk_phone = models.CharField(
        "help-desk phone",
        max_length=30,
        blank=True,
        validators=[help_desk_phone_validator],
        help_text="printed on patient handouts for questions",
    )
    # Admins always need a second factor; this asks it of every member.
    require_mfa = models.BooleanField("every member needs a second factor", default=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("name",)
        verbose_name_plural = "facilities"

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    SENDER = "sender", "Sender"
    READER = "reader", "Reader"
    VIEWER = "viewer", "View only"


# Which roles may do what. Admins do everything a sender does; senders everything a reader does;
# readers everything a view-only member does, plus taking copies (ZIP, disc image, PACS push).
UPLOAD_ROLES = (Role.ADMIN, Role.SENDER)
MANAGE_ROLES = (Role.ADMIN,)
COPY_ROLES = (Role.ADMIN, Role.SENDER, Role.READER)


class Membership(models.Model):
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.READER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "facility"], name="membership_unique")
        ]
        ordering = ("facility__name", "user__email")

    def __str__(self) -> str:
        return f"{self.user} @ {self.facility} ({self.role})"

    @property
    def can_upload(self) -> bool:
        return self.role in UPLOAD_ROLES

    @property
    def can_manage(self) -> bool:
        return self.role in MANAGE_ROLES


class Invitation(models.Model):
    """An e-mailed invitation to join a facility; the link carries a token stored hashed."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.READER)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        User, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"Invitation of {self.email} to {self.facility}"

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def default_expiry() -> Any:
        return timezone.now() + timedelta(days=settings.RELAY_INVITATION_DAYS)

    @property
    def is_usable(self) -> bool:
        return (
            self.accepted_at is None
            and self.revoked_at is None
            and self.expires_at > timezone.now()
        )


class TokenAccess(models.TextChoices):
    READ = "read", "Read (check what is stored)"
    WRITE = "write", "Read and upload"


class ApiToken(models.Model):
    """A per-user token for the upload API and the desktop uploader, stored hashed.

    It works for one facility (a token made before scopes existed: every facility its owner may
    upload to), for reading or also uploading, until it expires or is revoked."""

    PREFIX = "rly_"
    LIFETIMES_DAYS = (7, 30, 90, 365)

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    # The first characters, kept so a person can tell their tokens apart; not enough to use one.
    hint = models.CharField(max_length=12)
    facility = models.ForeignKey(
        Facility, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    access = models.CharField(max_length=10, choices=TokenAccess.choices, default=TokenAccess.WRITE)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…)"

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def can_write(self) -> bool:
        return self.access == TokenAccess.WRITE

    @classmethod
    def issue(
        cls,
        *,
        user: User,
        name: str,
        facility: Facility | None = None,
        access: str = TokenAccess.WRITE,
        days: int = 90,
    ) -> tuple[ApiToken, str]:
        raw = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user,
            name=name,
            token_hash=hash_token(raw),
            hint=raw[:10],
            facility=facility,
            access=access,
            expires_at=timezone.now() + timedelta(days=days),
        )
        return token, raw


class SingleSignOn(models.Model):
    """A facility's own identity provider (OpenID Connect), set up by the operator with the
    facility's IT: people whose verified e-mail is in one of its domains sign in there and become
    members; a role claim, when the provider sends one, sets their role."""

    facility = models.OneToOneField(Facility, on_delete=models.CASCADE, related_name="sso")
    # allauth's provider entry (provider "openid_connect", its issuer URL, client id and secret).
    app = models.OneToOneField(
        "socialaccount.SocialApp", on_delete=models.PROTECT, related_name="relay_sso"
    )
    email_domains = models.CharField(
        max_length=400, help_text="e-mail domains of this facility's people, comma-separated"
    )
    role_claim = models.CharField(
        max_length=100, blank=True, help_text="the ID token claim that names a role, if any"
    )
    role_map = models.JSONField(
        default=dict, blank=True, help_text='claim value to role, e.g. {"radiologist": "reader"}'
    )
    default_role = models.CharField(max_length=10, choices=Role.choices, default=Role.VIEWER)
    enabled = models.BooleanField(default=True)

    class Meta:
        verbose_name = "single sign-on"
        verbose_name_plural = "single sign-on"

    def __str__(self) -> str:
        return f"SSO for {self.facility}"

    def domains(self) -> list[str]:
        return [d.strip().lower().lstrip("@") for d in self.email_domains.split(",") if d.strip()]

    def covers(self, email: str) -> bool:
        return email.rpartition("@")[2].lower() in self.domains()


class AuditAction(models.TextChoices):
    """What an audit event records. A Python enum, not database choices: `audit_record` refuses
    any other value, and a new action needs no migration. Values fit AuditEvent.action (20)."""

    LOGIN = "login", "Logged in"
    LOGOUT = "logout", "Logged out"
    LOGIN_FAILED = "login_failed", "Failed login"
    UPLOAD = "upload", "Uploaded an instance"
    STUDY_VIEW = "study_view", "Viewed a study"
    STUDY_LIST = "study_list", "Listed studies"
    MEMBER_INVITE = "member_invite", "Invited a member"
    INVITATION_REVOKE = "invitation_revoke", "Withdrew an invitation"
    MEMBER_JOIN = "member_join", "Joined a facility"
    MEMBER_CHANGE = "member_change", "Changed a member's role"
    MEMBER_REMOVE = "member_remove", "Removed a member"
    TOKEN_CREATE = "token_create", "Created an API token"
    TOKEN_REVOKE = "token_revoke", "Revoked an API token"
    PASSWORD_CHANGE = "password_change", "Changed password"
    PASSWORD_RESET_ASK = "password_reset_ask", "Asked for a password reset"
    PASSWORD_RESET = "password_reset", "Reset the password"
    ACCESS_DENIED = "access_denied", "Refused access"
    SHARE_CREATE = "share_create", "Shared a study"
    DEIDENTIFY = "deidentify", "Made a de-identified copy of a study"
    SHARE_OPEN = "share_open", "Opened a shared study"
    SHARE_REVOKE = "share_revoke", "Revoked a share"
    SHARE_EXTEND = "share_extend", "Extended a share"
    PATIENT_FACTOR = "patient_factor", "Patient link second factor"
    GUEST_CODE = "guest_code", "Guest link code"
    GUEST_CODE_SEND = "guest_code_send", "E-mailed a guest link code"
    PURGE = "purge", "Purged a study's images"
    REPORT_ATTACH = "report_attach", "Attached a report"
    REPORT_VIEW = "report_view", "Read a report"
    STUDY_DOWNLOAD = "study_download", "Downloaded a study"
    STUDY_PUSH = "study_push", "Sent a study to a PACS"
    PUSH_CANCEL = "push_cancel", "Cancelled a push to PACS"
    PATIENT_RECONCILE = "patient_reconcile", "Reconciled a study's patient"
    FACILITY_CHANGE = "facility_change", "Changed the facility's settings"
    FACILITY_SWITCH = "facility_switch", "Switched the current facility"
    GATEWAY_CHANGE = "gateway_change", "Changed DICOM gateway access"
    DESTINATION_ADD = "destination_add", "Added a PACS destination"
    DESTINATION_REMOVE = "destination_remove", "Removed a PACS destination"
    DESTINATION_CHANGE = "destination_change", "Changed a PACS destination"
    DESTINATION_ECHO = "destination_echo", "Tested a PACS destination"
    ROUTING_RULE_ADD = "routing_rule_add", "Added a routing rule"
    ROUTING_RULE_REMOVE = "routing_rule_remove", "Removed a routing rule"
    LOCKOUT = "lockout", "Locked out after failed attempts"
    UNLOCK = "unlock", "Lifted a lockout"
    MFA_ADD = "mfa_add", "Added a second factor"
    MFA_REMOVE = "mfa_remove", "Removed a second factor"
    MFA_FAILED = "mfa_failed", "Failed second factor"
    REAUTH = "reauth", "Confirmed identity again"
    SSO_CHANGE = "sso_change", "Changed single sign-on"
    TOKEN_REFUSED = "token_refused", "Refused an API token"
    DICOM_REFUSED = "dicom_refused", "Refused a DICOM association"
    DICOM_QUERY = "dicom_query", "Queried the DICOM gateway"
    DICOM_RETRIEVE = "dicom_retrieve", "Retrieved a study through the DICOM gateway"
    DICOM_COMMIT = "dicom_commit", "Asked for storage commitment"
    PATIENT_LINK_LOCK = "patient_link_lock", "Locked a patient link"
    PATIENT_LINK_UNLOCK = "patient_link_unlock", "Re-opened a locked patient link"
    AUDIT_EXPORT = "audit_export", "Exported the audit trail"
    SESSION_EXPIRED = "session_expired", "Session ended"
    INTEGRITY_FAILED = "integrity_failed", "Found a stored copy damaged"
    STUDY_COMPLETE = "study_complete", "Completed a study with images missing"
    # `manage.py backup` and `restore` (relay.backup): a copy of every patient's data leaves, or
    # a whole database comes back.
    BACKUP = "backup", "Backed up the database"
    RESTORE = "restore", "Restored the database from a backup"


class Outcome(models.TextChoices):
    SUCCESS = "success", "Success"
    FAILURE = "failure", "Failure"


class AuditEvent(models.Model):
    """One audited event, modelled on IHE ATNA: who, what, when, where, which patient, outcome.

    Append-only: the application offers no way to change or delete one, the admin is read-only,
    and a database trigger (see the migration) refuses UPDATE, and DELETE on PostgreSQL.
    Users and facilities are referenced with PROTECT and their e-mail / name is copied in, so the
    record reads the same whatever happens to them later.
    """

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        User, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    actor_email = models.CharField(max_length=254, blank=True)
    facility = models.ForeignKey(
        Facility, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # The facility the person acted for (a recipient's own facility when opening a study another
    # facility shared): its admins see the event as well as the data owner's.
    actor_facility = models.ForeignKey(
        Facility, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # An AuditAction value, checked by audit_record (no database choices: see AuditAction).
    action = models.CharField(max_length=20)
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default=Outcome.SUCCESS)
    study_instance_uid = models.CharField(max_length=64, blank=True)
    patient_id = models.CharField(max_length=64, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("-at", "-id")
        indexes = [
            models.Index(fields=["facility", "-at"], name="audit_facility_at"),
            models.Index(fields=["study_instance_uid"], name="audit_study"),
            models.Index(fields=["patient_id"], name="audit_patient"),
            models.Index(fields=["actor_facility", "-at"], name="audit_actor_facility_at"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_email or '-'} {self.action} {self.outcome}"

    @property
    def action_label(self) -> str:
        """The action as people read it; an action since retired shows as stored."""
        try:
            return str(AuditAction(self.action).label)
        except ValueError:
            return self.action


class AuditForwardCursor(models.Model):
    """How far the trail has been delivered to an outside collector (the syslog feed): the id of
    the last event it acknowledged. Events are never marked (they are append-only); the cursor
    moves only after a send succeeded, so an unreachable collector loses nothing."""

    name = models.CharField(max_length=50, unique=True)
    last_event_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} at {self.last_event_id}"
