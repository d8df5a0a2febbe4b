"""STOW-RS: dicomweb-client and Orthanc's DICOMweb plugin store instances into Relay.

What a sender checks: the instances are held byte for byte as sent (preamble zeroed, as every
upload), the answer lists each one with its RetrieveURL or its failure reason and the HTTP
status says whether all, some or none were kept; a read-only token stores nothing; a body over
1 MB sent chunked (as dicomweb-client sends it) arrives whole; what was stored is found by
QIDO; every file is audited as an upload is. And the index writes of a 50-instance request are
batched: the SQL statements per stored instance are counted.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from django.conf import settings
from django.core.files.storage import storages
from django.core.servers import basehttp
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.servers import OrthancServer, dicomweb_config
from portal.models import AuditAction, AuditEvent, Facility, Outcome, User
from tests.helpers import client_for, upload
from transfers.models import Instance, Study

from .conftest import bearer, orthanc_dicomweb_required

pytestmark = pytest.mark.django_db(transaction=True)

BOUNDARY = "relay-test-boundary"


# --- instances to send ------------------------------------------------------------------------------


def _dataset(study: str, series: str, *, number: int = 1, big: bool = False) -> Dataset:
    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    ds.PatientName = "STOW^TEST"
    ds.PatientID = "PID-STOW"
    if big:
        # 1,024 x 1,024 x 16 bits: a 2 MiB file, which dicomweb-client sends chunked.
        ds.Rows, ds.Columns = 1024, 1024
        ds.PixelData = np.arange(1024 * 1024, dtype="<u2").tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _bytes(ds: Dataset) -> bytes:
    """The file as dicomweb-client encodes it (pydicom.dcmwrite with its defaults)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def _series(n: int, study: str | None = None) -> list[Dataset]:
    study = study or generate_uid()
    series = generate_uid()
    return [_dataset(study, series, number=i + 1) for i in range(n)]


