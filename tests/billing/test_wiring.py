"""Metering through the real delivery paths: ZIP download, viewer frames, patient link: the
viewer, the ZIP and the disc image really meter what they deliver."""

from __future__ import annotations

import pytest
from django.test import Client

from billing.models import UsageDay, UsageKind, UsageRecord
from portal.models import Facility, User
from tests.helpers import client_for, dicom_bytes, upload
from transfers.models import Instance, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def share(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for _ in range(3):
        data = dicom_bytes("CT_small.dcm", StudyInstanceUID="1.2.826.0.1.3680043.8.498.9")
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    made, _ = share_create(
        facility=Study.objects.get().facility,
        created_by=bob,
        studies=[Study.objects.get()],
        kind="facility",
        recipient_facility=gfc,
        can_download=True,
    )
    return made


def test_a_zip_downloaded_to_the_end_is_metered_once_against_the_recipient(
    share: Share, dana: User, bob: User, gfc: Facility
) -> None:
    study = share.studies.get()
    image_bytes = sum(Instance.objects.values_list("size_bytes", flat=True))
    for _ in range(2):
        response = client_for(dana).get(f"/studies/{study.uuid}/download/")
        b"".join(response.streaming_content)  # to the last byte
    # The owner's own download is not a delivery.
    b"".join(client_for(bob).get(f"/studies/{study.uuid}/download/").streaming_content)
    record = UsageRecord.objects.get()
    assert (record.facility, record.user, record.kind) == (gfc, dana, UsageKind.ZIP)
    assert (record.images, record.bytes) == (3, image_bytes)


def test_an_abandoned_zip_is_not_metered(share: Share, dana: User) -> None:
    response = client_for(dana).get(f"/studies/{share.studies.get().uuid}/download/")
    next(iter(response.streaming_content))  # the browser went away after the first chunk
    assert not UsageRecord.objects.exists()


def test_each_viewer_frame_is_metered_once(share: Share, dana: User, gfc: Facility) -> None:
    study = share.studies.get()
    client = client_for(dana)
    for instance in Instance.objects.all():
        for _ in range(2):
            url = f"/studies/{study.uuid}/view/frames/{instance.sop_instance_uid}/0/"
            assert client.get(url).status_code == 200
    records = UsageRecord.objects.filter(kind=UsageKind.VIEWER)
    assert records.count() == 3 and {r.facility for r in records} == {gfc}
    assert sum(r.images for r in records) == 3
    assert UsageDay.objects.get(facility=gfc).records == 3
