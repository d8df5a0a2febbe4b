"""Monthly invoicing: once per facility and month, whatever happens to the workers."""

from __future__ import annotations

import io
import threading
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.core import mail
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.db.models import ProtectedError
from django.test.utils import CaptureQueriesContext

from billing import invoicing
from billing.invoicing import (
    credit_note_issue,
    invoice_mark_paid,
    invoice_month,
    invoices_notify,
)
from billing.models import CreditNote, Invoice, InvoiceLine, LineKind, PlanAssignment
from billing.plans import BillingError, plan_assign, plan_default
from billing.tasks import invoice_previous_month
from portal.models import Facility, User
from tests.billing.factories import DENVER, deliver, gfc_like, local, make_study, subscription

GB = 10**9


class Killed(BaseException):
    """Stands for the worker being killed: nothing in the service catches it."""


def test_it_issues_one_invoice_per_facility_with_its_lines(krmc: Facility, gfc: Facility) -> None:
    study = make_study(krmc)
    deliver(gfc, nbytes=2 * GB, images=40, at=local(date(2025, 3, 4)), study=study)
    deliver(gfc, nbytes=GB, images=10, at=local(date(2025, 3, 5)), study=study)
    plan_assign(facility=krmc, plan=subscription(), starts_on=date(2025, 1, 1))
    run = invoice_month(year=2025, month=3)
    assert (run.issued, run.already, run.empty) == (2, 0, 0)
    gfc_invoice = Invoice.objects.get(facility=gfc, period=date(2025, 3, 1))
    assert gfc_invoice.number == "2025-03-GFC"
    assert gfc_invoice.facility_name == "Great Falls Clinic"
    assert (gfc_invoice.total, gfc_invoice.currency) == (Decimal("3.00"), "USD")
    assert (gfc_invoice.records, gfc_invoice.bytes, gfc_invoice.images) == (2, 3 * GB, 50)
    assert gfc_invoice.studies == 1 and gfc_invoice.courier_cost == Decimal("11.00")
    assert list(gfc_invoice.lines.values_list("kind", "amount", "quantity")) == [
        (LineKind.PER_GB, Decimal("3.00"), Decimal("3")),
        (LineKind.DELIVERIES, Decimal("0"), Decimal("1")),
    ]
    krmc_invoice = Invoice.objects.get(facility=krmc)
    assert list(krmc_invoice.lines.values_list("kind", "amount")) == [
        (LineKind.SUBSCRIPTION, Decimal("31.00"))
    ]


def test_it_issues_nothing_new_when_run_again(gfc: Facility) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 4)))
    first = invoice_month(year=2025, month=3)
    second = invoice_month(year=2025, month=3)
    assert (first.issued, second.issued, second.already) == (1, 0, 1)
    assert Invoice.objects.count() == 1 and InvoiceLine.objects.count() == 2


def test_it_issues_no_invoice_for_a_month_without_usage_on_pay_as_you_go(
    gfc: Facility, krmc: Facility
) -> None:
    plan_assign(facility=krmc, plan=subscription(), starts_on=date(2025, 3, 1))
    run = invoice_month(year=2025, month=3)
    # Great Falls (pay as you go) received nothing: no invoice. Kalispell owes its fee.
    assert (run.issued, run.empty) == (1, 1)
    assert list(Invoice.objects.values_list("facility__slug", "total")) == [
        ("krmc", Decimal("31.00"))
    ]


def test_it_puts_a_delivery_at_2330_on_the_last_day_in_that_months_invoice(
    gfc: Facility,
) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 1, 31), 23, 30))
    invoice_month(year=2025, month=1)
    invoice_month(year=2025, month=2)
    assert list(Invoice.objects.values_list("period", "bytes")) == [(date(2025, 1, 1), GB)]


def test_it_refuses_a_month_that_has_not_ended(gfc: Facility, monkeypatch: Any) -> None:
    # 31 March 23:59 in Denver is already 1 April in UTC; the month is still running.
    monkeypatch.setattr(
        "django.utils.timezone.now", lambda: datetime(2025, 3, 31, 23, 59, tzinfo=DENVER)
    )
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 31), 23, 0))
    with pytest.raises(BillingError, match="has not ended"):
        invoice_month(year=2025, month=3)
    assert invoice_month(year=2025, month=3, allow_open_month=True).issued == 1


