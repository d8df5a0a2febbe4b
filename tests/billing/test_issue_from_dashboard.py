"""The operator issues a month's invoices from the dashboard (before, only beat on the 1st or
`manage.py invoice_month` could): staff only, the password asked again, safe to press twice,
and an open month refused."""

from __future__ import annotations

from datetime import date

import pytest
from django.utils import timezone

from billing.models import Invoice
from portal.models import Facility, User
from tests.billing.factories import deliver, local, make_study
from tests.helpers import client_for, sign_in_age

pytestmark = pytest.mark.django_db

GB = 10**9


@pytest.fixture
def march_usage(krmc: Facility, gfc: Facility) -> None:
    for facility in (krmc, gfc):
        deliver(
            facility,
            nbytes=3 * GB,
            images=30,
            at=local(date(2025, 3, 2)),
            study=make_study(facility),
        )


def test_the_operator_issues_a_months_invoices_once(operator: User, march_usage: None) -> None:
    client = client_for(operator)
    page = client.get("/billing/?month=2025-03").content.decode()
    assert "Issue invoices for March 2025" in page
    assert "Not issued yet" in page

    response = client.post("/billing/invoices/issue/", {"month": "2025-03"}, follow=True)
    assert response.status_code == 200
    html = response.content.decode()
    assert "March 2025: 2 invoices issued, 0 already issued" in html
    assert Invoice.objects.filter(period=date(2025, 3, 1)).count() == 2
    assert "2 invoices issued for March 2025" in html

    again = client.post("/billing/invoices/issue/", {"month": "2025-03"}, follow=True)
    assert "0 invoices issued, 2 already issued" in again.content.decode()
    assert Invoice.objects.filter(period=date(2025, 3, 1)).count() == 2


def test_it_refuses_a_month_that_has_not_ended(operator: User, march_usage: None) -> None:
    this_month = timezone.localdate().replace(day=1)
    response = client_for(operator).post(
        "/billing/invoices/issue/", {"month": f"{this_month:%Y-%m}"}, follow=True
    )
    assert "No invoices issued" in response.content.decode()
    assert "has not ended yet" in response.content.decode()
    assert not Invoice.objects.filter(period=this_month).exists()


@pytest.mark.parametrize("who", ["alice", "bob", "charlie"])
def test_nobody_but_staff_issues_invoices(request, who: str, march_usage: None) -> None:
    user = request.getfixturevalue(who)
    response = client_for(user).post("/billing/invoices/issue/", {"month": "2025-03"})
    assert response.status_code == 404
    assert not Invoice.objects.exists()


def test_it_asks_for_the_password_again_after_a_while(operator: User, march_usage: None) -> None:
    client = client_for(operator)
    # Signed in (with the second factor) an hour ago, not confirmed since.
    sign_in_age(client, 3600)
    response = client.post("/billing/invoices/issue/", {"month": "2025-03"})
    assert response.status_code == 302
    assert "reauthenticate" in response["Location"]
    assert not Invoice.objects.exists()
