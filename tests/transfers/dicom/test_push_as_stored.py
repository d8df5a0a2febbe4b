"""Push to a PACS that accepts the stored transfer syntaxes: every instance goes as it is stored.

The peer is dcmtk's storescp with `+xa` (it accepts every transfer syntax it knows, JPEG-LS and
JPEG 2000 among them) and `+B` (it writes the data set it received byte for byte), so the test
reads exactly what Relay sent.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import storages
from django.test import Client
from pydicom.pixels.decoders.base import Decoder
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from bench.servers import free_port, stop_process_tree
from portal.models import Facility, User
from tests.helpers import dicom_bytes, require_peer, upload
from tests.transfers.dicom.test_pacs_push import FakeRequest, _destination
from transfers.access import study_access
from transfers.dicom import push as push_module
from transfers.dicom.push import push_create, push_send
from transfers.models import Instance, PushStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.57"

# JPEG 2000 and JPEG-LS (both secondary capture: one SOP class, two syntaxes) and explicit VR
# little endian.
STORED_AS = {
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "JPEGLSNearLossless_08.dcm": "1.2.840.10008.1.2.4.81",
    "CT_small.dcm": "1.2.840.10008.1.2.1",
}


@pytest.fixture
def study(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    for name in STORED_AS:
        # The JPEG-LS file has no study or series of its own.
        data = dicom_bytes(
            name,
            StudyInstanceUID=STUDY_UID,
            SeriesInstanceUID=f"{STUDY_UID}.{len(name)}",
            PatientID="GF-3",
        )
        assert upload(client, data, token=bob_token).status_code == 201, name
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
def accept_all_storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    program = require_peer("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [program, "-aet", "GFCPACS", "+xa", "+B", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield port, received
    finally:
        stop_process_tree(proc)  # type: ignore[arg-type]


def _data_set(path: Path) -> bytes:
    """The bytes of a DICOM file after its file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.mark.peer
def test_it_sends_the_stored_bytes_without_decoding_them(
    study: Share,
    dana: User,
    gfc: Facility,
    accept_all_storescp: tuple[int, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[str] = []

    def converted(*args: Any, **kwargs: Any) -> Any:
        decoded.append("converted_copy")
        raise AssertionError("an instance the PACS accepts as stored was converted")

    def decode(self: Decoder, *args: Any, **kwargs: Any) -> Any:
        decoded.append(f"decode {self.UID}")
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(push_module, "converted_copy", converted)
    for method in ("as_array", "as_buffer", "iter_array", "iter_buffer"):
        monkeypatch.setattr(Decoder, method, decode)
    port, folder = accept_all_storescp
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)

    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, 3, 0)
    assert decoded == []
    # Each instance's answer recorded, in the syntax it is stored in.
    assert sorted(push.items.values_list("transfer_syntax_uid", "status", "sent")) == sorted(
        (syntax, 0, True) for syntax in STORED_AS.values()
    )
    storage = storages["default"]
    stored: dict[str, bytes] = {}
    for instance in Instance.objects.all():
        copy = tmp_path / f"{instance.pk}.dcm"
        with storage.open(instance.storage_key, "rb") as f:
            copy.write_bytes(f.read())
        stored[instance.sop_instance_uid] = _data_set(copy)
    arrived = {
        path.name.split(".", 1)[1]: _data_set(path) for path in folder.iterdir() if path.is_file()
    }
    assert len(arrived) == 3
    # Byte for byte after the file meta: the same JPEG 2000, JPEG-LS and explicit VR data sets.
    assert arrived == stored


@pytest.mark.peer
def test_a_pacs_that_aborts_midway_leaves_the_rest_for_the_retry(
    study: Share, dana: User, gfc: Facility
) -> None:
    stored: list[str] = []

    def on_store(event: Any) -> int:
        """Takes the first instance, then aborts the association."""
        if stored:
            event.assoc.abort()
            return 0xA700
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    port = free_port()
    scp = AE(ae_title="GFCPACS")
    scp.supported_contexts = AllStoragePresentationContexts
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
        push = push_create(access=access, destination=_destination(gfc, port), by=dana)
        with pytest.raises(push_module.PushTransient):
            push_send(push=push)
    finally:
        server.shutdown()
    push.refresh_from_db()
    # What arrived is recorded as sent; the rest waits for the retry.
    assert (push.status, push.sent, push.failed) == (PushStatus.QUEUED, 1, 2)
    assert (
        list(push.items.filter(sent=True).values_list("instance__sop_instance_uid", flat=True))
        == stored
    )
