"""Downloading a shared study as a ZIP: rights, receipts, audit, and what the file holds."""

from __future__ import annotations

import io
import zipfile

import pytest
from django.core.files.storage import storages
from django.test import Client

from portal.models import AuditAction, AuditEvent, Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Instance, Share, ShareEvent, ShareEventKind, Study, StudyStatus
from transfers.reports import report_attach
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for _ in range(3):
        data = dicom_bytes(
            "CT_small.dcm", StudyInstanceUID="1.2.826.0.1.3680043.8.498.9", PatientName="DOE^JOHN"
        )
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    study = Study.objects.get()
    report_attach(study=study, by=bob, text="Impression: normal.")
    made, _ = share_create(
        facility=study.facility,
        created_by=bob,
        studies=[study],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
    )
    return made


def _get(client: Client, study: Study):  # type: ignore[no-untyped-def]
    return client.get(f"/studies/{study.uuid}/download/")


def test_the_recipient_downloads_the_study_with_its_report_and_the_sender_sees_it(
    share: Share, dana: User
) -> None:
    study = share.studies.get()
    response = _get(client_for(dana), study)
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    # The file name says when, not who: it lands in download lists and browser history.
    assert "DOE" not in response["Content-Disposition"]
    body = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(body)
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert {"DICOMDIR", "README.TXT"} <= set(names)
    assert any(n.startswith("REPORT/") for n in names)
    assert sum(1 for n in names if "/IM" in n) == 3

    event = AuditEvent.objects.get(action=AuditAction.STUDY_DOWNLOAD)
    assert event.actor == dana and event.detail["images"] == 3
    receipt = ShareEvent.objects.get(share=share, kind=ShareEventKind.DOWNLOADED)
    assert receipt.actor_label == "dana@gfc.example"
    assert "3 images" in receipt.detail
    sent_page = client_for(share.created_by).get(f"/shares/{share.uuid}/").content.decode()
    assert "Downloaded" in sent_page and "dana@gfc.example" in sent_page


def test_an_abandoned_download_is_audited_but_not_reported_as_delivered(
    share: Share, dana: User
) -> None:
    response = _get(client_for(dana), share.studies.get())
    chunks = iter(response.streaming_content)
    next(chunks)  # the browser went away after the first chunk

    assert AuditEvent.objects.filter(action=AuditAction.STUDY_DOWNLOAD).count() == 1
    assert not ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED).exists()


def test_a_view_only_share_refuses_the_download_plainly(share: Share, dana: User) -> None:
    Share.objects.filter(pk=share.pk).update(can_download=False)
    response = _get(client_for(dana), share.studies.get())
    assert response.status_code == 403
    assert b"not download" in response.content
    assert b"DICM" not in response.content
    assert not AuditEvent.objects.filter(action=AuditAction.STUDY_DOWNLOAD).exists()


def test_a_missing_stored_copy_is_a_clear_error_not_a_broken_zip(share: Share, dana: User) -> None:
    instance = Instance.objects.first()
    assert instance is not None
    storages["default"].delete(instance.storage_key)
    response = _get(client_for(dana), share.studies.get())
    assert response.status_code == 503
    assert b"cannot be downloaded right now" in response.content
    assert not ShareEvent.objects.filter(kind=ShareEventKind.DOWNLOADED).exists()
