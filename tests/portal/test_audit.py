"""The audit trail: what is written, that it cannot be changed, and the facility admin's page."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, connection, transaction
from django.test import Client

from portal.models import AuditEvent
from tests.helpers import PASSWORD, client_for, read_testdata, upload
from tests.transfers.test_worklist import make_study

pytestmark = pytest.mark.django_db


def test_login_logout_and_failed_login_are_audited(bob):
    client = Client(HTTP_USER_AGENT="Firefox/140", REMOTE_ADDR="10.1.2.3")
    response = client.post("/accounts/login/", {"login": "bob@krmc.example", "password": "wrong"})
    assert response.status_code == 200
    assert b"password you specified are not correct" in response.content
    failed = AuditEvent.objects.get(action="login_failed")
    assert failed.outcome == "failure"
    assert failed.detail == {"email": "bob@krmc.example"}
    assert failed.client_ip == "10.1.2.3"
    assert "wrong" not in str(failed.detail)

    response = client.post("/accounts/login/", {"login": "BOB@krmc.example", "password": PASSWORD})
    assert response.status_code == 302
    login = AuditEvent.objects.get(action="login")
    assert (login.actor, login.outcome, login.user_agent) == (bob, "success", "Firefox/140")

    client.post("/accounts/logout/")
    assert AuditEvent.objects.get(action="logout").actor == bob


def test_viewing_a_study_is_audited_with_the_patient(bob, krmc):
    study = make_study(krmc, 1, patient_id="MRN-77")
    client_for(bob).get(f"/studies/{study.uuid}/")
    event = AuditEvent.objects.get(action="study_view")
    assert (event.actor, event.facility, event.patient_id, event.study_instance_uid) == (
        bob,
        krmc,
        "MRN-77",
        study.study_instance_uid,
    )


def test_an_outsiders_attempt_to_open_a_study_shows_nothing(charlie, krmc):
    study = make_study(krmc, 1)
    assert client_for(charlie).get(f"/studies/{study.uuid}/").status_code == 404
    assert not AuditEvent.objects.filter(action="study_view").exists()


def test_the_audit_trail_cannot_be_changed_in_the_database(bob):
    Client().post("/accounts/login/", {"login": "bob@krmc.example", "password": "nope"})
    event = AuditEvent.objects.get()
    with pytest.raises(DatabaseError), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(outcome="success")
    if connection.vendor == "postgresql":
        with pytest.raises(DatabaseError), transaction.atomic():
            AuditEvent.objects.filter(pk=event.pk).delete()
    event.refresh_from_db()
    assert event.outcome == "failure"


def test_the_admin_site_offers_no_way_to_edit_the_audit_trail(admin_client, bob):
    Client().post("/accounts/login/", {"login": "bob@krmc.example", "password": "nope"})
    event = AuditEvent.objects.get(action="login_failed")
    assert admin_client.get("/admin/portal/auditevent/").status_code == 200
    assert admin_client.get("/admin/portal/auditevent/add/").status_code == 403
    assert (
        admin_client.post(
            f"/admin/portal/auditevent/{event.pk}/delete/", {"post": "yes"}
        ).status_code
        == 403
    )
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_the_facility_admin_reads_and_filters_their_facilitys_log(
    client, alice, bob, bob_token, charlie
):
    upload(client, read_testdata("CT_small.dcm"), token=bob_token)
    upload(client, b"garbage" * 50, token=bob_token, filename="garbage.bin")
    other = client_for(charlie)
    other.get("/studies/")
    page = client_for(alice).get("/facilities/krmc/audit/")
    body = page.content.decode()
    assert page.status_code == 200
    assert "bob@krmc.example" in body
    assert "garbage.bin" in body
    assert "charlie@gfc.example" not in body

    failures = (
        client_for(alice).get("/facilities/krmc/audit/", {"outcome": "failure"}).content.decode()
    )
    assert "garbage.bin" in failures
    assert "CompressedSamples" not in failures
    by_patient = (
        client_for(alice).get("/facilities/krmc/audit/", {"patient_id": "1CT1"}).content.decode()
    )
    assert "x.dcm" in by_patient and "garbage.bin" not in by_patient


def test_an_unknown_action_is_refused_and_every_action_fits_its_column():
    from portal.audit import audit_record
    from portal.models import AuditAction

    with pytest.raises(ValueError):
        audit_record(action="image_veiw")
    assert not AuditEvent.objects.exists()
    width = AuditEvent._meta.get_field("action").max_length
    assert all(len(action.value) <= width for action in AuditAction)
    # Not database choices: a new action adds no migration.
    assert not AuditEvent._meta.get_field("action").choices


def test_an_action_no_longer_written_still_reads_on_the_log(alice):
    # Rows written before an action was retired keep their value and show it as stored.
    AuditEvent.objects.create(action="image_view", facility=alice.memberships.get().facility)
    page = client_for(alice).get("/facilities/krmc/audit/").content.decode()
    assert "image_view" in page
