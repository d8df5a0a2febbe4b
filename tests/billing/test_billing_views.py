"""Billing pages: who may open them, and that what they show is what the rows say."""

from __future__ import annotations

import csv
import io
import re
import subprocess
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing.dashboard import this_month
from billing.invoicing import credit_note_issue, invoice_mark_paid, invoice_month
from billing.models import Invoice, UsageRecord
from billing.plans import bill_for, plan_assign, plan_default
from portal.models import Facility, Membership, User
from tests.billing.factories import deliver, gfc_like, local, make_study, subscription
from tests.helpers import client_for, require_peer

GB = 10**9


@pytest.fixture
def invoice(gfc: Facility) -> Invoice:
    deliver(gfc, nbytes=3 * GB, images=30, at=local(date(2025, 3, 2)), study=make_study(gfc))
    invoice_month(year=2025, month=3)
    return Invoice.objects.get(facility=gfc)


@pytest.fixture
def gfc_admin(gfc: Facility) -> User:
    user = User.objects.create_user(email="admin@gfc.example", password="x" * 12)
    Membership.objects.create(user=user, facility=gfc, role="admin")
    return user


# --- access ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("alice", 200),  # admin of Kalispell
        ("bob", 404),  # sender there
        ("carol", 404),  # reader there
        ("charlie", 404),  # outsider
        ("operator", 404),  # staff, but not an admin of the facility
        (None, 302),
    ],
)
def test_it_shows_the_facility_billing_page_to_its_admins_only(
    request: pytest.FixtureRequest, krmc: Facility, who: str | None, status: int
) -> None:
    user = request.getfixturevalue(who) if who else None
    response = client_for(user).get("/facilities/krmc/billing/")
    assert response.status_code == status


@pytest.mark.parametrize(
    ("who", "status"),
    [("gfc_admin", 200), ("operator", 200), ("charlie", 404), ("alice", 404), (None, 302)],
)
@pytest.mark.parametrize("suffix", ["", "pdf/"])
def test_it_shows_an_invoice_to_its_facilitys_admins_and_staff_only(
    request: pytest.FixtureRequest, invoice: Invoice, who: str | None, status: int, suffix: str
) -> None:
    user = request.getfixturevalue(who) if who else None
    response = client_for(user).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/{suffix}")
    assert response.status_code == status


def test_it_answers_404_for_an_invoice_under_another_facilitys_address(
    alice: User, invoice: Invoice
) -> None:
    # Alice administers Kalispell; the invoice is Great Falls'.
    response = client_for(alice).get(f"/facilities/krmc/billing/invoices/{invoice.uuid}/")
    assert response.status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "/billing/",
        "/billing/usage.csv?start=2025-03-01&end=2025-03-31",
        "/billing/invoices.csv?start=2025-03-01&end=2025-03-31",
    ],
)
@pytest.mark.parametrize(
    ("who", "status"), [("operator", 200), ("alice", 404), ("charlie", 404), (None, 302)]
)
def test_it_shows_the_dashboard_and_exports_to_staff_only(
    request: pytest.FixtureRequest, krmc: Facility, url: str, who: str | None, status: int
) -> None:
    user = request.getfixturevalue(who) if who else None
    assert client_for(user).get(url).status_code == status


# --- the facility page ----------------------------------------------------------------------------


def test_it_shows_the_plan_usage_against_the_allowance_and_the_estimate(
    alice: User, krmc: Facility
) -> None:
    period = this_month()
    plan_assign(facility=krmc, plan=subscription(included_gb="40"), starts_on=period)
    today = local(period)  # noon on the 1st: certainly in this month and not in the future
    deliver(krmc, nbytes=10 * GB, images=200, at=today, study=make_study(krmc))
    deliver(krmc, nbytes=2 * GB, images=40, at=today, study=make_study(krmc))
    bill = bill_for(facility=krmc, period=period)
    html = client_for(alice).get("/facilities/krmc/billing/").content.decode()
    assert "Monthly 40 GB" in html
    assert 'id="allowance" min="0" max="100" value="30"' in html  # 12 of 40 GB
    assert "12.000 of 40.000 GB" in html
    assert bill.total == Decimal("31.00")
    assert "<strong>USD 31.00</strong>" in html
    # Two studies by courier: 22.00; the estimate is the subscription fee.
    assert "USD 22.00 (2 discs at USD 11.00)" in html
    assert "you save" not in html  # this month a courier would have been cheaper: no boast


