"""The figures of the staff billing dashboard and of the CSV exports.

Every figure comes from a fixed number of queries whatever the number of facilities: revenue
from the invoices (less their credit notes), GB from the daily rollup, the month still running
from `bills_for_month`. Revenue is shown in the billing currency (`RELAY_BILLING_CURRENCY`);
invoices in any other currency are listed among the unpaid ones and in the CSV, not charted.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import (
    Count,
    DecimalField,
    F,
    OuterRef,
    QuerySet,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Coalesce, TruncMonth
from django.utils import timezone

from .conf import billing_currency, billing_tz
from .models import CreditNote, Invoice, UsageDay, UsageRecord, UsageStudy
from .plans import ZERO, Bill, bills_for_month, gb, next_month

TOP_N = 10
UNPAID_SHOWN = 100


def this_month() -> date:
    return timezone.now().astimezone(billing_tz()).date().replace(day=1)


def months_back(last: date, count: int) -> list[date]:
    """`count` first-of-month dates ending with `last`, oldest first."""
    months = [last]
    while len(months) < count:
        months.insert(0, (months[0] - timedelta(days=1)).replace(day=1))
    return months


@dataclass(frozen=True)
class MonthFigures:
    period: date
    invoiced: Decimal  # invoice totals of the month, billing currency
    credited: Decimal  # credit notes against those invoices
    estimate: Decimal | None  # the month still running: what it comes to so far
    bytes: int

    @property
    def revenue(self) -> Decimal:
        if self.estimate is not None:
            return self.estimate
        return self.invoiced - self.credited

    @property
    def gb(self) -> Decimal:
        return gb(self.bytes)


@dataclass(frozen=True)
class FacilityUsage:
    facility_id: int
    name: str
    slug: str
    bytes: int
    images: int
    records: int
    studies: int

    @property
    def gb(self) -> Decimal:
        return gb(self.bytes)


@dataclass(frozen=True)
class OverAllowance:
    name: str
    slug: str
    bill: Bill


@dataclass(frozen=True)
class Dashboard:
    month: date
    currency: str
    months: list[MonthFigures]
    top: list[FacilityUsage]
    over: list[OverAllowance]
    unpaid: list[Invoice]
    unpaid_summary: list[dict[str, Any]]  # per currency: n, due


def with_credited(invoices: QuerySet[Invoice]) -> QuerySet[Invoice]:
    """Annotate each invoice with `credited` (its credit notes' sum) and `balance`, by a
    subquery, so that a join with the notes cannot count an invoice's total twice."""
    money: DecimalField[Decimal, Decimal] = DecimalField(max_digits=12, decimal_places=2)
    credited = (
        CreditNote.objects.filter(invoice=OuterRef("pk"))
        .order_by()
        .values("invoice")
        .annotate(s=Sum("amount"))
        .values("s")
    )
    return invoices.annotate(
        credited=Coalesce(Subquery(credited, output_field=money), Value(ZERO), output_field=money)
    ).annotate(balance=F("total") - F("credited"))


def unpaid_invoices() -> QuerySet[Invoice]:
    """Invoices not marked paid and not wholly credited."""
    invoices = with_credited(Invoice.objects.filter(paid_at__isnull=True))
    return invoices.filter(balance__gt=0)  # type: ignore[misc]  # the stubs miss annotations


def dashboard_data(*, month: date, months: int = 12) -> Dashboard:
    month = month.replace(day=1)
    periods = months_back(month, months)
    first, end = periods[0], next_month(month)
    currency = billing_currency()
    current = this_month()

    invoiced = dict(
        Invoice.objects.filter(period__gte=first, period__lt=end, currency=currency)
        .values("period")
        .annotate(s=Sum("total"))
        .values_list("period", "s")
        .order_by()
    )
    credited = dict(
        CreditNote.objects.filter(
            invoice__period__gte=first, invoice__period__lt=end, currency=currency
        )
        .values("invoice__period")
        .annotate(s=Sum("amount"))
        .values_list("invoice__period", "s")
        .order_by()
    )
    usage = dict(
        UsageDay.objects.filter(day__gte=first, day__lt=end)
        .annotate(m=TruncMonth("day"))
        .values("m")
        .annotate(b=Sum("bytes"))
        .values_list("m", "b")
        .order_by()
    )
    bills = bills_for_month(period=month)
    open_estimate: Decimal | None = None
    if month == current:
        open_estimate = sum(
            (b.total for b in bills.values() if b.currency == currency and not b.is_empty), ZERO
        )
    figures = [
        MonthFigures(
            period=p,
            invoiced=invoiced.get(p, ZERO),
            credited=credited.get(p, ZERO),
            estimate=open_estimate if p == current else None,
            bytes=int(usage.get(p) or 0),
        )
        for p in periods
    ]

    rows = list(
        UsageDay.objects.filter(day__gte=month, day__lt=end)
        .values("facility_id", "facility__name", "facility__slug")
        .annotate(b=Sum("bytes"), i=Sum("images"), r=Sum("records"))
        .order_by("-b", "facility__name")[:TOP_N]
    )
    studies = dict(
        UsageStudy.objects.filter(month=month, facility_id__in=[r["facility_id"] for r in rows])
        .values("facility_id")
        .annotate(n=Count("pk"))
        .values_list("facility_id", "n")
        .order_by()
    )
    top = [
        FacilityUsage(
            facility_id=r["facility_id"],
            name=r["facility__name"],
            slug=r["facility__slug"],
            bytes=r["b"],
            images=r["i"],
            records=r["r"],
            studies=studies.get(r["facility_id"], 0),
        )
        for r in rows
    ]

    over_ids = [fid for fid, bill in bills.items() if bill.overage_bytes > 0]
    names = {}
    if over_ids:
        from portal.models import Facility

        names = {
            pk: (name, slug)
            for pk, name, slug in Facility.objects.filter(pk__in=over_ids).values_list(
                "pk", "name", "slug"
            )
        }
    over = sorted(
        (OverAllowance(names[fid][0], names[fid][1], bills[fid]) for fid in over_ids),
        key=lambda o: (-o.bill.overage_bytes, o.name),
    )

    unpaid = unpaid_invoices()
    return Dashboard(
        month=month,
        currency=currency,
        months=figures,
        top=top,
        over=over,
        unpaid=list(
            unpaid.select_related("facility").order_by("period", "facility_name")[:UNPAID_SHOWN]
        ),
        unpaid_summary=list(
            unpaid.values("currency")
            .annotate(n=Count("pk"), due=Sum("balance"))
            .order_by("currency")
        ),
    )


# --- CSV exports --------------------------------------------------------------------------------


class _Echo:
    """A file-like object whose write returns the line, for streaming csv.writer output."""

    def write(self, value: str) -> str:
        return value


USAGE_HEADER = [
    "day",
    "at",
    "facility",
    "facility_name",
    "kind",
    "bytes",
    "images",
    "study",
    "share",
    "user",
    "key",
]
INVOICE_HEADER = [
    "number",
    "facility",
    "facility_name",
    "period",
    "currency",
    "total",
    "credited",
    "balance",
    "paid_at",
    "issued_at",
    "studies",
    "transfers",
    "images",
    "bytes",
    "courier_cost",
]


def usage_csv_rows(*, start: date, end: date) -> Iterator[str]:
    """Every usage record delivered from `start` to `end` (billing days, both included),
    streamed in chunks so that a million rows never sit in memory."""
    writer = csv.writer(_Echo())
    tz = billing_tz()
    yield writer.writerow(USAGE_HEADER)
    rows = (
        UsageRecord.objects.filter(day__gte=start, day__lte=end)
        .order_by("day", "at", "pk")
        .values_list(
            "day",
            "at",
            "facility__slug",
            "facility__name",
            "kind",
            "bytes",
            "images",
            "study__uuid",
            "share__uuid",
            "user__email",
            "key",
        )
    )
    for day, at, slug, name, kind, nbytes, images, study, share, email, key in rows.iterator(
        chunk_size=5000
    ):
        yield writer.writerow(
            [
                day.isoformat(),
                at.astimezone(tz).isoformat(timespec="seconds"),
                slug,
                name,
                kind,
                nbytes,
                images,
                study or "",
                share or "",
                email or "",
                key,
            ]
        )


def invoices_csv_rows(*, start: date, end: date) -> Iterator[str]:
    """Every invoice of the months from `start` to `end` (both included)."""
    writer = csv.writer(_Echo())
    tz = billing_tz()
    yield writer.writerow(INVOICE_HEADER)
    invoices = (
        with_credited(Invoice.objects.filter(period__gte=start.replace(day=1), period__lte=end))
        .select_related("facility")
        .order_by("period", "number")
    )
    for invoice in invoices.iterator(chunk_size=2000):
        yield writer.writerow(
            [
                invoice.number,
                invoice.facility.slug,
                invoice.facility_name,
                f"{invoice.period:%Y-%m}",
                invoice.currency,
                f"{invoice.total:.2f}",
                f"{invoice.credited:.2f}",  # type: ignore[attr-defined]
                f"{invoice.balance:.2f}",  # type: ignore[attr-defined]
                invoice.paid_at.astimezone(tz).isoformat(timespec="seconds")
                if invoice.paid_at
                else "",
                invoice.issued_at.astimezone(tz).isoformat(timespec="seconds"),
                invoice.studies,
                invoice.records,
                invoice.images,
                invoice.bytes,
                f"{invoice.courier_cost:.2f}",
            ]
        )
