"""Plans and prices: which plan a facility is on, day by day, and what a month costs.

`bills_for_month(period=...)` prices a month for every facility (or some) from the rollup
tables in six queries, however many facilities there are. Invoicing issues what it returns;
the facility page and the staff dashboard show it for the month still running.

The rules (also in the README, Billing):

- A GB is 10⁹ bytes. Money is Decimal, rounded half-up to the cent once per invoice line;
  the total is the sum of the rounded lines.
- Days are calendar days in the billing time zone. An assignment's plan applies from 00:00 of
  its first day; days with no assignment are on the default plan (pay as you go).
- **Proration.** A month whose days fall under more than one plan is cut into segments of
  consecutive days on the same plan. Each segment is priced on its own, with the usage of its
  own days: pay-as-you-go plans charge that usage at their price; a subscription charges
  `monthly_fee × days / days_in_month` and includes `included_gb × days / days_in_month`
  (rounded down to the byte), and only usage beyond that segment's allowance is overage.
  Allowances do not carry from one segment to another. A plan changed twice in one month makes
  three segments.
- Usage exactly at the allowance costs nothing extra: overage is what lies strictly beyond.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

from django.db import transaction
from django.db.models import Count, Q
from django.template.defaultfilters import pluralize

from portal.models import Facility

from .conf import billing_currency, courier_cd_price, default_price_per_gb
from .models import (
    Invoice,
    LineKind,
    Plan,
    PlanAssignment,
    PlanKind,
    UsageDay,
    UsageStudy,
)

log = logging.getLogger(__name__)

GB = Decimal(10**9)
CENT = Decimal("0.01")
QUANTITY = Decimal("0.000001")
ZERO = Decimal("0")
DEFAULT_PLAN_NAME = "Pay as you go"


class BillingError(Exception):
    """A billing request that cannot be honoured; the message is for the operator."""


def money(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def gb(nbytes: int) -> Decimal:
    """Bytes as GB (10⁹ bytes), to six decimals, for display and invoice quantities."""
    return (Decimal(nbytes) / GB).quantize(QUANTITY, rounding=ROUND_HALF_UP)


def next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def month_days(first: date) -> int:
    return (next_month(first) - first).days


# --- which plan -----------------------------------------------------------------------------------


def plan_default() -> Plan:
    """The default plan; made (pay as you go per GB, at RELAY_DEFAULT_PRICE_PER_GB) the first
    time billing needs one, so that a fresh installation bills without any set-up."""
    plan = Plan.objects.filter(is_default=True).first()
    if plan is not None:
        return plan
    plan, _ = Plan.objects.get_or_create(
        is_default=True,
        defaults={
            "name": DEFAULT_PLAN_NAME,
            "kind": PlanKind.PER_GB,
            "currency": billing_currency(),
            "price_per_gb": default_price_per_gb(),
        },
    )
    return plan


def plan_assign(*, facility: Facility, plan: Plan, starts_on: date) -> PlanAssignment:
    """Put `facility` on `plan` from `starts_on` on (open-ended). The assignment running on
    that day ends there; any that started on or after it is replaced. A month already invoiced
    cannot change: its invoice is final."""
    with transaction.atomic():
        # Lock the facility row so that two changes of one facility's plan run one at a time.
        Facility.objects.select_for_update().filter(pk=facility.pk).first()
        if Invoice.objects.filter(facility=facility, period__gte=starts_on.replace(day=1)).exists():
            raise BillingError(
                f"{facility} is already invoiced for {starts_on:%B %Y}; "
                "start the new plan in a month not yet invoiced."
            )
        if starts_on.day != 1:
            running = plan_on(facility=facility, day=starts_on - timedelta(days=1))
            if running.currency != plan.currency:
                raise BillingError(
                    f"{facility} is billed in {running.currency} until {starts_on:%d %B}; a plan "
                    f"in {plan.currency} starts on the first of a month (one currency a month)."
                )
        PlanAssignment.objects.filter(facility=facility, starts_on__gte=starts_on).delete()
        PlanAssignment.objects.filter(facility=facility).filter(
            Q(ends_on__isnull=True) | Q(ends_on__gt=starts_on)
        ).update(ends_on=starts_on)
        return PlanAssignment.objects.create(facility=facility, plan=plan, starts_on=starts_on)


def plan_on(*, facility: Facility, day: date) -> Plan:
    """The plan a facility is on, on a given billing day."""
    assignment = (
        PlanAssignment.objects.filter(facility=facility, starts_on__lte=day)
        .filter(Q(ends_on__isnull=True) | Q(ends_on__gt=day))
        .select_related("plan")
        .order_by("-starts_on")
        .first()
    )
    return assignment.plan if assignment is not None else plan_default()


# --- what a month costs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    records: int = 0
    bytes: int = 0
    images: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.records + other.records, self.bytes + other.bytes, self.images + other.images
        )


@dataclass(frozen=True)
class Segment:
    """Consecutive days of one month on one plan, with their usage."""

    plan: Plan
    starts_on: date
    ends_on: date  # the last day included
    days: int
    month_days: int
    usage: Usage
    # Subscriptions only: bytes included in this segment, and bytes beyond them.
    allowance_bytes: int | None = None
    overage_bytes: int = 0

    @property
    def whole_month(self) -> bool:
        return self.days == self.month_days


@dataclass(frozen=True)
class Line:
    kind: str
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal
    starts_on: date
    ends_on: date


@dataclass(frozen=True)
class Bill:
    """One facility's month, priced. `lines` are what an invoice would carry."""

    facility_id: int
    period: date
    currency: str
    segments: tuple[Segment, ...]
    lines: tuple[Line, ...]
    usage: Usage
    studies: int
    courier_price: Decimal = field(default_factory=courier_cd_price)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), ZERO)

    @property
    def subscribed(self) -> bool:
        return any(s.plan.kind == PlanKind.SUBSCRIPTION for s in self.segments)

    @property
    def allowance_bytes(self) -> int | None:
        """Bytes included in the month (subscription days only); None without a subscription."""
        if not self.subscribed:
            return None
        return sum(s.allowance_bytes or 0 for s in self.segments)

    @property
    def allowance_used_bytes(self) -> int:
        """Bytes delivered on subscription days: what counts against the allowance."""
        return sum(s.usage.bytes for s in self.segments if s.plan.kind == PlanKind.SUBSCRIPTION)

    @property
    def overage_bytes(self) -> int:
        return sum(s.overage_bytes for s in self.segments)

    @property
    def allowance_percent(self) -> int:
        allowance = self.allowance_bytes
        if not allowance:
            return 100 if self.allowance_used_bytes else 0
        return min(100, int(100 * self.allowance_used_bytes / allowance))

    @property
    def is_empty(self) -> bool:
        """Nothing delivered and no subscription: no invoice is issued for such a month."""
        return self.usage.records == 0 and not self.subscribed

    @property
    def courier_cost(self) -> Decimal:
        """One courier CD per study delivered."""
        return money(self.courier_price * self.studies)

    @property
    def savings(self) -> Decimal:
        return self.courier_cost - self.total


