"""Plans and prices: default plan, per image, per GB, subscriptions, proration, rounding."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from billing.invoicing import invoice_month
from billing.models import Invoice, LineKind, Plan, PlanAssignment, PlanKind
from billing.plans import (
    BillingError,
    bill_for,
    bills_for_month,
    plan_assign,
    plan_default,
    plan_on,
)
from portal.models import Facility
from tests.billing.factories import (
    deliver,
    gfc_like,
    local,
    make_study,
    per_gb,
    per_image,
    subscription,
)

MARCH = date(2025, 3, 1)
GB = 10**9


def _amounts(bill: Any) -> list[tuple[str, Decimal]]:
    return [(line.kind, line.amount) for line in bill.lines]


def test_it_bills_a_facility_without_a_plan_on_the_default_plan(gfc: Facility) -> None:
    deliver(gfc, nbytes=1_500_000_000, images=3, at=local(date(2025, 3, 9)))
    bill = bill_for(facility=gfc, period=MARCH)
    default = Plan.objects.get(is_default=True)
    assert default.kind == PlanKind.PER_GB and default.price_per_gb == Decimal("1.00")
    assert [s.plan for s in bill.segments] == [default]
    assert _amounts(bill) == [(LineKind.PER_GB, Decimal("1.50")), (LineKind.DELIVERIES, 0)]
    assert bill.total == Decimal("1.50") and bill.currency == "USD"
    assert plan_on(facility=gfc, day=date(2025, 3, 9)) == default


def test_it_makes_the_default_plan_once(db: None) -> None:
    assert plan_default() == plan_default()
    assert Plan.objects.filter(is_default=True).count() == 1


def test_it_charges_per_image(gfc: Facility) -> None:
    plan_assign(facility=gfc, plan=per_image(price="0.0100"), starts_on=date(2025, 1, 1))
    deliver(gfc, nbytes=5 * GB, images=250, at=local(date(2025, 3, 2)))
    bill = bill_for(facility=gfc, period=MARCH)
    assert _amounts(bill) == [(LineKind.PER_IMAGE, Decimal("2.50")), (LineKind.DELIVERIES, 0)]
    assert bill.lines[0].quantity == 250


def test_it_charges_nothing_beyond_the_fee_for_usage_exactly_at_the_allowance(
    gfc: Facility,
) -> None:
    plan_assign(facility=gfc, plan=subscription(fee="31.00", included_gb="40"), starts_on=MARCH)
    deliver(gfc, nbytes=40 * GB - 1000, at=local(date(2025, 3, 1), 0, 5))
    deliver(gfc, nbytes=1000, at=local(date(2025, 3, 31), 23, 55))
    bill = bill_for(facility=gfc, period=MARCH)
    assert bill.allowance_bytes == 40 * GB == bill.allowance_used_bytes
    assert bill.overage_bytes == 0
    assert _amounts(bill) == [(LineKind.SUBSCRIPTION, Decimal("31.00")), (LineKind.DELIVERIES, 0)]
    assert bill.allowance_percent == 100


def test_it_charges_overage_beyond_the_allowance(gfc: Facility) -> None:
    plan_assign(facility=gfc, plan=subscription(included_gb="40", overage="0.50"), starts_on=MARCH)
    deliver(gfc, nbytes=41 * GB, at=local(date(2025, 3, 10)))
    bill = bill_for(facility=gfc, period=MARCH)
    assert bill.overage_bytes == GB
    assert _amounts(bill) == [
        (LineKind.SUBSCRIPTION, Decimal("31.00")),
        (LineKind.OVERAGE, Decimal("0.50")),
        (LineKind.DELIVERIES, 0),
    ]
    assert bill.total == Decimal("31.50")


def test_it_charges_a_subscription_with_no_usage_its_fee(gfc: Facility) -> None:
    plan_assign(facility=gfc, plan=subscription(), starts_on=MARCH)
    bill = bill_for(facility=gfc, period=MARCH)
    assert _amounts(bill) == [(LineKind.SUBSCRIPTION, Decimal("31.00"))]
    assert not bill.is_empty and bill.allowance_percent == 0


def test_it_prorates_a_plan_changed_twice_in_one_month(gfc: Facility) -> None:
    # 1-10 March: default, 1.00 per GB; 11-20: 31.00 a month with 40 GB; 21-31: 0.01 per image.
    plan_assign(facility=gfc, plan=subscription(), starts_on=date(2025, 3, 11))
    plan_assign(facility=gfc, plan=per_image(), starts_on=date(2025, 3, 21))
    deliver(gfc, nbytes=2 * GB, images=10, at=local(date(2025, 3, 10), 23, 59))
    deliver(gfc, nbytes=15 * GB, images=20, at=local(date(2025, 3, 11), 0, 1))
    deliver(gfc, nbytes=GB, images=300, at=local(date(2025, 3, 21)))
    bill = bill_for(facility=gfc, period=MARCH)
    assert [(s.starts_on.day, s.ends_on.day, s.days) for s in bill.segments] == [
        (1, 10, 10),
        (11, 20, 10),
        (21, 31, 11),
    ]
    # The subscription's 10 of 31 days: fee 31.00 x 10/31 = 10.00; allowance 40 GB x 10/31 =
    # 12,903,225,806 bytes (rounded down); 15 GB used -> 2,096,774,194 bytes over at 0.50.
    middle = bill.segments[1]
    assert middle.allowance_bytes == 12_903_225_806
    assert middle.overage_bytes == 15 * GB - 12_903_225_806
    assert _amounts(bill) == [
        (LineKind.PER_GB, Decimal("2.00")),
        (LineKind.SUBSCRIPTION, Decimal("10.00")),
        (LineKind.OVERAGE, Decimal("1.05")),
        (LineKind.PER_IMAGE, Decimal("3.00")),
        (LineKind.DELIVERIES, 0),
    ]
    assert bill.total == Decimal("16.05")
    assert "11–20 March 2025 (10 of 31 days)" in bill.lines[1].description


def test_it_rounds_each_line_half_up_to_the_cent(gfc: Facility) -> None:
    plan_assign(facility=gfc, plan=per_gb(price="2.00"), starts_on=MARCH)
    deliver(gfc, nbytes=2_500_000, at=local(date(2025, 3, 3)))  # 0.005 USD
    assert bill_for(facility=gfc, period=MARCH).total == Decimal("0.01")


def _euro() -> Plan:
    return Plan.objects.create(
        name="Euro", kind=PlanKind.PER_GB, currency="EUR", price_per_gb=Decimal("1")
    )


def test_it_refuses_two_currencies_in_one_month(gfc: Facility) -> None:
    euro = _euro()
    with pytest.raises(BillingError, match="one currency a month"):
        plan_assign(facility=gfc, plan=euro, starts_on=date(2025, 3, 15))
    form_row = PlanAssignment(facility=gfc, plan=euro, starts_on=date(2025, 3, 15))
    plan_assign(facility=gfc, plan=plan_default(), starts_on=date(2025, 1, 1))
    PlanAssignment.objects.filter(facility=gfc).update(ends_on=date(2025, 3, 15))
    with pytest.raises(ValidationError, match="one currency a month"):
        form_row.clean()
    # From the first of a month it is a new month in a new currency.
    plan_assign(facility=gfc, plan=euro, starts_on=date(2025, 4, 1))
    deliver(gfc, nbytes=GB, at=local(date(2025, 4, 2)))
    assert bill_for(facility=gfc, period=date(2025, 4, 1)).currency == "EUR"


def test_a_facility_with_two_currencies_in_a_month_does_not_stop_the_others(
    gfc: Facility, krmc: Facility
) -> None:
    # Rows written before the rule (or by hand): the month cannot be billed for gfc ...
    PlanAssignment.objects.create(
        facility=gfc, plan=plan_default(), starts_on=date(2025, 1, 1), ends_on=date(2025, 3, 15)
    )
    PlanAssignment.objects.create(facility=gfc, plan=_euro(), starts_on=date(2025, 3, 15))
    for facility in (gfc, krmc):
        deliver(facility, nbytes=GB, at=local(date(2025, 3, 20)))
    with pytest.raises(BillingError, match="two currencies"):
        bill_for(facility=gfc, period=MARCH)

    run = invoice_month(year=2025, month=3)

    # ... and every other facility is still invoiced.
    assert run.issued == 1
    assert list(Invoice.objects.values_list("facility__slug", flat=True)) == ["krmc"]


def test_it_rounds_a_prorated_fee_half_up_from_its_exact_amount(gfc: Facility) -> None:
    # 19.95 for 10 of February's 28 days is 7.125 exactly: half up, 7.13.
    plan_assign(facility=gfc, plan=subscription(fee="19.95"), starts_on=date(2025, 2, 19))
    bill = bill_for(facility=gfc, period=date(2025, 2, 1))
    fees = [line.amount for line in bill.lines if line.kind == LineKind.SUBSCRIPTION]
    assert fees == [Decimal("7.13")]


def test_it_compares_with_the_courier_only_in_the_billing_currency(gfc: Facility) -> None:
    plan_assign(facility=gfc, plan=_euro(), starts_on=date(2025, 3, 1))
    study = make_study(gfc)
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 3)), study=study)
    bill = bill_for(facility=gfc, period=MARCH)
    assert bill.currency == "EUR"
    # The courier price is in USD: no 11 "EUR" a disc, no savings made of two currencies.
    assert bill.courier_cost == 0 and bill.courier_price == 0


def test_it_ends_the_running_plan_when_a_new_one_starts(gfc: Facility) -> None:
    first = plan_assign(facility=gfc, plan=subscription(), starts_on=date(2025, 1, 1))
    plan_assign(facility=gfc, plan=per_image(), starts_on=date(2025, 2, 1))
    first.refresh_from_db()
    assert first.ends_on == date(2025, 2, 1)
    # Starting the same day again replaces the assignment rather than overlapping it.
    plan_assign(facility=gfc, plan=per_gb(), starts_on=date(2025, 2, 1))
    assert list(
        PlanAssignment.objects.filter(facility=gfc).values_list("plan__name", "ends_on")
    ) == [("Monthly 40 GB", date(2025, 2, 1)), ("Per GB", None)]


def test_it_refuses_a_plan_change_in_a_month_already_invoiced(gfc: Facility) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 3)))
    invoice_month(year=2025, month=3)
    plan = subscription()
    with pytest.raises(BillingError, match="already invoiced"):
        plan_assign(facility=gfc, plan=plan, starts_on=date(2025, 3, 20))
    plan_assign(facility=gfc, plan=plan, starts_on=date(2025, 4, 1))


def test_it_refuses_overlapping_assignments_in_the_admin_form(gfc: Facility) -> None:
    plan = subscription()
    PlanAssignment.objects.create(facility=gfc, plan=plan, starts_on=date(2025, 1, 1))
    overlapping = PlanAssignment(facility=gfc, plan=plan, starts_on=date(2025, 3, 1))
    with pytest.raises(ValidationError, match="already has a plan"):
        overlapping.clean()
    backwards = PlanAssignment(
        facility=gfc, plan=plan, starts_on=date(2024, 3, 1), ends_on=date(2024, 2, 1)
    )
    with pytest.raises(ValidationError, match="after the start"):
        backwards.clean()


def test_it_refuses_a_subscription_as_the_default_plan(db: None) -> None:
    with pytest.raises(ValidationError):
        Plan(name="x", kind=PlanKind.SUBSCRIPTION, is_default=True).clean()


@pytest.mark.parametrize("count", [3, 40])
def test_it_prices_every_facility_in_a_constant_number_of_queries(
    db: None, count: int, django_assert_max_num_queries: Any
) -> None:
    facilities = gfc_like(count)
    plan = subscription()
    for i, facility in enumerate(facilities):
        study = make_study(facility)
        if i % 2:
            plan_assign(facility=facility, plan=plan, starts_on=date(2025, 3, 5 + i % 20))
        deliver(facility, nbytes=GB + i, at=local(date(2025, 3, 1 + i % 28)), study=study)
    plan_default()
    with django_assert_max_num_queries(6):
        bills = bills_for_month(period=MARCH)
    assert len(bills) == count
    assert all(bill.studies == 1 and bill.usage.bytes >= GB for bill in bills.values())