def _stored(sop: str) -> bytes:
    with storages["default"].open(Instance.objects.get(sop_instance_uid=sop).storage_key) as f:
        return bytes(f.read())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _multipart(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def _post(
    client: Client, body: bytes, token: str, path: str = "/dicom-web/studies", **extra: Any
) -> Any:
    content_type = extra.pop(
        "content_type", f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
    )
    return client.post(path, data=body, content_type=content_type, **bearer(token), **extra)


# --- the live server, as gunicorn reads a chunked body --------------------------------------------


class _Dechunked:
    """A chunked request body decoded, as gunicorn hands it to Django in wsgi.input."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.left = 0
        self.done = False

    def readline(self, size: int = -1) -> bytes:
        line = b""
        while not line.endswith(b"\n") and (size < 0 or len(line) < size):
            byte = self.read(1)
            if not byte:
                break
            line += byte
        return line

    def read(self, size: int = -1) -> bytes:
        out = b""
        while not self.done and (size < 0 or len(out) < size):
            if self.left == 0:
                line = self.raw.readline()
                self.left = int(line.split(b";")[0].strip() or b"0", 16)
                if self.left == 0:
                    while self.raw.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self.done = True
                    break
            want = self.left if size < 0 else min(self.left, size - len(out))
            data = self.raw.read(want)
            out += data
            self.left -= len(data)
            if self.left == 0:
                self.raw.readline()  # the CRLF after the chunk
        return out


@pytest.fixture
def chunked_seen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Django's development server (the live server) reads a body without a Content-Length as
    empty; gunicorn, which Relay runs on, decodes chunked bodies. The live server's handler is
    given gunicorn's behaviour, and records each chunked request it saw."""
    seen: list[str] = []

    class Handler(basehttp.ServerHandler):
        def __init__(self, stdin: Any, stdout: Any, stderr: Any, environ: Any, **kw: Any) -> None:
            super().__init__(stdin, stdout, stderr, environ, **kw)
            chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
            if chunked and not environ.get("CONTENT_LENGTH"):
                seen.append(environ["PATH_INFO"])
                self.stdin = _Dechunked(stdin)  # type: ignore[assignment]

    monkeypatch.setattr(basehttp, "ServerHandler", Handler)
    return seen


@pytest.fixture
def stow_client(
    live_server: Any, bob_token: str, chunked_seen: list[str]
) -> Iterator[DICOMwebClient]:
    client = DICOMwebClient(
        f"{live_server.url}/dicom-web", headers={"Authorization": f"Bearer {bob_token}"}
    )
    yield client
    client._session.close()


def _uids(answer: Dataset, keyword: str) -> list[str]:
    return [item.ReferencedSOPInstanceUID for item in answer.get(keyword, [])]


# --- dicomweb-client ---------------------------------------------------------------------------------


def test_store_instances_held_byte_for_byte_and_audited(
    stow_client: DICOMwebClient, live_server: Any, bob: User, krmc: Facility
) -> None:
    datasets = _series(3)
    sent = {ds.SOPInstanceUID: _bytes(ds) for ds in datasets}
    answer = stow_client.store_instances(datasets)

    assert sorted(_uids(answer, "ReferencedSOPSequence")) == sorted(sent)
    assert "FailedSOPSequence" not in answer or not answer.FailedSOPSequence
    study_uid = datasets[0].StudyInstanceUID
    assert answer.RetrieveURL == f"{live_server.url}/dicom-web/studies/{study_uid}"
    for item in answer.ReferencedSOPSequence:
        ds = next(d for d in datasets if d.SOPInstanceUID == item.ReferencedSOPInstanceUID)
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (
            f"{live_server.url}/dicom-web/studies/{study_uid}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}"
        )
    for sop, data in sent.items():
        assert _sha(_stored(sop)) == _sha(bytes(128) + data[128:])  # preamble zeroed
    study = Study.objects.get(study_instance_uid=study_uid)
    assert (study.num_instances, study.num_series, study.facility) == (3, 1, krmc)
    assert study.size_bytes == sum(len(d) for d in sent.values())
    assert study.modalities == ",CT,"

    events = AuditEvent.objects.filter(action=AuditAction.UPLOAD, facility=krmc)
    assert events.count() == 3
    for event in events:
        assert event.outcome == Outcome.SUCCESS
        assert (event.actor, event.actor_facility) == (bob, krmc)
        assert event.detail["source"] == "dicomweb"
        assert event.detail["status"] == "stored"
        assert event.patient_id == "PID-STOW"
        assert event.study_instance_uid == study_uid
    assert {e.detail["sop_instance_uid"] for e in events} == set(sent)

    # The same again: held already, a plain success (200), nothing stored twice.
    again = stow_client.store_instances(datasets)
    assert sorted(_uids(again, "ReferencedSOPSequence")) == sorted(sent)
    assert Instance.objects.count() == 3
    study.refresh_from_db()
    assert study.num_instances == 3
    assert (
        AuditEvent.objects.filter(action=AuditAction.UPLOAD, detail__status="duplicate").count()
        == 3
    )

    # And QIDO finds them.
    found = stow_client.search_for_instances(study_instance_uid=study_uid)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(sent)


def test_wrong_study_on_studies_s_is_not_stored(stow_client: DICOMwebClient) -> None:
    datasets = _series(2)
    stray = _dataset(generate_uid(), generate_uid())
    target = datasets[0].StudyInstanceUID
    response = stow_client._http_post_multipart_application_dicom(
        f"{stow_client.base_url}/studies/{target}", [_bytes(d) for d in [*datasets, stray]]
    )
    # dicomweb-client's own call: a 202 answer it parses (and logs the failure of).
    assert sorted(_uids(response, "ReferencedSOPSequence")) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    [failed] = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == stray.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == stray.SOPClassUID
    assert failed.FailureReason == 0xC000
    assert not Instance.objects.filter(sop_instance_uid=stray.SOPInstanceUID).exists()
    refused = AuditEvent.objects.get(detail__sop_instance_uid=stray.SOPInstanceUID)
    assert refused.outcome == Outcome.FAILURE
    assert "another study" in refused.detail["reason"]


def test_status_and_reasons(client: Client, bob_token: str, krmc: Facility) -> None:
    good = _series(1)[0]
    garbage = b"this is not a DICOM file" * 10
    answer = _post(client, _multipart([_bytes(good), garbage]), bob_token)
    assert answer.status_code == 202
    assert answer["Content-Type"] == "application/dicom+json"
    body = answer.json()
    assert [i["00081155"]["Value"][0] for i in body["00081199"]["Value"]] == [good.SOPInstanceUID]
    [failed] = body["00081198"]["Value"]
    assert failed["00081197"] == {"vr": "US", "Value": [0xC000]}
    assert "00081155" not in failed  # nothing could be read from it
    assert "Not a DICOM file" in answer["Warning"]

    # None held: 409, with the same body.
    answer = _post(client, _multipart([garbage]), bob_token)
    assert answer.status_code == 409
    assert answer.json()["00081199"] == {"vr": "SQ", "Value": []}
    assert len(answer.json()["00081198"]["Value"]) == 1

    # Same UID, other bytes: kept the first, A900.
    other = pydicom.dcmread(io.BytesIO(_bytes(good)))
    other.StudyDescription = "changed"
    answer = _post(client, _multipart([_bytes(other)]), bob_token)
    assert answer.status_code == 409
    assert answer.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]

    # Garbage refusals are audited as uploads.
    assert (
        AuditEvent.objects.filter(
            action=AuditAction.UPLOAD, outcome=Outcome.FAILURE, detail__source="dicomweb"
        ).count()
        == 3
    )


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom+json"; boundary=x',
        "application/dicom",
        "multipart/form-data; boundary=x",
    ],
)
def test_other_media_types_415(
    client: Client, bob_token: str, content_type: str, krmc: Facility
) -> None:
    answer = _post(
        client, _multipart([_bytes(_series(1)[0])]), bob_token, content_type=content_type
    )
    assert answer.status_code == 415
    assert not Instance.objects.exists()


