"""Findings of the security review of the guest links, patient forwards, home page and push
cancel (each failed before its fix): forwarding never widens what reaches anyone, re-issuing a
leaked link stops what was forwarded through it, guest tokens stay out of logs, another
facility's pushes stay off the home page, view-only members cannot cancel pushes, one code
opens once even when two answers race, and bad links are audited."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import Retry
from django.contrib.auth.hashers import make_password
from django.core import mail
from django.test import Client
from django.utils import timezone

from bench.servers import free_port
from portal.models import AuditAction, AuditEvent, Membership, User
from relay.logs import redact
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from transfers.access import study_access
from transfers.dicom.push import push_create
from transfers.models import PacsDestination, Push, PushStatus, Share, Study, StudyStatus
from transfers.patient_links import services as link_services
from transfers.reports import report_attach
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


class _Request:
    def __init__(self, user: User) -> None:
        self.user = user


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate="19650412")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _patient(bob: User, study: Study) -> tuple[Share, str, Client]:
    share, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        second_factor="birth_date",
        can_download=True,
    )
    assert token is not None
    browser = Client()
    assert browser.post(f"/p/{token}/", {"birth_date": "1965-04-12"}).status_code == 302
    return share, token, browser


def _forward_and_open(browser: Client, token: str, email: str, capture: Any) -> tuple[Client, str]:
    """Forward to `email` and open the guest link there; returns that browser and the link."""
    mail.outbox.clear()
    with capture(execute=True):
        assert (
            browser.post(f"/p/{token}/forward/", {"email": email, "days": "7"}).status_code == 302
        )
    link = re.search(r"(/g/[^/\s]+/)", mail.outbox[-1].body).group(1)  # type: ignore[union-attr]
    guest = Client()
    mail.outbox.clear()
    with capture(execute=True):
        guest.post(link, {"send": "1"})
    code = re.search(r"\b(\d{6})\b", mail.outbox[-1].subject).group(1)  # type: ignore[union-attr]
    assert guest.post(link, {"code": code}).status_code == 302
    return guest, link


def test_a_forward_reads_only_what_the_patient_reads(
    bob, study, django_capture_on_commit_callbacks
):
    hidden = report_attach(study=study, by=bob, text="Suspicious mass; tell the patient first.")
    shown = report_attach(study=study, by=bob, text="IMPRESSION: benign.", for_patient=True)
    _share, token, patient = _patient(bob, study)
    guest, link = _forward_and_open(
        patient, token, "me.other@mail.example", django_capture_on_commit_callbacks
    )
    page = guest.get(link + "studies/").content.decode()
    assert str(shown.uuid) in page and str(hidden.uuid) not in page
    gtoken = link.split("/")[2]
    base = f"/p/{gtoken}/studies/{study.uuid}/reports/"
    assert guest.get(f"{base}{hidden.uuid}/").status_code == 404
    assert guest.get(f"{base}{shown.uuid}/").status_code == 200
    summary = guest.get(f"/p/{gtoken}/studies/{study.uuid}/summary/").content.decode()
    assert summary.count("Report of") == 1


def test_reissuing_a_leaked_link_stops_what_was_forwarded_through_it(
    bob, study, django_capture_on_commit_callbacks
):
    share, token, thief = _patient(bob, study)
    guest, link = _forward_and_open(
        thief, token, "thief@evil.example", django_capture_on_commit_callbacks
    )
    assert client_for(bob).post(f"/shares/{share.uuid}/reissue/").status_code == 302
    forward = Share.objects.get(forwarded_from=share)
    assert forward.state == "revoked"
    assert guest.get(link + "studies/").status_code == 404


def test_guest_link_tokens_never_reach_a_log_line() -> None:
    line = '"POST /g/Zk3nQ9_secret_guest_token/ HTTP/1.1" 403'
    assert "Zk3nQ9_secret_guest_token" not in redact(line)
    assert "Zk3nQ9" not in redact("Not Found: /g/Zk3nQ9_secret_guest_token/studies/")


def _failed_push_into_gfc(bob: User, dana: User, gfc: Any, study: Study, capture: Any) -> Push:
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_import=True,
    )
    destination = PacsDestination.objects.create(
        facility=gfc,
        name="GFC Internal PACS",
        ae_title="GFCPACS",
        host="127.0.0.1",
        port=free_port(),
    )
    with pytest.raises(Retry), capture(execute=True):
        push_create(
            access=study_access(_Request(dana), study.uuid),  # type: ignore[arg-type]
            destination=destination,
            by=dana,
        )
    return Push.objects.get()


def test_a_failed_push_shows_on_the_home_of_the_facility_that_owns_the_pacs(
    bob, dana, gfc, study, django_capture_on_commit_callbacks
):
    push = _failed_push_into_gfc(bob, dana, gfc, study, django_capture_on_commit_callbacks)
    Push.objects.filter(pk=push.pk).update(status=PushStatus.FAILED, error="rejected at 10.2.3.4")
    assert "GFC Internal PACS" not in client_for(bob).get("/").content.decode()
    assert "GFC Internal PACS" in client_for(dana).get("/").content.decode()


def test_a_view_only_member_cannot_cancel_a_push(
    bob, dana, gfc, study, django_capture_on_commit_callbacks
):
    push = _failed_push_into_gfc(bob, dana, gfc, study, django_capture_on_commit_callbacks)
    viewer = User.objects.create_user(email="v@gfc.example", password=PASSWORD)
    Membership.objects.create(user=viewer, facility=gfc, role="viewer")
    response = client_for(viewer).post(
        f"/studies/{study.uuid}/pacs/", {"action": "cancel", "push": str(push.uuid)}
    )
    assert response.status_code == 302
    push.refresh_from_db()
    assert push.status != PushStatus.CANCELLED
    assert AuditEvent.objects.filter(
        action=AuditAction.ACCESS_DENIED, actor=viewer, detail__action="cancel"
    ).exists()


def test_one_code_opens_once_even_when_two_answers_race(bob, study, monkeypatch):
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="physician",
        recipient_email="dr@x.example",
    )
    Share.objects.filter(pk=share.pk).update(
        code_hash=make_password("123456"), code_expires_at=timezone.now() + timedelta(minutes=5)
    )
    second: list[bool] = []
    matches = link_services._answer_matches

    def answer_then_race(*args: Any, **kwargs: Any) -> bool:
        result = matches(*args, **kwargs)
        if not second:  # the second request checks the same code right now
            second.append(False)
            second[0] = link_services.patient_factor_check(
                share=Share.objects.get(pk=share.pk), request=None, code="123456"
            ).ok
        return result

    monkeypatch.setattr(link_services, "_answer_matches", answer_then_race)
    first = link_services.patient_factor_check(
        share=Share.objects.get(pk=share.pk), request=None, code="123456"
    ).ok
    assert [first, *second].count(True) == 1


def test_bad_links_are_audited_without_their_token(bob, study):
    assert Client().get("/g/not-a-real-token/").status_code == 404
    assert Client().get("/p/not-a-real-token/").status_code == 404
    refusals = AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED)
    assert {e.detail["what"] for e in refusals} == {"guest link", "patient link"}
    assert not any("not-a-real-token" in str(e.detail) for e in refusals)


def test_the_forward_limit_counts_live_forwards(bob, study, django_capture_on_commit_callbacks):
    share, token, patient = _patient(bob, study)
    for n in range(10):
        with django_capture_on_commit_callbacks(execute=True):
            patient.post(f"/p/{token}/forward/", {"email": f"d{n}@x.example", "days": "7"})
        forward = Share.objects.filter(forwarded_from=share).order_by("-id").first()
        assert forward is not None
        patient.post(f"/p/{token}/forwards/{forward.uuid}/revoke/")
    response = patient.post(f"/p/{token}/forward/", {"email": "real.doctor@x.example", "days": "7"})
    assert response.status_code == 302
