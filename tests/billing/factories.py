"""Rows for billing tests: studies, shares, usage on given days, plans."""

from __future__ import annotations

import itertools
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from django.utils import timezone

from billing.metering import usage_record
from billing.models import Plan, PlanKind, UsageKind, UsageRecord
from portal.models import Facility, User
from transfers.deliveries import DeliveryKind, delivery_announce, delivery_key
from transfers.models import Share, ShareKind, Study

DENVER = ZoneInfo("America/Denver")
_counter = itertools.count(1)


def make_study(facility: Facility) -> Study:
    n = next(_counter)
    return Study.objects.create(facility=facility, study_instance_uid=f"1.2.826.0.1.{n}")


def make_share(study: Study, *, by: User, kind: str, **fields: object) -> Share:
    share = Share.objects.create(
        facility=study.facility,
        created_by=by,
        kind=kind,
        expires_at=timezone.now() + timedelta(days=30),
        **fields,
    )
    share.studies.add(study)
    return share


def local(day: date, hour: int = 12, minute: int = 0) -> datetime:
    """An instant at a local time of day in the billing time zone."""
    return datetime.combine(day, time(hour, minute), tzinfo=DENVER)


def deliver(
    facility: Facility,
    *,
    nbytes: int,
    images: int = 1,
    at: datetime,
    study: Study | None = None,
    kind: str = UsageKind.ZIP,
    key: str | None = None,
) -> UsageRecord | None:
    return usage_record(
        facility=facility,
        user=None,
        share=None,
        study=study,
        kind=kind,
        bytes=nbytes,
        images=images,
        key=key or delivery_key("test", next(_counter)),
        at=at,
    )


def announce(
    share: Share,
    *,
    user: User | None,
    study: Study,
    kind: DeliveryKind,
    nbytes: int,
    images: int,
    key_parts: tuple[object, ...],
) -> UsageRecord | None:
    """Announce a delivery as transfers does; the usage row billing recorded for it, if any."""
    delivery = delivery_announce(
        kind=kind,
        share=share,
        study=study,
        user=user,
        nbytes=nbytes,
        images=images,
        key_parts=key_parts,
    )
    return UsageRecord.objects.filter(key=delivery.key).first()


def subscription(
    name: str = "Monthly 40 GB",
    *,
    fee: str = "31.00",
    included_gb: str = "40",
    overage: str = "0.50",
) -> Plan:
    return Plan.objects.create(
        name=name,
        kind=PlanKind.SUBSCRIPTION,
        monthly_fee=Decimal(fee),
        included_gb=Decimal(included_gb),
        overage_per_gb=Decimal(overage),
    )


def per_image(name: str = "Per image", price: str = "0.0100") -> Plan:
    return Plan.objects.create(name=name, kind=PlanKind.PER_IMAGE, price_per_image=Decimal(price))


def per_gb(name: str = "Per GB", price: str = "2.00") -> Plan:
    return Plan.objects.create(name=name, kind=PlanKind.PER_GB, price_per_gb=Decimal(price))


def gfc_like(n: int, start: int = 0) -> list[Facility]:
    """n more facilities, numbered from `start`."""
    return [
        Facility.objects.create(name=f"Facility {i:04d}", slug=f"f{i:04d}")
        for i in range(start, start + n)
    ]


__all__ = ["ShareKind", "deliver", "gfc_like", "local", "make_share", "make_study"]
