"""Guest links: an outside physician without an account opens what was shared with them through
the link in one e-mail and a one-time code e-mailed to the same address; no password, no
practice, no invitation. On main, the same share made a practice "Practice of <e-mail>", sent
an invitation as admin and a "sign in" e-mail he could not use, and asked for a password."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, Invitation, Membership, User
from tests.helpers import PASSWORD, client_for, read_testdata, upload
from transfers.models import NotifyStatus, Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db

DOCTOR = "dr.outside@ruralclinic.example"


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _guest_share(bob: User, study: Study, capture: Any, **extra: Any) -> tuple[Share, str]:
    """Share with a physician who has no account; returns the share and the link's path."""
    mail.outbox.clear()
    with capture(execute=True):
        share, raw = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="physician",
            recipient_email=DOCTOR,
            message="Consult requested.",
            can_download=True,
            **extra,
        )
    assert raw is None  # the sender never sees the guest's link
    (notice,) = mail.outbox
    match = re.search(r"https?://[^/\s]+(/g/[^/\s]+/)", notice.body)
    assert match, notice.body
    mail.outbox.clear()
    return share, match.group(1)


def _code(client: Client, link: str, capture: Any) -> str:
    """Ask for a code at the link; returns the code e-mailed to the physician."""
    mail.outbox.clear()
    with capture(execute=True):
        response = client.post(link, {"send": "1"})
    assert response.status_code == 302, response.content.decode()[:2000]
    (message,) = mail.outbox
    assert message.to == [DOCTOR]
    code = re.search(r"\b(\d{6})\b", message.subject).group(1)  # type: ignore[union-attr]
    assert code in message.body
    return code


def _enter(client: Client, link: str, code: str) -> Any:
    return client.post(link, {"code": code})


def test_it_sends_one_email_with_a_guest_link_and_makes_no_account(
    bob, study, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        share, _ = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="physician",
            recipient_email=DOCTOR,
            message="Consult requested.",
        )
    assert [m.to for m in mail.outbox] == [[DOCTOR]]  # one e-mail, no invitation
    notice = mail.outbox[0]
    assert "/g/" in notice.body and "/invitations/" not in notice.body
    assert "no account or password needed" in notice.body.lower()
    assert "Consult requested." in notice.body
    everything = notice.subject + notice.body + notice.alternatives[0][0]
    for secret in (study.patient_name, study.patient_id, study.study_instance_uid):
        assert secret not in everything
    assert not Facility.objects.filter(is_practice=True).exists()
    assert not Invitation.objects.exists()
    assert not User.objects.filter(email=DOCTOR).exists()
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT
    # The token is kept hashed and encrypted, never in clear.
    token = re.search(r"/g/([^/\s]+)/", notice.body).group(1)  # type: ignore[union-attr]
    assert token not in share.link_token_encrypted and token != share.token_hash


def test_the_physician_opens_the_link_with_the_emailed_code_and_views(
    bob, study, django_capture_on_commit_callbacks
):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    page = doctor.get(link)
    assert page.status_code == 200
    html = page.content.decode()
    # Before the code: who sent it and where the code goes, nothing of the patient.
    assert "Kalispell Regional Medical Center" in html
    assert "d\u2022\u2022\u2022@ruralclinic.example" in html
    assert study.patient_name not in html and DOCTOR not in html
    assert doctor.get(link + "studies/").status_code == 302

    code = _code(doctor, link, django_capture_on_commit_callbacks)
    response = _enter(doctor, link, code)
    assert response.status_code == 302
    assert response["Location"] == link + "studies/"

    studies = doctor.get(link + "studies/").content.decode()
    assert "CompressedSamples, CT1" in studies
    token = link.split("/")[2]
    viewer_url = f"/p/{token}/studies/{study.uuid}/view/"
    assert viewer_url in studies
    assert "Keep these studies in an account" in studies
    viewer = doctor.get(viewer_url)
    assert viewer.status_code == 200
    # A radiologist's viewer, not the patient's, and back to the guest's list.
    assert link + "studies/" in viewer.content.decode()
    data = doctor.get(viewer_url + "study.json")
    assert data.status_code == 200
    sop = study.series.get().instances.get().sop_instance_uid
    assert doctor.get(f"{viewer_url}frames/{sop}/0/").status_code == 200
    download = doctor.get(f"/p/{token}/studies/{study.uuid}/download/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content)[:2] == b"PK"

    # The sender's receipts name the physician.
    share.refresh_from_db()
    assert share.first_opened_by == DOCTOR
    kinds = list(ShareEvent.objects.filter(share=share).values_list("kind", "actor_label"))
    assert (ShareEventKind.CODE_SENT, DOCTOR) in kinds
    assert (ShareEventKind.OPENED, DOCTOR) in kinds
    assert (ShareEventKind.DOWNLOADED, DOCTOR) in kinds
    # Audited: the code sent, the code entered, the views.
    actions = set(AuditEvent.objects.values_list("action", "outcome"))
    assert (AuditAction.GUEST_CODE_SEND, "success") in actions
    assert (AuditAction.GUEST_CODE, "success") in actions
    assert (AuditAction.STUDY_VIEW, "success") in actions


def test_a_code_opens_once_and_another_browser_needs_its_own(
    bob, study, django_capture_on_commit_callbacks
):
    _share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    code = _code(doctor, link, django_capture_on_commit_callbacks)
    assert _enter(doctor, link, code).status_code == 302
    # Someone the e-mail was forwarded to, with the same code: refused.
    other = Client()
    assert _enter(other, link, code).status_code == 403
    assert other.get(link + "studies/").status_code == 302


def test_a_wrong_or_expired_code_is_refused_and_counted(
    bob, study, django_capture_on_commit_callbacks
):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    code = _code(doctor, link, django_capture_on_commit_callbacks)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    response = _enter(doctor, link, wrong)
    assert response.status_code == 403
    assert "4 tries left" in response.content.decode()
    Share.objects.filter(pk=share.pk).update(code_expires_at=timezone.now() - timedelta(seconds=1))
    assert _enter(doctor, link, code).status_code == 403
    failures = AuditEvent.objects.filter(action=AuditAction.GUEST_CODE, outcome="failure")
    assert failures.count() == 2


def test_it_locks_after_five_wrong_codes_and_tells_the_sender(
    bob, study, django_capture_on_commit_callbacks
):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    code = _code(doctor, link, django_capture_on_commit_callbacks)
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    with django_capture_on_commit_callbacks(execute=True):
        for _ in range(5):
            _enter(doctor, link, wrong)
    # Locked: even the right code is refused unread, and no new code is sent.
    response = _enter(doctor, link, code)
    assert response.status_code == 403
    assert "locked" in response.content.decode()
    assert doctor.post(link, {"send": "1"}).status_code == 403
    share.refresh_from_db()
    assert share.lock_rounds == 1 and share.locked_until is not None
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.LOCKED).exists()
    assert any(bob.email in m.to for m in mail.outbox)  # the sender is told


