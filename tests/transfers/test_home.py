"""Issue 15, item 2: the home page per role. Received studies (new first, "View images"), what was
sent and how it fares, uploads still arriving and what needs action, each with an empty state
that says what to do next; the menu per role; a bounded number of SQL statements."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for
from tests.transfers.test_worklist import make_study
from transfers.models import (
    NotifyStatus,
    PacsDestination,
    Push,
    PushStatus,
    Share,
    Study,
    StudyStatus,
)

pytestmark = pytest.mark.django_db


def _share(
    study: Study, by: User, *, days: int = 10, opened: bool = False, **fields: object
) -> Share:
    share = Share.objects.create(
        facility=study.facility,
        created_by=by,
        expires_at=timezone.now() + timedelta(days=days),
        first_opened_at=timezone.now() if opened else None,
        notify_status=NotifyStatus.SENT,
        **fields,
    )
    share.studies.add(study)
    return share


@pytest.fixture
def physician(db: None) -> User:
    """A referring physician with an account at their own practice, where they only read."""
    practice = Facility.objects.create(name="Whitefish Family Practice", slug="wfp")
    user = User.objects.create_user(email="dr.eve@wfp.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=practice, role="reader")
    return user


def _links(html: str) -> list[str]:
    return re.findall(r'href="([^"]+)"', html)


def test_it_sends_an_anonymous_visitor_to_sign_in(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/"


def test_it_shows_a_reader_no_upload_and_no_sent(carol, krmc):
    response = client_for(carol).get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "/upload/" not in _links(html)
    assert "/sent/" not in _links(html)
    assert "/" in _links(html)  # Home
    assert ">Home</a>" in html
    assert 'id="home-sent"' not in html
    assert "Uploads in progress" not in html


def test_a_reader_who_opens_the_upload_page_gets_relays_not_found_page(carol, krmc):
    response = client_for(carol).get("/upload/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "<h1>Page not found</h1>" in html
    assert "Go to Relay's home page" in html


def test_a_sender_sees_upload_and_sent(bob, krmc):
    html = client_for(bob).get("/").content.decode()
    assert "/upload/" in _links(html)
    assert "/sent/" in _links(html)


def test_a_recipient_physician_sees_the_study_with_view_images(physician, bob, krmc):
    study = make_study(krmc, 1, patient_name="SHARED^SUSAN", status=StudyStatus.COMPLETE)
    _share(study, bob, kind="physician", recipient_user=physician, recipient_email=physician.email)
    response = client_for(physician).get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "SHARED, SUSAN" in html
    assert f"/studies/{study.uuid}/view/" in _links(html)
    assert "View images" in html
    assert "Kalispell Regional Medical Center" in html  # who sent it
    assert '<span class="badge">New</span>' in html


def test_received_studies_are_newest_first_and_opened_ones_are_not_new(dana, bob, krmc, gfc):
    old = make_study(krmc, 1, patient_name="OLDER^ONE", status=StudyStatus.COMPLETE)
    new = make_study(krmc, 2, patient_name="NEWER^TWO", status=StudyStatus.COMPLETE)
    first = _share(old, bob, kind="facility", recipient_facility=gfc, opened=True)
    Share.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(days=2))
    _share(new, bob, kind="facility", recipient_facility=gfc)
    html = client_for(dana).get("/").content.decode()
    assert html.index("NEWER, TWO") < html.index("OLDER, ONE")
    assert html.count('<span class="badge">New</span>') == 1


def test_an_outsider_sees_nothing_of_what_was_shared_elsewhere(charlie, bob, krmc, physician):
    study = make_study(krmc, 1, patient_name="SECRET^PATIENT", status=StudyStatus.COMPLETE)
    _share(study, bob, kind="physician", recipient_user=physician, recipient_email=physician.email)
    make_study(krmc, 2, patient_name="SECRET^ARRIVING", status=StudyStatus.RECEIVING)
    html = client_for(charlie).get("/").content.decode()
    assert "SECRET" not in html


def test_a_sender_sees_sent_shares_with_their_status(bob, alice, krmc, gfc):
    opened = make_study(krmc, 1, patient_name="OPENED^ONE", status=StudyStatus.COMPLETE)
    waiting = make_study(krmc, 2, patient_name="WAITING^TWO", status=StudyStatus.COMPLETE)
    revoked = make_study(krmc, 3, patient_name="REVOKED^THREE", status=StudyStatus.COMPLETE)
    _share(opened, bob, kind="facility", recipient_facility=gfc, opened=True)
    _share(waiting, bob, kind="facility", recipient_facility=gfc)
    _share(revoked, bob, kind="facility", recipient_facility=gfc, revoked_at=timezone.now())
    html = client_for(alice).get("/").content.decode()
    sent = html[html.index('id="home-sent"') :]
    assert "Opened" in sent
    assert "Not yet opened" in sent
    assert "Revoked" in sent
    assert "Great Falls Clinic" in sent
    assert "E-mail sent" in sent


def test_a_sender_sees_uploads_in_progress_and_what_needs_action(bob, krmc, gfc):
    make_study(krmc, 1, patient_name="ARRIVING^ANNA", status=StudyStatus.RECEIVING)
    pushed = make_study(krmc, 2, patient_name="PUSHED^PAUL", status=StudyStatus.COMPLETE)
    pacs = PacsDestination.objects.create(
        facility=krmc, name="Main PACS", ae_title="PACS", host="pacs", port=104
    )
    Push.objects.create(
        study=pushed, destination=pacs, requested_by=bob, status=PushStatus.FAILED, error="refused"
    )
    expiring = make_study(krmc, 3, patient_name="EXPIRING^ERIN", status=StudyStatus.COMPLETE)
    _share(expiring, bob, days=1, kind="facility", recipient_facility=gfc)
    make_study(
        krmc, 4, patient_name="RECONCILE^RITA", status=StudyStatus.COMPLETE, reconcile_running=True
    )

    html = client_for(bob).get("/").content.decode()
    arriving = html[html.index("Uploads in progress") : html.index("Needs action")]
    assert "ARRIVING, ANNA" in arriving
    action = html[html.index("Needs action") :]
    assert "PUSHED, PAUL" in action
    assert f"/studies/{pushed.uuid}/pacs/" in _links(action)
    assert "EXPIRING, ERIN" in action
    assert "RECONCILE, RITA" in action


def test_a_push_that_succeeded_on_a_later_try_needs_no_action(bob, krmc):
    pushed = make_study(krmc, 2, patient_name="PUSHED^PAUL", status=StudyStatus.COMPLETE)
    pacs = PacsDestination.objects.create(
        facility=krmc, name="Main PACS", ae_title="PACS", host="pacs", port=104
    )
    failed = Push.objects.create(
        study=pushed, destination=pacs, requested_by=bob, status=PushStatus.FAILED
    )
    Push.objects.filter(pk=failed.pk).update(created_at=timezone.now() - timedelta(hours=1))
    Push.objects.create(study=pushed, destination=pacs, requested_by=bob, status=PushStatus.DONE)
    html = client_for(bob).get("/").content.decode()
    assert "PUSHED, PAUL" not in html[html.index("Needs action") :]


def test_empty_sections_say_what_to_do_next(bob, carol, krmc):
    sender = client_for(bob).get("/").content.decode()
    assert "Nothing received yet. Studies other facilities share with you appear here." in sender
    assert "Nothing sent yet." in sender
    assert "Upload studies" in sender
    assert "No uploads in progress." in sender
    assert "Nothing needs your attention." in sender
    reader = client_for(carol).get("/").content.decode()
    assert "Nothing received yet. Studies other facilities share with you appear here." in reader
    assert "Upload studies" not in reader


def test_the_sections_follow_the_current_facility(bob, krmc, gfc):
    # bob also reads at Great Falls: there he sends nothing, so its home has no Sent section.
    Membership.objects.create(user=bob, facility=gfc, role="reader")
    make_study(krmc, 1, patient_name="ARRIVING^ANNA", status=StudyStatus.RECEIVING)
    browser = client_for(bob)
    assert "ARRIVING, ANNA" in browser.get("/").content.decode()
    browser.post("/facility/", {"facility": "gfc", "next": "/"})
    html = browser.get("/").content.decode()
    assert "ARRIVING, ANNA" not in html
    assert 'id="home-sent"' not in html
    assert "Great Falls Clinic" in html


def test_the_page_is_audited(bob, krmc, gfc, dana):
    study = make_study(krmc, 1, status=StudyStatus.COMPLETE)
    share = _share(study, bob, kind="facility", recipient_facility=gfc)
    client_for(dana).get("/")
    event = AuditEvent.objects.get(action=AuditAction.STUDY_LIST)
    assert event.actor == dana
    assert event.detail["page"] == "home"
    assert str(share.uuid) in event.detail["shares"]


def _home_statements(user: User) -> int:
    browser = client_for(user)
    with CaptureQueriesContext(connection) as queries:
        assert browser.get("/").status_code == 200
    return len(queries)


def _fill(n: int, krmc: Facility, gfc: Facility, bob: User, start: int) -> None:
    pacs, _ = PacsDestination.objects.get_or_create(
        facility=krmc, name="Main PACS", ae_title="PACS", host="pacs", port=104
    )
    for i in range(start, start + n):
        make_study(krmc, 100 + i, status=StudyStatus.RECEIVING)
        done = make_study(krmc, 200 + i, status=StudyStatus.COMPLETE, reconcile_running=True)
        _share(done, bob, days=1, kind="facility", recipient_facility=gfc)
        theirs = make_study(gfc, 300 + i, status=StudyStatus.COMPLETE)
        _share(theirs, bob, kind="facility", recipient_facility=krmc)
        Push.objects.create(
            study=done, destination=pacs, requested_by=bob, status=PushStatus.PARTIAL
        )


def test_the_number_of_statements_does_not_grow_with_the_data(bob, krmc, gfc):
    _fill(1, krmc, gfc, bob, start=0)
    few = _home_statements(bob)
    _fill(8, krmc, gfc, bob, start=1)
    many = _home_statements(bob)
    assert many == few
    # Session, user and second factor (middleware); memberships; received shares and their
    # studies; sent shares and their studies; uploads; pushes; expiring shares and their
    # studies; reconciling studies; the audit event; the session's current facility, written
    # on its first request (three statements).
    assert many <= 17
