"""Sharing a study with a facility or a physician: notification, inbox, receipts, revoke, extend."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, read_testdata, upload
from transfers.models import NotifyStatus, Share, ShareEvent, Study, StudyStatus
from transfers.sharing.services import ShareError, share_create, share_revoke
from transfers.tasks import studies_complete_quiet

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(client, bob_token) -> Study:
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


@pytest.fixture
def dave(gfc: Facility) -> User:
    """A reader at the recipient facility."""
    user = User.objects.create_user(email="dave@gfc.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=gfc, role="reader")
    return user


@pytest.fixture
def eve(db: None) -> User:
    """A reader at an unrelated facility."""
    stluke = Facility.objects.create(name="St. Luke", slug="stluke")
    user = User.objects.create_user(email="eve@stluke.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=stluke, role="reader")
    return user


def _share_with_gfc(bob: User, study: Study, capture: Any, **extra: Any) -> Share:
    with capture(execute=True):
        response = client_for(bob).post(
            "/share/",
            {
                "study": [str(study.uuid)],
                "kind": "facility",
                "recipient_facility": Facility.objects.get(slug="gfc").pk,
                "message": "Please review before the transfer tomorrow.",
                "expires_on": (timezone.localdate() + timedelta(days=10)).isoformat(),
                "can_view": "on",
                "can_download": "on",
                **extra,
            },
        )
    assert response.status_code == 302, response.content.decode()[:3000]
    return Share.objects.get()


def test_the_recipient_facility_is_emailed_without_patient_information(
    bob, study, charlie, dave, mailoutbox, django_capture_on_commit_callbacks
):
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    assert sorted(m.to[0] for m in mailoutbox) == ["charlie@gfc.example", "dave@gfc.example"]
    message = mailoutbox[0]
    everything = message.subject + message.body + message.alternatives[0][0]
    for secret in (
        study.patient_name,
        "CompressedSamples",
        study.patient_id,
        study.description or "x-no-desc",
        study.study_instance_uid,
    ):
        assert secret not in everything
    assert "Kalispell Regional Medical Center" in message.subject
    assert "Please review before the transfer tomorrow." in message.body
    assert f"/shares/{share.uuid}/" in message.body
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT
    assert list(share.events.values_list("kind", flat=True)) == ["created", "notified"]


def test_the_reader_opens_it_and_the_sender_sees_when(
    bob, study, dave, django_capture_on_commit_callbacks
):
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    reader = client_for(dave)
    inbox = reader.get("/inbox/").content.decode()
    assert "New" in inbox and "CompressedSamples, CT1" in inbox
    assert reader.get(f"/shares/{share.uuid}/").status_code == 200
    assert reader.get(f"/studies/{study.uuid}/").status_code == 200
    reader.get(f"/shares/{share.uuid}/")  # a second visit is no new receipt
    share.refresh_from_db()
    assert share.first_opened_by == "dave@gfc.example"
    assert ShareEvent.objects.filter(share=share, kind="opened").count() == 1
    assert "New" not in reader.get("/inbox/").content.decode()
    sent = client_for(bob).get("/sent/").content.decode()
    assert "dave@gfc.example" in sent
    timeline = client_for(bob).get(f"/shares/{share.uuid}/").content.decode()
    assert "Opened" in timeline and "Recipient notified" in timeline
    assert AuditEvent.objects.filter(
        action="share_open", actor=dave, study_instance_uid=study.study_instance_uid
    ).exists()


LOGIN = "login"


@pytest.mark.parametrize(
    ("persona", "expected"),
    [("bob", 200), ("alice", 200), ("dave", 200), ("eve", 404), ("anon", LOGIN)],
)
def test_who_sees_a_shared_study(
    request, persona, expected, bob, alice, dave, eve, study, django_capture_on_commit_callbacks
):
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    user = None if persona == "anon" else request.getfixturevalue(persona)
    for page in (f"/studies/{study.uuid}/", f"/shares/{share.uuid}/"):
        response = client_for(user).get(page)
        if expected == LOGIN:
            assert response.status_code == 302 and "/accounts/login/" in response["Location"]
        else:
            assert response.status_code == expected
            if expected == 404:
                assert b"CompressedSamples" not in response.content


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_revoked_or_expired_share_stops_working_at_once(
    how, bob, dave, study, django_capture_on_commit_callbacks
):
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    reader = client_for(dave)
    assert reader.get(f"/studies/{study.uuid}/").status_code == 200
    if how == "revoked":
        response = client_for(bob).post(f"/shares/{share.uuid}/revoke/", {"confirm": "yes"})
        assert response.status_code == 302
    else:
        Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert reader.get(f"/studies/{study.uuid}/").status_code == 404
    assert reader.get(f"/shares/{share.uuid}/").status_code == 404
    assert "CompressedSamples" not in reader.get("/inbox/").content.decode()
    # The sender still reads the timeline.
    assert client_for(bob).get(f"/shares/{share.uuid}/").status_code == 200


def test_the_sender_extends_within_the_facility_maximum(
    bob, dave, study, django_capture_on_commit_callbacks
):
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    later = timezone.localdate() + timedelta(days=60)
    client_for(bob).post(f"/shares/{share.uuid}/extend/", {"expires_on": later.isoformat()})
    share.refresh_from_db()
    assert timezone.localtime(share.expires_at).date() == later
    too_late = timezone.localdate() + timedelta(days=400)
    response = client_for(bob).post(
        f"/shares/{share.uuid}/extend/", {"expires_on": too_late.isoformat()}, follow=True
    )
    assert b"at most 90 days" in response.content
    share.refresh_from_db()
    assert timezone.localtime(share.expires_at).date() == later


def test_a_share_of_a_study_still_arriving_is_notified_when_it_completes(
    bob, study, dave, mailoutbox, settings, django_capture_on_commit_callbacks
):
    Study.objects.update(status=StudyStatus.RECEIVING, last_received_at=timezone.now())
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    assert mailoutbox == []
    assert Share.objects.get().notify_status == NotifyStatus.WAITING
    with django_capture_on_commit_callbacks(execute=True):
        studies_complete_quiet()  # not quiet long enough yet
    assert mailoutbox == []
    settings.RELAY_STUDY_QUIET_SECONDS = 0
    with django_capture_on_commit_callbacks(execute=True):
        studies_complete_quiet()
    assert [m.to for m in mailoutbox] == [["dave@gfc.example"]]
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT


def test_a_physician_with_an_account_gets_it_in_their_inbox(
    bob, study, eve, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        share, _ = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="physician",
            recipient_email="EVE@stluke.example",
        )
    assert share.recipient_user == eve
    assert [m.to for m in mailoutbox] == [["eve@stluke.example"]]
    assert client_for(eve).get(f"/studies/{study.uuid}/").status_code == 200


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"kind": "physician", "recipient_email": "not-an-address"}, "not a valid e-mail"),
        ({"expires_at": "past"}, "in the future"),
        ({"expires_at": "far"}, "at most 90 days"),
        ({"can_view": False, "can_download": False, "can_import": False}, "at least one thing"),
        ({"recipient_facility": "own"}, "already see"),
    ],
)
def test_bad_shares_are_refused_with_a_reason(bob, study, gfc, krmc, changes, error):
    args: dict[str, Any] = {"kind": "facility", "recipient_facility": gfc}
    args.update(changes)
    if args.get("expires_at") == "past":
        args["expires_at"] = timezone.now() - timedelta(hours=1)
    elif args.get("expires_at") == "far":
        args["expires_at"] = timezone.now() + timedelta(days=365)
    if args.get("recipient_facility") == "own":
        args["recipient_facility"] = krmc
    with pytest.raises(ShareError, match=error):
        share_create(facility=krmc, created_by=bob, studies=[study], **args)
    assert not Share.objects.exists()


def test_nobody_shares_a_study_they_do_not_own(charlie, carol, study, gfc, krmc):
    assert client_for(charlie).get("/share/", {"study": str(study.uuid)}).status_code == 404
    with pytest.raises(ShareError, match="Only senders"):
        share_create(
            facility=krmc,
            created_by=charlie,
            studies=[study],
            kind="facility",
            recipient_facility=gfc,
        )
    with pytest.raises(ShareError, match="own facility"):
        share_create(
            facility=gfc,
            created_by=charlie,
            studies=[study],
            kind="facility",
            recipient_facility=krmc,
        )
    # A reader of the owning facility cannot share either.
    assert client_for(carol).get("/share/", {"study": str(study.uuid)}).status_code == 404
    assert not Share.objects.exists()


def test_an_smtp_failure_is_visible_on_the_sent_page_and_retried(
    bob, study, dave, settings, free_tcp_port, django_capture_on_commit_callbacks
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_tcp_port  # nothing listens
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_TIMEOUT = 5
    from relay.celery import app

    app.conf.task_eager_propagates = False
    try:
        share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    finally:
        app.conf.task_eager_propagates = True
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.FAILED
    assert share.notify_attempts >= 1
    assert "ConnectionRefusedError" in share.notify_error
    sent = client_for(bob).get("/sent/").content.decode()
    assert "Failed (retrying)" in sent
    # Once the mail server is back, the retry delivers it.
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    from transfers.sharing.tasks import share_notify

    share_notify.apply(args=[share.pk])
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.SENT
    assert [m.to for m in mail.outbox] == [["dave@gfc.example"]]


def test_revoking_twice_records_one_event(bob, study, gfc, krmc):
    share, _ = share_create(
        facility=krmc, created_by=bob, studies=[study], kind="facility", recipient_facility=gfc
    )
    share_revoke(share=share, by=bob)
    share_revoke(share=share, by=bob)
    assert ShareEvent.objects.filter(share=share, kind="revoked").count() == 1
    assert re.search("revoked", client_for(bob).get("/sent/").content.decode())


def test_a_patient_link_is_emailed_with_its_token_and_no_patient_data(
    bob, study, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(bob).post(
            "/share/",
            {
                "study": [str(study.uuid)],
                "kind": "patient",
                "recipient_email": "patient@home.example",
                "second_factor": "pin",
                "pin": "482913",
                "expires_on": (timezone.localdate() + timedelta(days=5)).isoformat(),
                "can_view": "on",
            },
        )
    assert response.status_code == 302
    assert [m.to for m in mailoutbox] == [["patient@home.example"]]
    body = mailoutbox[0].body
    assert "CompressedSamples" not in body + mailoutbox[0].subject
    link = re.search(r"https?://[^/\s]+(/p/\S+/)", body).group(1)  # type: ignore[union-attr]
    assert Client().get(link).status_code == 200
    # The sender sees that it went out (main said "E-mail: No e-mail").
    share = Share.objects.get()
    assert share.notify_status == NotifyStatus.SENT
    assert ShareEvent.objects.filter(share=share, kind="notified").exists()
    page = client_for(bob).get(f"/shares/{share.uuid}/").content.decode()
    assert "No e-mail" not in page
    assert "Sent" in page


def test_a_patient_link_email_that_fails_shows_failed_and_retrying(
    bob, study, django_capture_on_commit_callbacks, settings
):
    from celery.exceptions import Retry

    from transfers.sharing.services import patient_link_email

    settings.EMAIL_BACKEND = "tests.transfers.sharing.test_share.RefusingBackend"
    share, token = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="patient",
        recipient_email="patient@home.example",
        second_factor="pin",
        pin="482913",
    )
    assert token is not None
    # Eager Celery: the task's retry surfaces as an exception here.
    with pytest.raises(Retry), django_capture_on_commit_callbacks(execute=True):
        patient_link_email(share=share, raw_token=token)
    share.refresh_from_db()
    assert share.notify_status == NotifyStatus.FAILED
    assert "refused" in share.notify_error
    assert ShareEvent.objects.filter(share=share, kind="notify_failed").exists()


class RefusingBackend:
    """A mail server that is down."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> RefusingBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send_messages(self, messages: Any) -> int:
        raise ConnectionRefusedError("connection refused")


