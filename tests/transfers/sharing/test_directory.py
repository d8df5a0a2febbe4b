"""The facilities a sender may share with: those listed in the directory and those already
exchanged with; never an invited physician's practice, never the whole platform."""

from __future__ import annotations

import pytest

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, read_testdata, upload
from transfers.models import Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


def _share_form(user: User, study: Study) -> str:
    # The facility menu is on the form once "A facility" is chosen.
    return client_for(user).get(f"/share/?study={study.uuid}&to=facility").content.decode()


@pytest.fixture
def study(client, bob_token) -> Study:  # type: ignore[no-untyped-def]
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return Study.objects.get()


def test_an_invited_physicians_practice_is_never_offered_to_anyone(
    bob: User, charlie: User, study: Study, gfc: Facility
) -> None:
    # A guest who kept the studies in an account has a practice of their own.
    from portal.services import practice_create

    practice = practice_create(email="dr.private@example.org")
    assert practice.is_practice and not practice.listed
    # Great Falls' sender, with a study of its own to share, never sees the address.
    own = Study.objects.create(
        facility=gfc, study_instance_uid="1.2.826.0.1.77", status=StudyStatus.COMPLETE
    )
    assert "dr.private@example.org" not in _share_form(charlie, own)
    assert "dr.private@example.org" not in _share_form(bob, study)
    # Nor can the practice be listed.
    from portal.services import ServiceError, facility_listing_set

    with pytest.raises(ServiceError):
        facility_listing_set(facility=practice, listed=True, by=bob)
    practice.refresh_from_db()
    assert not practice.listed


def test_a_sender_sees_listed_facilities_and_those_already_exchanged_with(
    bob: User, study: Study, gfc: Facility
) -> None:
    hidden = Facility.objects.create(name="Unlisted Hospital", slug="unlisted")
    form = _share_form(bob, study)
    assert "Great Falls Clinic" in form
    assert "Unlisted Hospital" not in form
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=hidden,
    )
    assert "Unlisted Hospital" in _share_form(bob, study)


def test_a_facility_admin_lists_their_facility_and_it_is_audited(
    alice: User, bob: User, krmc: Facility, study: Study
) -> None:
    other = Facility.objects.create(name="Glacier Clinic", slug="glacier")
    from portal.models import Membership

    Membership.objects.create(user=alice, facility=other, role="admin")
    assert "Glacier Clinic" not in _share_form(bob, study)
    client_for(alice).post("/facilities/glacier/directory/", {"listed": "on"})
    assert "Glacier Clinic" in _share_form(bob, study)
    event = AuditEvent.objects.get(action=AuditAction.FACILITY_CHANGE)
    assert event.facility == other and event.actor == alice
    assert event.detail == {"before": {"listed": False}, "after": {"listed": True}}
    # Only its admins may.
    assert client_for(bob).post("/facilities/glacier/directory/", {}).status_code == 404