def test_it_shows_what_a_courier_would_have_cost_next_to_each_invoice(
    gfc_admin: User, invoice: Invoice
) -> None:
    credit_note_issue(invoice=invoice, amount=Decimal("1.00"), reason="Goodwill", by=None)
    html = client_for(gfc_admin).get("/facilities/gfc/billing/").content.decode()
    assert invoice.number in html
    assert "USD 3.00" in html and "USD 11.00" in html
    assert "saved USD 9.00" in html  # 11.00 by courier, 2.00 paid after the credit note


# --- the invoice ----------------------------------------------------------------------------------


def test_it_shows_the_invoice_lines_and_credit_notes(gfc_admin: User, invoice: Invoice) -> None:
    credit_note_issue(invoice=invoice, amount=Decimal("0.50"), reason="Late delivery", by=None)
    html = (
        client_for(gfc_admin)
        .get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/")
        .content.decode()
    )
    for line in invoice.lines.all():
        assert line.description in html
    assert 'id="total">USD 3.00' in html
    assert 'id="balance">USD 2.50' in html
    assert "Late delivery" in html


def _check_pdf_structure(body: bytes) -> None:
    """The cross-reference table points at every object: what a reader relies on."""
    assert body.startswith(b"%PDF-1.4") and body.rstrip().endswith(b"%%EOF")
    startxref = int(re.search(rb"startxref\n(\d+)\n", body)[1])  # type: ignore[index]
    assert body[startxref:].startswith(b"xref\n")
    entries = re.findall(rb"(\d{10}) 00000 n ", body[startxref:])
    for number, offset in enumerate(entries, start=1):
        assert body[int(offset) :].startswith(b"%d 0 obj" % number)


def test_it_downloads_the_invoice_as_a_pdf(gfc_admin: User, invoice: Invoice) -> None:
    response = client_for(gfc_admin).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/pdf/")
    assert response["Content-Type"] == "application/pdf"
    assert "invoice-2025-03-GFC.pdf" in response["Content-Disposition"]
    _check_pdf_structure(response.content)
    assert b"(Invoice 2025-03-GFC) Tj" in response.content
    assert b"(USD 3.00) Tj" in response.content


