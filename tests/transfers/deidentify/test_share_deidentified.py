"""A de-identified share end to end: the form, the copy's bytes, dciodvfy, who sees what, and
the purge when the share is revoked."""

from __future__ import annotations

import io
import subprocess
from datetime import date, timedelta
from typing import Any

import pydicom
import pytest
from django.core.files.storage import storages
from django.test import Client
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.helpers import client_for, dicom_bytes, require_peer, upload
from transfers.models import DeidentifiedCopy, Instance, Share, Study
from transfers.purge import purge_expired

NAME = "WOLFENDEN^MARGARETHE^ELISE"
IDENTIFIERS = {
    "name": NAME,
    "family": "WOLFENDEN",
    "given": "MARGARETHE",
    "middle": "ELISE",
    "id": "MRN7719034",
    "birth": "19461123",
    "accession": "ACC99310",
    "institution": "Flathead Valley Hospital",
    "referring": "HOLLINGWORTH^BARNABY",
    "performing": "QUARTERMAINE^OPHELIA",
    "station": "FVH-CT-EAST",
}


@pytest.fixture
def original(bob: Any, bob_token: str) -> dict[str, Any]:
    """Two CT images of one series (the second references the first) and an US image."""
    study_uid, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
    first_uid = generate_uid()
    common = {
        "PatientName": NAME,
        "PatientID": IDENTIFIERS["id"],
        "PatientBirthDate": IDENTIFIERS["birth"],
        "AccessionNumber": IDENTIFIERS["accession"],
        "InstitutionName": IDENTIFIERS["institution"],
        "ReferringPhysicianName": IDENTIFIERS["referring"],
        "PerformingPhysicianName": IDENTIFIERS["performing"],
        "StationName": IDENTIFIERS["station"],
        "StudyInstanceUID": study_uid,
        "StudyDate": "20240310",
        "SeriesDate": "20240310",
        "StudyDescription": "CT CHEST WOLFENDEN",
        "FrameOfReferenceUID": frame,
        "DeviceSerialNumber": "SN-4471",
    }
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    reference.ReferencedSOPInstanceUID = first_uid
    files = [
        dicom_bytes(SOPInstanceUID=first_uid, SeriesInstanceUID=series_uid, **common),
        dicom_bytes(
            SeriesInstanceUID=series_uid,
            ReferencedImageSequence=Sequence([reference]),
            **common,
        ),
        dicom_bytes(SeriesInstanceUID=generate_uid(), Modality="US", SeriesNumber=9, **common),
    ]
    client = Client()
    uids: dict[str, Any] = {
        "study": study_uid,
        "series": series_uid,
        "frame": frame,
        "first": first_uid,
    }
    for data in files:
        response = upload(client, data, token=bob_token)
        assert response.status_code == 201, response.content
    uids["all"] = [str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID) for d in files]
    uids["files"] = files
    uids["study_row"] = Study.objects.get(study_instance_uid=study_uid)
    return uids


def _share(client: Client, study: Study, gfc: Any, **extra: Any) -> Any:
    data = {
        "study": str(study.uuid),
        "kind": "facility",
        "recipient_facility": gfc.pk,
        "expires_on": (timezone.localdate() + timedelta(days=7)).isoformat(),
        "can_view": "on",
        "can_download": "on",
        "deidentify": "on",
        **extra,
    }
    return client.post(f"/share/?study={study.uuid}", data)


@pytest.fixture
def shared(
    original: dict[str, Any], bob: Any, gfc: Any, django_capture_on_commit_callbacks: Any
) -> DeidentifiedCopy:
    client = client_for(bob)
    with django_capture_on_commit_callbacks(execute=True):
        response = _share(
            client, original["study_row"], gfc, retain_dates="on", burned_in_confirmed="on"
        )
    assert response.status_code == 302, response.content.decode()[-3000:]
    return DeidentifiedCopy.objects.select_related("study", "share").get()


def _stored(copy: DeidentifiedCopy) -> list[bytes]:
    storage = storages["default"]
    out = []
    for instance in Instance.objects.filter(series__study=copy.study):
        with storage.open(instance.storage_key, "rb") as fh:
            out.append(fh.read())
    return out


def test_it_warns_of_burned_in_text_and_names_the_series(original, bob, gfc):
    response = _share(client_for(bob), original["study_row"], gfc)
    assert response.status_code == 200
    page = response.content.decode()
    assert "may show the patient&#x27;s name or ID in the image itself" in page
    assert "US series 9" in page
    assert not Share.objects.exists() and not DeidentifiedCopy.objects.exists()


def test_a_patient_link_cannot_be_de_identified(original, bob, gfc):
    response = _share(
        client_for(bob),
        original["study_row"],
        gfc,
        kind="patient",
        second_factor="pin",
        pin="583920",
        burned_in_confirmed="on",
    )
    assert response.status_code == 200
    assert "cannot be de-identified" in response.content.decode()
    assert not Share.objects.exists()


