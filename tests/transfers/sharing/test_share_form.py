"""The share form: one kind of recipient at a time, errors beside their field, the import right
on for a facility with a PACS, a message that must not identify the patient; and the study page
that leads with Share."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from portal.models import Facility
from tests.helpers import client_for, read_testdata, upload
from transfers.models import PacsDestination, Share, Study, StudyStatus

pytestmark = pytest.mark.django_db

FIELDS = {"recipient_facility", "recipient_email", "second_factor", "pin", "can_import"}


@pytest.fixture
def study(client, bob_token) -> Study:
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


@pytest.fixture
def helena(db: None) -> Facility:
    """A listed facility without a PACS."""
    return Facility.objects.create(name="Helena Imaging", slug="helena", listed=True)


def _page(bob: Any, study: Study, **params: str) -> str:
    response = client_for(bob).get("/share/", {"study": str(study.uuid), **params})
    assert response.status_code == 200
    return response.content.decode()


def _named(page: str) -> set[str]:
    return set(re.findall(r'name="([a-z_]+)"', page)) & FIELDS


def _block(page: str, name: str) -> str:
    """The markup of one field: its label, control, help and errors."""
    match = re.search(rf'<div class="field[^"]*" id="field-{name}">(.*?)</div>', page, re.S)
    assert match, f"no field block for {name}"
    return match.group(1)


def _post(bob: Any, study: Study, **fields: Any) -> Any:
    data = {
        "study": [str(study.uuid)],
        "expires_on": (timezone.localdate() + timedelta(days=10)).isoformat(),
        "can_view": "on",
        **fields,
    }
    return client_for(bob).post("/share/", data)


def test_it_asks_who_to_share_with_before_any_recipient_field(bob, study, gfc):
    page = _page(bob, study)
    assert _named(page) == set()
    for to, label in [
        ("facility", "A facility"),
        ("physician", "A physician or colleague (by e-mail)"),
        ("patient", "The patient"),
    ]:
        assert f"to={to}" in page and label in page


@pytest.mark.parametrize(
    ("to", "shown"),
    [
        ("facility", {"recipient_facility", "can_import"}),
        ("physician", {"recipient_email", "can_import"}),
        ("patient", {"recipient_email", "second_factor", "pin"}),
    ],
)
def test_it_shows_only_the_chosen_kinds_fields(bob, study, gfc, to, shown):
    page = _page(bob, study, to=to)
    assert _named(page) == shown
    assert f'<input type="hidden" name="kind" value="{to}"' in page
    assert 'aria-current="page"' in page


def test_a_facility_with_a_pacs_is_marked_and_the_import_right_is_on(bob, study, gfc, helena):
    PacsDestination.objects.create(facility=helena, name="PACS", ae_title="HEL", host="h", port=104)
    helena.refresh_from_db()
    gfc.has_pacs = False
    gfc.save()
    page = _page(bob, study, to="facility")
    assert re.search(
        rf'data-has-pacs="true"[^>]*value="{helena.pk}"|value="{helena.pk}"[^>]*data-has-pacs="true"',
        page,
    )
    assert re.search(
        rf'data-has-pacs="false"[^>]*value="{gfc.pk}"|value="{gfc.pk}"[^>]*data-has-pacs="false"',
        page,
    )
    assert re.search(r'name="can_import"[^>]*checked', _block(page, "can_import"))


def test_the_import_right_is_off_when_no_facility_has_a_pacs(bob, study, gfc, helena):
    Facility.objects.update(has_pacs=False)
    block = _block(_page(bob, study, to="facility"), "can_import")
    assert 'name="can_import"' in block and "checked" not in block


def test_the_message_field_warns_that_it_is_emailed(bob, study, gfc):
    block = _block(_page(bob, study, to="facility"), "message")
    assert "This message is e-mailed to the recipient." in block
    assert "Do not include the patient&#x27;s name, ID or birth date." in block


def test_a_message_that_names_the_patient_is_refused_beside_the_message(
    bob, study, gfc, mailoutbox
):
    response = _post(
        bob, study, kind="facility", recipient_facility=gfc.pk, message="CT of compressedsamples"
    )
    assert response.status_code == 200
    page = response.content.decode()
    block = _block(page, "message")
    assert "must not identify the patient: it contains the patient&#x27;s name" in block
    assert 'aria-invalid="true"' in block
    assert not Share.objects.exists() and mailoutbox == []


@pytest.mark.parametrize(
    ("fields", "where", "error"),
    [
        ({"kind": "facility"}, "recipient_facility", "Choose the facility"),
        ({"kind": "facility", "recipient_facility": "own"}, "recipient_facility", "from the list"),
        ({"kind": "physician"}, "recipient_email", "not a valid e-mail"),
        ({"kind": "physician", "recipient_email": "x@"}, "recipient_email", "valid email"),
        (
            {"kind": "patient", "second_factor": "pin", "pin": "123456"},
            "pin",
            "too easy to guess",
        ),
        ({"kind": "patient"}, "second_factor", "Choose the patient"),
        (
            {"kind": "facility", "recipient_facility": "gfc", "expires_on": "past"},
            "expires_on",
            "in the future",
        ),
        (
            {"kind": "facility", "recipient_facility": "gfc", "can_view": ""},
            "permissions",
            "at least one thing",
        ),
    ],
)
def test_a_refusal_is_shown_beside_its_field(bob, study, gfc, krmc, fields, where, error):
    if fields.get("recipient_facility") == "own":
        fields["recipient_facility"] = krmc.pk
    elif fields.get("recipient_facility") == "gfc":
        fields["recipient_facility"] = gfc.pk
    if fields.get("expires_on") == "past":
        fields["expires_on"] = (timezone.localdate() - timedelta(days=1)).isoformat()
    response = _post(bob, study, **fields)
    assert response.status_code == 200
    page = response.content.decode()
    assert error in _block(page, where)
    assert 'class="errorlist' not in page  # no raw list of field names at the top
    assert not Share.objects.exists()


def test_a_refused_form_keeps_the_chosen_kind(bob, study, gfc):
    page = _post(bob, study, kind="patient").content.decode()
    assert _named(page) == {"recipient_email", "second_factor", "pin"}


def test_an_outsider_cannot_open_the_form(charlie, study):
    response = client_for(charlie).get("/share/", {"study": str(study.uuid), "to": "facility"})
    assert response.status_code == 404


def test_the_study_page_leads_with_share(bob, study):
    page = client_for(bob).get(f"/studies/{study.uuid}/").content.decode()
    actions = re.search(r'<div class="actions">(.*?)</div>', page, re.S).group(1)  # type: ignore[union-attr]
    buttons = re.findall(r'<(?:a|button)[^>]*class="([^"]*button[^"]*)"[^>]*>([^<]*)<', actions)
    assert buttons[0] == ("button primary", "Share")
    assert all("secondary" in classes for classes, _ in buttons[1:]) and len(buttons) > 2