def test_revoking_asks_first_and_a_plain_post_revokes_nothing(
    bob, dave, study, django_capture_on_commit_callbacks
):
    """On main, "Revoke now" acted at once, with no way back."""
    share = _share_with_gfc(bob, study, django_capture_on_commit_callbacks)
    sender = client_for(bob)
    page = sender.get(f"/shares/{share.uuid}/").content.decode()
    assert f'href="/shares/{share.uuid}/revoke/"' in page and "Revoke now" not in page
    question = sender.get(f"/shares/{share.uuid}/revoke/")
    assert question.status_code == 200
    html = question.content.decode()
    assert "Revoke the share with Great Falls Clinic?" in html
    assert "cannot be undone" in html
    assert 'name="confirm" value="yes"' in html
    # A POST that did not confirm (an old page, a stray click) asks again.
    assert sender.post(f"/shares/{share.uuid}/revoke/").status_code == 200
    share.refresh_from_db()
    assert share.revoked_at is None
    assert client_for(dave).get(f"/studies/{study.uuid}/").status_code == 200
    # Nobody but the sending side is even asked.
    assert client_for(dave).get(f"/shares/{share.uuid}/revoke/").status_code == 404
    done = sender.post(f"/shares/{share.uuid}/revoke/", {"confirm": "yes"})
    assert done.status_code == 302
    share.refresh_from_db()
    assert share.revoked_at is not None


def test_readers_have_no_sent_page(carol, dave):
    assert client_for(carol).get("/sent/").status_code == 404
    assert client_for(dave).get("/sent/").status_code == 404