def test_it_finishes_after_a_worker_killed_between_batches(db: None, monkeypatch: Any) -> None:
    facilities = gfc_like(5)
    for facility in facilities:
        deliver(facility, nbytes=GB, at=local(date(2025, 3, 2)))
    real = invoicing._issue_batch
    calls = []

    def dies_on_the_second_batch(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(invoicing, "_issue_batch", dies_on_the_second_batch)
    with pytest.raises(Killed):
        invoice_month(year=2025, month=3, batch_size=2)
    assert Invoice.objects.count() == 2
    monkeypatch.setattr(invoicing, "_issue_batch", real)
    run = invoice_month(year=2025, month=3, batch_size=2)
    assert (run.issued, run.already) == (3, 2)
    assert Invoice.objects.count() == 5
    assert all(i.lines.count() == 2 for i in Invoice.objects.all())


def test_it_leaves_no_invoice_without_lines_when_killed_inside_a_batch(
    db: None,
    monkeypatch: Any,
) -> None:
    facilities = gfc_like(4)
    for facility in facilities:
        deliver(facility, nbytes=GB, at=local(date(2025, 3, 2)))
    real = InvoiceLine.objects.bulk_create
    calls = []

    def dies_on_the_second_batch(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # the batch's invoices are inserted, its lines not yet
        return real(*args, **kwargs)

    monkeypatch.setattr(InvoiceLine.objects, "bulk_create", dies_on_the_second_batch)
    with pytest.raises(Killed):
        invoice_month(year=2025, month=3, batch_size=2)
    assert Invoice.objects.count() == 2
    monkeypatch.setattr(InvoiceLine.objects, "bulk_create", real)
    assert invoice_month(year=2025, month=3, batch_size=2).issued == 2
    assert sorted(i.lines.count() for i in Invoice.objects.all()) == [2, 2, 2, 2]


@pytest.mark.django_db(transaction=True)
def test_it_issues_each_invoice_once_with_two_workers_at_once() -> None:
    facilities = gfc_like(9)
    for i, facility in enumerate(facilities):
        deliver(facility, nbytes=GB * (i + 1), at=local(date(2025, 3, 2)))
    barrier = threading.Barrier(2)
    runs: list[invoicing.InvoiceRun] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=10)
            runs.append(invoice_month(year=2025, month=3, batch_size=2))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(run.issued for run in runs) == 9
    assert Invoice.objects.count() == 9
    for invoice in Invoice.objects.all():
        assert list(invoice.lines.values_list("position", flat=True)) == [1, 2]
        assert invoice.total == sum(invoice.lines.values_list("amount", flat=True))


def test_it_emails_the_facility_admins_once(
    alice: User,
    bob: User,
    krmc: Facility,
    django_capture_on_commit_callbacks: Any,
) -> None:
    deliver(krmc, nbytes=GB, at=local(date(2025, 3, 2)))
    with django_capture_on_commit_callbacks(execute=True):
        invoice_month(year=2025, month=3)
    assert [m.to for m in mail.outbox] == [["alice@krmc.example"]]
    message = mail.outbox[0]
    invoice = Invoice.objects.get()
    assert "March 2025" in message.subject
    assert "USD 1.00" in message.body
    assert f"/facilities/krmc/billing/invoices/{invoice.uuid}/" in message.body
    with django_capture_on_commit_callbacks(execute=True):
        invoice_month(year=2025, month=3)
        assert invoices_notify(period=date(2025, 3, 1)) == 0
    assert len(mail.outbox) == 1


def test_it_keeps_an_issued_invoice_unchangeable(gfc: Facility) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    invoice = Invoice.objects.get()
    with pytest.raises(DatabaseError), transaction.atomic():
        Invoice.objects.filter(pk=invoice.pk).update(total=Decimal("0.01"))
    with pytest.raises(DatabaseError), transaction.atomic():
        InvoiceLine.objects.filter(invoice=invoice).update(amount=Decimal("0"))
    assert invoice_mark_paid(invoice=invoice) is True
    assert invoice_mark_paid(invoice=invoice) is False
    invoice.refresh_from_db()
    assert invoice.paid_at is not None and invoice.total == Decimal("1.00")


def test_it_corrects_with_credit_notes_never_more_than_the_total(
    gfc: Facility, operator: User
) -> None:
    deliver(gfc, nbytes=3 * GB, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    invoice = Invoice.objects.get()
    note = credit_note_issue(invoice=invoice, amount=Decimal("1.004"), reason="Test", by=operator)
    assert (note.number, note.amount, note.currency) == ("CN-2025-03-GFC-1", Decimal("1.00"), "USD")
    with pytest.raises(BillingError, match="At most USD 2.00"):
        credit_note_issue(invoice=invoice, amount=Decimal("2.01"), reason="Too much", by=operator)
    with pytest.raises(BillingError, match="why"):
        credit_note_issue(invoice=invoice, amount=Decimal("1"), reason=" ", by=operator)
    credit_note_issue(invoice=invoice, amount=Decimal("2.00"), reason="Rest", by=operator)
    assert CreditNote.objects.count() == 2
    with pytest.raises(DatabaseError), transaction.atomic():
        CreditNote.objects.filter(pk=note.pk).update(amount=Decimal("3"))
    invoice.refresh_from_db()
    assert invoice.total == Decimal("3.00")  # the invoice itself never changes


def test_the_command_invoices_a_month_and_then_nothing(gfc: Facility) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 2)))
    out = io.StringIO()
    call_command("invoice_month", "2025-03", stdout=out)
    call_command("invoice_month", "2025-03", stdout=out)
    assert out.getvalue().splitlines() == [
        "2025-03: 1 invoice(s) issued, 0 already issued, 0 facilities with nothing to invoice,"
        " 1 notified",
        "2025-03: 0 invoice(s) issued, 1 already issued, 0 facilities with nothing to invoice,"
        " 0 notified",
    ]


