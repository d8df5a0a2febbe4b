"""The sender's printable handout: a Print button, the facility's help-desk phone, and, once the
link has been shown, a plain way to re-issue it and print a new one."""

from __future__ import annotations

import pytest
from django.test import Client

from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Share, Study, StudyStatus
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate="19700101")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _patient_share(bob: User, study: Study, factor: str = "birth_date") -> tuple[Share, str]:
    extra = {"pin": "40917362"} if factor == "pin" else {}
    share, raw_token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor=factor,
        **extra,  # type: ignore[arg-type]
    )
    assert raw_token is not None
    return share, raw_token


def _handout_client(bob: User, share: Share, raw_token: str) -> Client:
    """Bob's browser right after making the share, as share_new leaves it."""
    client = client_for(bob)
    session = client.session
    session[f"patient_link_{share.uuid}"] = raw_token
    session.save()
    return client


def test_it_has_a_print_button_wired_by_a_module_not_inline_script(bob, study):
    share, raw_token = _patient_share(bob, study)
    html = _handout_client(bob, share, raw_token).get(f"/shares/{share.uuid}/handout/")
    page = html.content.decode()
    assert "data-print" in page and "Print the handout" in page
    assert '<script type="module" src="/static/js/print.js"' in page
    assert "onclick" not in page


def test_it_prints_the_help_desk_phone_of_the_facility(bob, study, krmc: Facility):
    krmc.help_desk_phone = "+1 (406) 555-0142"
    krmc.save()
    share, raw_token = _patient_share(bob, study)
    page = _handout_client(bob, share, raw_token).get(f"/shares/{share.uuid}/handout/")
    assert (
        "Questions? Call Kalispell Regional Medical Center at +1 (406) 555-0142"
        in page.content.decode()
    )


def test_it_prints_no_phone_line_when_the_facility_has_none(bob, study):
    share, raw_token = _patient_share(bob, study)
    page = _handout_client(bob, share, raw_token).get(f"/shares/{share.uuid}/handout/")
    assert "Questions? Call" not in page.content.decode()


def test_a_reloaded_handout_offers_to_reissue_and_print_a_new_one(bob, study):
    share, raw_token = _patient_share(bob, study)
    client = _handout_client(bob, share, raw_token)
    client.get(f"/shares/{share.uuid}/handout/")

    again = client.get(f"/shares/{share.uuid}/handout/").content.decode()
    assert raw_token not in again
    assert "shown only once" in again
    assert f'action="/shares/{share.uuid}/reissue/"' in again
    assert "Re-issue the link and print a new handout" in again
    assert "old link" in again and "stops working" in again
    assert "data-print" not in again  # nothing to print

    # The button: a new link on a new handout, and the one on the lost paper is dead.
    page = client.post(f"/shares/{share.uuid}/reissue/", follow=True).content.decode()
    assert "/p/" in page and "data-print" in page
    assert client.get(f"/p/{raw_token}/").status_code == 404


def test_a_reloaded_pin_handout_says_a_new_pin_comes_too(bob, study):
    share, raw_token = _patient_share(bob, study, factor="pin")
    client = _handout_client(bob, share, raw_token)
    client.get(f"/shares/{share.uuid}/handout/")
    again = client.get(f"/shares/{share.uuid}/handout/").content.decode()
    assert "new PIN" in again
    page = client.post(f"/shares/{share.uuid}/reissue/", follow=True).content.decode()
    assert "The new PIN is" in page


def test_a_revoked_link_is_not_offered_for_reissue(bob, study):
    share, raw_token = _patient_share(bob, study)
    share_revoke(share=share, by=bob)
    page = client_for(bob).get(f"/shares/{share.uuid}/handout/").content.decode()
    assert "Re-issue the link" not in page
    assert "no longer active" in page


def test_an_outsider_gets_no_handout_and_cannot_reissue(bob, study, charlie, carol):
    share, raw_token = _patient_share(bob, study)
    for user in (charlie, carol):  # another facility; a reader of the sending one
        assert client_for(user).get(f"/shares/{share.uuid}/handout/").status_code == 404
        assert client_for(user).post(f"/shares/{share.uuid}/reissue/").status_code == 404
    assert Share.objects.patient_link(raw_token) is not None
