"""The manifest that ends an upload: studies complete only when everything listed is intact."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.test import Client

from tests.helpers import dicom_bytes, upload
from transfers.models import NotifyStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


def _stored_sha(data: bytes) -> str:
    if data[128:132] == b"DICM":
        data = bytes(128) + data[128:]
    return hashlib.sha256(data).hexdigest()


def _entry(data: bytes) -> dict[str, str]:
    import io

    import pydicom

    uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
    return {"sop_instance_uid": uid, "sha256": _stored_sha(data)}


def _manifest(
    client: Client, token: str, entries: list[dict[str, str]], facility: str = "krmc"
) -> Any:
    return client.post(
        "/api/v1/manifests",
        data={"facility": facility, "instances": entries},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {token}",
    )


@pytest.fixture
def three_slices() -> list[bytes]:
    slices = [
        dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.840.99.1", InstanceNumber=n)
        for n in (1, 2, 3)
    ]
    hidden = bytearray(slices[2])
    hidden[:2] = b"MZ"  # a preamble the server zeroes: the manifest hash is of the zeroed copy
    slices[2] = bytes(hidden)
    return slices


def test_a_study_completes_when_every_listed_instance_is_stored(
    client,
    bob,
    bob_token,
    gfc,
    charlie,
    three_slices,
    mailoutbox,
    django_capture_on_commit_callbacks,
):
    for data in three_slices[:2]:
        assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get()
    with django_capture_on_commit_callbacks(execute=True):
        share, _ = share_create(
            facility=study.facility,
            created_by=bob,
            studies=[study],
            kind="facility",
            recipient_facility=gfc,
        )
    assert share.notify_status == NotifyStatus.WAITING

    entries = [_entry(d) for d in three_slices]
    answer = _manifest(client, bob_token, entries).json()
    assert answer["incomplete"] == [str(study.uuid)]
    assert answer["missing"] == [entries[2]["sop_instance_uid"]]
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    assert mailoutbox == []

    assert upload(client, three_slices[2], token=bob_token).json()["preamble_zeroed"] is True
    with django_capture_on_commit_callbacks(execute=True):
        answer = _manifest(client, bob_token, entries).json()
    assert answer == {
        "complete": [str(study.uuid)],
        "incomplete": [],
        "missing": [],
        "mismatched": [],
        # Of those, the studies with a share whose recipients are told (the upload page says so).
        "shared": [str(study.uuid)],
    }
    study.refresh_from_db()
    assert study.status == StudyStatus.COMPLETE
    assert Share.objects.get().notify_status == NotifyStatus.SENT
    assert [m.to for m in mailoutbox] == [["charlie@gfc.example"]]


def test_an_instance_stored_with_other_bytes_keeps_the_study_incomplete(
    client, bob_token, three_slices
):
    for data in three_slices:
        upload(client, data, token=bob_token)
    entries = [_entry(d) for d in three_slices]
    entries[1]["sha256"] = "0" * 64
    answer = _manifest(client, bob_token, entries).json()
    assert answer["mismatched"] == [entries[1]["sop_instance_uid"]]
    assert Study.objects.get().status == StudyStatus.RECEIVING


def test_another_facilitys_instances_count_as_missing(client, bob_token, charlie, three_slices):
    from portal.models import ApiToken

    for data in three_slices:
        upload(client, data, token=bob_token)
    token = ApiToken.issue(user=charlie, name="t")[1]
    answer = _manifest(client, token, [_entry(d) for d in three_slices], facility="gfc").json()
    assert len(answer["missing"]) == 3 and answer["complete"] == []
    assert Study.objects.get().status == StudyStatus.RECEIVING


@pytest.mark.parametrize(
    "body",
    [
        {"facility": "krmc", "instances": []},
        {"facility": "krmc", "instances": [{"sop_instance_uid": "../x", "sha256": "0" * 64}]},
        {"facility": "krmc", "instances": [{"sop_instance_uid": "1.2.3", "sha256": "xyz"}]},
        {"facility": "krmc", "instances": "all of them"},
    ],
)
def test_a_malformed_manifest_is_refused(client, bob_token, body):
    response = client.post(
        "/api/v1/manifests",
        data=body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 400
    assert response.json()["reason"]


def test_a_study_without_a_share_is_not_reported_as_shared(client, bob_token, three_slices):
    for data in three_slices:
        assert upload(client, data, token=bob_token).status_code == 201
    answer = _manifest(client, bob_token, [_entry(d) for d in three_slices]).json()
    assert answer["complete"] == [str(Study.objects.get().uuid)]
    assert answer["shared"] == []
