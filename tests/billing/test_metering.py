"""Metering: each delivery recorded once, against the right facility, in the right month."""

from __future__ import annotations

import os
import threading
from datetime import UTC, date
from typing import Any

import pytest
from django.db import connection, transaction

from billing.metering import billing_day, usage_rollups_rebuild
from billing.models import UsageDay, UsageRecord, UsageStudy
from portal.models import Facility, Membership, User
from tests.billing.factories import announce, deliver, local, make_share, make_study
from transfers.deliveries import DeliveryKind, delivery_key
from transfers.models import Share, ShareKind, Study


def test_it_records_a_delivery_with_its_rollups(
    gfc: Facility, charlie: User, share_to_gfc: Share, study: Study
) -> None:
    record = announce(
        share_to_gfc,
        user=charlie,
        study=study,
        kind=DeliveryKind.ZIP,
        nbytes=200_000_000,
        images=120,
        key_parts=(share_to_gfc.uuid, charlie.pk, study.uuid),
    )
    assert record is not None
    assert (record.facility, record.user, record.share, record.study) == (
        gfc,
        charlie,
        share_to_gfc,
        study,
    )
    day = UsageDay.objects.get(facility=gfc)
    assert (day.records, day.bytes, day.images) == (1, 200_000_000, 120)
    assert UsageStudy.objects.filter(facility=gfc, study=study).count() == 1


def test_it_counts_a_retried_delivery_once(gfc: Facility, study: Study) -> None:
    at = local(date(2025, 3, 10))
    first = deliver(gfc, nbytes=1000, images=2, at=at, study=study, key="push:1")
    again = deliver(gfc, nbytes=1000, images=2, at=at, study=study, key="push:1")
    assert first is not None and again is None
    assert UsageRecord.objects.count() == 1
    day = UsageDay.objects.get(facility=gfc)
    assert (day.records, day.bytes, day.images) == (1, 1000, 2)


def test_it_keeps_the_callers_transaction_usable_after_a_duplicate(
    gfc: Facility, study: Study
) -> None:
    at = local(date(2025, 3, 10))
    deliver(gfc, nbytes=10, at=at, key="k")
    with transaction.atomic():
        assert deliver(gfc, nbytes=10, at=at, key="k") is None
        # The caller's own writes after the duplicate still work and commit.
        deliver(gfc, nbytes=5, at=at, key="k2")
    assert sorted(UsageRecord.objects.values_list("key", flat=True)) == ["k", "k2"]
    assert UsageDay.objects.get(facility=gfc).bytes == 15


def test_it_records_nothing_for_a_delivery_of_zero_bytes(gfc: Facility, study: Study) -> None:
    assert deliver(gfc, nbytes=0, images=0, at=local(date(2025, 3, 1)), study=study) is None
    assert deliver(gfc, nbytes=0, images=1, at=local(date(2025, 3, 1)), study=study) is None
    assert not UsageRecord.objects.exists()
    assert not UsageDay.objects.exists()
    assert not UsageStudy.objects.exists()


