"""Bad input through the upload API: each gets a clear error, no server error, and what was
already stored stays exactly as it was."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from django.core.files.storage import storages
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from portal.models import AuditEvent
from tests.helpers import dicom_bytes, read_testdata, upload
from transfers.models import Instance, Study

pytestmark = pytest.mark.django_db


def _snapshot() -> dict[str, tuple[str, str]]:
    storage = storages["default"]
    result = {}
    for inst in Instance.objects.all():
        with storage.open(inst.storage_key) as fh:
            result[inst.sop_instance_uid] = (inst.sha256, hashlib.sha256(fh.read()).hexdigest())
    return result


@pytest.fixture
def baseline(client: Client, bob, bob_token: str) -> Callable[..., None]:
    """One good study stored first; the returned check asserts it is unchanged."""
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert upload(client, read_testdata(name), token=bob_token).status_code == 201
    before = _snapshot()
    counts = list(Study.objects.values_list("study_instance_uid", "num_instances", "size_bytes"))

    def unchanged(*, only_these: bool = True) -> None:
        after = _snapshot()
        assert {uid: after.get(uid) for uid in before} == before
        for sha, actual in before.values():
            assert sha == actual
        if only_these:
            assert after == before
            rows = Study.objects.values_list("study_instance_uid", "num_instances", "size_bytes")
            assert list(rows) == counts

    return unchanged


def _reject(client: Client, token: str, data: bytes, status: int = 400) -> str:
    response = upload(client, data, token=token, filename="bad.dcm")
    assert response.status_code == status, response.content
    body = response.json()
    assert body["status"] == "rejected"
    assert body["reason"]
    return body["reason"]


def _minimal_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "NEST^TEST"
    ds.PatientID = "N1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.preamble = bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _save(ds: Dataset, *, enforce: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=enforce)
    return buffer.getvalue()


def test_it_rejects_a_file_that_is_not_dicom(client, bob_token, baseline):
    reason = _reject(client, bob_token, b"Patient list\nSMITH, JOHN\n" * 20)
    assert "Not a DICOM file" in reason
    baseline()


def test_it_rejects_a_zero_byte_file(client, bob_token, baseline):
    response = client.post(
        "/api/v1/instances?facility=krmc",
        data=b"",
        content_type="application/dicom",
        CONTENT_LENGTH="0",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 400
    assert response.json()["status"] == "rejected"
    assert "empty" in response.json()["reason"]
    # The same inside a multipart upload.
    response = client.post(
        "/api/v1/instances?facility=krmc",
        {"file": [_named(b"", "empty.dcm")]},
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    result = response.json()["results"][0]
    assert result["status"] == "rejected"
    assert "empty" in result["reason"]
    baseline()


def _named(data: bytes, name: str) -> io.BytesIO:
    buffer = io.BytesIO(data)
    buffer.name = name
    return buffer


def test_it_rejects_a_truncated_file(client, bob_token, baseline):
    data = dicom_bytes("CT_small.dcm")
    reason = _reject(client, bob_token, data[: len(data) - 5000])
    assert "truncated" in reason
    baseline()


def test_it_rejects_pixel_data_shorter_than_rows_columns_frames(client, bob_token, baseline):
    # A well-formed element whose length is shorter than Rows x Columns needs.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[:1000]
    reason = _reject(client, bob_token, _save(ds))
    assert "128 x 128 x 1" in reason
    baseline()


def test_it_rejects_truncated_compressed_pixel_data(client, bob_token, baseline):
    data = read_testdata("MR_small_RLE.dcm")
    reason = _reject(client, bob_token, data[: len(data) - 2000])
    assert "truncated" in reason
    baseline()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_it_rejects_dicom_without_an_identifier(client, bob_token, baseline, keyword):
    data = dicom_bytes("CT_small.dcm", **{keyword: None})
    reason = _reject(client, bob_token, data)
    assert "has no" in reason
    baseline()


def test_it_rejects_dicom_without_a_sop_instance_uid(client, bob_token, baseline):
    ds = _minimal_dataset()
    del ds.SOPInstanceUID
    del ds.file_meta.MediaStorageSOPInstanceUID
    reason = _reject(client, bob_token, _save(ds, enforce=False))
    assert "SOP Instance UID" in reason
    baseline()


@pytest.mark.parametrize(
    "bad_uid", ["../../etc/x", "1.2..3", ".", "1.2.3a", "1" * 65, "1.2.3/../../4"]
)
def test_it_rejects_uids_that_are_not_uids(
    client, bob_token, baseline, bad_uid, _private_storage: Path
):
    files_before = sorted(p for p in _private_storage.parent.rglob("*") if p.is_file())
    ds = _minimal_dataset()
    ds.StudyInstanceUID = bad_uid
    reason = _reject(client, bob_token, _save(ds, enforce=False))
    assert "not a valid DICOM UID" in reason
    files_after = sorted(p for p in _private_storage.parent.rglob("*") if p.is_file())
    assert files_after == files_before
    assert not Path("/etc/x").exists()
    baseline()


def test_it_zeroes_an_executable_header_hidden_in_the_preamble(client, bob_token, baseline):
    data = bytearray(dicom_bytes("CT_small.dcm"))
    data[:128] = (b"MZ\x90\x00\x03\x00\x00\x00This program cannot be run in DOS mode." * 4)[:128]
    response = upload(client, bytes(data), token=bob_token)
    assert response.status_code == 201
    body = response.json()
    assert body["preamble_zeroed"] is True
    instance = Instance.objects.get(sop_instance_uid=body["sop_instance_uid"])
    with storages["default"].open(instance.storage_key) as fh:
        stored = fh.read()
    assert stored[:128] == bytes(128)
    assert stored[128:] == bytes(data[128:])
    assert instance.sha256 == hashlib.sha256(stored).hexdigest()


def _nested_undefined(depth: int) -> bytes:
    """(0040,A730) nested `depth` levels deep with undefined lengths, explicit VR little endian."""
    open_sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    open_item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_item = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    close_sq = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + open_item) * depth + (close_item + close_sq) * depth


def _nested_defined(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return inner


@pytest.mark.parametrize(
    "builder", [_nested_undefined, _nested_defined], ids=["undefined-length", "defined-length"]
)
def test_it_rejects_3000_nested_sequences(client, bob_token, baseline, builder):
    data = _save(_minimal_dataset()) + builder(3000)
    reason = _reject(client, bob_token, data)
    assert "nests sequences" in reason
    baseline()


def test_it_accepts_reasonable_nesting(client, bob_token, baseline):
    data = _save(_minimal_dataset()) + _nested_defined(5)
    response = upload(client, data, token=bob_token)
    assert response.status_code == 201, response.content


def test_it_answers_413_for_a_file_over_the_maximum_size(client, bob_token, baseline, settings):
    settings.RELAY_MAX_UPLOAD_BYTES = 20_000
    response = upload(client, read_testdata("CT_small.dcm"), token=bob_token)  # 39 kB
    assert response.status_code == 413
    assert "larger than the" in response.json()["reason"]
    baseline()


def test_it_answers_413_when_a_multipart_file_is_over_the_maximum(
    client, bob_token, baseline, settings
):
    settings.RELAY_MAX_UPLOAD_BYTES = 30_000
    response = client.post(
        "/api/v1/instances?facility=krmc",
        {"file": [_named(read_testdata("CT_small.dcm"), "ct.dcm")]},
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 413
    baseline()


def test_it_keeps_the_first_copy_when_the_same_sop_instance_uid_has_other_bytes(
    client, bob_token, baseline
):
    original = Instance.objects.get(
        sop_instance_uid=pydicom.dcmread(get_testdata_file("CT_small.dcm")).SOPInstanceUID
    )
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "SOMEONE^ELSE"
    response = upload(client, _save(ds), token=bob_token)
    assert response.status_code == 409
    body = response.json()
    assert body["status"] == "conflict"
    assert "first copy was kept" in body["reason"]
    assert Instance.objects.filter(sop_instance_uid=original.sop_instance_uid).count() == 1
    baseline()


def test_it_does_nothing_when_the_same_study_is_uploaded_twice(client, bob_token, baseline):
    for name in ("CT_small.dcm", "MR_small.dcm"):
        response = upload(client, read_testdata(name), token=bob_token)
        assert response.status_code == 200
        assert response.json()["status"] == "duplicate"
    assert Instance.objects.count() == 2
    baseline()


def test_it_handles_every_file_of_pydicoms_test_data(client, bob_token, baseline):
    """Including the malformed ones: each is stored or refused with a reason; never a 500."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert len(files) > 50
    outcomes: dict[str, list[str]] = {}
    for path in files:
        response = upload(client, path.read_bytes(), token=bob_token, filename=path.name)
        assert response.status_code < 500, (path.name, response.content)
        body = response.json()
        assert body["status"] in {"stored", "duplicate", "conflict", "rejected"}, body
        if body["status"] in {"rejected", "conflict"}:
            assert body["reason"], path.name
        outcomes.setdefault(body["status"], []).append(path.name)
    # Known malformed and non-DICOM files are refused.
    for name in (
        "MR_truncated.dcm",
        "rtplan_truncated.dcm",
        "no_meta.dcm",
        "README.txt",
        "rtplan.dump",
    ):
        assert name in outcomes["rejected"], outcomes["rejected"]
    # Well-formed files are accepted: stored, or (several test files share one SOP Instance
    # UID in different encodings) reported as a conflict with the copy stored first.
    accepted = outcomes["stored"] + outcomes.get("conflict", []) + outcomes.get("duplicate", [])
    for name in (
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "rtdose.dcm",
        "SC_rgb_rle_2frame.dcm",
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_jpeg.dcm",
        "image_dfl.dcm",
        "ExplVR_BigEnd.dcm",
    ):
        assert name in accepted, name
    assert len(outcomes["stored"]) >= 30
    # And whatever was stored reads back whole.
    for instance in Instance.objects.all():
        with storages["default"].open(instance.storage_key) as fh:
            ds = pydicom.dcmread(fh)
            assert ds.SOPInstanceUID == instance.sop_instance_uid
    baseline(only_these=False)


def test_every_refusal_is_audited_with_its_reason(client, bob_token, baseline):
    _reject(client, bob_token, b"not dicom at all" * 100)
    event = AuditEvent.objects.filter(action="upload", outcome="failure").latest("at")
    assert event.actor_email == "bob@krmc.example"
    assert event.detail["status"] == "rejected"
    assert "Not a DICOM file" in event.detail["reason"]
