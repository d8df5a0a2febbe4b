"""The sender's share page shows a locked patient link and lets the sending side unlock it or
re-issue it (a new link and PIN, the old link dead at once); nobody else can."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.models.sharing import PATIENT_LINK_TRIES
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
PIN = "582039"


@pytest.fixture(autouse=True)
def _fast_pin_hashing(settings: Any) -> None:
    # Every test answers a PIN fifteen times; the hash's cost is not what is tested here.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _pin_link(bob: User, study: Study) -> tuple[Share, str]:
    share, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="pin",
        pin=PIN,
    )
    assert token is not None
    return share, token


def _lock_for_good(token: str) -> None:
    """Three rounds of wrong answers, each earlier lock run out by moving it into the past."""
    patient = Client()
    for _ in range(3):
        Share.objects.update(locked_until=timezone.now() - timedelta(seconds=1))
        for _ in range(PATIENT_LINK_TRIES):
            patient.post(f"/p/{token}/", {"pin": "930285"})
    share = Share.objects.get()
    assert (share.lock_rounds, share.locked_until) == (3, None)


def test_the_share_page_shows_the_lock_and_the_sender_unlocks_it(bob, study):
    share, token = _pin_link(bob, study)
    _lock_for_good(token)
    sender = client_for(bob)

    page = sender.get(f"/shares/{share.uuid}/").content.decode()
    assert "Locked until you unlock or re-issue it" in page
    assert f'action="/shares/{share.uuid}/unlock/"' in page
    assert f'action="/shares/{share.uuid}/reissue/"' in page

    response = sender.post(f"/shares/{share.uuid}/unlock/")
    assert response.status_code == 302
    assert response["Location"] == f"/shares/{share.uuid}/"
    share.refresh_from_db()
    assert (share.failed_attempts, share.lock_rounds, share.locked_until) == (0, 0, None)
    assert "Locked" not in sender.get(f"/shares/{share.uuid}/").content.decode()

    # The same link and PIN work again.
    patient = Client()
    assert patient.post(f"/p/{token}/", {"pin": PIN}).status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200

    (event,) = AuditEvent.objects.filter(action=AuditAction.PATIENT_LINK_UNLOCK)
    assert event.actor == bob and event.facility == study.facility
    assert event.detail == {"share": str(share.uuid), "how": "unlock"}
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.UNLOCKED).count() == 1


def test_the_share_page_shows_a_lock_in_time(bob, study):
    share, token = _pin_link(bob, study)
    for _ in range(PATIENT_LINK_TRIES):
        Client().post(f"/p/{token}/", {"pin": "930285"})
    share.refresh_from_db()
    page = client_for(bob).get(f"/shares/{share.uuid}/").content.decode()
    assert f"Locked until {timezone.localtime(share.locked_until):%Y-%m-%d %H:%M}" in page


def test_the_admin_reissues_a_link_the_old_one_dies_and_the_new_one_works(bob, alice, study):
    share, old_token = _pin_link(bob, study)
    _lock_for_good(old_token)
    admin = client_for(alice)

    response = admin.post(f"/shares/{share.uuid}/reissue/")
    assert response.status_code == 302
    assert response["Location"] == f"/shares/{share.uuid}/handout/"
    handout = admin.get(response["Location"]).content.decode()
    new_token = re.search(r"/p/([A-Za-z0-9_-]{32})/", handout).group(1)  # type: ignore[union-attr]
    new_pin = re.search(r"The new PIN is <strong[^>]*>(\d{8})</strong>", handout).group(1)  # type: ignore[union-attr]
    assert new_token != old_token and new_pin != PIN
    # Shown once: the next look shows neither.
    again = admin.get(f"/shares/{share.uuid}/handout/").content.decode()
    assert new_token not in again and new_pin not in again

    assert Client().get(f"/p/{old_token}/").status_code == 404
    assert Client().post(f"/p/{old_token}/", {"pin": PIN}).status_code == 404
    patient = Client()
    assert patient.post(f"/p/{new_token}/", {"pin": PIN}).status_code == 403  # the old PIN
    assert patient.post(f"/p/{new_token}/", {"pin": new_pin}).status_code == 302
    assert patient.get(f"/p/{new_token}/studies/").status_code == 200

    (event,) = AuditEvent.objects.filter(action=AuditAction.PATIENT_LINK_UNLOCK)
    assert event.actor == alice and event.facility == study.facility
    assert event.detail == {"share": str(share.uuid), "how": "reissue", "new_pin": True}
    every_detail = str(list(AuditEvent.objects.values_list("detail", flat=True)))
    assert new_token not in every_detail and new_pin not in every_detail
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.REISSUED).count() == 1


def test_a_birth_date_link_is_reissued_with_a_new_link_only(bob, study):
    share, old_token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
    )
    sender = client_for(bob)
    handout = sender.get(sender.post(f"/shares/{share.uuid}/reissue/")["Location"])
    html = handout.content.decode()
    assert "The new PIN" not in html
    new_token = re.search(r"/p/([A-Za-z0-9_-]{32})/", html).group(1)  # type: ignore[union-attr]
    assert Client().get(f"/p/{old_token}/").status_code == 404
    assert Client().post(f"/p/{new_token}/", {"birth_date": BIRTH_DATE}).status_code == 302


@pytest.mark.parametrize("action", ["unlock", "reissue"])
@pytest.mark.parametrize("persona", ["charlie", "carol", "dana"])
def test_only_the_sending_side_may_unlock_or_reissue(
    request, bob, study, carol, charlie, dana, persona, action
):
    share, token = _pin_link(bob, study)
    _lock_for_good(token)
    user = request.getfixturevalue(persona)
    outsider = client_for(user)

    assert outsider.post(f"/shares/{share.uuid}/{action}/").status_code == 404
    (refused,) = AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED)
    assert refused.actor == user and refused.outcome == "failure"
    assert refused.facility == study.facility
    assert refused.detail["share"] == str(share.uuid)
    share.refresh_from_db()
    assert share.lock_rounds == 3
    assert Share.objects.patient_link(token) is not None  # the link is unchanged
    assert not AuditEvent.objects.filter(action=AuditAction.PATIENT_LINK_UNLOCK).exists()
    assert "unlock/" not in outsider.get(f"/shares/{share.uuid}/").content.decode()


@pytest.mark.parametrize("action", ["unlock", "reissue"])
def test_unlock_and_reissue_are_post_only_with_csrf(bob, study, action):
    share, token = _pin_link(bob, study)
    _lock_for_good(token)
    url = f"/shares/{share.uuid}/{action}/"
    assert client_for(bob).get(url).status_code == 405
    assert Client().post(url)["Location"].startswith("/accounts/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(bob)
    assert strict.post(url).status_code == 403
    share.refresh_from_db()
    assert share.lock_rounds == 3
    assert Share.objects.patient_link(token) is not None


def test_a_revoked_link_is_not_reissued(bob, study):
    from transfers.sharing.services import share_revoke

    share, _ = _pin_link(bob, study)
    share_revoke(share=share, by=bob)
    response = client_for(bob).post(f"/shares/{share.uuid}/reissue/", follow=True)
    assert "Only an active patient link can be re-issued" in response.content.decode()
    before = share.token_hash
    share.refresh_from_db()
    assert share.token_hash == before
    assert not ShareEvent.objects.filter(share=share, kind=ShareEventKind.REISSUED).exists()


def test_a_browser_verified_under_the_old_link_must_answer_again_after_a_reissue(bob, study):
    share, old_token = _pin_link(bob, study)
    patient = Client()
    assert patient.post(f"/p/{old_token}/", {"pin": PIN}).status_code == 302
    assert patient.get(f"/p/{old_token}/studies/").status_code == 200
    sender = client_for(bob)
    page = sender.get(sender.post(f"/shares/{share.uuid}/reissue/")["Location"]).content.decode()
    new_token = re.search(r"/p/([A-Za-z0-9_-]{32})/", page).group(1)  # type: ignore[union-attr]
    # The same browser, now holding the new link too, is asked for the (new) PIN again.
    response = patient.get(f"/p/{new_token}/studies/")
    assert response.status_code == 302
    assert response["Location"] == f"/p/{new_token}/"
