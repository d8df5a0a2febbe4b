"""The disc-image page refreshes itself while the image is being made, and stops once it is
ready or has failed."""

from __future__ import annotations

import pytest
from django.test import Client

from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import ExportStatus, MediaExport, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

REFRESH = '<meta http-equiv="refresh"'


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    assert upload(client, dicom_bytes("CT_small.dcm"), token=bob_token).status_code == 201
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


def test_it_refreshes_while_the_image_is_made_and_stops_when_ready_or_failed(
    share: Share, dana: User
) -> None:
    study = Study.objects.get()
    export = MediaExport.objects.create(study=study, share=share, requested_by=dana)
    url = f"/studies/{study.uuid}/cd/{export.uuid}/"
    for status in (ExportStatus.QUEUED, ExportStatus.BUILDING):
        MediaExport.objects.filter(pk=export.pk).update(status=status)
        page = client_for(dana).get(url).content.decode()
        assert REFRESH in page
        assert "This page updates itself" in page
    MediaExport.objects.filter(pk=export.pk).update(status=ExportStatus.READY, media="CD")
    page = client_for(dana).get(url).content.decode()
    assert REFRESH not in page and "is ready" in page
    MediaExport.objects.filter(pk=export.pk).update(status=ExportStatus.FAILED, error="disk full")
    page = client_for(dana).get(url).content.decode()
    assert REFRESH not in page and "could not be made: disk full" in page
