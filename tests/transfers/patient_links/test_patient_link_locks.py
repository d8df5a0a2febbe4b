"""Patient links lock in rounds: 30 minutes, then 4 hours, then until the sender unlocks or
re-issues the link. Waiting does not reset the rounds; a right answer does. Every lock is audited,
on the share's timeline, and e-mailed to the sending side without patient data."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, User
from tests.helpers import dicom_bytes, upload
from transfers.models import Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.models.sharing import AttemptClaim
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

BIRTH_DATE = "1965-04-12"
PIN = "582039"


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate=BIRTH_DATE.replace("-", ""))
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[timedelta], datetime]:
    """Moves the portal's clock forward: clock(timedelta(hours=1)) returns the new now."""
    real_now = timezone.now
    offset = [timedelta(0)]

    def now() -> datetime:
        return real_now() + offset[0]

    monkeypatch.setattr(timezone, "now", now)

    def forward(by: timedelta) -> datetime:
        offset[0] += by
        return now()

    return forward


def _link(bob: User, study: Study, **extra: Any) -> tuple[Share, str]:
    options: dict[str, Any] = {"second_factor": "birth_date", **extra}
    share, token = share_create(
        facility=study.facility, created_by=bob, studies=[study], kind="patient", **options
    )
    assert token is not None
    return share, token


def _wrong(patient: Client, token: str, times: int = 5) -> Any:
    response = None
    for _ in range(times):
        response = patient.post(f"/p/{token}/", {"birth_date": "2001-01-01"})
    return response


def test_it_locks_longer_each_round_and_then_for_good_even_with_the_right_answer(bob, study, clock):
    share, token = _link(bob, study)
    patient = Client()

    response = _wrong(patient, token)
    share.refresh_from_db()
    assert share.lock_rounds == 1
    assert share.locked_until is not None
    assert timedelta(minutes=29) < share.locked_until - timezone.now() <= timedelta(minutes=30)
    assert "try again after" in response.content.decode()

    clock(timedelta(minutes=31))
    response = _wrong(patient, token, 4)
    assert "1 try left before the link locks for 4 hours" in response.content.decode()
    _wrong(patient, token, 1)
    share.refresh_from_db()
    assert share.lock_rounds == 2
    assert (
        timedelta(hours=3, minutes=59) < share.locked_until - timezone.now() <= timedelta(hours=4)
    )

    clock(timedelta(hours=4, minutes=1))
    response = _wrong(patient, token, 4)
    assert "before the link locks until Kalispell Regional Medical Center" in (
        response.content.decode()
    )
    _wrong(patient, token, 1)
    share.refresh_from_db()
    assert (share.lock_rounds, share.locked_until) == (3, None)

    # Days later, with the right answer: still locked, and the answer is not even checked.
    clock(timedelta(days=2))
    response = patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE})
    assert response.status_code == 403
    html = response.content.decode()
    assert "locked" in html and "try again after" not in html
    assert "Ask Kalispell Regional Medical Center, who sent it" in html
    assert "<form" not in html
    assert patient.get(f"/p/{token}/studies/").status_code == 302
    assert "Ask Kalispell Regional Medical Center" in Client().get(f"/p/{token}/").content.decode()
    refused = AuditEvent.objects.filter(action=AuditAction.PATIENT_FACTOR, outcome="failure")
    assert refused.filter(detail__reason="locked").count() == 1


def test_a_right_answer_between_rounds_starts_the_rounds_again(bob, study, clock):
    share, token = _link(bob, study)
    patient = Client()
    _wrong(patient, token)
    clock(timedelta(minutes=31))
    _wrong(patient, token)  # round 2: 4 hours
    clock(timedelta(hours=4, minutes=1))

    assert patient.post(f"/p/{token}/", {"birth_date": BIRTH_DATE}).status_code == 302
    share.refresh_from_db()
    assert (share.failed_attempts, share.lock_rounds, share.locked_until) == (0, 0, None)

    # The next five wrong answers are a first round again: 30 minutes, not for good.
    response = _wrong(Client(), token)
    share.refresh_from_db()
    assert share.lock_rounds == 1
    assert share.locked_until is not None
    assert share.locked_until - timezone.now() <= timedelta(minutes=30)
    assert "try again after" in response.content.decode()


