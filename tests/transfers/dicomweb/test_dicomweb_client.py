"""dicomweb-client (the Python DICOMweb client) against a running Relay: searches, whole-study
retrieval converted and as stored, metadata whose BulkDataURIs it follows, and frames of
compressed and uncompressed images, through an API token and through a signed-in session."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from django.conf import settings
from django.core.files.storage import storages
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian

from portal.models import AuditEvent, User
from tests.helpers import client_for
from transfers.models import Instance

from .conftest import UploadedStudy, study_upload

pytestmark = pytest.mark.django_db(transaction=True)


def multipart_parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """A multipart/related answer's parts: (headers, body), split as RFC 2046 says."""
    content_type = response.headers["Content-Type"]
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    body = response.content
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    pieces = body[len(boundary) + 4 : -len(boundary) - 8].split(f"\r\n--{boundary}\r\n".encode())
    parts = []
    for piece in pieces:
        head, _, content = piece.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def _token_client(url: str, token: str) -> DICOMwebClient:
    return DICOMwebClient(f"{url}/dicom-web", headers={"Authorization": f"Bearer {token}"})


def _session_client(url: str, user: User) -> DICOMwebClient:
    signed_in = client_for(user)
    session = requests.Session()
    session.cookies.set(
        settings.SESSION_COOKIE_NAME, signed_in.cookies[settings.SESSION_COOKIE_NAME].value
    )
    return DICOMwebClient(f"{url}/dicom-web", session=session)


@pytest.fixture(params=["token", "session"])
def dicomweb(
    request: Any, live_server: Any, read_token: str, bob: User
) -> Iterator[DICOMwebClient]:
    if request.param == "token":
        client = _token_client(live_server.url, read_token)
    else:
        client = _session_client(live_server.url, bob)
    yield client
    # Its kept-alive connections hold the live server's threads, and their database sessions.
    client._session.close()


@pytest.fixture
def two_studies(client: Any, bob_token: str) -> tuple[UploadedStudy, UploadedStudy]:
    first = study_upload(client, bob_token)
    second = study_upload(
        client,
        bob_token,
        patient_name="SMITH^JOHN",
        patient_id="PID-2",
        study_date="20230101",
        accession="ACC2",
        sources=(("CT_small.dcm", 1),),
    )
    return first, second


def _uids(answers: list[dict[str, Any]]) -> set[str]:
    return {answer["0020000D"]["Value"][0] for answer in answers}


def test_it_searches_studies_series_and_instances(
    dicomweb: DICOMwebClient, two_studies: tuple[UploadedStudy, UploadedStudy]
) -> None:
    doe, smith = two_studies
    assert _uids(dicomweb.search_for_studies(search_filters={"PatientName": "*doe*"})) == {doe.uid}
    assert _uids(dicomweb.search_for_studies(search_filters={"PatientName": "sm?th^j**"})) == {
        smith.uid
    }
    assert _uids(dicomweb.search_for_studies(search_filters={"StudyDate": "20240101-"})) == {
        doe.uid
    }
    assert _uids(
        dicomweb.search_for_studies(search_filters={"StudyDate": "20221201-20230131"})
    ) == {smith.uid}
    both = dicomweb.search_for_studies(
        search_filters={"StudyInstanceUID": f"{doe.uid}\\{smith.uid}"}
    )
    assert _uids(both) == {doe.uid, smith.uid}
    assert _uids(dicomweb.search_for_studies(search_filters={"00100020": "PID-2"})) == {smith.uid}
    assert _uids(dicomweb.search_for_studies(search_filters={"ModalitiesInStudy": "MR\\US"})) == {
        doe.uid
    }
    # includefield: an attribute that is not returned by default comes when asked.
    (answer,) = dicomweb.search_for_studies(
        search_filters={"AccessionNumber": "ACC2"}, fields=["StudyDescription"]
    )
    assert "00081030" in answer
    assert answer["00100010"]["Value"] == [{"Alphabetic": "SMITH^JOHN"}]
    assert answer["00201208"]["Value"] == [1]
    assert answer["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{smith.uid}")
    # Paging: one at a time, the second page the other study.
    page1 = dicomweb.search_for_studies(limit=1, offset=0)
    page2 = dicomweb.search_for_studies(limit=1, offset=1)
    assert len(page1) == len(page2) == 1 and _uids(page1 + page2) == {doe.uid, smith.uid}

    series = dicomweb.search_for_series(doe.uid)
    assert {s["0020000E"]["Value"][0] for s in series} == {sop[0] for sop in doe.where.values()}
    assert {s["00080060"]["Value"][0] for s in series} == {"CT", "MR", "OT"}
    ct_series = doe.series_of("CT_small.dcm")
    (instance,) = dicomweb.search_for_instances(doe.uid, ct_series)
    assert instance["00080018"]["Value"] == [doe.sop_of("CT_small.dcm")]
    assert instance["00280010"]["Value"] == [128]
    assert len(dicomweb.search_for_instances(doe.uid)) == 4