def test_bad_multipart_400(client: Client, bob_token: str, krmc: Facility) -> None:
    no_boundary = 'multipart/related; type="application/dicom"'
    assert _post(client, b"x", bob_token, content_type=no_boundary).status_code == 400
    assert _post(client, b"no parts here", bob_token).status_code == 400
    assert not Instance.objects.exists()


def test_read_only_token_refused(
    stow_client: DICOMwebClient, read_token: str, live_server: Any
) -> None:
    client = DICOMwebClient(
        f"{live_server.url}/dicom-web", headers={"Authorization": f"Bearer {read_token}"}
    )
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances(_series(1))
    assert refused.value.response is not None
    assert refused.value.response.status_code == 403
    assert not Instance.objects.exists()
    assert AuditEvent.objects.filter(
        action=AuditAction.ACCESS_DENIED, detail__reason="This API token is read-only."
    ).exists()


def test_body_over_1mb_sent_chunked(stow_client: DICOMwebClient, chunked_seen: list[str]) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [_dataset(study, series, number=n, big=True) for n in (1, 2)]
    answer = stow_client.store_instances(datasets)
    assert chunked_seen == ["/dicom-web/studies"]  # it was sent chunked
    assert sorted(_uids(answer, "ReferencedSOPSequence")) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    for ds in datasets:
        data = _bytes(ds)
        assert _sha(_stored(ds.SOPInstanceUID)) == _sha(bytes(128) + data[128:])


def test_session_needs_csrf(bob: User, krmc: Facility) -> None:
    signed_in = client_for(bob)
    signed_in.handler.enforce_csrf_checks = True
    body = _multipart([_bytes(_series(1)[0])])
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    refused = signed_in.post("/dicom-web/studies", data=body, content_type=content_type)
    assert refused.status_code == 403
    token = "k" * 32  # a CSRF secret, as the cookie carries it and a page's form echoes it
    signed_in.cookies[settings.CSRF_COOKIE_NAME] = token
    stored = signed_in.post(
        "/dicom-web/studies", data=body, content_type=content_type, HTTP_X_CSRFTOKEN=token
    )
    assert stored.status_code == 200, stored.content
    assert Instance.objects.count() == 1


def test_session_with_several_facilities_names_one(
    bob: User, krmc: Facility, gfc: Facility
) -> None:
    from portal.models import Membership

    Membership.objects.create(user=bob, facility=gfc, role="sender")
    signed_in = client_for(bob)
    body = _multipart([_bytes(_series(1)[0])])
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    unsaid = signed_in.post("/dicom-web/studies", data=body, content_type=content_type)
    assert unsaid.status_code == 400
    assert "facility" in unsaid.json()["reason"]
    said = signed_in.post("/dicom-web/studies?facility=gfc", data=body, content_type=content_type)
    assert said.status_code == 200
    assert Instance.objects.get().facility == gfc


# --- the index writes of a request, batched --------------------------------------------------------


def _statements(client: Client, token: str, body: bytes, **kw: Any) -> tuple[int, Any]:
    with CaptureQueriesContext(connection) as queries:
        answer = _post(client, body, token, **kw)
    return len(queries.captured_queries), answer


