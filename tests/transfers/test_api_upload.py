"""The upload API: who may call it, which facility it stores into, what it answers."""

from __future__ import annotations

import io
import socket
from urllib.parse import urlsplit

import pytest
from django.db import connection
from django.test import Client

from portal.models import ApiToken, AuditEvent, Membership
from tests.helpers import dicom_bytes, read_testdata, upload
from transfers.models import Instance, Series, Study

pytestmark = pytest.mark.django_db


def test_it_stores_a_file_sent_with_a_token(client, bob, bob_token, krmc):
    response = upload(client, read_testdata("CT_small.dcm"), token=bob_token, filename="ct/ct.dcm")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "stored"
    study = Study.objects.get(uuid=body["study_uuid"])
    assert study.facility == krmc
    assert study.uploaded_by == bob
    assert study.patient_name == "CompressedSamples^CT1"
    assert study.modalities == ",CT,"
    assert (study.num_series, study.num_instances) == (1, 1)
    instance = Instance.objects.get()
    assert instance.rows == 128 and instance.columns == 128
    assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert study.size_bytes == instance.size_bytes == len(read_testdata("CT_small.dcm"))
    event = AuditEvent.objects.get(action="upload")
    assert event.patient_id == study.patient_id
    assert event.detail["filename"] == "ct/ct.dcm"


def test_it_counts_series_and_modalities_as_instances_arrive(client, bob_token):
    first = dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.1")
    second = dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.1")
    third = dicom_bytes("MR_small.dcm", StudyInstanceUID="1.2.3.4", SeriesInstanceUID="1.2.3.4.2")
    for data in (first, second, third):
        assert upload(client, data, token=bob_token).status_code == 201
    study = Study.objects.get(study_instance_uid="1.2.3.4")
    assert (study.num_series, study.num_instances) == (2, 3)
    assert study.modality_list == ["CT", "MR"]
    assert list(
        Series.objects.order_by("series_instance_uid").values_list("num_instances", flat=True)
    ) == [2, 1]


def test_it_accepts_several_files_in_one_multipart_request(client, bob_token):
    files = [
        io.BytesIO(read_testdata("CT_small.dcm")),
        io.BytesIO(b"not dicom"),
        io.BytesIO(read_testdata("MR_small.dcm")),
    ]
    for f, name in zip(files, ("ct.dcm", "notes.txt", "mr.dcm"), strict=True):
        f.name = name
    response = client.post(
        "/api/v1/instances?facility=krmc", {"file": files}, HTTP_AUTHORIZATION=f"Bearer {bob_token}"
    )
    assert response.status_code == 207
    body = response.json()
    assert body["counts"] == {"stored": 2, "rejected": 1}
    assert [r["filename"] for r in body["results"]] == ["ct.dcm", "notes.txt", "mr.dcm"]
    assert Instance.objects.count() == 2


def test_it_refuses_a_revoked_token(client, bob):
    token, raw = ApiToken.issue(user=bob, name="old laptop")
    token.revoked_at = token.created_at
    token.save()
    response = upload(client, read_testdata("CT_small.dcm"), token=raw)
    assert response.status_code == 401
    assert Instance.objects.count() == 0


def test_it_refuses_an_unknown_token(client, bob):
    response = upload(client, read_testdata("CT_small.dcm"), token="rly_nottherealone")
    assert response.status_code == 401


def test_it_refuses_anonymous_callers(client, krmc):
    response = upload(client, read_testdata("CT_small.dcm"))
    assert response.status_code == 401
    assert Instance.objects.count() == 0


def test_it_refuses_a_token_of_a_disabled_user(client, bob, bob_token):
    bob.is_active = False
    bob.save()
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 401


def test_a_reader_cannot_upload(client, carol):
    raw = ApiToken.issue(user=carol, name="t")[1]
    response = upload(client, read_testdata("CT_small.dcm"), token=raw)
    assert response.status_code == 403
    assert Instance.objects.count() == 0


def test_an_outsider_cannot_upload_into_another_facility(client, charlie):
    raw = ApiToken.issue(user=charlie, name="t")[1]
    response = upload(client, read_testdata("CT_small.dcm"), token=raw, facility="krmc")
    assert response.status_code == 403
    assert Instance.objects.count() == 0