def test_it_warns_when_more_results_can_be_asked_for(
    live_server: Any, read_token: str, two_studies: Any
) -> None:
    headers = {"Authorization": f"Bearer {read_token}"}
    url = f"{live_server.url}/dicom-web/studies"
    more = requests.get(url, params={"limit": "1"}, headers=headers, timeout=20)
    assert more.status_code == 200
    assert more.headers["Content-Type"] == "application/dicom+json"
    assert "There are additional results that can be requested" in more.headers["Warning"]
    last = requests.get(url, params={"limit": "1", "offset": "1"}, headers=headers, timeout=20)
    assert "Warning" not in last.headers
    fuzzy = requests.get(url, params={"fuzzymatching": "true"}, headers=headers, timeout=20)
    assert "Only literal matching" in fuzzy.headers["Warning"]
    none = requests.get(url, params={"PatientID": "nobody"}, headers=headers, timeout=20)
    assert none.json() == []


def _source(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def test_it_retrieves_a_study_converted_by_default(
    dicomweb: DICOMwebClient, ct_study: UploadedStudy
) -> None:
    retrieved = dicomweb.retrieve_study(ct_study.uid)
    assert len(retrieved) == 4
    for ds in retrieved:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        source = _source(ct_study.files[ds.SOPInstanceUID])
        assert np.array_equal(ds.pixel_array, source.pixel_array), ct_study.where[ds.SOPInstanceUID]
    assert AuditEvent.objects.filter(
        action="study_download", study_instance_uid=ct_study.uid, detail__via="dicomweb"
    ).exists()


def _stored(sop: str) -> bytes:
    instance = Instance.objects.get(sop_instance_uid=sop)
    with storages["default"].open(instance.storage_key) as f:
        return f.read()


def test_it_retrieves_a_study_as_stored_byte_for_byte(
    dicomweb: DICOMwebClient, live_server: Any, read_token: str, ct_study: UploadedStudy
) -> None:
    retrieved = dicomweb.retrieve_study(ct_study.uid, media_types=(("application/dicom", "*"),))
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in retrieved} == {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    }
    # The bytes of each part are the stored copy's, and each part names its own syntax.
    answer = requests.get(
        f"{live_server.url}/dicom-web/studies/{ct_study.uid}",
        headers={
            "Authorization": f"Bearer {read_token}",
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
        timeout=20,
    )
    parts = multipart_parts(answer)
    assert len(parts) == 4
    for headers, body in parts:
        ds = _source(body)
        assert body == _stored(ds.SOPInstanceUID)
        assert headers["content-type"] == (
            f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
        )


def test_it_follows_metadata_bulk_data_uris(
    dicomweb: DICOMwebClient, ct_study: UploadedStudy
) -> None:
    ct_series = ct_study.series_of("CT_small.dcm")
    (metadata,) = dicomweb.retrieve_series_metadata(ct_study.uid, ct_series)
    sop = ct_study.sop_of("CT_small.dcm")
    assert metadata["00080018"]["Value"] == [sop]
    assert metadata["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    pixels = metadata["7FE00010"]
    assert pixels["vr"] == "OW" and "Value" not in pixels
    (data,) = dicomweb.retrieve_bulkdata(pixels["BulkDataURI"])
    assert data == _source(ct_study.files[sop]).PixelData

    jp2 = ct_study.sop_of("MR_small_jp2klossless.dcm")
    single = dicomweb.retrieve_instance_metadata(
        ct_study.uid, ct_study.series_of("MR_small_jp2klossless.dcm"), jp2
    )
    assert single["7FE00010"]["vr"] == "OB"
    # Uncompressed by default: the decoded values, little endian.
    (decoded,) = dicomweb.retrieve_bulkdata(single["7FE00010"]["BulkDataURI"])
    assert decoded == _source(ct_study.files[jp2]).pixel_array.astype("<i2").tobytes()
    assert len(dicomweb.retrieve_study_metadata(ct_study.uid)) == 4
    assert AuditEvent.objects.filter(
        action="study_view", study_instance_uid=ct_study.uid, detail__what="metadata"
    ).exists()


def _frames(
    dicomweb: DICOMwebClient, study: UploadedStudy, name: str, numbers: list[int], **kw: Any
) -> list[bytes]:
    sop = study.sop_of(name)
    return dicomweb.retrieve_instance_frames(
        study.uid, study.series_of(name), sop, frame_numbers=numbers, **kw
    )


def _as_stored(source: pydicom.Dataset) -> Iterator[bytes]:
    count = int(source.get("NumberOfFrames") or 1)
    for index in range(count):
        yield get_frame(source.PixelData, index, number_of_frames=count)


def test_it_sends_frames_compressed_as_stored_or_decoded(
    dicomweb: DICOMwebClient, ct_study: UploadedStudy
) -> None:
    stored = (("application/octet-stream", "*"),)
    # JPEG 2000, one frame: the codestream as stored.
    jp2 = _source(ct_study.files[ct_study.sop_of("MR_small_jp2klossless.dcm")])
    assert _frames(
        dicomweb, ct_study, "MR_small_jp2klossless.dcm", [1], media_types=stored
    ) == list(_as_stored(jp2))
    # RLE, two frames asked in reverse order.
    rle = _source(ct_study.files[ct_study.sop_of("SC_rgb_rle_2frame.dcm")])
    first, second = _as_stored(rle)
    assert _frames(dicomweb, ct_study, "SC_rgb_rle_2frame.dcm", [2, 1], media_types=stored) == [
        second,
        first,
    ]
    # Asked uncompressed (the client's default): decoded, raw.
    (raw,) = _frames(dicomweb, ct_study, "SC_rgb_rle_2frame.dcm", [2])
    assert raw == rle.pixel_array[1].tobytes()
    # Stored uncompressed: the frame's bytes, either way.
    plain = _source(ct_study.files[ct_study.sop_of("SC_rgb_2frame.dcm")])
    size = len(plain.PixelData) // 2
    for kw in ({}, {"media_types": stored}):
        assert _frames(dicomweb, ct_study, "SC_rgb_2frame.dcm", [2], **kw) == [
            plain.PixelData[size:]
        ]


def test_each_frame_part_names_its_transfer_syntax_as_ohif_needs(
    live_server: Any, read_token: str, ct_study: UploadedStudy
) -> None:
    name = "MR_small_jp2klossless.dcm"
    url = (
        f"{live_server.url}/dicom-web/studies/{ct_study.uid}/series/{ct_study.series_of(name)}"
        f"/instances/{ct_study.sop_of(name)}/frames/1"
    )
    headers = {
        "Authorization": f"Bearer {read_token}",
        # OHIF's own header: the type not quoted.
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
    }
    ((part_headers, _),) = multipart_parts(requests.get(url, headers=headers, timeout=20))
    assert part_headers["content-type"] == (
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.90"
    )
    missing = requests.get(url.replace("/frames/1", "/frames/2"), headers=headers, timeout=20)
    assert missing.status_code == 404
    image = requests.get(url, headers={**headers, "Accept": "image/jpeg"}, timeout=20)
    assert image.status_code == 406


def test_an_outsider_finds_nothing_and_gets_404(
    live_server: Any, charlie: User, ct_study: UploadedStudy
) -> None:
    outsider = _session_client(live_server.url, charlie)
    # A refused answer leaves requests' connection open behind it; not kept alive, the live
    # server's thread (and its database session) ends with each request.
    outsider._session.headers["Connection"] = "close"
    try:
        assert outsider.search_for_studies() == []
        assert outsider.search_for_series(ct_study.uid) == []
        for call in (
            lambda: outsider.retrieve_study(ct_study.uid),
            lambda: outsider.retrieve_study_metadata(ct_study.uid),
        ):
            with pytest.raises(requests.HTTPError) as refused:
                call()
            assert refused.value.response.status_code == 404
    finally:
        outsider._session.close()
    assert AuditEvent.objects.filter(action="access_denied", actor=charlie).count() == 2