def bills_for_month(*, period: date, facility_ids: Iterable[int] | None = None) -> dict[int, Bill]:
    """Price the month starting on `period` for every facility (or those given), from the
    rollups, in a constant number of queries. The month may still be running: then the bill is
    what is owed so far, with the whole month's subscription fee."""
    period = period.replace(day=1)
    end = next_month(period)
    facilities = Facility.objects.order_by("pk")
    days = UsageDay.objects.filter(day__gte=period, day__lt=end)
    studies = UsageStudy.objects.filter(month=period)
    assignments = PlanAssignment.objects.filter(starts_on__lt=end).filter(
        Q(ends_on__isnull=True) | Q(ends_on__gt=period)
    )
    if facility_ids is not None:
        wanted = list(facility_ids)
        facilities = facilities.filter(pk__in=wanted)
        days = days.filter(facility_id__in=wanted)
        studies = studies.filter(facility_id__in=wanted)
        assignments = assignments.filter(facility_id__in=wanted)

    usage_by_day: dict[int, list[tuple[date, int, int, int]]] = defaultdict(list)
    for facility_id, day, records, nbytes, images in days.values_list(
        "facility_id", "day", "records", "bytes", "images"
    ).order_by():
        usage_by_day[facility_id].append((day, records, nbytes, images))
    study_counts = dict(
        studies.values("facility_id")
        .annotate(n=Count("study_id"))
        .values_list("facility_id", "n")
        .order_by()
    )
    # Tuples, not model instances: a thousand facilities' assignments cost a thousand objects.
    by_facility: dict[int, list[tuple[date, date | None, int]]] = defaultdict(list)
    for facility_id, starts_on, ends_on, plan_id in assignments.order_by("starts_on").values_list(
        "facility_id", "starts_on", "ends_on", "plan_id"
    ):
        by_facility[facility_id].append((starts_on, ends_on, plan_id))
    plans = {plan.pk: plan for plan in Plan.objects.all()}
    default = plan_default()
    courier = courier_cd_price()

    bills = {}
    for facility_id in facilities.values_list("pk", flat=True):
        segments = _segments(
            period=period,
            assignments=by_facility.get(facility_id, []),
            plans=plans,
            default=default,
            usage=usage_by_day.get(facility_id, []),
        )
        try:
            bills[facility_id] = _bill(
                facility_id=facility_id,
                period=period,
                segments=segments,
                studies=study_counts.get(facility_id, 0),
                courier=courier,
            )
        except BillingError as exc:
            # One facility's impossible month (plans refuse it now; older rows may not) is
            # reported, and every other facility is still billed.
            log.error("facility %s not billed for %s: %s", facility_id, f"{period:%Y-%m}", exc)
    return bills


