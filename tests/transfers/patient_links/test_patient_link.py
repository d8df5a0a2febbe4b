"""Patient links: the printed handout, the second factor, the lock, and what the patient sees."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.sharing.services import ShareError, share_create, share_revoke

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _patient_share(bob: User, study: Study, **extra: object) -> tuple[Share, str]:
    options: dict[str, object] = {"second_factor": "birth_date", "can_download": True, **extra}
    share, raw_token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        **options,  # type: ignore[arg-type]
    )
    assert raw_token is not None
    return share, raw_token


def _handout(bob: User, share: Share, raw_token: str) -> Client:
    """Bob's browser right after making the share, as share_new leaves it."""
    client = client_for(bob)
    session = client.session
    session[f"patient_link_{share.uuid}"] = raw_token
    session.save()
    return client


def _answer(client: Client, token: str, **data: str) -> object:
    return client.post(f"/p/{token}/", data)


def _factor_events(outcome: str | None = None) -> list[AuditEvent]:
    events = AuditEvent.objects.filter(action=AuditAction.PATIENT_FACTOR)
    if outcome:
        events = events.filter(outcome=outcome)
    return list(events)


def test_it_shows_the_link_and_its_qr_code_once(bob, study, settings):
    settings.SITE_URL = "https://relay.example"
    share, raw_token = _patient_share(bob, study)
    client = _handout(bob, share, raw_token)

    page = client.get(f"/shares/{share.uuid}/handout/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f"https://relay.example/p/{raw_token}/" in html
    assert re.search(r"<svg[^>]*class=\"segno\"", html)
    assert "date of birth" in html
    assert "Kalispell Regional Medical Center" in html
    assert timezone.localtime(share.expires_at).strftime("%Y-%m-%d") in html
    assert "no-store" in page["Cache-Control"]

    again = client.get(f"/shares/{share.uuid}/handout/").content.decode()
    assert raw_token not in again
    assert "<svg" not in again
    assert "shown once" in again


def test_it_lets_the_patient_in_with_the_right_birth_date(bob, study):
    share, token = _patient_share(bob, study)
    patient = Client()
    assert "date of birth" in patient.get(f"/p/{token}/").content.decode()

    response = _answer(patient, token, birth_date=BIRTH_DATE)
    assert response.status_code == 302
    assert response["Location"] == f"/p/{token}/studies/"

    page = patient.get(f"/p/{token}/studies/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "CompressedSamples, CT1" in html
    assert study.description in html
    assert "CT" in html
    share.refresh_from_db()
    assert share.first_opened_by == "patient link"
    assert ShareEvent.objects.filter(share=share, kind=ShareEventKind.OPENED).count() == 1
    views = AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW, outcome="success")
    assert [e.study_instance_uid for e in views] == [study.study_instance_uid]


def test_it_keeps_the_patient_out_with_a_wrong_birth_date(bob, study):
    share, token = _patient_share(bob, study)
    patient = Client()

    response = _answer(patient, token, birth_date="1965-04-13")
    assert response.status_code == 403
    assert "does not match" in response.content.decode()
    assert "4 tries left" in response.content.decode()
    assert "CompressedSamples" not in response.content.decode()

    studies = patient.get(f"/p/{token}/studies/")
    assert studies.status_code == 302
    assert studies["Location"] == f"/p/{token}/"
    share.refresh_from_db()
    assert share.failed_attempts == 1
    assert share.first_opened_at is None


def test_it_locks_after_five_wrong_answers_until_the_lock_lapses(bob, study):
    share, token = _patient_share(bob, study)
    patient = Client()
    for _ in range(5):
        response = _answer(patient, token, birth_date="2001-01-01")
    assert "locked" in response.content.decode()

    # While locked even the right answer is refused, and not checked.
    response = _answer(patient, token, birth_date=BIRTH_DATE)
    assert response.status_code == 403
    html = response.content.decode()
    assert "locked" in html
    share.refresh_from_db()
    assert share.locked_until is not None
    assert timezone.localtime(share.locked_until).strftime("%H:%M") in html
    assert patient.get(f"/p/{token}/studies/").status_code == 302
    assert "locked" in patient.get(f"/p/{token}/").content.decode()

    Share.objects.filter(pk=share.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
    response = _answer(patient, token, birth_date=BIRTH_DATE)
    assert response.status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200
    share.refresh_from_db()
    assert (share.failed_attempts, share.locked_until) == (0, None)


def test_it_gives_a_fresh_five_tries_after_the_lock_lapses(bob, study):
    share, token = _patient_share(bob, study)
    Share.objects.filter(pk=share.pk).update(
        failed_attempts=5, locked_until=timezone.now() - timedelta(minutes=1)
    )
    response = _answer(Client(), token, birth_date="2001-01-01")
    assert "4 tries left" in response.content.decode()


def test_it_audits_every_attempt(bob, study):
    share, token = _patient_share(bob, study)
    patient = Client()
    for _ in range(5):
        _answer(patient, token, birth_date="2001-01-01")
    _answer(patient, token, birth_date=BIRTH_DATE)  # while locked
    Share.objects.filter(pk=share.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
    _answer(patient, token, birth_date=BIRTH_DATE)

    assert len(_factor_events()) == 7
    failures = _factor_events("failure")
    assert len(failures) == 6
    assert sum(e.detail.get("reason") == "locked" for e in failures) == 1
    (success,) = _factor_events("success")
    assert success.study_instance_uid == study.study_instance_uid
    assert success.patient_id == study.patient_id
    assert success.detail["share"] == str(share.uuid)
    assert success.client_ip == "127.0.0.1"


def test_it_opens_a_pin_share_with_the_pin(bob, study):
    share, token = _patient_share(bob, study, second_factor="pin", pin="582039")
    patient = Client()
    assert "PIN" in patient.get(f"/p/{token}/").content.decode()

    assert _answer(patient, token, pin="930285").status_code == 403
    assert _answer(patient, token, birth_date=BIRTH_DATE).status_code == 200  # not the question
    assert _answer(patient, token, pin="582039").status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200
    share.refresh_from_db()
    assert share.failed_attempts == 0


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_it_stops_at_once_when_revoked_or_expired(bob, study, how):
    share, token = _patient_share(bob, study)
    patient = Client()
    assert _answer(patient, token, birth_date=BIRTH_DATE).status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 200

    if how == "revoked":
        share_revoke(share=share, by=bob)
    else:
        Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    for response in (
        patient.get(f"/p/{token}/studies/"),
        patient.get(f"/p/{token}/"),
        _answer(patient, token, birth_date=BIRTH_DATE),
        _answer(Client(), token, birth_date=BIRTH_DATE),
    ):
        assert response.status_code == 404
        assert "CompressedSamples" not in response.content.decode()


def test_it_answers_a_guessed_token_like_a_revoked_one(bob, study):
    share, token = _patient_share(bob, study)
    share_revoke(share=share, by=bob)
    revoked = Client().get(f"/p/{token}/")
    guessed = Client().get("/p/Zm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4/")
    assert revoked.status_code == guessed.status_code == 404
    assert revoked.content == guessed.content


def test_it_answers_a_facility_share_token_hash_like_an_unknown_one(bob, study, gfc):
    """Only patient shares open by token, whatever else the token column holds."""
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
    )
    from portal.models import hash_token

    Share.objects.filter(pk=share.pk).update(token_hash=hash_token("not-a-patient-link"))
    assert Client().get("/p/not-a-patient-link/").status_code == 404


def test_it_does_not_open_another_share_with_a_verified_session(bob, study):
    _, first = _patient_share(bob, study)
    _, second = _patient_share(bob, study, second_factor="pin", pin="582039")
    patient = Client()
    assert _answer(patient, first, birth_date=BIRTH_DATE).status_code == 302

    response = patient.get(f"/p/{second}/studies/")
    assert response.status_code == 302
    assert response["Location"] == f"/p/{second}/"
    assert "PIN" in patient.get(f"/p/{second}/").content.decode()


def test_it_cycles_the_session_when_the_factor_is_right(bob, study):
    _, token = _patient_share(bob, study)
    patient = Client()
    patient.get(f"/p/{token}/")
    session = patient.session
    session["planted"] = True
    session.save()
    before = session.session_key
    _answer(patient, token, birth_date=BIRTH_DATE)
    assert patient.session.session_key != before


@pytest.mark.parametrize(
    ("persona", "status"),
    [("anonymous", 302), ("charlie", 404), ("carol", 404), ("bob", 200), ("alice", 200)],
)
def test_it_shows_the_handout_only_to_the_sending_side(
    request, bob, study, alice, carol, charlie, persona, status
):
    share, _ = _patient_share(bob, study)
    user = None if persona == "anonymous" else request.getfixturevalue(persona)
    response = client_for(user).get(f"/shares/{share.uuid}/handout/")
    assert response.status_code == status
    if persona == "anonymous":
        assert response["Location"].startswith("/accounts/login/")


def test_the_patient_downloads_the_study_and_reads_the_report(bob, study):
    from transfers.reports import report_attach

    report = report_attach(study=study, by=bob, text="IMPRESSION: no fracture.", for_patient=True)
    share, token = _patient_share(bob, study)
    patient = Client()
    _answer(patient, token, birth_date=BIRTH_DATE)

    html = patient.get(f"/p/{token}/studies/").content.decode()
    report_url = f"/p/{token}/studies/{study.uuid}/reports/{report.uuid}/"
    zip_url = f"/p/{token}/studies/{study.uuid}/download/"
    assert report_url in html and zip_url in html
    assert b"no fracture" in patient.get(report_url).content
    download = patient.get(zip_url)
    assert download.status_code == 200
    assert b"".join(download.streaming_content)[:2] == b"PK"
    # The sender's timeline says the patient took a copy.
    receipt = ShareEvent.objects.get(share=share, kind=ShareEventKind.DOWNLOADED)
    assert receipt.actor_label == "patient link"


@pytest.mark.parametrize(
    "factor", [{"second_factor": "birth_date"}, {"second_factor": "pin", "pin": "482915"}]
)
def test_it_refuses_a_link_with_two_patients_studies_whatever_the_factor(
    bob, study, client, bob_token, factor
):
    other = dicom_bytes(
        "MR_small.dcm", PatientID="OTHER-77", PatientBirthDate=BIRTH_DATE.replace("-", "")
    )
    assert upload(client, other, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    studies = list(Study.objects.all())
    assert len({s.patient_id for s in studies}) == 2

    with pytest.raises(ShareError, match="one patient only"):
        share_create(
            facility=study.facility, created_by=bob, studies=studies, kind="patient", **factor
        )
    assert not Share.objects.exists()


@pytest.mark.parametrize(
    ("pin", "why"),
    [
        ("4821", "6 to 12 digits"),
        ("111111", "too easy"),
        ("123456", "too easy"),
        ("987654", "too easy"),
        ("196504", "birth year"),
        ("12041965", "birth year or birth date"),
        ("650412", "birth date"),
    ],
)
def test_it_refuses_a_pin_that_is_easy_to_guess(bob, study, pin, why):
    with pytest.raises(ShareError, match=why):
        _patient_share(bob, study, second_factor="pin", pin=pin)
    assert not Share.objects.exists()
    # A longer one is fine.
    _patient_share(bob, study, second_factor="pin", pin="58203917")


def test_the_patient_signs_out_and_the_link_asks_again(bob, study):
    share, token = _patient_share(bob, study)
    patient = Client()
    _answer(patient, token, birth_date=BIRTH_DATE)
    page = patient.get(f"/p/{token}/studies/").content.decode()
    assert f'action="/p/{token}/sign-out/"' in page
    # The page shows no raw template text (a two-line {# #} comment once leaked onto it).
    assert "{#" not in page and "same-origin: the link" not in page
    assert patient.post(f"/p/{token}/sign-out/").status_code == 302
    assert patient.get(f"/p/{token}/studies/").status_code == 302  # back to the factor
    assert patient.get(f"/p/{token}/studies/{study.uuid}/download/").status_code == 404
