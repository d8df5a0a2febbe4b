"""Integrity on the way out and at rest: one flipped byte in a stored image stops the ZIP, the
disc image and the push of it (audited, staff told), and `storage_verify` finds it, a missing
object and an extra one, and carries on where it stopped."""

from __future__ import annotations

import io
import os
import time
import zipfile
from io import StringIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from portal.models import AuditAction, AuditEvent, Facility, Outcome, User
from tests.helpers import client_for, dicom_bytes, upload
from tests.transfers.dicom.test_pacs_push import FakeRequest, _destination, _received, storescp
from tests.transfers.test_s3_storage import BUCKET, bucket  # noqa: F401  (fixture)
from transfers import integrity
from transfers.access import study_access
from transfers.dicom.push import push_create, push_send
from transfers.models import (
    ExportStatus,
    Instance,
    MediaExport,
    PushStatus,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.models.studies import StorageVerifyRun
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

__all__ = ["storescp"]  # a fixture, imported for the push test

STUDY_UID = "1.2.826.0.1.3680043.8.498.1313"


@pytest.fixture
def staff(db: None) -> User:
    return User.objects.create_user(
        email="ops@relay.example", password="x", full_name="Ops", is_staff=True
    )


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for _ in range(3):
        data = dicom_bytes(
            "CT_small.dcm", StudyInstanceUID=STUDY_UID, PatientName="DOE^JOHN", StudyDate="20240115"
        )
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    made, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=list(Study.objects.all()),
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
        can_import=True,
    )
    return made


def _flip(instance: Instance, offset: int = -100) -> bytes:
    """Flip one bit of one byte of the stored copy (in the pixel data); returns the good bytes."""
    storage = storages["default"]
    with storage.open(instance.storage_key, "rb") as f:
        good = f.read()
    bad = bytearray(good)
    bad[offset] ^= 0x01
    storage.delete(instance.storage_key)
    assert storage.save(instance.storage_key, ContentFile(bytes(bad))) == instance.storage_key
    return good


def _one_alert(mailoutbox: list[Any], instance: Instance) -> Any:
    (mail,) = [m for m in mailoutbox if "integrity" in m.subject]
    assert mail.to == ["ops@relay.example"]
    assert f"instance #{instance.pk}" in mail.body and "krmc" in mail.body
    # Named by instance and facility, never by patient (nor by the UIDs of the storage key).
    assert "DOE" not in mail.body + mail.subject
    assert STUDY_UID not in mail.body
    return mail


def test_it_breaks_the_zip_of_a_damaged_image_audits_and_tells_staff(
    share: Share,
    dana: User,
    staff: User,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    study = share.studies.get()
    damaged = Instance.objects.order_by("pk")[1]
    good = _flip(damaged)

    response: Any = client_for(dana).get(f"/studies/{study.uuid}/download/")
    assert response.status_code == 200
    body = b""
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(integrity.IntegrityError) as caught,
    ):
        for chunk in response.streaming_content:
            body += chunk
    assert caught.value.key == damaged.storage_key

    # The client got less than the Content-Length promised, and no readable ZIP.
    assert len(body) < int(response["Content-Length"])
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(body))
    # The damaged image's last chunk (here: all of it) never left: the three images have the
    # same pixels, and they are in the body once, from the first (intact) image only.
    assert body.count(good[-1000:-110]) == 1
    event = AuditEvent.objects.get(action=AuditAction.INTEGRITY_FAILED)
    assert event.outcome == Outcome.FAILURE and event.actor == dana
    assert event.detail["where"] == "zip" and event.detail["key"] == damaged.storage_key
    assert event.detail["instance"] == damaged.pk
    assert event.study_instance_uid == STUDY_UID
    assert not ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED).exists()
    _one_alert(mailoutbox, damaged)

    # Trying again is audited again, but staff are not e-mailed twice for one object.
    again: Any = client_for(dana).get(f"/studies/{study.uuid}/download/")
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(integrity.IntegrityError):
        b"".join(again.streaming_content)
    assert AuditEvent.objects.filter(action=AuditAction.INTEGRITY_FAILED).count() == 2
    _one_alert(mailoutbox, damaged)

    # Put back, the same download is a valid ZIP again.
    storages["default"].delete(damaged.storage_key)
    storages["default"].save(damaged.storage_key, ContentFile(good))
    response = client_for(dana).get(f"/studies/{study.uuid}/download/")
    whole = b"".join(response.streaming_content)
    assert sum(1 for n in zipfile.ZipFile(io.BytesIO(whole)).namelist() if "/IM" in n) == 3


