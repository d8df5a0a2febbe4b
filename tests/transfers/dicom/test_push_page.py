"""The "Send to PACS" page: it refreshes itself while a push is pending and says when a push
that could not reach the PACS tries again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import Retry
from django.test import Client
from django.utils import timezone

from bench.servers import free_port
from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.access import study_access
from transfers.dicom.push import push_create
from transfers.dicom.tasks import push_run
from transfers.models import PacsDestination, Push, PushStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

REFRESH = '<meta http-equiv="refresh"'


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


def _push(dana: User, gfc: Facility) -> Push:
    destination = PacsDestination.objects.create(
        facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=free_port()
    )
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    return push_create(access=access, destination=destination, by=dana)


def _page(user: User) -> str:
    return client_for(user).get(f"/studies/{Study.objects.get().uuid}/pacs/").content.decode()


def test_it_refreshes_itself_while_a_push_is_pending_and_stops_after(
    shared: Share, dana: User, gfc: Facility
) -> None:
    assert REFRESH not in _page(dana)  # nothing sent yet
    push = _push(dana, gfc)
    assert REFRESH in _page(dana)
    Push.objects.filter(pk=push.pk).update(status=PushStatus.RUNNING)
    assert REFRESH in _page(dana)
    for status in (PushStatus.DONE, PushStatus.FAILED, PushStatus.CANCELLED):
        Push.objects.filter(pk=push.pk).update(status=status)
        assert REFRESH not in _page(dana)


def test_it_shows_when_a_push_that_could_not_connect_tries_again(
    shared: Share, dana: User, gfc: Facility, django_capture_on_commit_callbacks: Any
) -> None:
    before = timezone.now()
    with pytest.raises(Retry), django_capture_on_commit_callbacks(execute=True):
        _push(dana, gfc)
    push = Push.objects.get()
    assert push.next_attempt_at is not None
    # The first retry waits 30 seconds (then 60, 120, ... up to an hour).
    assert before + timedelta(seconds=29) <= push.next_attempt_at
    assert push.next_attempt_at <= timezone.now() + timedelta(seconds=31)

    page = _page(dana)
    when = timezone.localtime(push.next_attempt_at).strftime("%H:%M:%S")
    assert f"Next attempt at {when}" in page
    assert "(attempt 2 of 9)" in page
    assert "did not answer" in page
    assert REFRESH in page

    # The fourth failure waits 240 seconds and says so.
    with pytest.raises(Retry):
        push_run.apply(args=(push.pk,), retries=3).get()
    push.refresh_from_db()
    assert push.next_attempt_at is not None
    assert push.next_attempt_at >= timezone.now() + timedelta(seconds=235)
    assert "(attempt 5 of 9)" in _page(dana)

    # The last one gives up: no next attempt, and the page stops refreshing.
    push_run.apply(args=(push.pk,), retries=push_run.max_retries)
    push.refresh_from_db()
    assert push.status == PushStatus.FAILED and push.next_attempt_at is None
    page = _page(dana)
    assert "Next attempt" not in page and REFRESH not in page


def test_its_refreshes_are_audited_once_not_every_few_seconds(
    shared: Share, dana: User, gfc: Facility
) -> None:
    _push(dana, gfc)
    client = client_for(dana)
    url = f"/studies/{Study.objects.get().uuid}/pacs/"
    first = client.get(url)
    assert 'content="5;url=?refresh=1"' in first.content.decode()
    # The page's own reloads, every few seconds: one look in the trail.
    for _ in range(3):
        assert client.get(url + "?refresh=1").status_code == 200
    views = AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW, detail__page="pacs")
    assert views.count() == 1
    # A look the person asks for (a reload, the link again) is audited every time.
    client.get(url)
    assert views.count() == 2
    # Another browser (a new session) is audited at its first reload too.
    client_for(dana).get(url + "?refresh=1")
    assert views.count() == 3