@pytest.mark.peer
def test_ghostscript_reads_the_invoice_pdf(
    gfc_admin: User, invoice: Invoice, tmp_path: Any
) -> None:
    gs = require_peer("gs")
    path = tmp_path / "invoice.pdf"
    path.write_bytes(
        client_for(gfc_admin).get(f"/facilities/gfc/billing/invoices/{invoice.uuid}/pdf/").content
    )
    text = subprocess.run(
        [gs, "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite", "-sOutputFile=-", path],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout.decode("latin-1")
    assert "Invoice 2025-03-GFC" in text
    assert "Great Falls Clinic" in text
    assert "USD 3.00" in text


def test_it_writes_a_pdf_of_many_lines_on_several_pages(db: None) -> None:
    from billing.pdf import Document

    doc = Document()
    for i in range(200):
        doc.text(f"Line {i} (with parentheses) and a backslash \\ and café")
    body = doc.render()
    _check_pdf_structure(body)
    assert body.count(b"/Type /Page ") > 1
    assert b"\\(with parentheses\\)" in body and b"caf\\351" in body


# --- the staff dashboard --------------------------------------------------------------------------


@pytest.fixture
def months_of_usage(krmc: Facility, gfc: Facility) -> list[Facility]:
    """Usage in January to March 2025 at three facilities; January and February invoiced."""
    third = Facility.objects.create(name="St. Luke", slug="stluke")
    plan_assign(facility=gfc, plan=subscription(included_gb="1"), starts_on=date(2025, 1, 1))
    sizes = {krmc: 3 * GB, gfc: 2 * GB + 500_000_000, third: GB // 4}
    for month in (1, 2, 3):
        for facility, size in sizes.items():
            for day in (1, 15, 28):
                deliver(
                    facility,
                    nbytes=size + day,
                    images=day,
                    at=local(date(2025, month, day), 23, 30),
                    study=make_study(facility),
                )
    invoice_month(year=2025, month=1)
    invoice_month(year=2025, month=2)
    january = Invoice.objects.get(facility=krmc, period=date(2025, 1, 1))
    credit_note_issue(invoice=january, amount=Decimal("2.00"), reason="Outage", by=None)
    invoice_mark_paid(invoice=Invoice.objects.get(facility=gfc, period=date(2025, 1, 1)))
    return [krmc, gfc, third]


def test_the_dashboard_figures_match_the_rows(
    operator: User, months_of_usage: list[Facility]
) -> None:
    from billing.dashboard import dashboard_data

    data = dashboard_data(month=date(2025, 3, 1), months=3)
    by_month = {m.period: m for m in data.months}
    for month in (1, 2, 3):
        first = date(2025, month, 1)
        rows = UsageRecord.objects.filter(day__gte=first, day__lt=first + timedelta(days=31))
        rows = rows.filter(day__month=month)
        assert by_month[first].bytes == sum(rows.values_list("bytes", flat=True))
        invoices = Invoice.objects.filter(period=first)
        credited = sum((n.amount for i in invoices for n in i.credit_notes.all()), Decimal("0"))
        assert by_month[first].revenue == sum(i.total for i in invoices) - credited
    assert by_month[date(2025, 1, 1)].credited == Decimal("2.00")
    assert by_month[date(2025, 3, 1)].invoiced == 0  # March not invoiced yet

    march = UsageRecord.objects.filter(day__gte=date(2025, 3, 1), day__lt=date(2025, 4, 1))
    expected_top = sorted(
        (
            (
                sum(march.filter(facility=f).values_list("bytes", flat=True)),
                f.name,
                march.filter(facility=f).count(),
            )
            for f in months_of_usage
        ),
        reverse=True,
    )
    assert [(t.bytes, t.name, t.records) for t in data.top] == expected_top
    assert all(t.studies == 3 for t in data.top)

    # Great Falls has 1 GB included and took 3 x 2.5 GB in March.
    assert [(o.slug, o.bill.overage_bytes) for o in data.over] == [
        ("gfc", sum(march.filter(facility__slug="gfc").values_list("bytes", flat=True)) - GB)
    ]

    unpaid = Invoice.objects.filter(paid_at__isnull=True)
    expected_due = sum(i.total for i in unpaid) - Decimal("2.00")
    assert [(s["currency"], s["n"], s["due"]) for s in data.unpaid_summary] == [
        ("USD", unpaid.count(), expected_due)
    ]
    assert {i.number for i in data.unpaid} == set(unpaid.values_list("number", flat=True))


def test_the_dashboard_page_draws_the_charts_and_tables(
    operator: User, months_of_usage: list[Facility]
) -> None:
    html = client_for(operator).get("/billing/?month=2025-03").content.decode()
    assert html.count('<svg class="chart"') == 2
    january = sum(UsageRecord.objects.filter(day__month=1).values_list("bytes", flat=True))
    assert f"January 2025: {Decimal(january) / GB:,.3f} GB" in html
    assert "Great Falls Clinic" in html and "St. Luke" in html
    assert 'id="over"' in html and "/facilities/gfc/billing/" in html


def test_the_dashboard_estimates_the_month_still_running(operator: User, gfc: Facility) -> None:
    deliver(gfc, nbytes=4 * GB, at=local(this_month()))
    html = client_for(operator).get("/billing/").content.decode()
    assert f"{this_month():%B %Y}: USD 4.00 (estimate so far)" in html


def test_the_dashboard_makes_the_same_number_of_queries_for_any_number_of_facilities(
    operator: User,
) -> None:
    plan = subscription(included_gb="1")
    client = client_for(operator)
    counts = []
    for start, count in ((0, 3), (3, 30)):
        for i, facility in enumerate(gfc_like(count, start=start)):
            plan_assign(facility=facility, plan=plan, starts_on=date(2025, 1, 1))
            deliver(
                facility, nbytes=2 * GB + i, at=local(date(2025, 2, 3)), study=make_study(facility)
            )
            deliver(
                facility, nbytes=2 * GB + i, at=local(date(2025, 3, 3)), study=make_study(facility)
            )
        Invoice.objects.filter(period=date(2025, 2, 1)).exists() or invoice_month(
            year=2025, month=2
        )
        plan_default()
        client.get("/billing/?month=2025-03")  # the session and the user are fetched once
        with CaptureQueriesContext(connection) as queries:
            response = client.get("/billing/?month=2025-03")
        assert response.status_code == 200
        counts.append(len(queries))
        html = response.content.decode()
        assert html.count('href="/facilities/f') >= min(start + count, 10)
    assert counts[0] == counts[1] <= 18, counts


# --- CSV exports ----------------------------------------------------------------------------------


def _csv(client: Client, url: str) -> list[dict[str, str]]:
    response = client.get(url)
    assert response.status_code == 200
    body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    return list(csv.DictReader(io.StringIO(body)))


def test_the_invoice_csv_matches_the_invoices(
    operator: User, months_of_usage: list[Facility]
) -> None:
    rows = _csv(client_for(operator), "/billing/invoices.csv?start=2025-01-01&end=2025-02-28")
    invoices = Invoice.objects.order_by("period", "number")
    assert [r["number"] for r in rows] == [i.number for i in invoices]
    for row, invoice in zip(rows, invoices, strict=True):
        credited = sum((n.amount for n in invoice.credit_notes.all()), Decimal("0"))
        assert Decimal(row["total"]) == invoice.total
        assert Decimal(row["credited"]) == credited
        assert Decimal(row["balance"]) == invoice.total - credited
        assert (row["facility"], row["period"], row["currency"]) == (
            invoice.facility.slug,
            f"{invoice.period:%Y-%m}",
            invoice.currency,
        )
        assert int(row["bytes"]) == invoice.bytes and int(row["studies"]) == invoice.studies
        assert bool(row["paid_at"]) == (invoice.paid_at is not None)
    only_february = _csv(
        client_for(operator), "/billing/invoices.csv?start=2025-02-10&end=2025-02-11"
    )
    assert {r["period"] for r in only_february} == {"2025-02"}


def test_the_usage_csv_matches_the_usage_rows(
    operator: User, months_of_usage: list[Facility]
) -> None:
    rows = _csv(client_for(operator), "/billing/usage.csv?start=2025-01-15&end=2025-02-15")
    records = UsageRecord.objects.filter(
        day__gte=date(2025, 1, 15), day__lte=date(2025, 2, 15)
    ).order_by("day", "at", "pk")
    assert [r["key"] for r in rows] == [r.key for r in records]
    assert sum(int(r["bytes"]) for r in rows) == sum(r.bytes for r in records)
    # 23:30 local on the 15th: written as local time with its offset, on that billing day.
    assert rows[0]["day"] == "2025-01-15" and rows[0]["at"].startswith("2025-01-15T23:30:00-07")


@pytest.mark.parametrize(
    "query", ["", "?start=2025-03-01", "?start=2025-03-31&end=2025-03-01", "?start=x&end=y"]
)
def test_the_exports_refuse_a_bad_period(operator: User, query: str) -> None:
    for url in ("/billing/usage.csv", "/billing/invoices.csv"):
        assert client_for(operator).get(url + query).status_code == 400


def test_it_lists_billings_models_in_the_admin(operator: User) -> None:
    operator.is_superuser = True
    operator.save()
    html = client_for(operator).get("/admin/billing/").content.decode()
    for name in ("Plans", "Plan assignments", "Invoices", "Credit notes", "Usage records"):
        assert name in html