def test_it_emails_the_sender_and_admins_on_each_lock_without_patient_data(
    bob, alice, carol, study, clock, mailoutbox, settings, django_capture_on_commit_callbacks
):
    settings.SITE_URL = "https://relay.example"
    # A fast hasher for the PIN: fifteen answers, and the hash's cost is not what is tested.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    share, token = _link(bob, study, second_factor="pin", pin=PIN)
    patient = Client()
    for _ in range(3):
        for _ in range(5):
            with django_capture_on_commit_callbacks(execute=True):
                patient.post(f"/p/{token}/", {"pin": "930285"})
        clock(timedelta(hours=5))

    # Three locks, each to the creator (bob) and the facility's admin (alice); not the reader.
    assert sorted(m.to[0] for m in mailoutbox) == sorted(
        ["alice@krmc.example", "bob@krmc.example"] * 3
    )
    study.refresh_from_db()
    secrets_and_phi = [
        token,
        PIN,
        study.patient_name,
        study.patient_name_display,
        study.patient_id,
        BIRTH_DATE,
        study.patient_birth_date.strftime("%Y%m%d"),
        study.description,
        study.study_instance_uid,
    ]
    for message in mailoutbox:
        html = message.alternatives[0][0]
        for text in (message.subject, message.body, html):
            for secret in secrets_and_phi:
                if secret:
                    assert secret not in text, (secret, message.subject)
        assert f"https://relay.example/shares/{share.uuid}/" in message.body
        assert f"https://relay.example/shares/{share.uuid}/" in html
    first, last = mailoutbox[0], mailoutbox[-1]
    assert "locked after repeated wrong answers" in first.subject
    assert "opens again at" in first.body
    assert "locked until you unlock or re-issue it" in last.subject
    assert "re-issue" in last.body


def test_it_audits_each_lock_for_the_sending_facility_and_puts_it_on_the_timeline(
    bob, study, clock
):
    share, token = _link(bob, study)
    patient = Client()
    _wrong(patient, token)
    clock(timedelta(minutes=31))
    _wrong(patient, token)
    clock(timedelta(hours=5))
    _wrong(patient, token)

    locks = list(AuditEvent.objects.filter(action=AuditAction.PATIENT_LINK_LOCK).order_by("id"))
    assert [e.detail["round"] for e in locks] == [1, 2, 3]
    for event in locks:
        assert event.facility == study.facility
        assert event.detail["share"] == str(share.uuid)
        assert event.study_instance_uid == study.study_instance_uid
        assert event.client_ip == "127.0.0.1"
    assert locks[0].detail["until"] is not None and not locks[0].detail["for_good"]
    assert locks[2].detail["until"] is None and locks[2].detail["for_good"]
    every_detail = str(list(AuditEvent.objects.values_list("detail", flat=True)))
    assert token not in every_detail
    timeline = ShareEvent.objects.filter(share=share, kind=ShareEventKind.LOCKED)
    assert [e.detail[:10] for e in timeline] == ["lock 1 of ", "lock 2 of ", "lock 3 of "]
    assert "until unlocked or re-issued" in timeline.last().detail  # type: ignore[union-attr]


@pytest.mark.django_db(transaction=True)
def test_parallel_wrong_answers_cannot_exceed_a_round(bob, study):
    """Twenty answers at the same moment, each on its own database connection: five are
    counted, one of them sets the lock, fifteen are refused unread."""
    share, _ = _link(bob, study)
    racers = 20
    start = threading.Barrier(racers)
    claims: list[AttemptClaim] = []
    errors: list[BaseException] = []

    def answer() -> None:
        try:
            mine = Share.objects.get(pk=share.pk)
            start.wait()
            claims.append(mine.patient_attempt_claim())
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=answer) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors, errors
    counted = [c for c in claims if c.refused is None]
    assert sorted(c.failed for c in counted) == [1, 2, 3, 4, 5]
    assert sum(c.locks is not None for c in counted) == 1
    assert sum(c.refused is not None for c in claims) == racers - 5
    share.refresh_from_db()
    assert (share.failed_attempts, share.lock_rounds) == (5, 1)
    assert share.locked_until is not None
