"""Errors in the PACS destination and routing rule forms read as sentences beside the field they
are about, not as Django's raw list of field names."""

from __future__ import annotations

import re

import pytest

from portal.models import Facility, User
from tests.helpers import client_for
from transfers.models import PacsDestination

pytestmark = pytest.mark.django_db

BAD = {"name": "Main PACS", "ae_title": "MAIN PACS WITH A LONG NAME", "host": "", "port": "70000"}


def _error_beside(html: str, field_id: str, text: str) -> bool:
    """The error text follows the field's input within its own block."""
    match = re.search(rf'id="{field_id}".*?</p>', html, re.S)
    return match is not None and text in match.group(0)


def test_adding_a_destination_shows_each_error_under_its_field(alice: User, krmc: Facility):
    response = client_for(alice).post("/facilities/krmc/dicom/destinations/", BAD)
    html = response.content.decode()
    assert response.status_code == 200
    assert 'class="errorlist"' not in html
    assert "<li>port" not in html and "<li>ae_title" not in html
    assert _error_beside(html, "id_port", "A port is 1 to 65535.")
    assert _error_beside(html, "id_host", "This field is required.")
    assert _error_beside(html, "id_ae_title", "16")
    assert html.count('role="alert"') == 1  # one summary at the top of the form
    assert "Not saved: correct what is marked below." in html
    assert not PacsDestination.objects.exists()


def test_editing_a_destination_shows_each_error_under_its_field(alice: User, krmc: Facility):
    destination = PacsDestination.objects.create(
        facility=krmc, name="Main", ae_title="MAIN", host="10.0.0.5", port=104
    )
    url = f"/facilities/krmc/dicom/destinations/{destination.uuid}/edit/"
    html = client_for(alice).post(url, {**BAD, "host": "10.0.0.5"}).content.decode()
    assert 'class="errorlist"' not in html
    assert _error_beside(html, "id_port", "A port is 1 to 65535.")
    assert html.count('role="alert"') == 1
    destination.refresh_from_db()
    assert destination.port == 104


def test_a_rule_without_one_recipient_says_so_at_the_top(alice: User, krmc: Facility):
    html = (
        client_for(alice).post("/facilities/krmc/dicom/rules/", {"modality": "CT"}).content.decode()
    )
    assert 'class="errorlist' not in html
    assert "Choose one recipient: a facility or an e-mail address." in html


def test_gateway_errors_sit_under_their_field(alice: User, krmc: Facility):
    html = (
        client_for(alice)
        .post("/facilities/krmc/dicom/gateway/", {"gateway_addresses": "not-an-address"})
        .content.decode()
    )
    assert 'class="errorlist"' not in html
    assert _error_beside(html, "id_gateway_addresses", "is not an IP address or network.")


def test_an_outsider_gets_no_form(charlie: User, krmc: Facility):
    response = client_for(charlie).post("/facilities/krmc/dicom/destinations/", BAD)
    assert response.status_code == 404
