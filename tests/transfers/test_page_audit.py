"""Pages that show a shared study's patient leave an audit event, whoever looks at them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.test import Client

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from transfers.models import Instance, Series, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    data = dicom_bytes("CT_small.dcm", PatientName="AUDIT^ME", PatientID="KR-5")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    made, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=[Study.objects.get()],
        kind="facility",
        recipient_facility=gfc,
    )
    return made


@pytest.fixture
def operator(db: None) -> User:
    return User.objects.create_superuser(email="ops@relay.example", password=PASSWORD)


def _study() -> Study:
    return Study.objects.get()


PAGES: dict[str, tuple[str, Callable[[Share], str], str, str]] = {
    # name: (who looks, address, action, what the event's detail names the page)
    "inbox": ("dana", lambda s: "/inbox/", AuditAction.STUDY_LIST, "inbox"),
    "sent": ("bob", lambda s: "/sent/", AuditAction.STUDY_LIST, "sent"),
    "share seen by its sender": (
        "bob",
        lambda s: f"/shares/{s.uuid}/",
        AuditAction.STUDY_LIST,
        "share",
    ),
    "new share form": (
        "bob",
        lambda s: f"/share/?study={_study().uuid}",
        AuditAction.STUDY_LIST,
        "share_new",
    ),
    "admin study list": (
        "operator",
        lambda s: "/admin/transfers/study/?q=KR-5",
        AuditAction.STUDY_LIST,
        "admin:study",
    ),
    "admin study": (
        "operator",
        lambda s: f"/admin/transfers/study/{_study().pk}/change/",
        AuditAction.STUDY_VIEW,
        "admin:study",
    ),
    "admin series": (
        "operator",
        lambda s: f"/admin/transfers/series/{Series.objects.get().pk}/change/",
        AuditAction.STUDY_VIEW,
        "admin:series",
    ),
    "admin instance": (
        "operator",
        lambda s: f"/admin/transfers/instance/{Instance.objects.get().pk}/change/",
        AuditAction.STUDY_VIEW,
        "admin:instance",
    ),
}


@pytest.mark.parametrize("name", list(PAGES))
def test_the_page_is_audited(
    name: str, share: Share, bob: User, dana: User, operator: User
) -> None:
    who, address, action, page = PAGES[name]
    user = {"bob": bob, "dana": dana, "operator": operator}[who]
    before = AuditEvent.objects.filter(action=action, actor=user).count()

    response = client_for(user).get(address(share))

    assert response.status_code == 200
    events = AuditEvent.objects.filter(action=action, actor=user).order_by("pk")
    assert events.count() == before + 1
    event = events.last()
    assert event is not None and event.detail.get("page") == page
    if action == AuditAction.STUDY_VIEW:
        # The patient the staff member looked at is on the record.
        assert event.patient_id == "KR-5"


def test_the_study_json_asked_on_its_own_is_audited(share: Share, dana: User) -> None:
    study = _study()
    response = client_for(dana).get(f"/studies/{study.uuid}/view/study.json")
    assert response.status_code == 200
    event = AuditEvent.objects.filter(action=AuditAction.STUDY_VIEW, actor=dana).last()
    assert event is not None
    assert event.detail == {"via": "study.json", "share": str(share.uuid)}
    assert event.patient_id == "KR-5"


def test_the_patient_handout_is_audited(bob: User, client: Client, bob_token: str) -> None:
    data = dicom_bytes("CT_small.dcm", PatientBirthDate="19650412")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    made, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=[Study.objects.get()],
        kind="patient",
        second_factor="birth_date",
    )
    assert client_for(bob).get(f"/shares/{made.uuid}/handout/").status_code == 200
    event = AuditEvent.objects.filter(action=AuditAction.STUDY_LIST, actor=bob).last()
    assert event is not None
    assert event.detail == {"page": "handout", "share": str(made.uuid), "link_shown": False}