@pytest.mark.parametrize(("nbytes", "images"), [(-1, 0), (10, -1)])
def test_it_refuses_a_negative_size(gfc: Facility, nbytes: int, images: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        deliver(gfc, nbytes=nbytes, images=images, at=local(date(2025, 3, 1)))


def test_it_refuses_an_unknown_kind(gfc: Facility) -> None:
    with pytest.raises(ValueError, match="kind"):
        deliver(gfc, nbytes=1, at=local(date(2025, 3, 1)), kind="fax")


def test_it_puts_2330_local_on_the_last_day_in_that_month(gfc: Facility) -> None:
    at = local(date(2025, 1, 31), 23, 30)
    assert at.astimezone(UTC).date() == date(2025, 2, 1)  # already February in UTC
    record = deliver(gfc, nbytes=100, at=at)
    assert record is not None and record.day == date(2025, 1, 31)
    assert billing_day(local(date(2025, 2, 1), 0, 0)) == date(2025, 2, 1)


def test_it_follows_the_billing_time_zone_setting(settings: Any, gfc: Facility) -> None:
    settings.RELAY_BILLING_TIME_ZONE = "UTC"
    record = deliver(gfc, nbytes=100, at=local(date(2025, 1, 31), 23, 30))
    assert record is not None and record.day == date(2025, 2, 1)


def _charged(share: Share, user: User | None) -> Facility | None:
    """The facility a one-image viewer delivery under `share` to `user` is charged to."""
    record = announce(
        share,
        user=user,
        study=share.studies.get(),
        kind=DeliveryKind.VIEWER,
        nbytes=1000,
        images=1,
        key_parts=(share.uuid, user.pk if user else "patient", "1.2.3", 0),
    )
    return record.facility if record is not None else None


def test_it_charges_a_facility_share_to_the_recipient_facility(
    share_to_gfc: Share, charlie: User, gfc: Facility
) -> None:
    assert _charged(share_to_gfc, charlie) == gfc


def test_it_charges_a_physician_share_to_the_physicians_practice(study: Study, bob: User) -> None:
    practice = Facility.objects.create(name="Practice of dr", slug="practice-dr")
    later = Facility.objects.create(name="Hospital", slug="hospital")
    doctor = User.objects.create_user(email="dr@example.org", password="x" * 12)
    Membership.objects.create(user=doctor, facility=practice, role="admin")
    Membership.objects.create(user=doctor, facility=later, role="reader")
    share = make_share(study, by=bob, kind=ShareKind.PHYSICIAN, recipient_user=doctor)
    assert _charged(share, doctor) == practice


def test_it_charges_a_physician_without_a_facility_to_the_sender(
    study: Study, bob: User, krmc: Facility
) -> None:
    doctor = User.objects.create_user(email="dr@example.org", password="x" * 12)
    share = make_share(study, by=bob, kind=ShareKind.PHYSICIAN, recipient_user=doctor)
    assert _charged(share, doctor) == krmc


def test_it_charges_a_patient_link_to_the_sending_facility(
    study: Study, bob: User, krmc: Facility
) -> None:
    share = make_share(study, by=bob, kind=ShareKind.PATIENT)
    record = announce(
        share,
        user=None,
        study=study,
        kind=DeliveryKind.VIEWER,
        nbytes=524_288,
        images=1,
        key_parts=(share.uuid, "patient", "1.2.3", 0),
    )
    assert record is not None and record.facility == krmc


def test_it_meters_no_patient_link_when_set_to_none(settings: Any, study: Study, bob: User) -> None:
    settings.RELAY_BILL_PATIENT_LINKS_TO = "none"
    share = make_share(study, by=bob, kind=ShareKind.PATIENT)
    assert _charged(share, None) is None
    assert not UsageRecord.objects.exists()


def test_it_hashes_a_key_too_long_for_the_column() -> None:
    key = delivery_key("push", "1." * 200)
    assert len(key) <= 255 and key.startswith("push:sha256:")
    assert key == delivery_key("push", "1." * 200)
    assert delivery_key("zip", "a", 1) == "zip:a:1"


def test_it_rebuilds_rollups_equal_to_the_incremental_ones(gfc: Facility, krmc: Facility) -> None:
    studies = [make_study(krmc) for _ in range(3)]
    for i in range(30):
        deliver(
            gfc if i % 3 else krmc,
            nbytes=1000 + i,
            images=i % 4,
            at=local(date(2025, 1 + i % 2, 1 + i % 28), i % 24),
            study=studies[i % 3],
        )
    days = sorted(UsageDay.objects.values_list("facility_id", "day", "records", "bytes", "images"))
    months = sorted(UsageStudy.objects.values_list("facility_id", "month", "study_id"))
    usage_rollups_rebuild(first_month=date(2025, 1, 1), last_month=date(2025, 2, 1))
    assert (
        sorted(UsageDay.objects.values_list("facility_id", "day", "records", "bytes", "images"))
        == days
    )
    assert sorted(UsageStudy.objects.values_list("facility_id", "month", "study_id")) == months


@pytest.mark.django_db(transaction=True)
def test_it_counts_one_delivery_recorded_by_two_workers_at_once(krmc: Facility) -> None:
    study = make_study(krmc)
    barrier = threading.Barrier(2)
    results: list[object] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(
                deliver(krmc, nbytes=700, at=local(date(2025, 3, 3)), study=study, key="same")
            )
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sum(r is not None for r in results) == 1
    assert UsageRecord.objects.count() == 1
    assert UsageDay.objects.get().bytes == 700
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        assert connection.vendor == "postgresql"
