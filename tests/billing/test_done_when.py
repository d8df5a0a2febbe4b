"""The issue's "done when", on the demo's shape: Kalispell shares, Great Falls views, downloads,
and pays; the month is invoiced once; the operator's dashboard and CSV agree.

The viewer and the ZIP download announce their deliveries exactly as below (the seam
`transfers.deliveries`; tests/billing/test_wiring.py goes through the real views); here the
announcements are made directly.
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from django.core import mail
from django.core.management import call_command

from billing.dashboard import this_month
from billing.models import Invoice, UsageRecord
from billing.plans import plan_default
from portal.models import Facility, Membership, User
from tests.billing.factories import announce, make_share
from tests.helpers import client_for
from transfers.deliveries import DeliveryKind
from transfers.models import ShareKind, Study


def test_it_meters_bills_and_invoices_a_shared_study_once(
    krmc: Facility,
    gfc: Facility,
    bob: User,
    study: Study,
    operator: User,
    django_capture_on_commit_callbacks: object,
) -> None:
    reader = User.objects.create_user(email="reader@gfc.example", password="x" * 12)
    admin = User.objects.create_user(email="admin@gfc.example", password="x" * 12)
    Membership.objects.create(user=reader, facility=gfc, role="reader")
    Membership.objects.create(user=admin, facility=gfc, role="admin")
    share = make_share(
        study, by=bob, kind=ShareKind.FACILITY, recipient_facility=gfc, can_download=True
    )

    # The reader views 12 frames (frame 2 twice: its cache expired), then downloads the ZIP twice.
    for frame in [*range(12), 2]:
        announce(
            share,
            user=reader,
            study=study,
            kind=DeliveryKind.VIEWER,
            nbytes=524_288,
            images=1,
            key_parts=(share.uuid, reader.pk, f"1.2.3.{frame}", 0),
        )
    for _ in range(2):
        announce(
            share,
            user=reader,
            study=study,
            kind=DeliveryKind.ZIP,
            nbytes=200_000_000,
            images=12,
            key_parts=(share.uuid, reader.pk, study.uuid, 12, 200_000_000),
        )
    assert UsageRecord.objects.filter(facility=gfc).count() == 13
    total_bytes = 12 * 524_288 + 200_000_000

    # The Great Falls admin sees the usage and the estimated bill (default plan: 1.00 per GB).
    html = client_for(admin).get("/facilities/gfc/billing/").content.decode()
    assert f"{Decimal(total_bytes) / 10**9:.3f} GB, 24 images, 1 study" in html
    assert "<strong>USD 0.21</strong>" in html
    assert "you save USD 10.79" in html  # one courier CD would have cost 11.00

    # invoice_month for the current month issues Great Falls' invoice; a second run none.
    out = io.StringIO()
    with django_capture_on_commit_callbacks(execute=True):  # type: ignore[operator]
        call_command("invoice_month", f"{this_month():%Y-%m}", "--allow-open-month", stdout=out)
        call_command("invoice_month", f"{this_month():%Y-%m}", "--allow-open-month", stdout=out)
    first, second = out.getvalue().splitlines()
    assert first.startswith(f"{this_month():%Y-%m}: 1 invoice(s) issued")
    assert second.startswith(f"{this_month():%Y-%m}: 0 invoice(s) issued, 1 already issued")
    invoice = Invoice.objects.get()
    assert (invoice.facility, invoice.total, invoice.bytes) == (gfc, Decimal("0.21"), total_bytes)
    assert [m.to for m in mail.outbox] == [["admin@gfc.example"]]

    # The operator's dashboard draws its charts; the invoice CSV matches the invoice.
    plan_default()
    staff = client_for(operator)
    assert staff.get("/billing/").content.decode().count('<svg class="chart"') == 2
    first_day = this_month()
    response = staff.get(f"/billing/invoices.csv?start={first_day}&end={first_day}")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(r["number"], r["total"], r["bytes"]) for r in rows] == [
        (invoice.number, "0.21", str(total_bytes))
    ]