def test_a_copy_of_the_wrong_size_breaks_the_zip_too(share: Share, dana: User) -> None:
    damaged = Instance.objects.order_by("pk")[2]
    storage = storages["default"]
    with storage.open(damaged.storage_key, "rb") as f:
        good = f.read()
    storage.delete(damaged.storage_key)
    storage.save(damaged.storage_key, ContentFile(good + b"\0" * 10))
    # The planning's size check catches it first: nothing is sent at all.
    response = client_for(dana).get(f"/studies/{share.studies.get().uuid}/download/")
    assert response.status_code == 503

    reader = integrity.VerifyingReader(
        io.BytesIO(good + b"\0"), key="k", size=len(good), sha256=damaged.sha256
    )
    with pytest.raises(integrity.IntegrityError, match="more than"):
        while reader.read(4096):
            pass


def test_the_reader_checks_what_a_seek_skipped(share: Share) -> None:
    instance = Instance.objects.order_by("pk")[0]
    _flip(instance, offset=-20)  # inside the pixel data, which pydicom leaves deferred
    # pydicom seeks over the pixel data and reads the end: the skipped bytes are read then.
    with (
        integrity.instance_open(instance) as reader,
        pytest.raises(integrity.IntegrityError, match="SHA-256"),
    ):
        pydicom.dcmread(reader, defer_size=1024)  # type: ignore[arg-type]
    # A decoder that checks when it is done (the viewer) gets its dataset, then the error.
    with integrity.instance_open(instance, at_end=False) as reader:
        ds = pydicom.dcmread(reader, defer_size=1024)  # type: ignore[arg-type]
        assert ds.SOPInstanceUID == instance.sop_instance_uid
        with pytest.raises(integrity.IntegrityError, match="SHA-256"):
            reader.verify()
    good = Instance.objects.order_by("pk")[1]
    with integrity.instance_open(good) as reader:
        reader.read(200)
        reader.seek(5000)
        reader.read(10)
        reader.verify()
        assert reader.verified


def test_the_disc_image_of_a_damaged_study_is_refused(
    share: Share,
    dana: User,
    staff: User,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    study = share.studies.get()
    damaged = Instance.objects.order_by("pk")[2]
    _flip(damaged)
    with django_capture_on_commit_callbacks(execute=True):
        assert client_for(dana).post(f"/studies/{study.uuid}/cd/").status_code == 302

    export = MediaExport.objects.get()
    assert export.status == ExportStatus.FAILED and export.storage_key == ""
    assert "damaged" in export.error
    _, names = storages["default"].listdir(f"exports/{study.facility.uuid}/{study.uuid}")
    assert not [n for n in names if n.endswith(".iso")]
    event = AuditEvent.objects.get(action=AuditAction.INTEGRITY_FAILED)
    assert event.detail["where"] == "disc image" and event.detail["key"] == damaged.storage_key
    _one_alert(mailoutbox, damaged)
    assert not [m for m in mailoutbox if "is ready" in m.subject]  # no "ready" notice


@pytest.mark.peer
def test_a_push_fails_the_damaged_instance_and_sends_the_others(
    share: Share,
    dana: User,
    gfc: Facility,
    staff: User,
    storescp: tuple[int, Path],
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    port, folder = storescp
    damaged = Instance.objects.order_by("pk")[0]
    _flip(damaged)
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)
    with django_capture_on_commit_callbacks(execute=True):
        push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.PARTIAL, 2, 1)
    item = push.items.get(instance=damaged)
    assert not item.sent and "damaged" in item.error
    assert damaged.sop_instance_uid not in _received(folder) and len(_received(folder)) == 2
    event = AuditEvent.objects.get(action=AuditAction.INTEGRITY_FAILED)
    assert event.detail["where"] == "push"
    _one_alert(mailoutbox, damaged)


# --- storage_verify ---------------------------------------------------------------------------


