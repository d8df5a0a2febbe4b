"""WADO-RS details a client relies on: Accept parsing (quoted and bare `type`, q-values, `*/*`),
a big-endian image converted, 406 when the asked syntax cannot be produced with the way out
(`transfer-syntax=*`), and a damaged stored copy failing loudly: never sent as if intact,
audited, no delivery metered."""

from __future__ import annotations

import io
import tracemalloc
from typing import Any

import numpy as np
import pydicom
import pytest
from django.core.files.storage import storages
from django.test import Client
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from portal.models import AuditEvent
from tests.helpers import upload
from transfers.dicomweb.accept import AcceptError, accept_parse
from transfers.integrity import IntegrityError
from transfers.models import Instance

from .conftest import UploadedStudy, bearer, study_upload

pytestmark = pytest.mark.django_db


def test_accept_headers_of_every_peer_read_the_same() -> None:
    (quoted,) = accept_parse('multipart/related; type="application/dicom"; transfer-syntax=*')
    (bare,) = accept_parse("multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert (quoted.inner_type, quoted.transfer_syntax) == ("application/dicom", "*")
    assert (bare.inner_type, bare.transfer_syntax) == ("application/octet-stream", "*")
    (inside,) = accept_parse(
        'multipart/related; type="application/dicom; transfer-syntax=1.2.840.10008.1.2.1"'
    )
    assert inside.transfer_syntax == "1.2.840.10008.1.2.1"
    ranked = accept_parse("image/jpeg;q=0.2, multipart/related; type=application/dicom, */*;q=0.1")
    assert [m.type for m in ranked] == ["multipart/related", "image/jpeg", "*/*"]
    assert [m.type for m in accept_parse("text/html;q=0, */*")] == ["*/*"]
    assert accept_parse(None)[0].type == "*/*"
    for bad in ("multipart", "a/b; q=x", "a/b; q=2"):
        with pytest.raises(AcceptError):
            accept_parse(bad)


@pytest.fixture
def big_endian(client: Client, bob_token: str) -> UploadedStudy:
    return study_upload(client, bob_token, sources=(("MR_small_bigendian.dcm", 1),))


def _study(client: Client, token: str, study: UploadedStudy, accept: str) -> Any:
    return client.get(f"/dicom-web/studies/{study.uid}", HTTP_ACCEPT=accept, **bearer(token))


def test_a_big_endian_image_is_converted_to_explicit_little_endian(
    client: Client, read_token: str, big_endian: UploadedStudy
) -> None:
    answer = _study(client, read_token, big_endian, 'multipart/related; type="application/dicom"')
    assert answer.status_code == 200
    (part,) = _dicom_parts(answer)
    assert part.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    source = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    assert part.SOPInstanceUID == big_endian.sop_of("MR_small_bigendian.dcm")
    assert np.array_equal(part.pixel_array, source.pixel_array)


def test_a_syntax_that_cannot_be_produced_is_406_with_the_way_out(
    client: Client, read_token: str, big_endian: UploadedStudy
) -> None:
    # Relay never compresses: JPEG baseline of an uncompressed image cannot be produced.
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    refused = _study(client, read_token, big_endian, jpeg)
    assert refused.status_code == 406
    assert "transfer-syntax=*" in refused.content.decode()
    # As stored, it goes.
    stored = _study(
        client,
        read_token,
        big_endian,
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert stored.status_code == 200
    assert b"transfer-syntax=1.2.840.10008.1.2.2" in b"".join(stored.streaming_content)
    # Nothing but DICOM is offered for instances.
    assert _study(client, read_token, big_endian, "image/png").status_code == 406
    # The second choice, when the first cannot be met.
    second = _study(
        client,
        read_token,
        big_endian,
        f'{jpeg}, multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5',
    )
    assert second.status_code == 200


def _dicom_parts(answer: Any) -> list[pydicom.Dataset]:
    """The application/dicom parts of a multipart/related answer."""
    body = b"".join(answer.streaming_content)
    boundary = answer["Content-Type"].split("boundary=")[1].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        payload = chunk.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
        parts.append(pydicom.dcmread(io.BytesIO(payload)))
    return parts


def _damage(sop: str) -> None:
    instance = Instance.objects.get(sop_instance_uid=sop)
    storage = storages["default"]
    with storage.open(instance.storage_key) as f:
        data = bytearray(f.read())
    data[-10] ^= 0xFF
    storage.delete(instance.storage_key)
    storage.save(instance.storage_key, io.BytesIO(bytes(data)))


def test_a_damaged_copy_fails_loudly(
    client: Client, read_token: str, ct_study: UploadedStudy
) -> None:
    sop = ct_study.sop_of("CT_small.dcm")
    _damage(sop)
    answer = _study(
        client,
        read_token,
        ct_study,
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    assert answer.status_code == 200  # the headers went before the damage was found
    with pytest.raises(IntegrityError):
        b"".join(answer.streaming_content)
    series = ct_study.series_of("CT_small.dcm")
    base = f"/dicom-web/studies/{ct_study.uid}/series/{series}/instances/{sop}"
    metadata = client.get(f"{base}/metadata", **bearer(read_token))
    assert metadata.status_code == 500
    assert "damaged" in metadata.content.decode()
    frames = client.get(f"{base}/frames/1", **bearer(read_token))
    assert frames.status_code == 500
    failures = AuditEvent.objects.filter(action="integrity_failed")
    assert failures.count() == 3
    assert {e.detail["sop_instance_uid"] for e in failures} == {sop}


MULTI = (
    ("MR_small_implicit.dcm", 1),
    ("image_dfl.dcm", 2),
    ("JPEG-LL.dcm", 3),
    ("liver_expb.dcm", 4),
)


def _parts(answer: Any) -> list[bytes]:
    boundary = answer["Content-Type"].split("boundary=")[1]
    body = b"".join(answer.streaming_content)
    pieces = body.split(f"--{boundary}".encode())[1:-1]
    return [piece.partition(b"\r\n\r\n")[2][:-2] for piece in pieces]


def test_implicit_deflated_and_jpeg_lossless_are_converted_to_explicit_little_endian(
    client: Client, bob_token: str, read_token: str
) -> None:
    study = study_upload(client, bob_token, sources=MULTI[:3])
    answer = _study(client, read_token, study, 'multipart/related; type="application/dicom"')
    assert answer.status_code == 200
    parts = _parts(answer)
    assert len(parts) == 3
    for body in parts:
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        source = pydicom.dcmread(io.BytesIO(study.files[ds.SOPInstanceUID]))
        assert np.array_equal(ds.pixel_array, source.pixel_array)


def test_frames_of_a_one_bit_big_endian_image_are_packed_little_endian(
    client: Client, bob_token: str, read_token: str
) -> None:
    study = study_upload(client, bob_token, sources=MULTI[3:])
    name = "liver_expb.dcm"
    url = (
        f"/dicom-web/studies/{study.uid}/series/{study.series_of(name)}"
        f"/instances/{study.sop_of(name)}/frames/3,1"
    )
    answer = client.get(url, **bearer(read_token))
    assert answer.status_code == 200
    source = pydicom.dcmread(io.BytesIO(study.files[study.sop_of(name)]))
    expected = [np.packbits(source.pixel_array[i], bitorder="little").tobytes() for i in (2, 0)]
    assert _parts(answer) == expected


def test_a_study_streams_in_flat_memory(client: Client, bob_token: str, read_token: str) -> None:
    """Twelve 2 MB images go out while Python holds a few megabytes at most: one chunk of
    one stored file at a time, never the study."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(12):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number + 1
        ds.Rows = ds.Columns = 1024
        ds.PixelData = np.full((1024, 1024), number, dtype="<i2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert upload(client, buffer.getvalue(), token=bob_token).status_code == 201
    answer = client.get(
        f"/dicom-web/studies/{study_uid}",
        HTTP_ACCEPT='multipart/related; type="application/dicom"',
        **bearer(read_token),
    )
    tracemalloc.start()
    try:
        sent = sum(len(chunk) for chunk in answer.streaming_content)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > 12 * 2 * 1024 * 1024
    assert peak < 6 * 1024 * 1024, peak