def bill_for(*, facility: Facility, period: date) -> Bill:
    bills = bills_for_month(period=period, facility_ids=[facility.pk])
    if facility.pk not in bills:
        raise BillingError(f"{facility} has plans in two currencies in {period:%B %Y}")
    return bills[facility.pk]


def _segments(
    *,
    period: date,
    assignments: list[tuple[date, date | None, int]],
    plans: dict[int, Plan],
    default: Plan,
    usage: list[tuple[date, int, int, int]],
) -> list[Segment]:
    """Cut the month into runs of days on one plan, each with its usage and allowance.

    The month is cut where an assignment starts or ends; each piece takes the plan of the
    latest assignment covering it (the default plan if none does), and neighbouring pieces
    on the same plan are joined. This runs for every facility on every dashboard view, so it
    works on cut points and tuples, not day by day."""
    total_days = month_days(period)
    end = next_month(period)
    cuts = {period, end}
    for starts_on, ends_on, _ in assignments:
        for edge in (starts_on, ends_on):
            if edge is not None and period < edge < end:
                cuts.add(edge)
    points = sorted(cuts)
    runs: list[tuple[Plan, date, date]] = []  # plan, first day, day after the last
    for start, stop in zip(points, points[1:], strict=False):
        plan = default
        for starts_on, ends_on, plan_id in assignments:  # by start: the latest covering wins
            if starts_on <= start and (ends_on is None or start < ends_on):
                plan = plans[plan_id]
        if runs and runs[-1][0].pk == plan.pk:
            runs[-1] = (plan, runs[-1][1], stop)
        else:
            runs.append((plan, start, stop))
    segments = []
    for plan, first, stop in runs:
        records = nbytes = images = 0
        for day, r, b, i in usage:
            if first <= day < stop:
                records, nbytes, images = records + r, nbytes + b, images + i
        days = (stop - first).days
        allowance: int | None = None
        overage = 0
        if plan.kind == PlanKind.SUBSCRIPTION:
            allowance = int(
                (plan.included_gb * GB * days / total_days).to_integral_value(ROUND_FLOOR)
            )
            overage = max(0, nbytes - allowance)
        segments.append(
            Segment(
                plan,
                first,
                stop - timedelta(days=1),
                days,
                total_days,
                Usage(records, nbytes, images),
                allowance,
                overage,
            )
        )
    return segments


