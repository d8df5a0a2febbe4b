"""Patient reconciliation of a disc from another hospital."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.core.files.storage import storages
from django.test import Client

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, require_peer, upload
from transfers.models import Instance, Study, StudyStatus
from transfers.reconcile.services import Identity, study_reconcile
from transfers.sharing.services import ShareError, share_create

pytestmark = pytest.mark.django_db

DISC = {
    "PatientID": "OTHER-123",
    "PatientName": "DOE^JANE^Q",
    "IssuerOfPatientID": "SAINT ELSEWHERE",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77",
}


@pytest.fixture
def disc(client: Client, bob_token: str) -> list[bytes]:
    files = [dicom_bytes("CT_small.dcm", **DISC) for _ in range(3)]
    for data in files:
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    return files


def _reconcile(client: Client, study: Study, capture: Any, **data: str) -> Any:
    with capture(execute=True):
        return client.post(f"/studies/{study.uuid}/reconcile/", data)


def _stored(instance: Instance) -> bytes:
    with storages["default"].open(instance.storage_key) as f:
        return f.read()


def test_it_rewrites_the_identity_in_every_copy_and_keeps_what_it_was(
    disc: list[bytes], bob: User, django_capture_on_commit_callbacks: Any, tmp_path: Path
) -> None:
    study = Study.objects.get()
    before = {
        i.sop_instance_uid: pydicom.dcmread(io.BytesIO(_stored(i))) for i in Instance.objects.all()
    }

    response = _reconcile(
        client_for(bob),
        study,
        django_capture_on_commit_callbacks,
        patient_id="KR-555",
        patient_name="DOE^JANE",
        issuer="KRMC",
    )

    assert response.status_code == 302
    study.refresh_from_db()
    assert (study.patient_id, study.patient_name, study.issuer_of_patient_id) == (
        "KR-555",
        "DOE^JANE",
        "KRMC",
    )
    assert not study.reconcile_running and study.reconciled_at is not None
    for instance in Instance.objects.all():
        data = _stored(instance)
        assert hashlib.sha256(data).hexdigest() == instance.sha256
        assert instance.size_bytes == len(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        old = before[instance.sop_instance_uid]
        assert (ds.PatientID, str(ds.PatientName), ds.IssuerOfPatientID) == (
            "KR-555",
            "DOE^JANE",
            "KRMC",
        )
        # Same image, same identity of the image: UIDs, pixels and the rest unchanged.
        assert ds.SOPInstanceUID == old.SOPInstanceUID
        assert ds.StudyInstanceUID == old.StudyInstanceUID
        assert ds.PixelData == old.PixelData
        assert ds.file_meta.TransferSyntaxUID == old.file_meta.TransferSyntaxUID
        (change,) = ds.OriginalAttributesSequence
        assert change.ReasonForTheAttributeModification == "COERCE"
        assert change.ModifyingSystem == "RELAY"
        was = change.ModifiedAttributesSequence[0]
        assert (was.PatientID, str(was.PatientName), was.IssuerOfPatientID) == (
            "OTHER-123",
            "DOE^JANE^Q",
            "SAINT ELSEWHERE",
        )
    assert sum(i.size_bytes for i in Instance.objects.all()) == Study.objects.get().size_bytes
    event = AuditEvent.objects.get(action=AuditAction.PATIENT_RECONCILE)
    assert event.actor == bob
    assert event.detail["from"]["patient_id"] == "OTHER-123"
    assert event.detail["to"]["patient_id"] == "KR-555"
    # dcmtk reads the rewritten files.
    dcmdump = require_peer("dcmdump")
    path = tmp_path / "x.dcm"
    path.write_bytes(_stored(Instance.objects.first()))  # type: ignore[arg-type]
    out = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, check=True).stdout
    assert "KR-555" in out and "OTHER-123" in out


def test_the_same_disc_sent_again_is_already_stored(
    disc: list[bytes],
    client: Client,
    bob: User,
    bob_token: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    study = Study.objects.get()
    _reconcile(
        client_for(bob), study, django_capture_on_commit_callbacks,
        patient_id="KR-555", patient_name="DOE^JANE", issuer="KRMC",
    )  # fmt: skip
    again = upload(client, disc[0], token=bob_token)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert Instance.objects.count() == 3


def test_a_rerun_rewrites_nothing_more(disc: list[bytes]) -> None:
    study = Study.objects.get()
    identity = Identity("KR-555", "DOE^JANE", "KRMC")
    assert study_reconcile(study=study, identity=identity) == 3
    keys = set(Instance.objects.values_list("storage_key", flat=True))
    assert study_reconcile(study=study, identity=identity) == 0
    assert set(Instance.objects.values_list("storage_key", flat=True)) == keys


def test_bad_input_changes_nothing(
    disc: list[bytes], bob: User, django_capture_on_commit_callbacks: Any
) -> None:
    study = Study.objects.get()
    keys = set(Instance.objects.values_list("storage_key", flat=True))
    response = _reconcile(
        client_for(bob), study, django_capture_on_commit_callbacks,
        patient_id="KR\\555", patient_name="DOE^JANE", issuer="KRMC",
    )  # fmt: skip
    assert response.status_code == 200
    assert "no backslash" in response.content.decode()
    assert set(Instance.objects.values_list("storage_key", flat=True)) == keys
    assert Study.objects.get().patient_id == "OTHER-123"
    assert not AuditEvent.objects.filter(action=AuditAction.PATIENT_RECONCILE).exists()


def test_a_study_being_reconciled_cannot_be_shared(
    disc: list[bytes], bob: User, gfc: Facility
) -> None:
    Study.objects.update(reconcile_running=True)
    with pytest.raises(ShareError, match="being reconciled"):
        share_create(
            facility=Study.objects.get().facility,
            created_by=bob,
            studies=list(Study.objects.all()),
            kind="facility",
            recipient_facility=gfc,
        )


@pytest.mark.parametrize("persona", ["carol", "charlie"])
def test_only_the_senders_of_the_facility_reconcile(
    request: Any, persona: str, disc: list[bytes], django_capture_on_commit_callbacks: Any
) -> None:
    study = Study.objects.get()
    client = client_for(request.getfixturevalue(persona))
    assert client.get(f"/studies/{study.uuid}/reconcile/").status_code == 404
    response = _reconcile(
        client, study, django_capture_on_commit_callbacks,
        patient_id="X", patient_name="X^Y", issuer="",
    )  # fmt: skip
    assert response.status_code == 404
    assert Study.objects.get().patient_id == "OTHER-123"


def test_the_page_suggests_local_patients_with_the_same_birth_date(
    client: Client, bob: User, bob_token: str
) -> None:
    local = dicom_bytes(
        "CT_small.dcm", PatientID="KR-555", PatientName="DOE^JANE", PatientBirthDate="19650412"
    )
    arrived = dicom_bytes("CT_small.dcm", PatientBirthDate="19650412", **DISC)
    for data in (local, arrived):
        assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get(study_instance_uid=DISC["StudyInstanceUID"])
    page = client_for(bob).get(f"/studies/{study.uuid}/reconcile/").content.decode()
    assert "KR-555" in page and "This is the patient" in page
