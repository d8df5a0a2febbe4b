"""Bulk data for the billing benchmark: N facilities, M usage rows in one month, fast.

`usage_fill(facilities=1000, rows=1_000_000, period=date(2025, 3, 1))` makes the facilities
(a third on a subscription, a third paying per image, the rest on the default plan, one in
five with a plan change mid-month), ten studies each, and the usage rows spread over the
month's days, kinds and studies; then rebuilds the rollups from the raw rows. On PostgreSQL the
rows go in with COPY; elsewhere with bulk_create. `billing_bench(...)` then times what the
issue asks about: invoicing that month, and the staff dashboard and a facility page.

Only for a throwaway database (bench/, or a shell): it writes a lot and cleans nothing up.
"""

from __future__ import annotations

import random
import time as clock
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from django.db import connection, transaction

from billing.conf import billing_tz
from billing.invoicing import invoice_month
from billing.metering import usage_rollups_rebuild
from billing.models import Plan, PlanAssignment, PlanKind, UsageKind, UsageRecord
from billing.plans import month_days, plan_default
from portal.models import Facility, Membership, User
from tests.helpers import client_for
from transfers.models import Study

STUDIES_PER_FACILITY = 10
KINDS = [UsageKind.VIEWER] * 6 + [UsageKind.ZIP] * 2 + [UsageKind.PUSH, UsageKind.ISO]


@dataclass(frozen=True)
class Filled:
    facilities: int
    rows: int
    seconds: float


def usage_fill(
    *, facilities: int, rows: int, period: date, seed: int = 1, prefix: str = "bench"
) -> Filled:
    started = clock.perf_counter()
    rng = random.Random(seed)  # noqa: S311 - benchmark data, not secrets
    period = period.replace(day=1)
    with transaction.atomic():
        made = Facility.objects.bulk_create(
            Facility(name=f"Bench facility {i:05d}", slug=f"{prefix}-{i:05d}")
            for i in range(facilities)
        )
        if connection.vendor != "postgresql":  # bulk_create sets pks only on PostgreSQL
            made = list(Facility.objects.filter(slug__startswith=f"{prefix}-").order_by("pk"))
        Study.objects.bulk_create(
            Study(facility=f, study_instance_uid=f"2.25.{f.pk}.{n}")
            for f in made
            for n in range(STUDIES_PER_FACILITY)
        )
        studies: dict[int, list[int]] = {}
        for facility_id, study_id in Study.objects.filter(
            facility__in=made, study_instance_uid__startswith="2.25."
        ).values_list("facility_id", "pk"):
            studies.setdefault(facility_id, []).append(study_id)
        _plans_assign(made, period=period)
    with transaction.atomic():
        records = _rows(rng, made, studies, rows=rows, period=period, prefix=prefix)
        if connection.vendor == "postgresql":
            _copy(records)
        else:
            batch: list[UsageRecord] = []
            for r in records:
                batch.append(UsageRecord(**r))
                if len(batch) == 5000:
                    UsageRecord.objects.bulk_create(batch)
                    batch = []
            UsageRecord.objects.bulk_create(batch)
    usage_rollups_rebuild(first_month=period, last_month=period)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    return Filled(facilities, rows, clock.perf_counter() - started)


def _plans_assign(facilities: list[Facility], *, period: date) -> None:
    plan_default()
    subscription, _ = Plan.objects.get_or_create(
        name="Bench monthly 40 GB",
        defaults={
            "kind": PlanKind.SUBSCRIPTION,
            "monthly_fee": Decimal("49.00"),
            "included_gb": Decimal("40"),
            "overage_per_gb": Decimal("0.75"),
        },
    )
    per_image, _ = Plan.objects.get_or_create(
        name="Bench per image",
        defaults={"kind": PlanKind.PER_IMAGE, "price_per_image": Decimal("0.0050")},
    )
    assignments = []
    for i, facility in enumerate(facilities):
        plan = (subscription, per_image, None)[i % 3]
        if plan is not None:
            assignments.append(
                PlanAssignment(facility=facility, plan=plan, starts_on=date(2000, 1, 1))
            )
        if i % 5 == 0:  # a mid-month change for every fifth facility
            if assignments and assignments[-1].facility is facility:
                assignments[-1].ends_on = period + timedelta(days=14)
            assignments.append(
                PlanAssignment(
                    facility=facility,
                    plan=subscription if plan is not subscription else per_image,
                    starts_on=period + timedelta(days=14),
                )
            )
    PlanAssignment.objects.bulk_create(assignments)


