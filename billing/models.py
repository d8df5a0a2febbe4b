"""Billing data: usage records (what was delivered), plans and their assignments, invoices.

Usage is written by `billing.metering.usage_record` only; the two rollup tables next to it
(`UsageDay`, `UsageStudy`) are kept in step in the same transaction so that a month can be
priced without reading its million raw rows. Invoices, their lines and credit notes are
immutable once written: the application never updates them (only an invoice's `paid_at` and
`notified_at` are set later), and database triggers (migration 0002) refuse any other UPDATE.
Money is always `Decimal` with a three-letter currency next to it, never a float.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from portal.models import Facility

currency_validator = RegexValidator(r"^[A-Z]{3}$", "A currency is a three-letter ISO 4217 code.")
ZERO = Decimal("0")


# --- plans --------------------------------------------------------------------------------------


class PlanKind(models.TextChoices):
    PER_IMAGE = "per_image", "Pay as you go, per image"
    PER_GB = "per_gb", "Pay as you go, per GB"
    SUBSCRIPTION = "subscription", "Monthly subscription with an allowance"


class Plan(models.Model):
    """A price list. Staff edit these in the admin; a facility without an assignment is on the
    default plan (exactly one plan is the default, and it is pay-as-you-go)."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=12, choices=PlanKind.choices)
    currency = models.CharField(max_length=3, default="USD", validators=[currency_validator])
    price_per_image = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        help_text="Per image delivered (pay as you go, per image).",
    )
    price_per_gb = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        help_text="Per GB (10⁹ bytes) delivered (pay as you go, per GB).",
    )
    monthly_fee = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        help_text="Flat fee per month (subscription); prorated by days on a mid-month change.",
    )
    included_gb = models.DecimalField(
        "included GB",
        max_digits=12,
        decimal_places=3,
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        help_text="GB included each month (subscription); prorated like the fee.",
    )
    overage_per_gb = models.DecimalField(
        "overage per GB",
        max_digits=12,
        decimal_places=4,
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        help_text="Per GB beyond the allowance (subscription).",
    )
    is_default = models.BooleanField(
        "default plan",
        default=False,
        help_text="Facilities without a plan of their own are billed on this one.",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("name",)
        constraints = [
            models.UniqueConstraint(
                fields=["is_default"], condition=Q(is_default=True), name="plan_one_default"
            ),
            models.CheckConstraint(
                condition=Q(is_default=False) | ~Q(kind="subscription"),
                name="plan_default_is_pay_as_you_go",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.is_default and self.kind == PlanKind.SUBSCRIPTION:
            raise ValidationError("The default plan must be pay as you go.")


class PlanAssignment(models.Model):
    """A facility is on `plan` from `starts_on` (inclusive) to `ends_on` (exclusive; open when
    blank), in billing-time-zone calendar days. Assignments of one facility do not overlap:
    `billing.plans.plan_assign` closes the previous one, and the admin form checks."""

    facility = models.ForeignKey(Facility, on_delete=models.CASCADE, related_name="+")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="assignments")
    starts_on = models.DateField()
    ends_on = models.DateField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("facility", "starts_on")
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "starts_on"], name="plan_assignment_one_per_day"
            ),
            models.CheckConstraint(
                condition=Q(ends_on__isnull=True) | Q(ends_on__gt=models.F("starts_on")),
                name="plan_assignment_ends_after_start",
            ),
        ]
        indexes = [models.Index(fields=["starts_on", "ends_on"], name="plan_assignment_dates")]

    def __str__(self) -> str:
        return f"{self.facility_id}: {self.plan} from {self.starts_on}"

    def clean(self) -> None:
        if self.ends_on is not None and self.ends_on <= self.starts_on:
            raise ValidationError("The end must come after the start.")
        if self.facility_id is None:
            return
        overlapping = PlanAssignment.objects.filter(facility_id=self.facility_id).exclude(
            pk=self.pk
        )
        if self.ends_on is not None:
            overlapping = overlapping.filter(starts_on__lt=self.ends_on)
        overlapping = overlapping.filter(Q(ends_on__isnull=True) | Q(ends_on__gt=self.starts_on))
        if overlapping.exists():
            raise ValidationError(
                "This facility already has a plan for part of these dates; end that one first."
            )
        # The same rules as plan_assign: an invoiced month is final, and a month is billed in
        # one currency.
        earliest = self.starts_on.replace(day=1)
        if self.pk is not None:
            before = PlanAssignment.objects.filter(pk=self.pk).values_list("starts_on", flat=True)
            earliest = min([earliest, *(d.replace(day=1) for d in before)])
        if Invoice.objects.filter(facility_id=self.facility_id, period__gte=earliest).exists():
            raise ValidationError(
                "This facility is already invoiced for these dates; change plans only in months "
                "not yet invoiced."
            )
        if self.starts_on.day != 1 and self.plan_id is not None:
            day_before = self.starts_on - timedelta(days=1)
            running = (
                PlanAssignment.objects.filter(
                    facility_id=self.facility_id, starts_on__lte=day_before
                )
                .filter(Q(ends_on__isnull=True) | Q(ends_on__gt=day_before))
                .exclude(pk=self.pk)
                .select_related("plan")
                .first()
            )
            if running is not None and running.plan.currency != self.plan.currency:
                raise ValidationError(
                    f"The running plan is in {running.plan.currency}; a plan in "
                    f"{self.plan.currency} starts on the first of a month (one currency a month)."
                )


# --- usage --------------------------------------------------------------------------------------


