"""Cancelling a push that waits in the queue or for its next attempt; a running one is not."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import Retry
from django.test import Client

from bench.servers import free_port
from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from transfers.access import study_access
from transfers.dicom.push import push_cancel, push_create, push_send
from transfers.dicom.tasks import push_run
from transfers.models import PacsDestination, Push, PushStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


class FakeRequest:
    def __init__(self, user: User) -> None:
        self.user = user


@pytest.fixture
def shared(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    share, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=list(Study.objects.all()),
        kind="facility",
        recipient_facility=gfc,
        can_import=True,
    )
    return share


def _unreachable(gfc: Facility) -> PacsDestination:
    # Nothing listens on a free port: every attempt fails and asks for a retry.
    return PacsDestination.objects.create(
        facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=free_port()
    )


def _queued(dana: User, gfc: Facility) -> Push:
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    return push_create(access=access, destination=_unreachable(gfc), by=dana)


def test_it_cancels_a_push_waiting_for_its_next_attempt_and_the_retry_does_nothing(
    shared: Share, dana: User, gfc: Facility, django_capture_on_commit_callbacks: Any
) -> None:
    with pytest.raises(Retry), django_capture_on_commit_callbacks(execute=True):
        _queued(dana, gfc)
    push = Push.objects.get()
    assert push.status == PushStatus.QUEUED and push.next_attempt_at is not None
    study = Study.objects.get()

    page = client_for(dana).post(
        f"/studies/{study.uuid}/pacs/", {"action": "cancel", "push": str(push.uuid)}, follow=True
    )

    push.refresh_from_db()
    assert push.status == PushStatus.CANCELLED
    assert push.next_attempt_at is None
    assert "Cancelled" in page.content.decode()
    event = AuditEvent.objects.get(action=AuditAction.PUSH_CANCEL, detail__cancelled=True)
    assert event.actor == dana and event.study_instance_uid == study.study_instance_uid
    assert event.detail["push"] == str(push.uuid)
    # The retry Celery had already scheduled fires later and leaves the push alone.
    assert push_run.apply(args=(push.pk,), retries=1).get() == "cancelled"
    push.refresh_from_db()
    assert (push.status, push.attempts) == (PushStatus.CANCELLED, 1)


def test_push_send_leaves_a_cancelled_push_alone(shared: Share, dana: User, gfc: Facility) -> None:
    push = _queued(dana, gfc)  # not yet run: on_commit never fires inside the test transaction
    assert push_cancel(push=push, by=dana, request=None)

    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.attempts) == (PushStatus.CANCELLED, 0)


def test_it_does_not_cancel_a_running_or_finished_push(
    shared: Share, dana: User, gfc: Facility
) -> None:
    push = _queued(dana, gfc)
    for status in (PushStatus.RUNNING, PushStatus.DONE, PushStatus.FAILED):
        Push.objects.filter(pk=push.pk).update(status=status)
        assert not push_cancel(push=push, by=dana, request=None)
        push.refresh_from_db()
        assert push.status == status
    assert not AuditEvent.objects.filter(
        action=AuditAction.PUSH_CANCEL, detail__cancelled=True
    ).exists()


def test_the_page_offers_cancel_only_while_queued(shared: Share, dana: User, gfc: Facility) -> None:
    push = _queued(dana, gfc)
    url = f"/studies/{Study.objects.get().uuid}/pacs/"
    assert 'value="cancel"' in client_for(dana).get(url).content.decode()
    Push.objects.filter(pk=push.pk).update(status=PushStatus.RUNNING)
    assert 'value="cancel"' not in client_for(dana).get(url).content.decode()
    # Posted anyway (an old page): refused in words, the push goes on.
    page = client_for(dana).post(url, {"action": "cancel", "push": str(push.uuid)}, follow=True)
    assert "can no longer be cancelled" in page.content.decode()
    push.refresh_from_db()
    assert push.status == PushStatus.RUNNING


def test_an_outsider_cannot_cancel(shared: Share, dana: User, gfc: Facility, carol: User) -> None:
    push = _queued(dana, gfc)
    url = f"/studies/{Study.objects.get().uuid}/pacs/"
    # Carol, at the sending facility, sees the study, but the push goes into another
    # facility's PACS: it is not hers to stop.
    client_for(carol).post(url, {"action": "cancel", "push": str(push.uuid)})
    # Erin, at a facility the study was never shared with, gets the same 404 as for any study.
    stluke = Facility.objects.create(name="St. Luke", slug="stluke")
    erin = User.objects.create_user(email="erin@stluke.example", password=PASSWORD)
    Membership.objects.create(user=erin, facility=stluke, role="sender")
    response = client_for(erin).post(url, {"action": "cancel", "push": str(push.uuid)})
    assert response.status_code == 404
    push.refresh_from_db()
    assert push.status == PushStatus.QUEUED
    assert not AuditEvent.objects.filter(
        action=AuditAction.PUSH_CANCEL, detail__cancelled=True
    ).exists()


def test_a_cancelled_push_can_be_sent_again_later(shared: Share, dana: User, gfc: Facility) -> None:
    push = _queued(dana, gfc)
    assert push_cancel(push=push, by=dana, request=None)
    url = f"/studies/{Study.objects.get().uuid}/pacs/"
    assert "Send the rest again" in client_for(dana).get(url).content.decode()

    client_for(dana).post(url, {"action": "rerun", "push": str(push.uuid)})

    push.refresh_from_db()
    assert push.status == PushStatus.QUEUED
