"""The facility's help-desk phone: its admin sets it on the members page; patient handouts
print it."""

from __future__ import annotations

import pytest

from portal.models import AuditAction, AuditEvent, Facility
from tests.helpers import client_for

pytestmark = pytest.mark.django_db

URL = "/facilities/krmc/security/"


def test_the_admin_sets_the_help_desk_phone_and_it_is_audited(alice, krmc):
    krmc.require_mfa = True
    krmc.save()
    page = client_for(alice).get("/facilities/krmc/members/").content.decode()
    assert 'name="help_desk_phone"' in page

    response = client_for(alice).post(URL, {"help_desk_phone": " +1 (406) 555-0142 "})

    assert response.status_code == 302
    krmc.refresh_from_db()
    assert krmc.help_desk_phone == "+1 (406) 555-0142"
    assert krmc.require_mfa  # the other setting on the page is left as it was
    change = AuditEvent.objects.get(action=AuditAction.FACILITY_CHANGE)
    assert change.actor == alice
    assert change.detail == {
        "before": {"help_desk_phone": ""},
        "after": {"help_desk_phone": "+1 (406) 555-0142"},
    }
    page = client_for(alice).get("/facilities/krmc/members/").content.decode()
    assert 'value="+1 (406) 555-0142"' in page


@pytest.mark.parametrize(
    ("phone", "why"),
    [
        ("call the front desk", "digits, spaces and + ( ) - . x"),
        ("12345", "7 to 30 characters"),
        ("+1 406 555 0142 " * 3, "at most 30 characters"),
    ],
)
def test_it_refuses_what_is_not_a_phone_number_in_words(alice, krmc, phone, why):
    page = client_for(alice).post(URL, {"help_desk_phone": phone}, follow=True)
    html = page.content.decode()
    assert "The help-desk phone was not saved." in html and why in html
    assert "errorlist" not in html
    assert Facility.objects.get(pk=krmc.pk).help_desk_phone == ""
    assert not AuditEvent.objects.filter(action=AuditAction.FACILITY_CHANGE).exists()


def test_it_can_be_cleared(alice, krmc):
    Facility.objects.filter(pk=krmc.pk).update(help_desk_phone="406-555-0142 x12")
    client_for(alice).post(URL, {"help_desk_phone": ""})
    assert Facility.objects.get(pk=krmc.pk).help_desk_phone == ""


def test_only_the_facilitys_admin_sets_it(bob, charlie, krmc):
    for user in (bob, charlie):  # a sender there; a sender elsewhere
        assert client_for(user).post(URL, {"help_desk_phone": "406 555 0142"}).status_code == 404
    assert Facility.objects.get(pk=krmc.pk).help_desk_phone == ""