def test_statements_per_stored_instance(client: Client, bob_token: str, krmc: Facility) -> None:
    """50 instances of one new study in one STOW request: every statement of the request counted
    (authentication, the checks, the rows, the audit), against the same 50 through the
    single-file upload API."""
    datasets = _series(50)
    stow_count, answer = _statements(client, bob_token, _multipart([_bytes(d) for d in datasets]))
    assert answer.status_code == 200
    assert len(answer.json()["00081199"]["Value"]) == 50
    study = Study.objects.get()
    assert (study.num_instances, study.num_series) == (50, 1)
    assert AuditEvent.objects.filter(action=AuditAction.UPLOAD).count() == 50

    others = _series(50)
    with CaptureQueriesContext(connection) as queries:
        for ds in others:
            assert upload(client, _bytes(ds), token=bob_token).status_code == 201
    api_count = len(queries.captured_queries)

    per_instance = stow_count / 50
    print(f"statements: STOW {stow_count} ({per_instance:.2f}/instance), API {api_count / 50:.2f}")
    # Measured: 6 per instance through the upload API on PostgreSQL, 9 on SQLite (token and
    # facility, the series with any existing copy in one query, BEGIN, the rows, audit and
    # counters in one statement on PostgreSQL, COMMIT); 16 for the whole 50-instance STOW request
    # on both: the study's copies read once, rows, audit events and counters written in bulk.
    assert stow_count <= 16
    assert per_instance < 0.4
    assert api_count / 50 >= 5 * per_instance


def test_batch_falls_back_when_a_study_is_purged(
    client: Client, bob_token: str, krmc: Facility
) -> None:
    """A batch meeting a purged study (a tombstone to revive) commits each instance on its own,
    as a single upload would: the study is revived and counted from zero."""
    datasets = _series(3)
    assert _post(client, _multipart([_bytes(datasets[0])]), bob_token).status_code == 200
    study = Study.objects.get()
    from django.utils import timezone

    Instance.objects.all().delete()
    Study.objects.filter(pk=study.pk).update(purged_at=timezone.now())
    answer = _post(client, _multipart([_bytes(d) for d in datasets[1:]]), bob_token)
    assert answer.status_code == 200, answer.content
    study.refresh_from_db()
    assert study.purged_at is None
    assert (study.num_instances, study.num_series) == (2, 1)


# --- Orthanc's DICOMweb plugin ---------------------------------------------------------------------------


@pytest.mark.peer
def test_orthanc_stows_a_study_into_relay(
    live_server: Any, bob_token: str, krmc: Facility, chunked_seen: list[str]
) -> None:
    orthanc_dicomweb_required()
    datasets = _series(4)
    config = dicomweb_config(f"{live_server.url}/dicom-web/", bob_token)
    with OrthancServer(extra_config=config) as orthanc:
        base = orthanc.base_url
        for ds in datasets:
            added = httpx.post(f"{base}/instances", content=_bytes(ds), timeout=30)
            assert added.status_code == 200, added.text
        [orthanc_study] = httpx.get(f"{base}/studies", timeout=10).json()
        sent = httpx.post(
            f"{base}/dicom-web/servers/relay/stow",
            json={"Resources": [orthanc_study]},
            timeout=120,
        )
        assert sent.status_code == 200, sent.text
        held = {
            item["MainDicomTags"]["SOPInstanceUID"]: httpx.get(
                f"{base}/instances/{item['ID']}/file", timeout=10
            ).content
            for item in httpx.get(f"{base}/studies/{orthanc_study}/instances", timeout=10).json()
        }
    assert chunked_seen == ["/dicom-web/studies"]  # Orthanc sends its body chunked too
    assert len(held) == 4
    assert Study.objects.get().num_instances == 4
    for sop, data in held.items():
        assert _sha(_stored(sop)) == _sha(bytes(128) + data[128:])
    assert (
        AuditEvent.objects.filter(
            action=AuditAction.UPLOAD, detail__source="dicomweb", detail__status="stored"
        ).count()
        == 4
    )


def test_image_store_down_503(
    client: Client, bob_token: str, krmc: Facility, settings: Any, tmp_path: Path
) -> None:
    """The image store cannot be written (its folder is under a file): nothing is stored, the
    answer is 503 with Retry-After and every part is A700, so the sender sends it all again."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    stores = {key: dict(value) for key, value in settings.STORAGES.items()}
    stores["default"]["OPTIONS"] = {
        **stores["default"].get("OPTIONS", {}),
        "location": str(blocker / "media"),
    }
    settings.STORAGES = stores
    answer = _post(client, _multipart([_bytes(d) for d in _series(2)]), bob_token)
    assert answer.status_code == 503
    assert answer["Retry-After"]
    failed = answer.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in failed] == [[0xA700], [0xA700]]
    assert not Instance.objects.exists()