def test_it_asks_which_facility_when_the_user_sends_for_several(client, bob, bob_token, gfc):
    Membership.objects.create(user=bob, facility=gfc, role="sender")
    response = client.post(
        "/api/v1/instances",
        data=read_testdata("CT_small.dcm"),
        content_type="application/dicom",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 400
    assert "gfc" in response.json()["reason"] and "krmc" in response.json()["reason"]
    assert (
        upload(client, read_testdata("CT_small.dcm"), token=bob_token, facility="gfc").status_code
        == 201
    )
    assert Study.objects.get().facility == gfc


def test_the_same_file_may_be_held_by_two_facilities_separately(client, bob, bob_token, charlie):
    raw = ApiToken.issue(user=charlie, name="t")[1]
    assert upload(client, read_testdata("CT_small.dcm"), token=bob_token).status_code == 201
    assert (
        upload(client, read_testdata("CT_small.dcm"), token=raw, facility="gfc").status_code == 201
    )
    assert Study.objects.count() == 2
    assert len({i.storage_key for i in Instance.objects.all()}) == 2


def test_the_browser_session_needs_the_csrf_token(bob):
    client = Client(enforce_csrf_checks=True)
    client.force_login(bob)
    response = upload(client, read_testdata("CT_small.dcm"))
    assert response.status_code == 403
    assert Instance.objects.count() == 0
    client.get("/upload/")
    csrf = client.cookies["csrftoken"].value
    response = client.post(
        "/api/v1/instances?facility=krmc",
        data=read_testdata("CT_small.dcm"),
        content_type="application/dicom",
        HTTP_X_CSRFTOKEN=csrf,
    )
    assert response.status_code == 201
    assert AuditEvent.objects.get(action="upload").detail["source"] == "browser"


def test_known_lists_only_what_this_facility_already_has(client, bob_token, charlie):
    upload(client, read_testdata("CT_small.dcm"), token=bob_token)
    charlie_token = ApiToken.issue(user=charlie, name="t")[1]
    upload(client, read_testdata("MR_small.dcm"), token=charlie_token, facility="gfc")
    ct_uid = Instance.objects.get(facility__slug="krmc").sop_instance_uid
    mr_uid = Instance.objects.get(facility__slug="gfc").sop_instance_uid
    response = client.post(
        "/api/v1/instances/known",
        data={"facility": "krmc", "sop_instance_uids": [ct_uid, mr_uid, "../../x"]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 200
    assert response.json()["known"] == [ct_uid]


def test_known_refuses_a_body_that_is_not_json(client, bob_token):
    response = client.post(
        "/api/v1/instances/known",
        data="uids please",
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bob_token}",
    )
    assert response.status_code == 400


def test_facilities_lists_where_the_caller_may_upload(client, bob_token, carol, gfc):
    response = client.get("/api/v1/facilities", HTTP_AUTHORIZATION=f"Bearer {bob_token}")
    assert response.json() == {
        "facilities": [{"slug": "krmc", "name": "Kalispell Regional Medical Center"}]
    }


@pytest.mark.django_db(transaction=True)
def test_an_upload_cut_off_halfway_stores_nothing(live_server, bob_token):
    """The client promises the whole file, sends half, and closes its side."""
    data = read_testdata("CT_small.dcm")
    host = urlsplit(live_server.url)
    with socket.create_connection((host.hostname, host.port), timeout=30) as sock:
        head = (
            f"POST /api/v1/instances?facility=krmc HTTP/1.1\r\nHost: {host.hostname}\r\n"
            f"Authorization: Bearer {bob_token}\r\nContent-Type: application/dicom\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + data[: len(data) // 2])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b" 400 " in answer.split(b"\r\n")[0]
    assert b"cut off" in answer
    assert Instance.objects.count() == 0
    assert Study.objects.count() == 0


def test_an_unreachable_image_store_answers_503_and_stores_nothing(
    client, bob_token, settings, tmp_path
):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("the image store should be a folder")
    storages = {key: dict(value) for key, value in settings.STORAGES.items()}
    storages["default"]["OPTIONS"] = {**storages["default"]["OPTIONS"], "location": str(blocker)}
    settings.STORAGES = storages
    response = upload(client, read_testdata("CT_small.dcm"), token=bob_token)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "Try again" in response.json()["reason"]
    assert Instance.objects.count() == 0
    assert Study.objects.count() == 0


def _refuse_instance_rows() -> None:
    """Make the database refuse new instance rows, as a failing or full database would."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION refuse_row() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END; $$ LANGUAGE plpgsql"
            )
            cursor.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON transfers_instance FOR EACH ROW EXECUTE FUNCTION refuse_row()"
            )
        else:
            cursor.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON transfers_instance BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )


def test_when_the_rows_cannot_be_committed_the_object_is_removed(
    client, bob_token, _private_storage
):
    assert upload(client, read_testdata("MR_small.dcm"), token=bob_token).status_code == 201
    files_before = sorted(p for p in _private_storage.rglob("*") if p.is_file())
    _refuse_instance_rows()
    response = upload(client, read_testdata("CT_small.dcm"), token=bob_token)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "database is unavailable" in response.json()["reason"]
    assert sorted(p for p in _private_storage.rglob("*") if p.is_file()) == files_before
    assert Study.objects.count() == 1
    assert Instance.objects.count() == 1


def test_a_file_that_is_not_dicom_is_skipped_with_a_plain_reason(client, bob_token):
    response = upload(client, b"# README\nOpen the viewer on the disc.\n", token=bob_token)
    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "rejected"
    assert body["reason"].startswith("Not a DICOM file, skipped")
    assert "preamble" not in body["reason"] and "Part 10" not in body["reason"]
    assert Instance.objects.count() == 0
