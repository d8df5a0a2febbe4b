"""Disc images: asked for on the page, built by the task, downloaded, and purged with the study."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from typing import Any

import pycdlib
import pytest
from django.core.files.storage import storages
from django.test import Client
from django.utils import timezone

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import (
    ExportStatus,
    MediaExport,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.purge import purge_expired
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for _ in range(2):
        data = dicom_bytes(
            "CT_small.dcm",
            StudyInstanceUID="1.2.826.0.1.3680043.8.498.12",
            PatientName="SMITH^ANNA",
            StudyDate="20240115",
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
    )
    return made


def _ask(client: Client, study: Study, capture: Any) -> Any:
    with capture(execute=True):
        return client.post(f"/studies/{study.uuid}/cd/")


def test_the_recipient_gets_a_cd_image_that_opens_and_is_told_when_ready(
    share: Share, dana: User, mailoutbox: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    study = share.studies.get()
    client = client_for(dana)
    response = _ask(client, study, django_capture_on_commit_callbacks)
    export = MediaExport.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/studies/{study.uuid}/cd/{export.uuid}/"

    page = client.get(response["Location"]).content.decode()
    assert export.status == ExportStatus.READY or "ready" in page
    export.refresh_from_db()
    assert (export.status, export.media, export.images) == (ExportStatus.READY, "CD", 2)
    assert export.percent == 100
    # The DICOMDIR's File-set ID, not the patient's name (PS3.12 F.1.1; test_charsets.py).
    assert re.fullmatch(r"RELAY_[0-9A-F]{10}", export.volume_label)
    assert "Download the CD image" in page

    download = client.get(f"/studies/{study.uuid}/cd/{export.uuid}/download/")
    body = b"".join(download.streaming_content)
    assert int(download["Content-Length"]) == len(body) == export.total_bytes
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(body))
    names = [child.file_identifier().decode() for child in iso.list_children(iso_path="/")]
    iso.close()
    assert "DICOMDIR.;1" in names and "README.TXT;1" in names

    event = AuditEvent.objects.get(action=AuditAction.STUDY_DOWNLOAD)
    assert event.detail["format"] == "iso"
    receipt = ShareEvent.objects.get(share=share, kind=ShareEventKind.DOWNLOADED)
    assert receipt.detail.startswith("CD image of 2 images")
    # The notice carries a link and no patient data.
    (mail,) = [m for m in mailoutbox if "disc image" in m.subject]
    assert mail.to == ["dana@gfc.example"]
    assert f"/studies/{study.uuid}/cd/{export.uuid}/" in mail.body
    assert "SMITH" not in mail.body and "SMITH" not in mail.subject


def test_a_view_only_share_gets_no_disc(
    share: Share, dana: User, django_capture_on_commit_callbacks: Any
) -> None:
    Share.objects.filter(pk=share.pk).update(can_download=False)
    response = _ask(client_for(dana), share.studies.get(), django_capture_on_commit_callbacks)
    assert response.status_code == 302
    assert not MediaExport.objects.exists()


def test_someone_elses_disc_image_is_not_found(
    share: Share, dana: User, carol: User, django_capture_on_commit_callbacks: Any
) -> None:
    study = share.studies.get()
    _ask(client_for(dana), study, django_capture_on_commit_callbacks)
    export = MediaExport.objects.get()
    for url in (
        f"/studies/{study.uuid}/cd/{export.uuid}/",
        f"/studies/{study.uuid}/cd/{export.uuid}/download/",
    ):
        assert client_for(carol).get(url).status_code == 404


def test_the_disc_image_goes_with_the_purge(
    share: Share, dana: User, django_capture_on_commit_callbacks: Any
) -> None:
    study = share.studies.get()
    _ask(client_for(dana), study, django_capture_on_commit_callbacks)
    key = MediaExport.objects.get().storage_key
    assert storages["default"].exists(key)
    Share.objects.update(expires_at=timezone.now() - timedelta(days=1))
    then = timezone.now() - timedelta(days=60)
    Study.objects.update(created_at=then, last_received_at=then)

    assert purge_expired().studies_purged == 1

    assert not storages["default"].exists(key)
    assert not MediaExport.objects.exists()
    assert AuditEvent.objects.filter(action=AuditAction.PURGE).count() == 1