def test_no_original_identifier_is_anywhere_in_the_copys_bytes(shared, original):
    stored = _stored(shared)
    assert len(stored) == 3
    needles = [v.encode() for v in IDENTIFIERS.values()]
    needles += [original[k].encode() for k in ("study", "series", "frame", "first")]
    needles += [uid.encode() for uid in original["all"]]
    for data in stored:
        found = [n for n in needles if n in data or n.upper() in data.upper()]
        assert not found, found
    assert shared.study.patient_name.startswith("ANON^")
    assert IDENTIFIERS["family"] not in shared.study.patient_name


def test_uids_are_new_and_consistent_and_references_follow(shared, original):
    datasets = [pydicom.dcmread(io.BytesIO(d)) for d in _stored(shared)]
    assert {ds.StudyInstanceUID for ds in datasets} == {shared.study.study_instance_uid}
    ct = [ds for ds in datasets if ds.Modality == "CT"]
    assert len({ds.SeriesInstanceUID for ds in ct}) == 1
    assert len({ds.FrameOfReferenceUID for ds in ct}) == 1
    referring = next(ds for ds in ct if "ReferencedImageSequence" in ds)
    new_first = shared.uid_map[original["first"]]
    assert referring.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_first
    assert new_first in {ds.SOPInstanceUID for ds in ct}


def test_dates_move_by_the_copys_offset_on_every_instance(shared):
    offset = shared.date_offset_days
    assert offset <= -365
    moved = (date(2024, 3, 10) + timedelta(days=offset)).strftime("%Y%m%d")
    for data in _stored(shared):
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyDate == moved
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert ds.get("DeviceSerialNumber") != "SN-4471"  # device identity not retained
        assert ds.get("StudyDescription") in (None, "")  # descriptions not kept
    assert shared.study.study_date == date(2024, 3, 10) + timedelta(days=offset)


def _errors(dciodvfy: str, data: bytes, tmp_path: Any, name: str) -> set[str]:
    path = tmp_path / name
    path.write_bytes(data)
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return {line.split(" - ", 1)[-1] for line in lines if line.startswith("Error")}


def test_dciodvfy_finds_no_new_error_in_the_copy(shared, original, tmp_path):
    dciodvfy = require_peer("dciodvfy")
    before: set[str] = set()
    for n, data in enumerate(original["files"]):
        before |= _errors(dciodvfy, data, tmp_path, f"in{n}.dcm")
    for n, data in enumerate(_stored(shared)):
        new = _errors(dciodvfy, data, tmp_path, f"out{n}.dcm") - before
        assert not new, new


def test_the_recipient_sees_the_copy_only(shared, original, dana, bob):
    reader = client_for(dana)
    assert reader.get(f"/studies/{shared.study.uuid}/").status_code == 200
    assert reader.get(f"/studies/{original['study_row'].uuid}/").status_code == 404
    zip_response = reader.get(f"/studies/{shared.study.uuid}/download/")
    assert zip_response.status_code == 200
    body = b"".join(getattr(zip_response, "streaming_content"))  # noqa: B009
    assert IDENTIFIERS["family"].encode() not in body
    share_page = reader.get(f"/shares/{shared.share.uuid}/").content.decode()
    assert "de-identified copy of" not in share_page
    assert IDENTIFIERS["family"] not in share_page.upper()


def test_the_mapping_is_for_the_sending_facilitys_senders_and_admins(shared, bob, alice, carol):
    url = f"/shares/{shared.share.uuid}/"
    for person in (bob, alice):
        page = client_for(person).get(url).content.decode()
        assert "de-identified copy of" in page
    assert client_for(carol).get(url).status_code == 404


def test_the_copy_is_not_among_the_senders_studies(shared, original, bob, bob_token):
    page = client_for(bob).get("/studies/").content.decode()
    assert str(original["study_row"].uuid) in page
    assert str(shared.study.uuid) not in page
    found = Client().get("/dicom-web/studies", HTTP_AUTHORIZATION=f"Bearer {bob_token}")
    assert shared.study.study_instance_uid not in found.content.decode()
    assert original["study"] in found.content.decode()


def test_the_copy_is_purged_when_its_share_is_revoked(
    shared, bob, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(bob).post(f"/shares/{shared.share.uuid}/revoke/", {"confirm": "yes"})
    assert response.status_code == 302
    purge_expired()
    shared.study.refresh_from_db()
    assert shared.study.purged_at is not None
    assert not Instance.objects.filter(series__study=shared.study).exists()
    # The original stays for its retention period.
    assert Instance.objects.filter(series__study=shared.original).count() == 3