def test_it_sends_no_second_code_within_a_minute(bob, study, django_capture_on_commit_callbacks):
    _share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    _code(doctor, link, django_capture_on_commit_callbacks)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = doctor.post(link, {"send": "1"})
    assert response.status_code == 429
    assert "moments ago" in response.content.decode()
    assert mail.outbox == []


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_it_stops_at_once_when_revoked_or_expired(
    bob, study, django_capture_on_commit_callbacks, how
):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    code = _code(doctor, link, django_capture_on_commit_callbacks)
    _enter(doctor, link, code)
    token = link.split("/")[2]
    viewer_url = f"/p/{token}/studies/{study.uuid}/view/"
    assert doctor.get(viewer_url).status_code == 200
    if how == "revoked":
        share_revoke(share=share, by=bob)
    else:
        Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    assert doctor.get(link).status_code == 404
    assert doctor.get(link + "studies/").status_code == 404
    assert doctor.get(viewer_url).status_code == 404
    assert doctor.get(f"/p/{token}/studies/{study.uuid}/download/").status_code == 404


def test_guest_and_patient_links_do_not_open_each_others_pages(
    bob, study, django_capture_on_commit_callbacks
):
    _share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    token = link.split("/")[2]
    assert Client().get(f"/p/{token}/").status_code == 404
    _patient, patient_token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="pin",
        pin="482913",
    )
    assert Client().get(f"/g/{patient_token}/").status_code == 404


def test_a_physician_with_an_account_gets_a_share_behind_sign_in(
    bob, study, charlie, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        share, _ = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="physician",
            recipient_email=charlie.email,
        )
    assert share.token_hash is None and not share.is_guest_link
    (notice,) = mail.outbox
    assert f"/shares/{share.uuid}/" in notice.body and "/g/" not in notice.body


def test_the_physician_keeps_the_studies_in_an_account_without_another_email(
    bob, study, django_capture_on_commit_callbacks
):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    doctor = Client()
    code = _code(doctor, link, django_capture_on_commit_callbacks)
    _enter(doctor, link, code)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = doctor.post(link + "account/")
    assert response.status_code == 302
    assert response["Location"].startswith("/invitations/")
    assert mail.outbox == []  # the address was just proved: no e-mail round trip
    page = doctor.get(response["Location"]).content.decode()
    assert "Create your Relay account" in page and "Practice of" not in page
    created = doctor.post(
        response["Location"],
        {"full_name": "Dr Outside", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert created.status_code == 302
    user = User.objects.get(email=DOCTOR)
    assert Membership.objects.get(user=user).facility.is_practice
    assert client_for(user).get(f"/studies/{study.uuid}/").status_code == 200
    # Someone who never entered the code cannot make the account.
    assert Client().post(link + "account/").status_code == 302
    assert Invitation.objects.count() == 1


def test_a_guest_link_can_be_unlocked_by_the_sender(bob, study, django_capture_on_commit_callbacks):
    share, link = _guest_share(bob, study, django_capture_on_commit_callbacks)
    Share.objects.filter(pk=share.pk).update(
        lock_rounds=1, locked_until=timezone.now() + timedelta(minutes=30)
    )
    assert "locked" in Client().get(link).content.decode()
    response = client_for(bob).post(f"/shares/{share.uuid}/unlock/")
    assert response.status_code == 302
    assert "locked" not in Client().get(link).content.decode()