def _rows(
    rng: random.Random,
    facilities: list[Facility],
    studies: dict[int, list[int]],
    *,
    rows: int,
    period: date,
    prefix: str,
) -> Iterator[dict[str, object]]:
    tz = billing_tz()
    days = month_days(period)
    for n in range(rows):
        facility = facilities[n % len(facilities)]
        day = period + timedelta(days=rng.randrange(days))
        at = datetime.combine(day, time(rng.randrange(24), rng.randrange(60)), tzinfo=tz)
        kind = rng.choice(KINDS)
        # A viewer frame is about half a megabyte; a download or push a whole study.
        size = (
            rng.randrange(100_000, 1_000_000) if kind == "viewer" else rng.randrange(10**7, 10**9)
        )
        yield {
            "facility_id": facility.pk,
            "study_id": rng.choice(studies[facility.pk]),
            "kind": kind,
            "bytes": size,
            "images": 1 if kind == "viewer" else size // 500_000,
            "key": f"{prefix}:{period:%Y%m}:{n}",
            "at": at,
            "day": day,
        }


def _copy(records: Iterator[dict[str, object]]) -> None:
    columns = ["facility_id", "study_id", "kind", "bytes", "images", "key", "at", "day"]
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    with connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg's own cursor, for COPY
        with raw.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for record in records:
                copy.write_row([record[c] for c in columns])


@dataclass(frozen=True)
class BenchResult:
    fill: Filled
    invoice_seconds: float
    invoices: int
    rerun_seconds: float
    dashboard_ms: list[float]
    facility_page_ms: list[float]


def billing_bench(
    *, facilities: int = 1000, rows: int = 1_000_000, period: date = date(2025, 3, 1)
) -> BenchResult:
    """Fill, invoice the month (and again, to time the idempotent rerun), then time the
    dashboard for that month and one facility's billing page, five requests each."""
    from django.urls import reverse

    filled = usage_fill(facilities=facilities, rows=rows, period=period)
    started = clock.perf_counter()
    run = invoice_month(year=period.year, month=period.month)
    invoiced = clock.perf_counter() - started
    started = clock.perf_counter()
    invoice_month(year=period.year, month=period.month)
    rerun = clock.perf_counter() - started

    staff, _ = User.objects.get_or_create(email="bench-operator@relay.example", is_staff=True)
    facility = Facility.objects.filter(slug__startswith="bench-").order_by("pk").first()
    admin, _ = User.objects.get_or_create(email="bench-admin@relay.example")
    Membership.objects.get_or_create(user=admin, facility=facility, role="admin")
    assert facility is not None
    timings: dict[str, list[float]] = {"dashboard": [], "facility": []}
    for who, name, url in (
        (staff, "dashboard", reverse("billing_dashboard") + f"?month={period:%Y-%m}"),
        (admin, "facility", reverse("facility_billing", kwargs={"slug": facility.slug})),
    ):
        # Signed in as after the password and, for staff and admins, the second factor.
        client = client_for(who)
        for _ in range(5):
            started = clock.perf_counter()
            response = client.get(url)
            timings[name].append(round((clock.perf_counter() - started) * 1000, 1))
            assert response.status_code == 200, response.status_code
    return BenchResult(
        fill=filled,
        invoice_seconds=invoiced,
        invoices=run.issued,
        rerun_seconds=rerun,
        dashboard_ms=timings["dashboard"],
        facility_page_ms=timings["facility"],
    )
