"""A patient sends their study to a doctor from their own link (issue 16 item 2): a guest link
under the same rules (one e-mail, the e-mailed code), no longer than their own link, audited,
on the sending facility's timeline, revocable by the patient and by the facility. And the
printable one-page summary. On main the patient could only view and download."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Share, ShareEvent, ShareEventKind, ShareKind, Study, StudyStatus
from transfers.sharing.services import share_create, share_extend, share_revoke

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
DOCTOR = "dr.family@townclinic.example"


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _patient(bob: User, study: Study, **extra: object) -> tuple[Share, str, Client]:
    """A patient link with download, and the patient's browser past the second factor."""
    share, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
        can_download=True,
        **extra,  # type: ignore[arg-type]
    )
    assert token is not None
    patient = Client()
    assert patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE}).status_code == 302
    return share, token, patient


def _forward(patient: Client, token: str, capture, email: str = DOCTOR, days: int = 7):  # type: ignore[no-untyped-def]
    mail.outbox.clear()
    with capture(execute=True):
        return patient.post(f"/p/{token}/forward/", {"email": email, "days": str(days)})


def test_the_patient_sends_the_study_to_a_doctor_who_opens_it_as_a_guest(
    bob, study, django_capture_on_commit_callbacks
):
    share, token, patient = _patient(bob, study)
    page = patient.get(f"/p/{token}/studies/").content.decode()
    assert "Send to a doctor" in page
    response = _forward(patient, token, django_capture_on_commit_callbacks)
    assert response.status_code == 302
    forward = Share.objects.get(forwarded_from=share)
    assert forward.kind == ShareKind.PHYSICIAN and forward.is_guest_link
    assert forward.facility == share.facility
    assert forward.can_download and forward.expires_at <= share.expires_at
    # One e-mail, to the doctor, with a guest link and no patient data.
    (notice,) = mail.outbox
    assert notice.to == [DOCTOR]
    assert study.patient_name not in notice.subject + notice.body
    link = re.search(r"https?://[^/\s]+(/g/[^/\s]+/)", notice.body).group(1)  # type: ignore[union-attr]
    # The doctor opens it with the code e-mailed to that address.
    doctor = Client()
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        doctor.post(link, {"send": "1"})
    code = re.search(r"\b(\d{6})\b", mail.outbox[-1].subject).group(1)  # type: ignore[union-attr]
    assert doctor.post(link, {"code": code}).status_code == 302
    assert "CompressedSamples" in doctor.get(link + "studies/").content.decode()
    # The patient's page lists it; the facility's timelines show it.
    assert DOCTOR in patient.get(f"/p/{token}/studies/").content.decode()
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.FORWARDED).exists()
    sent = client_for(bob).get("/sent/").content.decode()
    assert DOCTOR in sent
    timeline = client_for(bob).get(f"/shares/{forward.uuid}/").content.decode()
    assert "forwarded by the patient" in timeline
    created = AuditEvent.objects.get(action=AuditAction.SHARE_CREATE, detail__to=DOCTOR)
    assert created.detail["forwarded_from"] == str(share.uuid)


def test_it_never_outlives_the_patients_link(bob, study, django_capture_on_commit_callbacks):
    share, token, patient = _patient(bob, study, expires_at=timezone.now() + timedelta(days=5))
    page = patient.get(f"/p/{token}/studies/").content.decode()
    # Nothing longer than the link is even offered; its own length is.
    assert 'value="30"' not in page and "as long as your link" in page
    left = (share.expires_at - timezone.now()).days
    assert (
        _forward(patient, token, django_capture_on_commit_callbacks, days=left).status_code == 302
    )
    assert (
        _forward(
            patient, token, django_capture_on_commit_callbacks, email="b@x.example", days=30
        ).status_code
        == 400
    )
    forward = Share.objects.get(forwarded_from=share)
    assert forward.expires_at <= share.expires_at
    # The facility shortens the patient's link: the forward follows.
    share_extend(share=share, by=bob, expires_at=timezone.now() + timedelta(days=2))
    forward.refresh_from_db()
    assert forward.expires_at <= timezone.now() + timedelta(days=2)


def test_the_patient_stops_sharing_and_the_doctors_link_dies(
    bob, study, django_capture_on_commit_callbacks
):
    share, token, patient = _patient(bob, study)
    _forward(patient, token, django_capture_on_commit_callbacks)
    forward = Share.objects.get(forwarded_from=share)
    response = patient.post(f"/p/{token}/forwards/{forward.uuid}/revoke/")
    assert response.status_code == 302
    forward.refresh_from_db()
    assert forward.revoked_at is not None
    assert ShareEvent.objects.get(share=forward, kind="revoked").actor_label == "patient link"
    # Someone without this link's verified session cannot stop it.
    other_share, other_token, other = _patient(bob, study)
    assert other.post(f"/p/{other_token}/forwards/{forward.uuid}/revoke/").status_code == 404
    assert Client().post(f"/p/{token}/forwards/{forward.uuid}/revoke/").status_code == 404


def test_revoking_the_patients_link_revokes_what_it_forwarded(
    bob, study, django_capture_on_commit_callbacks
):
    share, token, patient = _patient(bob, study)
    _forward(patient, token, django_capture_on_commit_callbacks)
    share_revoke(share=share, by=bob)
    assert Share.objects.get(forwarded_from=share).revoked_at is not None
    # And the facility revokes a forward like any share of its own.
    assert (
        client_for(bob).get(f"/shares/{Share.objects.get(forwarded_from=share).uuid}/").status_code
        == 200
    )


def test_it_refuses_a_bad_address_a_repeat_and_too_many(
    bob, study, django_capture_on_commit_callbacks
):
    share, token, patient = _patient(bob, study)
    bad = _forward(patient, token, django_capture_on_commit_callbacks, email="not-an-address")
    assert bad.status_code == 400
    _forward(patient, token, django_capture_on_commit_callbacks)
    again = _forward(patient, token, django_capture_on_commit_callbacks)
    assert again.status_code == 400
    assert "already shared" in again.content.decode()
    for n in range(9):
        _forward(patient, token, django_capture_on_commit_callbacks, email=f"dr{n}@x.example")
    too_many = _forward(patient, token, django_capture_on_commit_callbacks, email="dr99@x.example")
    assert too_many.status_code == 400
    assert "at most 10" in too_many.content.decode()
    assert Share.objects.filter(forwarded_from=share).count() == 10


def test_only_a_verified_patient_forwards(bob, study, django_capture_on_commit_callbacks):
    _share, token, _patient_client = _patient(bob, study)
    stranger = Client()
    response = stranger.post(f"/p/{token}/forward/", {"email": DOCTOR, "days": "7"})
    assert response.status_code == 404
    assert not Share.objects.filter(recipient_email=DOCTOR).exists()


def test_the_patient_prints_a_one_page_summary(bob, study):
    from transfers.reports import report_attach

    report_attach(study=study, by=bob, text="IMPRESSION: no fracture.", for_patient=True)
    share, token, patient = _patient(bob, study)
    response = patient.get(f"/p/{token}/studies/{study.uuid}/summary/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Imaging study summary" in html
    assert "CompressedSamples" in html and "Apr 12, 1965" in html
    assert "Kalispell Regional Medical Center" in html
    assert "data-print" in html and "js/print.js" in html
    assert "Report of" in html
    assert Client().get(f"/p/{token}/studies/{study.uuid}/summary/").status_code == 404
    views = AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW, detail__page="summary")
    assert views.count() == 1
