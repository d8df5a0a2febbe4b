"""Push to PACS against real peers: dcmtk's storescp (uncompressed only) and Orthanc."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from celery.exceptions import Retry
from django.core.files.storage import storages
from django.test import Client

from bench.servers import OrthancServer, free_port, stop_process_tree
from portal.models import AuditAction, AuditEvent, Facility, Membership, User
from tests.helpers import PASSWORD, client_for, dicom_bytes, require_peer, upload
from tests.transfers.test_s3_storage import bucket  # noqa: F401  (fixture)
from transfers.access import study_access
from transfers.dicom.push import PushError, destination_echo, push_create, push_rerun, push_send
from transfers.dicom.tasks import push_run
from transfers.models import (
    Instance,
    PacsDestination,
    Push,
    PushStatus,
    Share,
    ShareEvent,
    ShareEventKind,
    Study,
    StudyStatus,
)
from transfers.sharing.services import share_create, share_revoke

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.55"
# Uncompressed, JPEG baseline (lossy, YBR) and RLE, in one study.
SAMPLES = ["CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"]


class FakeRequest:
    """study_access needs only the user; this is what a signed-in request gives it."""

    def __init__(self, user: User) -> None:
        self.user = user


@pytest.fixture
def shared(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for name in SAMPLES:
        data = dicom_bytes(
            name, StudyInstanceUID=STUDY_UID, PatientID="GF-1", PatientName="DOE^JANE"
        )
        assert upload(client, data, token=bob_token).status_code == 201
    Study.objects.update(status=StudyStatus.COMPLETE)
    share, _ = share_create(
        facility=bob.memberships.get().facility,
        created_by=bob,
        studies=list(Study.objects.all()),
        kind="facility",
        recipient_facility=gfc,
        can_import=True,
    )
    return share


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    program = require_peer("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    # Default storescp: uncompressed transfer syntaxes only, so JPEG and RLE must be decoded.
    proc = subprocess.Popen(
        [program, "-aet", "GFCPACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield port, received
    finally:
        stop_process_tree(proc)  # type: ignore[arg-type]


def _destination(facility: Facility, port: int, ae: str = "GFCPACS") -> PacsDestination:
    return PacsDestination.objects.create(
        facility=facility, name="GFC PACS", ae_title=ae, host="127.0.0.1", port=port
    )


def _received(folder: Path) -> dict[str, pydicom.Dataset]:
    files = [pydicom.dcmread(p) for p in folder.iterdir() if p.is_file()]
    return {str(ds.SOPInstanceUID): ds for ds in files}


@pytest.mark.peer
def test_it_pushes_every_instance_decoding_what_the_pacs_does_not_accept(
    shared: Share, dana: User, gfc: Facility, storescp: tuple[int, Path]
) -> None:
    port, folder = storescp
    destination = _destination(gfc, port)
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=destination, by=dana)

    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, 3, 0)
    arrived = _received(folder)
    stored = {i.sop_instance_uid: i for i in Instance.objects.all()}
    # Every instance arrived under its own SOP Instance UID, whatever it was stored as.
    assert set(arrived) == set(stored)
    for uid, ds in arrived.items():
        assert ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
        with storages["default"].open(stored[uid].storage_key) as f:
            original = pydicom.dcmread(f)
        # Decoded on the way where needed: the PACS gets the pixels the original decodes to.
        assert (ds.pixel_array == original.pixel_array).all()
    # The sender reads it on the share's timeline.
    imported = ShareEvent.objects.get(share=shared, kind=ShareEventKind.IMPORTED)
    assert imported.detail == "3 of 3 images into GFC PACS"
    assert imported.actor_label == "dana@gfc.example"


@pytest.mark.peer
def test_a_rerun_sends_only_what_failed(
    shared: Share, dana: User, gfc: Facility, storescp: tuple[int, Path]
) -> None:
    port, folder = storescp
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    missing = Instance.objects.order_by("pk").first()
    assert missing is not None
    storage = storages["default"]
    with storage.open(missing.storage_key) as f:
        kept = f.read()
    storage.delete(missing.storage_key)

    push = push_create(access=access, destination=_destination(gfc, port), by=dana)
    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.PARTIAL, 2, 1)
    assert len(_received(folder)) == 2
    assert push.items.get(instance=missing).error

    storage.save(missing.storage_key, io.BytesIO(kept))
    for old in folder.iterdir():
        old.unlink()
    # Queued (the task's work is done here directly), and audited like the first run.
    assert push_rerun(push=push, access=access, by=dana) is True
    assert AuditEvent.objects.filter(action=AuditAction.STUDY_PUSH).count() == 2
    push_send(push=Push.objects.get(pk=push.pk))

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, 3, 0)
    assert set(_received(folder)) == {missing.sop_instance_uid}


def test_an_unreachable_pacs_is_retried_then_marked_failed(
    shared: Share, dana: User, gfc: Facility, django_capture_on_commit_callbacks: Any
) -> None:
    destination = _destination(gfc, free_port())
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    # The task asks Celery to try again later (with backoff) rather than failing at once.
    with pytest.raises(Retry), django_capture_on_commit_callbacks(execute=True):
        push_create(access=access, destination=destination, by=dana)
    push = Push.objects.get()
    assert (push.status, push.attempts, push.sent) == (PushStatus.QUEUED, 1, 0)
    assert "did not answer" in push.error

    # The last retry gives up: the push is failed, with the reason, for the user to see.
    push_run.apply(args=[push.pk], retries=push_run.max_retries)
    push.refresh_from_db()
    assert push.status == PushStatus.FAILED
    assert "did not answer" in push.error
    assert not ShareEvent.objects.filter(kind=ShareEventKind.IMPORTED).exists()
    echo = destination_echo(destination=destination)
    assert not echo.ok
    destination.refresh_from_db()
    assert destination.last_echo_message == echo.message and not destination.last_echo_ok


def test_a_share_without_import_rights_cannot_be_pushed(
    shared: Share, dana: User, gfc: Facility
) -> None:
    Share.objects.filter(pk=shared.pk).update(can_import=False)
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    with pytest.raises(PushError):
        push_create(access=access, destination=_destination(gfc, 104), by=dana)
    assert not Push.objects.exists()


def test_the_page_offers_only_your_facilitys_pacs_and_refuses_outsiders(
    shared: Share, dana: User, gfc: Facility, krmc: Facility, charlie: User, db: None
) -> None:
    ours = _destination(gfc, 104)
    theirs = _destination(krmc, 105, ae="KRMCPACS")
    study = Study.objects.get()
    page = client_for(dana).get(f"/studies/{study.uuid}/pacs/").content.decode()
    assert str(ours.uuid) in page and str(theirs.uuid) not in page

    client_for(dana).post(
        f"/studies/{study.uuid}/pacs/", {"action": "push", "destination": str(theirs.uuid)}
    )
    assert not Push.objects.exists()
    client_for(dana).post(
        f"/studies/{study.uuid}/pacs/", {"action": "push", "destination": "not-a-uuid"}
    )
    assert not Push.objects.exists()

    stluke = Facility.objects.create(name="St. Luke", slug="stluke")
    erin = User.objects.create_user(email="erin@stluke.example", password=PASSWORD)
    Membership.objects.create(user=erin, facility=stluke, role="reader")
    assert client_for(erin).get(f"/studies/{study.uuid}/pacs/").status_code == 404


@pytest.mark.peer
def test_a_revoked_share_stops_a_queued_push_and_its_rerun(
    shared: Share, dana: User, bob: User, gfc: Facility, storescp: tuple[int, Path]
) -> None:
    port, folder = storescp
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)
    # Revoked while the push waits in the queue (or for a retry): nothing leaves.
    share_revoke(share=shared, by=bob)

    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent) == (PushStatus.FAILED, 0)
    assert "revoked" in push.error
    assert not list(folder.iterdir())
    assert not ShareEvent.objects.filter(kind=ShareEventKind.IMPORTED).exists()
    # Another share of the study, to view only, does not let the reader send the rest.
    share_create(
        facility=shared.facility,
        created_by=bob,
        studies=list(shared.studies.all()),
        kind="facility",
        recipient_facility=gfc,
    )
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    with pytest.raises(PushError):
        push_rerun(push=push, access=access, by=dana)
    push.refresh_from_db()
    assert push.status == PushStatus.FAILED


def test_a_double_clicked_send_is_one_push(shared: Share, dana: User, gfc: Facility) -> None:
    destination = _destination(gfc, 104)
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push_create(access=access, destination=destination, by=dana)
    with pytest.raises(PushError, match="already being sent"):
        push_create(access=access, destination=destination, by=dana)
    assert Push.objects.count() == 1


def test_a_share_with_one_facility_cannot_be_pushed_into_another_facilitys_pacs(
    shared: Share, dana: User, gfc: Facility, bob: User
) -> None:
    # Dana reads at Great Falls, where the study was shared, and also at a facility it was not.
    other = Facility.objects.create(name="Unrelated Hospital", slug="unrelated", ae_title="UNREL")
    Membership.objects.create(user=dana, facility=other, role="reader")
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    with pytest.raises(PushError, match="No active share"):
        push_create(access=access, destination=_destination(other, 104, ae="UNRELPACS"), by=dana)
    assert not Push.objects.exists()
    # The facility that holds the study sends into its own PACS, with no share needed.
    krmc_pacs = _destination(shared.facility, 106, ae="KRMCPACS")
    owner = study_access(FakeRequest(bob), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=owner, destination=krmc_pacs, by=bob)
    assert push.share is None
    # The share's own facility is still fine.
    assert push_create(access=access, destination=_destination(gfc, 107), by=dana).share == shared


@pytest.mark.peer
def test_it_pushes_into_orthanc_whole(shared: Share, dana: User, gfc: Facility) -> None:
    require_peer("Orthanc")
    with OrthancServer() as orthanc:
        destination = _destination(gfc, orthanc.dicom_port, ae="ORTHANC")
        assert destination_echo(destination=destination).ok
        access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
        push = push_create(access=access, destination=destination, by=dana)
        push_send(push=push)

        studies = httpx.get(f"{orthanc.base_url}/studies").json()
        assert len(studies) == 1
        instances = httpx.get(f"{orthanc.base_url}/studies/{studies[0]}/instances").json()
        uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
        assert uids == set(Instance.objects.values_list("sop_instance_uid", flat=True))


@pytest.mark.peer
def test_the_admin_adds_a_destination_and_tests_the_connection(
    alice: User, storescp: tuple[int, Path]
) -> None:
    port, _ = storescp
    client = client_for(alice)
    refused = client.post(
        "/facilities/krmc/dicom/destinations/",
        {"name": "PACS", "ae_title": "BAD\\AE", "host": "x", "port": 0},
    )
    assert refused.status_code == 200
    assert not PacsDestination.objects.exists()

    added = client.post(
        "/facilities/krmc/dicom/destinations/",
        {
            "name": "KRMC PACS",
            "ae_title": "GFCPACS",
            "host": "127.0.0.1",
            "port": port,
        },
    )
    assert added.status_code == 302
    destination = PacsDestination.objects.get()
    assert destination.facility.slug == "krmc"

    tested = client.post(
        f"/facilities/krmc/dicom/destinations/{destination.uuid}/echo/", follow=True
    )
    assert "KRMC PACS: C-ECHO succeeded" in tested.content.decode()
    destination.refresh_from_db()
    assert destination.last_echo_ok


@pytest.mark.peer
def test_it_pushes_from_an_s3_bucket(
    bucket: Any,  # noqa: F811  (the fixture)
    shared: Share,
    dana: User,
    gfc: Facility,
    storescp: tuple[int, Path],
) -> None:
    """Images in a bucket have no path: each is copied to a temporary file and streamed."""
    port, folder = storescp
    assert storages["default"].__class__.__name__ == "S3Storage"
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)
    push_send(push=push)
    push.refresh_from_db()
    assert (push.status, push.sent) == (PushStatus.DONE, 3)
    assert set(_received(folder)) == set(
        Instance.objects.values_list("sop_instance_uid", flat=True)
    )
