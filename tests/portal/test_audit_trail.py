"""The audit trail as both facilities' admins read it: each event names the facility whose data
it is and the facility of the person acting; the log shows both sides, keeps a refused study's
patient from the other side, and exports as CSV or JSON (streamed, filtered, itself audited)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.access import home_facility
from portal.audit import audit_events_for, audit_export_stream, audit_record
from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, upload
from tests.transfers.test_worklist import make_study
from transfers.deliveries import receiving_facility_of
from transfers.models import PacsDestination, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

PATIENT = "KAL-4711"


@pytest.fixture
def gail(gfc: Facility) -> User:
    """The admin of Great Falls, the facility Kalispell shares with."""
    user = User.objects.create_user(email="gail@gfc.example", password=PASSWORD)
    Membership.objects.create(user=user, facility=gfc, role="admin")
    return user


@pytest.fixture
def shared(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    """A Kalispell study, uploaded by bob, shared with Great Falls to view, download and import."""
    data = dicom_bytes("CT_small.dcm", PatientID=PATIENT, PatientName="DOE^JANE")
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    share, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=list(Study.objects.all()),
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
        can_import=True,
    )
    return share


def _log(user: User, slug: str, **filters: str) -> str:
    response = client_for(user).get(f"/facilities/{slug}/audit/", filters)
    assert response.status_code == 200
    return response.content.decode()


def _export(client: Client, slug: str, **params: str) -> tuple[Any, bytes]:
    response: Any = client.get(f"/facilities/{slug}/audit/export/", params)
    body = b"".join(response.streaming_content) if response.status_code == 200 else b""
    return response, body


# --- both sides -----------------------------------------------------------------------------


def test_both_admins_see_a_recipients_opens_downloads_and_pushes(
    shared: Share, charlie: User, gail: User, alice: User, krmc: Facility, gfc: Facility
) -> None:
    study = shared.studies.get()
    pacs = PacsDestination.objects.create(
        facility=gfc, name="GFC PACS", ae_title="GFCPACS", host="127.0.0.1", port=11112
    )
    charlie_client = client_for(charlie)
    assert charlie_client.get(f"/studies/{study.uuid}/").status_code == 200
    assert charlie_client.get(f"/studies/{study.uuid}/view/").status_code == 200
    download: Any = charlie_client.get(f"/studies/{study.uuid}/download/")
    assert download.status_code == 200
    b"".join(download.streaming_content)
    pushed = charlie_client.post(
        f"/studies/{study.uuid}/pacs/", {"action": "push", "destination": str(pacs.uuid)}
    )
    assert pushed.status_code == 302

    events = AuditEvent.objects.filter(actor=charlie, study_instance_uid=study.study_instance_uid)
    actions = set(events.values_list("action", flat=True))
    assert {"study_view", "share_open", "study_download", "study_push"} <= actions
    # Kalispell's data, Great Falls' person: both facilities are named on every one.
    assert {(e.facility, e.actor_facility) for e in events} == {(krmc, gfc)}

    theirs = _log(gail, "gfc", action="study_download")
    assert "charlie@gfc.example" in theirs and PATIENT in theirs
    assert "At Kalispell Regional Medical Center" in theirs
    ours = _log(alice, "krmc", action="study_download")
    assert "charlie@gfc.example" in ours and "By Great Falls Clinic" in ours
    for action in ("study_push", "share_open", "study_view"):
        assert "charlie@gfc.example" in _log(gail, "gfc", action=action)


def test_a_person_of_two_facilities_acts_for_the_one_the_study_was_shared_with(
    client: Client, bob: User, bob_token: str, charlie: User, gfc: Facility
) -> None:
    # charlie's home is Great Falls; later he also joined Missoula, and Kalispell shares
    # with Missoula: his opens are Missoula's to see, not Great Falls'.
    missoula = Facility.objects.create(name="Missoula Clinic", slug="mso", ae_title="MSO")
    Membership.objects.create(user=charlie, facility=missoula, role="reader")
    assert home_facility(charlie) == gfc
    data = dicom_bytes("CT_small.dcm", PatientID=PATIENT)
    assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=missoula,
    )
    assert client_for(charlie).get(f"/studies/{study.uuid}/view/").status_code == 200

    view = AuditEvent.objects.get(actor=charlie, action="study_view")
    assert view.actor_facility == missoula


def test_every_event_with_a_person_names_the_facility_they_acted_for(
    bob: User, charlie: User, krmc: Facility, gfc: Facility
) -> None:
    client_for(charlie)  # signs in: the login event
    login = AuditEvent.objects.get(action="login", actor=charlie)
    assert (login.facility, login.actor_facility) == (None, gfc)
    # A member acting on their own facility's data acts for it.
    study = make_study(krmc, 1)
    client_for(bob).get(f"/studies/{study.uuid}/")
    view = AuditEvent.objects.get(action="study_view", actor=bob)
    assert (view.facility, view.actor_facility) == (krmc, krmc)
    # Without a person (the gateway, the purge) there is no acting facility.
    assert audit_record(action=AuditAction.PURGE, facility=krmc).actor_facility is None


def test_a_physicians_facility_is_their_home_facility(bob: User, charlie: User) -> None:
    study = make_study(bob.memberships.get().facility, 1)
    share, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="physician",
        recipient_email="charlie@gfc.example",
    )
    # The delivery seam (billing) and the audit trail agree on who receives.
    assert receiving_facility_of(share=share, user=charlie) == home_facility(charlie)


def test_a_refused_open_shows_the_actors_admin_the_attempt_but_not_the_patient(
    charlie: User, gail: User, alice: User, krmc: Facility
) -> None:
    study = make_study(krmc, 1, patient_id=PATIENT)
    assert client_for(charlie).get(f"/studies/{study.uuid}/").status_code == 404
    refused = AuditEvent.objects.get(action="access_denied")
    assert refused.actor_facility is not None and refused.actor_facility.slug == "gfc"

    theirs = _log(gail, "gfc")
    assert "charlie@gfc.example" in theirs and "Refused access" in theirs
    assert PATIENT not in theirs and study.study_instance_uid not in theirs
    # Nor can a search by patient find it.
    assert "charlie@gfc.example" not in _log(gail, "gfc", patient_id=PATIENT)
    assert "charlie@gfc.example" in _log(alice, "krmc", patient_id=PATIENT)


def test_another_facilitys_own_events_stay_with_it(
    bob: User, charlie: User, gail: User, krmc: Facility
) -> None:
    study = make_study(krmc, 1, patient_id=PATIENT)
    client_for(bob).get(f"/studies/{study.uuid}/")
    page = _log(gail, "gfc")
    assert "bob@krmc.example" not in page and PATIENT not in page


# --- export -----------------------------------------------------------------------------------


def test_the_export_is_the_filtered_log_as_csv_and_json_and_is_audited(
    shared: Share, charlie: User, alice: User, krmc: Facility
) -> None:
    study = shared.studies.get()
    client_for(charlie).get(f"/studies/{study.uuid}/view/")
    admin = client_for(alice)

    response, body = _export(admin, "krmc", action="study_view", patient_id=PATIENT)
    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith("text/csv")
    disposition = response["Content-Disposition"]
    day = timezone.localdate().strftime("%Y%m%d")
    assert disposition == f'attachment; filename="audit-krmc-{day}.csv"'
    assert PATIENT not in disposition
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [(r["actor_email"], r["side"], r["patient_id"]) for r in rows] == [
        ("charlie@gfc.example", "holder", PATIENT)
    ]
    assert rows[0]["actor_facility"] == "Great Falls Clinic"
    assert json.loads(rows[0]["detail"])["via"] == "viewer"

    response, body = _export(admin, "krmc", action="study_view", format="json")
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith('.json"')
    events = json.loads(body)
    assert [e["actor_email"] for e in events] == ["charlie@gfc.example"]
    assert events[0]["detail"]["via"] == "viewer"

    exports = AuditEvent.objects.filter(action="audit_export").order_by("id")
    assert [e.detail["format"] for e in exports] == ["csv", "json"]
    first = exports[0]
    assert (first.actor, first.facility, first.patient_id) == (alice, krmc, PATIENT)
    assert first.detail["filters"] == {"action": "study_view"}


def test_the_recipients_admin_exports_their_peoples_side(
    shared: Share, charlie: User, gail: User
) -> None:
    client_for(charlie).get(f"/studies/{shared.studies.get().uuid}/view/")
    _, body = _export(client_for(gail), "gfc", action="study_view", format="json")
    events = json.loads(body)
    assert [(e["actor_email"], e["side"]) for e in events] == [("charlie@gfc.example", "actor")]
    assert events[0]["facility"] == "Kalispell Regional Medical Center"


def test_exported_cells_cannot_run_as_formulas(alice: User, krmc: Facility) -> None:
    # What an outsider controls ends up in cells: the address tried at login, the browser's
    # user agent, a search typed into a page.
    request = RequestFactory().get("/", HTTP_USER_AGENT='=HYPERLINK("http://evil.example")')
    audit_record(
        action=AuditAction.LOGIN_FAILED,
        request=request,
        facility=krmc,
        detail={"email": "=cmd|' /C calc'!A0"},
    )
    for value in ("+1+1", "-1+1", "@SUM(1)"):
        audit_record(action=AuditAction.STUDY_LIST, facility=krmc, detail={"q": value})
    _, body = _export(client_for(alice), "krmc")
    rows = list(csv.reader(io.StringIO(body.decode())))
    cells = [cell for row in rows[1:] for cell in row]
    assert "'=cmd|' /C calc'!A0" in cells
    assert '\'=HYPERLINK("http://evil.example")' in cells
    assert not any(cell[:1] in ("=", "+", "-", "@") for cell in cells)


def test_the_export_reads_the_trail_a_batch_at_a_time_in_order(krmc: Facility) -> None:
    # Several events in the same instant: the batches must neither skip nor repeat one.
    now = timezone.now()
    made = [
        AuditEvent.objects.create(
            action="study_list", facility=krmc, at=now - timedelta(seconds=n // 3)
        )
        for n in range(7)
    ]
    expected = sorted(made, key=lambda e: (e.at, e.pk), reverse=True)
    with CaptureQueriesContext(connection) as queries:
        rows = list(
            csv.DictReader(
                io.StringIO(
                    "".join(audit_export_stream(audit_events_for(krmc), krmc, "csv", batch=3))
                )
            )
        )
    assert [r["at"] for r in rows] == [e.at.isoformat() for e in expected]
    assert len(rows) == 7
    selects = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    # 3 + 3 + 1: never the whole trail in one read.
    assert len(selects) == 3 and all("LIMIT 3" in sql for sql in selects)


def test_a_filter_that_does_not_read_exports_nothing(alice: User, krmc: Facility) -> None:
    # Not the whole trail instead: an export is never wider than what was asked.
    audit_record(action=AuditAction.STUDY_LIST, facility=krmc)
    response, body = _export(client_for(alice), "krmc", date_from="last tuesday")
    assert response.status_code == 400 and body == b""


@pytest.mark.parametrize("who", ["bob", "carol", "charlie", "gail"])
def test_only_the_facilitys_admin_may_export(
    request: pytest.FixtureRequest, who: str, alice: User, krmc: Facility
) -> None:
    user = request.getfixturevalue(who)
    response, _ = _export(client_for(user), "krmc")
    assert response.status_code == 404
    refused = AuditEvent.objects.get(action="access_denied")
    assert (refused.actor, refused.facility, refused.outcome) == (user, krmc, "failure")
    assert refused.detail["page"] == "audit export"
    assert not AuditEvent.objects.filter(action="audit_export").exists()
    # The same answer as for a facility that does not exist.
    assert _export(client_for(user), "nowhere")[0].status_code == 404


def test_signed_out_visitors_are_sent_to_sign_in(krmc: Facility) -> None:
    response = Client().get("/facilities/krmc/audit/export/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


# --- the filter keeps the patient out of the URL ----------------------------------------------


def test_a_search_by_patient_keeps_the_patient_id_out_of_the_url(
    alice: User, bob: User, krmc: Facility
) -> None:
    study = make_study(krmc, 1, patient_id=PATIENT)
    client_for(bob).get(f"/studies/{study.uuid}/")
    make_study(krmc, 2, patient_id="OTHER-1")
    admin = client_for(alice)

    posted = admin.post("/facilities/krmc/audit/", {"patient_id": PATIENT, "action": ""})
    assert posted.status_code == 302
    location = posted["Location"]
    assert PATIENT not in location and "search=" in location
    page = admin.get(location).content.decode()
    assert PATIENT in page
    assert 'value="KAL-4711"' in page  # the form shows what was searched
    # The page's download links carry the key, not the patient ID.
    key = location.split("search=")[1]
    assert f"/facilities/krmc/audit/export/?search={key}&amp;format=csv" in page
    assert f"patient_id={PATIENT}" not in page
    _, body = _export(admin, "krmc", search=key)
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert rows and {r["patient_id"] for r in rows} == {PATIENT}

    # The key means nothing in another session, even the same admin's.
    other = client_for(alice)
    assert "This search has expired" in other.get(location).content.decode()
    assert _export(other, "krmc", search=key)[0].status_code == 404


def test_a_date_out_of_range_is_a_clear_refusal_not_a_crash(alice, krmc):
    from tests.helpers import client_for as signed_in

    client = signed_in(alice)
    page = client.get("/facilities/krmc/audit/?date_to=9999-12-31")
    assert page.status_code == 200
    assert b"Choose a date between 2000 and 2999." in page.content
    export = client.get("/facilities/krmc/audit/export/?format=csv&date_to=9999-12-31")
    assert export.status_code == 400
