"""What an accounts-payable clerk checks on an invoice, on its page and in its PDF: who issued
it (name, address, tax id), who pays it (the facility's billing address), its number, issue and
due dates and payment terms, money in its currency with two decimals, and correct plurals."""

from __future__ import annotations

import subprocess
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.conf import billing_tz
from billing.invoicing import invoice_month
from billing.models import Invoice
from billing.plans import plan_assign
from portal.models import Facility, Membership, User
from tests.billing.factories import deliver, local, make_study, per_gb
from tests.helpers import client_for, require_peer

GB = 10**9


@pytest.fixture(autouse=True)
def _seller(settings: Any) -> None:
    settings.RELAY_SELLER_NAME = "Relay Imaging LLC"
    # A literal backslash-n, as a .env file holds a multi-line value.
    settings.RELAY_SELLER_ADDRESS = "100 Last Chance Gulch\\nHelena, MT 59601"
    settings.RELAY_SELLER_TAX_ID = "EIN 12-3456789"
    settings.RELAY_PAYMENT_TERMS_DAYS = 30


@pytest.fixture
def gfc_admin(gfc: Facility) -> User:
    gfc.billing_address = "Accounts Payable\n1101 26th Street South\nGreat Falls, MT 59405"
    gfc.save()
    user = User.objects.create_user(email="admin@gfc.example", password="x" * 12)
    Membership.objects.create(user=user, facility=gfc, role="admin")
    return user


@pytest.fixture
def invoice(gfc: Facility, gfc_admin: User) -> Invoice:
    """One study of 3 GB in March 2025, on a plan whose price is stored with four decimals."""
    plan_assign(facility=gfc, plan=per_gb(price="1.5000"), starts_on=date(2025, 3, 1))
    deliver(gfc, nbytes=3 * GB, images=30, at=local(date(2025, 3, 2)), study=make_study(gfc))
    invoice_month(year=2025, month=3)
    return Invoice.objects.get(facility=gfc)


def _day(day: date) -> str:
    return f"{day:%B} {day.day}, {day.year}"


def _dates(invoice: Invoice) -> tuple[str, str]:
    issued = invoice.issued_at.astimezone(billing_tz()).date()
    return _day(issued), _day(issued + timedelta(days=30))


def _pdf_text(user: User, invoice: Invoice, tmp_path: Path) -> str:
    gs = require_peer("gs")
    path = tmp_path / "invoice.pdf"
    response = client_for(user).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/pdf/")
    path.write_bytes(response.content)
    return subprocess.run(
        [gs, "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite", "-sOutputFile=-", path],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout.decode("latin-1")


def _assert_what_a_clerk_needs(text: str, invoice: Invoice) -> None:
    issued, due = _dates(invoice)
    for expected in (
        "Relay Imaging LLC",
        "100 Last Chance Gulch",
        "Helena, MT 59601",
        "Tax ID: EIN 12-3456789",
        "Invoice number",
        "2025-03-GFC",
        f"Invoice date: {issued}" if "Invoice date:" in text else issued,
        due,
        "Net 30: payment due within 30 days of the invoice date",
        "Bill to",
        "Great Falls Clinic",
        "1101 26th Street South",
        "Great Falls, MT 59405",
        "USD 1.50",  # the unit price, stored as 1.5000
        "USD 4.50",  # 3 GB at 1.50
        "1 study",
    ):
        assert expected in text, expected
    assert "1.5000" not in text
    assert "1 studies" not in text
    assert "1 transfers" not in text


def test_it_shows_seller_buyer_dates_and_terms_on_the_invoice_page(
    gfc_admin: User, invoice: Invoice
) -> None:
    html = client_for(gfc_admin).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/").content
    text = html.decode()
    _assert_what_a_clerk_needs(text, invoice)
    issued, due = _dates(invoice)
    assert f'id="due">{due}<' in text
    assert f'id="issued">{issued}<' in text
    assert 'id="total">USD 4.50<' in text


@pytest.mark.peer
def test_it_prints_seller_buyer_dates_and_terms_in_the_pdf(
    gfc_admin: User, invoice: Invoice, tmp_path: Path
) -> None:
    text = _pdf_text(gfc_admin, invoice, tmp_path)
    _assert_what_a_clerk_needs(text, invoice)
    issued, due = _dates(invoice)
    assert f"Invoice date: {issued}" in text
    assert f"Due date: {due}" in text


def test_it_counts_two_studies_in_the_plural(gfc_admin: User, gfc: Facility) -> None:
    for day in (2, 3):
        deliver(gfc, nbytes=GB, images=1, at=local(date(2025, 3, day)), study=make_study(gfc))
    invoice_month(year=2025, month=3)
    invoice = Invoice.objects.get(facility=gfc)
    text = client_for(gfc_admin).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/").content
    assert "2 studies" in text.decode()
    assert "2 transfers, 2 images" in text.decode()


def test_it_states_due_on_receipt_without_payment_terms(
    settings: Any, gfc_admin: User, invoice: Invoice
) -> None:
    settings.RELAY_PAYMENT_TERMS_DAYS = 0
    text = client_for(gfc_admin).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/").content
    issued, _ = _dates(invoice)
    assert "Due on receipt." in text.decode()
    assert f'id="due">{issued}<' in text.decode()


def test_the_facility_page_prints_a_four_decimal_price_with_two(
    gfc_admin: User, gfc: Facility
) -> None:
    plan_assign(facility=gfc, plan=per_gb(price="1.5000"), starts_on=date(2025, 3, 1))
    text = client_for(gfc_admin).get("/facilities/gfc/billing/").content.decode()
    assert "USD 1.50 per GB" in text
    assert "1.5000" not in text


def test_it_keeps_the_digits_of_a_price_below_a_cent() -> None:
    # Rounding 0.0125 a image to 0.01 would make quantity x price disagree with the amount.
    from billing.money import format_money, format_price

    assert format_price(Decimal("0.0125"), "USD") == "USD 0.0125"
    assert format_price(Decimal("0.0100"), "USD") == "USD 0.01"
    assert format_price(Decimal("1234.5000"), "EUR") == "EUR 1,234.50"
    assert format_money(Decimal("-2.505"), "USD") == "-USD 2.51"


def test_large_quantities_carry_thousands_separators() -> None:
    """The journeys found '123450 images' on an invoice."""
    from decimal import Decimal

    from billing.documents import quantity_text

    assert quantity_text(Decimal("123450"), "images") == "123,450 images"
    assert quantity_text(Decimal("1"), "images") == "1 image"
    assert quantity_text(Decimal("1234.5"), "GB") == "1,234.5 GB"