def _when(segment: Segment) -> str:
    if segment.whole_month:
        return f"{segment.starts_on:%B %Y}"
    return (
        f"{segment.starts_on.day}–{segment.ends_on.day} {segment.ends_on:%B %Y}"
        f" ({segment.days} of {segment.month_days} days)"
    )


def _bill(
    *, facility_id: int, period: date, segments: list[Segment], studies: int, courier: Decimal
) -> Bill:
    currencies = {segment.plan.currency for segment in segments}
    if len(currencies) > 1:
        raise BillingError(
            f"facility {facility_id} has plans in {', '.join(sorted(currencies))} in "
            f"{period:%B %Y}; one month is billed in one currency"
        )
    currency = currencies.pop() if currencies else billing_currency()
    lines: list[Line] = []
    for s in segments:
        plan, used, when = s.plan, s.usage, _when(s)
        if plan.kind == PlanKind.PER_GB and used.bytes:
            lines.append(
                Line(
                    LineKind.PER_GB,
                    f"Data delivered, {plan.name}, {when}",
                    gb(used.bytes),
                    "GB",
                    plan.price_per_gb,
                    money(Decimal(used.bytes) * plan.price_per_gb / GB),
                    s.starts_on,
                    s.ends_on,
                )
            )
        elif plan.kind == PlanKind.PER_IMAGE and used.images:
            lines.append(
                Line(
                    LineKind.PER_IMAGE,
                    f"Images delivered, {plan.name}, {when}",
                    Decimal(used.images),
                    "images",
                    plan.price_per_image,
                    money(used.images * plan.price_per_image),
                    s.starts_on,
                    s.ends_on,
                )
            )
        elif plan.kind == PlanKind.SUBSCRIPTION:
            fraction = Decimal(s.days) / Decimal(s.month_days)
            lines.append(
                Line(
                    LineKind.SUBSCRIPTION,
                    f"{plan.name}, {when}, includes {gb(s.allowance_bytes or 0).normalize():f} GB",
                    fraction.quantize(QUANTITY, rounding=ROUND_HALF_UP),
                    "month",
                    plan.monthly_fee,
                    # Multiplied before dividing: 19.95 for 10 of 28 days is 7.125 exactly,
                    # which rounds half up to 7.13 (a fraction rounded first gave 7.12).
                    money(plan.monthly_fee * s.days / s.month_days),
                    s.starts_on,
                    s.ends_on,
                )
            )
            if s.overage_bytes:
                lines.append(
                    Line(
                        LineKind.OVERAGE,
                        f"Overage beyond the allowance, {plan.name}, {when}",
                        gb(s.overage_bytes),
                        "GB",
                        plan.overage_per_gb,
                        money(Decimal(s.overage_bytes) * plan.overage_per_gb / GB),
                        s.starts_on,
                        s.ends_on,
                    )
                )
    usage = sum((s.usage for s in segments), Usage())
    if usage.records:
        lines.append(
            Line(
                LineKind.DELIVERIES,
                f"Studies delivered ({usage.records} transfer{pluralize(usage.records)},"
                f" {usage.images} image{pluralize(usage.images)},"
                f" {gb(usage.bytes).normalize():f} GB)",
                Decimal(studies),
                "studies",
                ZERO,
                ZERO,
                period,
                next_month(period) - timedelta(days=1),
            )
        )
    return Bill(
        facility_id=facility_id,
        period=period,
        currency=currency,
        segments=tuple(segments),
        lines=tuple(lines),
        usage=usage,
        studies=studies,
        # The courier price is in the billing currency: no comparison for a bill in another.
        courier_price=courier if currency == billing_currency() else ZERO,
    )