@pytest.mark.parametrize("bad", ["2025-3", "March", "2025-13", ""])
def test_the_command_refuses_a_bad_month(db: None, bad: str) -> None:
    with pytest.raises(CommandError):
        call_command("invoice_month", bad, stdout=io.StringIO())


def test_the_beat_task_invoices_last_month(gfc: Facility, monkeypatch: Any) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 31), 23, 30))
    monkeypatch.setattr(
        "django.utils.timezone.now", lambda: datetime(2025, 4, 1, 3, 15, tzinfo=DENVER)
    )
    assert invoice_previous_month.delay().get()["issued"] == 1
    assert invoice_previous_month.delay().get()["issued"] == 0
    assert Invoice.objects.get().period == date(2025, 3, 1)


def test_it_invoices_in_a_number_of_queries_that_does_not_grow_with_facilities(
    db: None,
) -> None:
    for i, facility in enumerate(gfc_like(4)):
        deliver(facility, nbytes=GB + i, at=local(date(2025, 3, 1 + i % 28)))
    for i, facility in enumerate(gfc_like(40, start=4)):
        deliver(facility, nbytes=GB + i, at=local(date(2025, 4, 1 + i % 28)))
    plan_default()
    with CaptureQueriesContext(connection) as few:
        assert invoice_month(year=2025, month=3).issued == 4
    with CaptureQueriesContext(connection) as many:
        assert invoice_month(year=2025, month=4).issued == 40
    assert len(few) == len(many) <= 20


def test_facilities_whose_slugs_differ_only_in_case_each_get_their_invoice(db: None) -> None:
    lower = Facility.objects.create(name="Abc Clinic", slug="abc")
    upper = Facility.objects.create(name="ABC Hospital", slug="ABC")
    for facility in (lower, upper):
        deliver(facility, nbytes=GB, at=local(date(2025, 3, 2)))

    run = invoice_month(year=2025, month=3)

    assert run.issued == 2
    numbers = dict(Invoice.objects.values_list("facility__slug", "number"))
    assert len(set(numbers.values())) == 2 and numbers["abc"] == "2025-03-ABC"
    assert InvoiceLine.objects.filter(invoice__facility=upper).exists()
    assert invoice_month(year=2025, month=3).issued == 0


def test_a_staff_member_who_issued_a_credit_note_is_kept_not_deleted(
    gfc: Facility, operator: User
) -> None:
    deliver(gfc, nbytes=3 * GB, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    credit_note_issue(invoice=Invoice.objects.get(), amount=Decimal("1"), reason="x", by=operator)
    # A clear refusal (deactivate them instead), not the immutability trigger's error.
    with pytest.raises(ProtectedError):
        operator.delete()
    assert CreditNote.objects.get().issued_by == operator


def test_the_admin_cannot_move_a_plan_into_an_invoiced_month(gfc: Facility) -> None:
    deliver(gfc, nbytes=GB, at=local(date(2025, 3, 3)))
    invoice_month(year=2025, month=3)
    row = PlanAssignment(facility=gfc, plan=subscription(), starts_on=date(2025, 3, 20))
    with pytest.raises(ValidationError, match="already invoiced"):
        row.clean()
    PlanAssignment(facility=gfc, plan=subscription("Later"), starts_on=date(2025, 4, 1)).clean()