def _verify(*args: str) -> tuple[str, str]:
    out = StringIO()
    try:
        call_command("storage_verify", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), str(exc)
    return out.getvalue(), ""


def test_storage_verify_finds_damaged_missing_and_extra_objects_and_carries_on(
    share: Share,
    staff: User,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    storage = storages["default"]
    first, second, third = Instance.objects.order_by("pk")
    _flip(first)
    storage.delete(second.storage_key)
    folder = third.storage_key.rsplit("/", 1)[0]
    stray = storage.save(f"{folder}/stray.dcm", ContentFile(b"left behind"))
    old = time.time() - 2 * 3600
    os.utime(storage.path(stray), (old, old))
    # Written a moment ago with no row yet: an upload in flight, not reported.
    storage.save(f"{folder}/inflight.dcm", ContentFile(b"arriving"))

    # Stopped after one image (as a killed or time-boxed run would be).
    out, error = _verify("--limit", "1")
    run = StorageVerifyRun.objects.get()
    assert (run.checked, run.corrupt, run.missing, run.finished_at) == (1, 1, 0, None)
    assert "Not finished" in out and "1 damaged" in error

    with django_capture_on_commit_callbacks(execute=True):
        out, error = _verify()
    run = StorageVerifyRun.objects.get()  # the same run, carried on
    assert run.checked == 3  # the first image was not read twice
    assert (run.corrupt, run.missing, run.extra) == (1, 1, 1)
    assert run.finished_at is not None
    assert {(p["kind"], p["key"]) for p in run.problems} == {
        ("corrupt", first.storage_key),
        ("missing", second.storage_key),
        ("extra", stray),
    }
    assert "Damaged: 1" in out and "Missing: 1" in out and stray in out
    assert "inflight" not in out
    assert error == "1 missing and 1 damaged image(s)"
    events = AuditEvent.objects.filter(action=AuditAction.INTEGRITY_FAILED)
    assert {e.detail["key"] for e in events} == {first.storage_key, second.storage_key}
    assert all(e.detail["where"] == "storage_verify" for e in events)
    (mail,) = mailoutbox
    assert mail.to == ["ops@relay.example"] and "1 missing, 1 damaged, 1 extra" in mail.subject
    assert "DOE" not in mail.body

    # The next run is a new pass; scoped to another facility or to later images, it reads none.
    _, error = _verify("--facility", "gfc", "--no-email")
    assert StorageVerifyRun.objects.count() == 2 and error == ""
    assert StorageVerifyRun.objects.order_by("-pk")[0].checked == 0
    out, _ = _verify("--since", "2999-01-01", "--no-email")
    assert "Checked: 0 objects" in out
    assert _verify("--facility", "nowhere")[1] == "No facility 'nowhere'."


def test_storage_verify_task_reports_an_intact_store(
    share: Share, staff: User, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    from transfers.tasks import storage_verify_task

    with django_capture_on_commit_callbacks(execute=True):
        result = storage_verify_task.apply().get()
    assert result["finished"] == 1 and result["checked"] == 3
    assert (result["missing"], result["corrupt"], result["extra"]) == (0, 0, 0)
    (mail,) = mailoutbox
    assert "all 3 objects intact" in mail.subject


def test_storage_verify_in_an_s3_bucket(
    client: Client,
    bob_token: str,
    bucket: Any,  # noqa: F811  (the fixture)
    settings: Any,
) -> None:
    settings.RELAY_STORAGE_VERIFY_GRACE_MINUTES = 0
    for _ in range(2):
        assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
    first, second = Instance.objects.order_by("pk")
    data = bytearray(bucket.get_object(Bucket=BUCKET, Key=first.storage_key)["Body"].read())
    data[-50] ^= 0x80
    bucket.put_object(Bucket=BUCKET, Key=first.storage_key, Body=bytes(data))
    stray = second.storage_key.rsplit("/", 1)[0] + "/stray.dcm"
    bucket.put_object(Bucket=BUCKET, Key=stray, Body=b"left behind")

    run = integrity.storage_verify(tell_staff=False)
    assert (run.checked, run.corrupt, run.missing, run.extra) == (2, 1, 0, 1)
    assert {(p["kind"], p["key"]) for p in run.problems} == {
        ("corrupt", first.storage_key),
        ("extra", stray),
    }
