"""Metering: every byte of image data delivered to a recipient is recorded once.

Transfers announces every delivery through one seam, `transfers.deliveries.delivery_made`, in
the request or task that delivers and inside its transaction; `delivery_meter` (connected in
billing.apps) decides who pays (`billed_facility`) and calls `usage_record`, which records a
delivery charged to a facility.

Rules, decided here and nowhere else:

- **Who pays.** The facility that receives the data, as transfers names it: for a share to a
  facility, that facility; for a share to a physician, the facility the physician belongs to
  (their oldest membership, which for an invited physician is their own practice); for a push
  into a PACS, the facility that owns the PACS. A physician with no facility: the sender. A
  patient link: the sending facility (`RELAY_BILL_PATIENT_LINKS_TO = "sender"`, or `"none"` to
  meter nothing). A facility reading its own studies is not a delivery (transfers announces
  none).
- **Once.** `key` names one delivery (`transfers.deliveries.delivery_key`); it is
  unique in the table, so a retried push, a resumed or repeated download, or a frame fetched
  again after its cache expired writes nothing new. The insert runs in a savepoint, so the
  duplicate does not spoil the caller's transaction.
- **Nothing delivered, nothing recorded.** A delivery of zero bytes (a frame that could not be
  decoded, an empty study) writes no row; negative sizes are a bug and raise ValueError.
- **Which month.** `day` is the delivery's calendar date in `RELAY_BILLING_TIME_ZONE`
  (default America/Denver): 23:30 local on the 31st of January belongs to January although it
  is already February in UTC.
- **An image** is one DICOM instance: a ZIP or a push counts its instances; the viewer counts an
  instance on its first frame (frame 0) and bytes on every frame.

Two rollup tables are kept in the same transaction: `UsageDay` (per facility and day: records,
bytes, images) and `UsageStudy` (which studies a facility received in a month). Pricing a month
reads those (about 31 rows per facility), never the raw rows.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from portal.models import Facility, User
from transfers.deliveries import KEY_MAX, Delivery
from transfers.models import Share, ShareKind, Study

from .conf import PATIENT_LINKS_TO_SENDER, billing_tz, patient_links_billed_to
from .models import UsageDay, UsageKind, UsageRecord, UsageStudy


def billing_day(at: datetime) -> date:
    """The calendar date of an instant in the billing time zone."""
    return at.astimezone(billing_tz()).date()


def month_start(day: date) -> date:
    return day.replace(day=1)


def billed_facility(delivery: Delivery) -> Facility | None:
    """The facility that pays for a delivery (None: nobody)."""
    if delivery.receiving_facility is not None:
        return delivery.receiving_facility
    if delivery.share.kind == ShareKind.PATIENT:
        if patient_links_billed_to() == PATIENT_LINKS_TO_SENDER:
            return delivery.share.facility
        return None
    return delivery.share.facility  # a physician with no facility of their own


def delivery_meter(sender: object, *, delivery: Delivery, **kwargs: Any) -> UsageRecord | None:
    """The receiver of `transfers.deliveries.delivery_made`: record the delivery against the
    facility that pays for it."""
    facility = billed_facility(delivery)
    if facility is None:
        return None
    return usage_record(
        facility=facility,
        user=delivery.user,
        share=delivery.share,
        study=delivery.study,
        kind=str(delivery.kind),
        bytes=delivery.bytes,
        images=delivery.images,
        key=delivery.key,
    )


def usage_record(
    *,
    facility: Facility,
    user: User | None,
    share: Share | None,
    study: Study | None,
    kind: str,
    bytes: int,  # shadows the builtin on purpose: the model's field and the callers' word
    images: int,
    key: str,
    at: datetime | None = None,
) -> UsageRecord | None:
    """Record one delivery charged to `facility`; the new row, or None when nothing was
    recorded (zero bytes, or this key was recorded before)."""
    if kind not in UsageKind.values:
        raise ValueError(f"unknown usage kind {kind!r}")
    if bytes < 0 or images < 0:
        raise ValueError("a delivery cannot have a negative size")
    if not key or len(key) > KEY_MAX:
        raise ValueError(
            "a usage key is 1 to 255 characters; build it with transfers.deliveries.delivery_key"
        )
    if bytes == 0:
        return None
    at = at or timezone.now()
    day = billing_day(at)
    with transaction.atomic():
        try:
            with transaction.atomic():  # a savepoint: a duplicate must not abort the caller
                record = UsageRecord.objects.create(
                    facility=facility,
                    user=user,
                    share=share,
                    study=study,
                    kind=kind,
                    bytes=bytes,
                    images=images,
                    key=key,
                    at=at,
                    day=day,
                )
        except IntegrityError:
            if UsageRecord.objects.filter(key=key).exists():
                return None  # delivered before: counted once
            raise
        _usage_day_add(facility_id=facility.pk, day=day, nbytes=bytes, images=images)
        if study is not None:
            UsageStudy.objects.bulk_create(
                [UsageStudy(facility=facility, month=month_start(day), study=study)],
                ignore_conflicts=True,
            )
    return record


def _usage_day_add(*, facility_id: int, day: date, nbytes: int, images: int) -> None:
    """Add one delivery to its day's rollup row with one upsert. The ORM cannot say
    "increment on conflict"; PostgreSQL and SQLite (3.24+) both speak this SQL."""
    table = connection.ops.quote_name(UsageDay._meta.db_table)
    sql = (
        f"INSERT INTO {table} (facility_id, day, records, bytes, images) "  # noqa: S608 - table name from the model
        "VALUES (%s, %s, 1, %s, %s) "
        "ON CONFLICT (facility_id, day) DO UPDATE SET "
        f"records = {table}.records + 1, "
        f"bytes = {table}.bytes + excluded.bytes, "
        f"images = {table}.images + excluded.images"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            sql, [facility_id, connection.ops.adapt_datefield_value(day), nbytes, images]
        )


def usage_rollups_rebuild(*, first_month: date, last_month: date) -> None:
    """Recompute both rollups of whole months from the raw rows: for rows loaded in bulk
    (bench/billing_data.py) and as a repair tool. Runs in one transaction."""
    first = month_start(first_month)
    end = _next_month(month_start(last_month))
    ops = connection.ops
    days = ops.quote_name(UsageDay._meta.db_table)
    studies = ops.quote_name(UsageStudy._meta.db_table)
    raw = ops.quote_name(UsageRecord._meta.db_table)
    with transaction.atomic(), connection.cursor() as cursor:
        UsageDay.objects.filter(day__gte=first, day__lt=end).delete()
        UsageStudy.objects.filter(month__gte=first, month__lt=end).delete()
        cursor.execute(
            f"INSERT INTO {days} (facility_id, day, records, bytes, images) "  # noqa: S608
            f"SELECT facility_id, day, COUNT(*), SUM(bytes), SUM(images) FROM {raw} "
            "WHERE day >= %s AND day < %s GROUP BY facility_id, day",
            [ops.adapt_datefield_value(first), ops.adapt_datefield_value(end)],
        )
        month = first
        while month < end:
            following = _next_month(month)
            cursor.execute(
                f"INSERT INTO {studies} (facility_id, month, study_id) "  # noqa: S608
                f"SELECT DISTINCT facility_id, %s, study_id FROM {raw} "
                "WHERE day >= %s AND day < %s AND study_id IS NOT NULL",
                [
                    ops.adapt_datefield_value(month),
                    ops.adapt_datefield_value(month),
                    ops.adapt_datefield_value(following),
                ],
            )
            month = following


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)
