"""Staff in the admin: plans are edited, invoices only viewed and marked paid, credit notes
added through the service."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from billing.invoicing import invoice_month
from billing.models import CreditNote, Invoice, Plan
from portal.models import Facility, User
from tests.billing.factories import deliver, local
from tests.helpers import client_for


@pytest.fixture
def superuser(operator: User) -> User:
    operator.is_superuser = True
    operator.save()
    return operator


@pytest.fixture
def invoice(gfc: Facility) -> Invoice:
    deliver(gfc, nbytes=3 * 10**9, at=local(date(2025, 3, 2)))
    invoice_month(year=2025, month=3)
    return Invoice.objects.get()


def test_it_lets_staff_edit_a_plans_prices(superuser: User) -> None:
    response = client_for(superuser).post(
        "/admin/billing/plan/add/",
        {
            "name": "Monthly 40 GB",
            "kind": "subscription",
            "currency": "USD",
            "price_per_image": "0",
            "price_per_gb": "0",
            "monthly_fee": "29.00",
            "included_gb": "40",
            "overage_per_gb": "0.75",
        },
    )
    assert response.status_code == 302
    assert Plan.objects.get(name="Monthly 40 GB").monthly_fee == Decimal("29.00")


def test_it_shows_an_invoice_read_only(superuser: User, invoice: Invoice) -> None:
    client = client_for(superuser)
    url = f"/admin/billing/invoice/{invoice.pk}/change/"
    assert client.get(url).status_code == 200
    assert client.post(url, {"total": "0.01"}).status_code == 403
    invoice.refresh_from_db()
    assert invoice.total == Decimal("3.00")


def test_it_marks_invoices_paid_from_the_list(superuser: User, invoice: Invoice) -> None:
    client_for(superuser).post(
        "/admin/billing/invoice/",
        {"action": "mark_paid", "_selected_action": [invoice.pk]},
    )
    invoice.refresh_from_db()
    assert invoice.paid_at is not None


def test_it_adds_a_credit_note_and_refuses_more_than_is_left(
    superuser: User, invoice: Invoice
) -> None:
    client = client_for(superuser)
    ok = client.post(
        "/admin/billing/creditnote/add/",
        {"invoice": invoice.pk, "amount": "1.25", "reason": "Outage on the 3rd"},
    )
    assert ok.status_code == 302
    note = CreditNote.objects.get()
    assert (note.number, note.amount, note.issued_by) == (
        "CN-2025-03-GFC-1",
        Decimal("1.25"),
        superuser,
    )
    refused = client.post(
        "/admin/billing/creditnote/add/",
        {"invoice": invoice.pk, "amount": "1.76", "reason": "Too much"},
    )
    assert refused.status_code == 200
    assert "At most USD 1.75" in refused.content.decode()
    assert CreditNote.objects.count() == 1
