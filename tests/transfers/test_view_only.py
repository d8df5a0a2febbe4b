"""The view-only role: its members open the studies their facility holds or receives, and take
no copy of them (no ZIP, no disc image, no push into a PACS), whatever the share allows."""

from __future__ import annotations

import pytest
from django.test import Client

from portal.models import AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, read_testdata, upload
from transfers.access import StudyAccess
from transfers.dicom.push import PushError, push_share
from transfers.models import PacsDestination, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(client: Client, bob_token: str) -> Study:
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def _member(email: str, facility: Facility, role: str) -> User:
    user = User.objects.create_user(email=email, password=PASSWORD)
    Membership.objects.create(user=user, facility=facility, role=role)
    return user


def _copies_refused(user: User, study: Study) -> None:
    client = client_for(user)
    page = client.get(f"/studies/{study.uuid}/")
    assert page.status_code == 200
    assert client.get(f"/studies/{study.uuid}/view/").status_code == 200
    html = page.content.decode()
    assert f"/studies/{study.uuid}/download/" not in html
    assert client.get(f"/studies/{study.uuid}/download/").status_code in (403, 404)
    disc = client.post(f"/studies/{study.uuid}/cd/", follow=True)
    assert not study.exports.exists()
    assert "not take a copy" in disc.content.decode()


def test_a_view_only_recipient_views_but_takes_no_copy(bob: User, study: Study, gfc: Facility):
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
        can_import=True,
    )
    watcher = _member("watcher@gfc.example", gfc, "viewer")
    _copies_refused(watcher, study)
    destination = PacsDestination.objects.create(
        facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=104
    )
    access = StudyAccess(
        study=study,
        share=study.shares.get(),
        can_view=True,
        can_download=False,
        can_import=False,
        who=watcher.email,
    )
    with pytest.raises(PushError, match="View-only"):
        push_share(access=access, destination=destination, by=watcher)
    # A reader of the same facility keeps every right the share gives.
    reader = _member("reader@gfc.example", gfc, "reader")
    assert client_for(reader).get(f"/studies/{study.uuid}/download/").status_code == 200
    assert AuditEvent.objects.filter(action="study_view", actor=watcher).exists()


def test_a_view_only_member_of_the_holding_facility_takes_no_copy(study: Study, krmc: Facility):
    _copies_refused(_member("watcher@krmc.example", krmc, "viewer"), study)


def test_the_admin_can_give_the_view_only_role(alice: User, bob: User) -> None:
    membership = Membership.objects.get(user=bob)
    client_for(alice).post(f"/facilities/krmc/members/{membership.pk}/role/", {"role": "viewer"})
    membership.refresh_from_db()
    assert membership.role == "viewer"