class UsageKind(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    ZIP = "zip", "ZIP download"
    ISO = "iso", "Disc image download"
    PUSH = "push", "Push to PACS"
    DICOMWEB = "dicomweb", "DICOMweb retrieve"


class UsageRecord(models.Model):
    """One delivery of image data to a recipient, charged to `facility`.

    `key` names the delivery (see `transfers.deliveries.delivery_key`): a retried push or a resumed
    download writes the same key again and is not counted twice. `day` is the calendar date of
    `at` in the billing time zone, fixed when the row is written, so that every later query
    by month is a plain date range with no time-zone arithmetic in SQL.
    """

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    share = models.ForeignKey(
        "transfers.Share", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    study = models.ForeignKey(
        "transfers.Study", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    kind = models.CharField(max_length=10, choices=UsageKind.choices)
    bytes = models.PositiveBigIntegerField()
    images = models.PositiveIntegerField(default=0)
    key = models.CharField(max_length=255, unique=True)
    at = models.DateTimeField(default=timezone.now)
    day = models.DateField()

    class Meta:
        ordering = ("-at", "-id")
        indexes = [
            models.Index(fields=["facility", "day"], name="usage_facility_day"),
            models.Index(fields=["day"], name="usage_day"),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.kind} {self.bytes} B -> facility {self.facility_id}"


class UsageDay(models.Model):
    """Rollup: one row per facility and billing day, incremented with each usage record."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    day = models.DateField()
    records = models.PositiveIntegerField(default=0)
    bytes = models.PositiveBigIntegerField(default=0)
    images = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["facility", "day"], name="usage_day_unique"),
        ]
        indexes = [models.Index(fields=["day"], name="usage_day_by_day")]

    def __str__(self) -> str:
        return f"{self.facility_id} {self.day}: {self.bytes} B"


class UsageStudy(models.Model):
    """Rollup: which studies were delivered to a facility in a month (`month` is its first
    day). Its count is the number of deliveries, and of courier discs saved."""

    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="+")
    month = models.DateField()
    study = models.ForeignKey("transfers.Study", on_delete=models.CASCADE, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["facility", "month", "study"], name="usage_study_unique"
            ),
        ]
        indexes = [models.Index(fields=["month", "facility"], name="usage_study_month")]

    def __str__(self) -> str:
        return f"{self.facility_id} {self.month:%Y-%m}: study {self.study_id}"


# --- invoices -----------------------------------------------------------------------------------


class Invoice(models.Model):
    """One facility's bill for one calendar month (billing time zone). Unique per facility and
    month: that constraint is what makes issuing idempotent and safe with several workers."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    number = models.CharField(max_length=80, unique=True)
    facility = models.ForeignKey(Facility, on_delete=models.PROTECT, related_name="invoices")
    # Copied, so the invoice reads the same if the facility is renamed later.
    facility_name = models.CharField(max_length=200)
    period = models.DateField(help_text="First day of the month billed.")
    currency = models.CharField(max_length=3, validators=[currency_validator])
    total = models.DecimalField(max_digits=12, decimal_places=2)
    # What was delivered that month, copied from the usage at issue time.
    records = models.PositiveIntegerField(default=0)
    bytes = models.PositiveBigIntegerField(default=0)
    images = models.PositiveBigIntegerField(default=0)
    studies = models.PositiveIntegerField("studies delivered", default=0)
    courier_cost = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        default=ZERO,
        help_text="What the studies delivered would have cost by courier CD.",
    )
    issued_at = models.DateTimeField(default=timezone.now)
    # Which invoicing run inserted it: a run finds its own rows by this after an INSERT that
    # skipped conflicting ones (see billing.invoicing).
    run_id = models.UUIDField(editable=False)
    # The only columns ever updated after issue (the triggers allow exactly these).
    paid_at = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-period", "facility_name")
        constraints = [
            models.UniqueConstraint(fields=["facility", "period"], name="invoice_one_per_month"),
        ]
        indexes = [
            models.Index(fields=["period"], name="invoice_period"),
            models.Index(fields=["run_id"], name="invoice_run"),
        ]

    def __str__(self) -> str:
        return f"Invoice {self.number}"


class LineKind(models.TextChoices):
    SUBSCRIPTION = "subscription", "Subscription fee"
    OVERAGE = "overage", "Overage"
    PER_GB = "per_gb", "Data delivered, per GB"
    PER_IMAGE = "per_image", "Images delivered"
    DELIVERIES = "deliveries", "Deliveries"


class InvoiceLine(models.Model):
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=12, choices=LineKind.choices)
    description = models.CharField(max_length=300)
    quantity = models.DecimalField(max_digits=18, decimal_places=6)
    unit = models.CharField(max_length=20)
    unit_price = models.DecimalField(max_digits=12, decimal_places=4)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    starts_on = models.DateField()
    ends_on = models.DateField(help_text="Last day included.")

    class Meta:
        ordering = ("invoice", "position")
        constraints = [
            models.UniqueConstraint(fields=["invoice", "position"], name="invoice_line_position")
        ]

    def __str__(self) -> str:
        return f"{self.description}: {self.amount}"


class CreditNote(models.Model):
    """A correction of an issued invoice: the invoice itself never changes."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    number = models.CharField(max_length=90, unique=True)
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_notes")
    amount = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal("0.01"))]
    )
    currency = models.CharField(max_length=3, validators=[currency_validator])
    reason = models.CharField(max_length=300)
    issued_at = models.DateTimeField(default=timezone.now)
    # PROTECT: a credit note is never changed (a trigger refuses it), so the staff member who
    # issued one is deactivated rather than deleted.
    issued_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ("invoice", "issued_at", "id")
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="credit_note_positive"),
        ]

    def __str__(self) -> str:
        return f"Credit note {self.number}"
