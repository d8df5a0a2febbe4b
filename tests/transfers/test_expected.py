"""Announced instances hold their study receiving until they arrive, the sender gives up on
them, or they expire (issue 13, finding 8: a killed `relay send` left 68/100 "complete")."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from typing import Any

import pydicom
import pytest
from django.test import Client
from django.utils import timezone

from portal.models import AuditEvent, Outcome
from tests.helpers import client_for, dicom_bytes, upload
from transfers.completion import expected_count, studies_complete_quiet
from transfers.models import ExpectedInstance, NotifyStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.13.68"


def _entry(data: bytes, *, study: bool = True) -> dict[str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    stored = bytes(128) + data[128:]
    entry = {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sha256": hashlib.sha256(stored).hexdigest(),
    }
    if study:
        entry["study_instance_uid"] = str(ds.StudyInstanceUID)
    return entry


def _post(client: Client, token: str, body: dict[str, Any]) -> Any:
    return client.post(
        "/api/v1/manifests",
        data={"facility": "krmc", **body},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


@pytest.fixture
def killed_run(client, bob, bob_token, gfc, charlie, django_capture_on_commit_callbacks):
    """A run killed after announcing 100 files and uploading 68: no manifest. The study is
    shared (waiting for completion) and long quiet."""
    files = [
        dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID, InstanceNumber=n)
        for n in range(100)
    ]
    answer = _post(client, bob_token, {"announce": True, "instances": [_entry(f) for f in files]})
    assert answer.json() == {"announced": 100, "already_stored": 0}
    for data in files[:68]:
        assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="facility",
            recipient_facility=gfc,
        )
    Study.objects.update(last_received_at=timezone.now() - timedelta(hours=1))
    return study, files


def test_a_killed_run_is_not_completed_by_the_quiet_period(
    killed_run, mailoutbox, django_capture_on_commit_callbacks
):
    study, _ = killed_run
    with django_capture_on_commit_callbacks(execute=True):
        assert studies_complete_quiet() == 0
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    assert mailoutbox == []


def test_the_sender_completes_it_without_them(
    killed_run, bob, mailoutbox, django_capture_on_commit_callbacks
):
    study, _ = killed_run
    page = client_for(bob).get(f"/studies/{study.uuid}/")
    assert b"Waiting for 32 images announced by" in page.content
    assert b"Complete without them" in page.content
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(bob).post(f"/studies/{study.uuid}/complete/")
    assert response.status_code == 302
    study.refresh_from_db()
    assert study.status == StudyStatus.COMPLETE
    assert ExpectedInstance.objects.count() == 0
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]
    assert Share.objects.get().notify_status == NotifyStatus.SENT
    event = AuditEvent.objects.get(action="study_complete")
    assert (event.actor, event.study_instance_uid, event.detail["missing"]) == (
        bob,
        STUDY_UID,
        32,
    )
    assert b"Complete without them" not in client_for(bob).get(f"/studies/{study.uuid}/").content


@pytest.mark.parametrize("who", ["charlie", "carol"])
def test_an_outsider_or_a_reader_cannot_complete_it(killed_run, who, request, mailoutbox):
    study, _ = killed_run
    user = request.getfixturevalue(who)
    assert b"Complete without them" not in client_for(user).get(f"/studies/{study.uuid}/").content
    assert client_for(user).post(f"/studies/{study.uuid}/complete/").status_code == 404
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    assert expected_count(study=study) == 32
    assert AuditEvent.objects.filter(
        action="access_denied", actor=user, outcome=Outcome.FAILURE
    ).exists()


def test_the_rest_arriving_completes_it(
    killed_run, client, bob_token, mailoutbox, django_capture_on_commit_callbacks
):
    study, files = killed_run
    for data in files[68:]:
        upload(client, data, token=bob_token)
    # Even without a manifest (the second run killed too), the quiet period now completes it.
    Study.objects.update(last_received_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert studies_complete_quiet() == 1
    assert Study.objects.get().status == StudyStatus.COMPLETE
    assert len(mailoutbox) == 1


def test_a_manifest_does_not_complete_a_study_waiting_for_announced_images(
    killed_run, client, bob_token, mailoutbox
):
    study, files = killed_run
    # The old client's manifest: only what is stored.
    answer = _post(client, bob_token, {"instances": [_entry(f, study=False) for f in files[:68]]})
    assert answer.json()["incomplete"] == [str(study.uuid)]
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    # The stored ones' expectations are met and gone; the others remain.
    assert ExpectedInstance.objects.count() == 32
    assert mailoutbox == []


def test_expired_expectations_do_not_hold_the_study(
    killed_run, settings, mailoutbox, django_capture_on_commit_callbacks
):
    study, _ = killed_run
    settings.RELAY_EXPECTED_HOURS = 72
    ExpectedInstance.objects.update(announced_at=timezone.now() - timedelta(hours=73))
    with django_capture_on_commit_callbacks(execute=True):
        assert studies_complete_quiet() == 1
    assert Study.objects.get().status == StudyStatus.COMPLETE
    assert ExpectedInstance.objects.count() == 0  # expired ones are cleared
    assert len(mailoutbox) == 1


def test_announcing_skips_what_is_stored_and_checks_its_input(client, bob_token, carol):
    data = dicom_bytes("CT_small.dcm", StudyInstanceUID=STUDY_UID)
    upload(client, data, token=bob_token)
    assert _post(client, bob_token, {"announce": True, "instances": [_entry(data)]}).json() == {
        "announced": 0,
        "already_stored": 1,
    }
    bad = [{**_entry(data), "study_instance_uid": "1.2.x"}]
    assert _post(client, bob_token, {"announce": True, "instances": bad}).status_code == 400
    no_study = [_entry(data, study=False)]
    assert _post(client, bob_token, {"announce": True, "instances": no_study}).status_code == 400
    assert (
        _post(client, bob_token, {"announce": "yes", "instances": [_entry(data)]}).status_code
        == 400
    )
    assert _post(client, bob_token, {"instances": [], "withdraw": [1]}).status_code == 400
    # A reader's token may not announce (the manifest endpoint writes).
    from portal.models import ApiToken

    reader = ApiToken.issue(user=carol, name="t")[1]
    assert _post(client, reader, {"announce": True, "instances": [_entry(data)]}).status_code == 403
    assert ExpectedInstance.objects.count() == 0
