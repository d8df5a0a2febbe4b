"""The DICOM gateway against dcmtk's echoscu and storescu, the way a PACS would send."""

from __future__ import annotations

import io
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.core.files.storage import storages

from portal.models import AuditAction, AuditEvent, Facility
from tests.helpers import (
    dicom_bytes,
    gateway_allow,
    gateway_running,
    require_peer,
    require_postgresql,
)
from transfers.dicom.gateway import Gateway
from transfers.models import Instance, Study, StudyStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.peer]

# Files as facilities send them, with the storescu option that proposes each one's own transfer
# syntax: uncompressed, big endian, JPEG baseline, JPEG 2000 lossless, RLE, deflated.
SAMPLES = {
    "CT_small.dcm": "-xe",
    "MR_small_bigendian.dcm": "-xb",
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",
    "MR_small_jp2klossless.dcm": "-xv",
    "MR_small_RLE.dcm": "-xr",
    "image_dfl.dcm": "-xd",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway(krmc: Facility) -> Iterator[int]:
    gateway_allow(krmc, "PACS1 PACS2 ECHOSCU")
    with gateway_running() as port:
        yield port


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)


def _storescu(
    port: int,
    files: list[Path],
    *,
    called: str = "KRMC",
    calling: str = "PACS1",
    syntax: str = "-xe",
) -> Any:
    storescu = require_peer("storescu")
    return _run(
        storescu, "-v", "--no-halt", syntax, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
        *map(str, files),
    )  # fmt: skip


def _files(tmp_path: Path, names: list[str]) -> list[Path]:
    """Copies of pydicom's files, each with its own SOP Instance UID (several of pydicom's
    MR_small variants share one, which the gateway rightly refuses as a conflict)."""
    paths = []
    for name in names:
        path = tmp_path / name
        path.write_bytes(dicom_bytes(name))
        paths.append(path)
    return paths


def test_it_answers_echo_for_a_facility_title(gateway: int) -> None:
    echoscu = require_peer("echoscu")
    assert _run(echoscu, "-aec", "KRMC", "127.0.0.1", str(gateway)).returncode == 0


def test_it_refuses_an_unknown_called_title_at_association(gateway: int) -> None:
    echoscu = require_peer("echoscu")
    result = _run(echoscu, "-aec", "NOBODY", "127.0.0.1", str(gateway))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_it_stores_every_transfer_syntax_as_sent(gateway: int, tmp_path: Path) -> None:
    files = _files(tmp_path, list(SAMPLES))
    for path in files:
        result = _storescu(gateway, [path], syntax=SAMPLES[path.name])
        assert result.returncode == 0, result.stdout + result.stderr

    for path in files:
        sent = pydicom.dcmread(path)
        instance = Instance.objects.get(sop_instance_uid=sent.SOPInstanceUID)
        assert instance.facility.slug == "krmc"
        # Kept in the sender's transfer syntax, pixel data byte for byte.
        assert instance.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        with storages["default"].open(instance.storage_key) as f:
            stored = pydicom.dcmread(f)
        assert stored.PixelData == sent.PixelData
    # Audited like any upload, with where it came from; complete only after the quiet period.
    events = AuditEvent.objects.filter(action=AuditAction.UPLOAD)
    assert events.count() == len(files)
    assert all(e.detail["source"].startswith("dicom:PACS1@127.0.0.1") for e in events)
    assert set(Study.objects.values_list("status", flat=True)) == {StudyStatus.RECEIVING}


def test_a_bad_instance_fails_alone_and_the_association_goes_on(
    gateway: int, tmp_path: Path
) -> None:
    good_before = tmp_path / "a.dcm"
    good_before.write_bytes(dicom_bytes("CT_small.dcm"))
    # A SOP Instance UID with letters in it: refused by ingest, reported to the sender.
    bad = tmp_path / "b.dcm"
    bad.write_bytes(dicom_bytes("CT_small.dcm", SOPInstanceUID="1.2.3.bad-uid"))
    good_after = tmp_path / "c.dcm"
    good_after.write_bytes(dicom_bytes("CT_small.dcm"))

    result = _storescu(gateway, [good_before, bad, good_after])

    output = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in output, output
    stored = set(Instance.objects.values_list("sop_instance_uid", flat=True))
    assert pydicom.dcmread(good_before).SOPInstanceUID in stored
    assert pydicom.dcmread(good_after).SOPInstanceUID in stored
    assert "1.2.3.bad-uid" not in stored


def test_the_calling_title_and_address_allow_lists_are_enforced(
    gateway: int, tmp_path: Path, krmc: Facility
) -> None:
    Facility.objects.filter(pk=krmc.pk).update(gateway_calling_aes="PACS1, PACS2")
    file = tmp_path / "x.dcm"
    file.write_bytes(dicom_bytes("CT_small.dcm"))

    refused = _storescu(gateway, [file], calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert not Instance.objects.exists()

    Facility.objects.filter(pk=krmc.pk).update(gateway_addresses="10.0.0.0/8")
    assert _storescu(gateway, [file], calling="PACS2").returncode != 0
    assert not Instance.objects.exists()

    Facility.objects.filter(pk=krmc.pk).update(gateway_addresses="10.0.0.0/8 127.0.0.1")
    assert _storescu(gateway, [file], calling="PACS2").returncode == 0
    assert Instance.objects.count() == 1


def test_an_unreachable_store_answers_a_retryable_failure_and_keeps_nothing(
    gateway: int, tmp_path: Path, settings: Any
) -> None:
    file = tmp_path / "x.dcm"
    file.write_bytes(dicom_bytes("CT_small.dcm"))
    working = {key: dict(value) for key, value in settings.STORAGES.items()}
    broken = {key: dict(value) for key, value in working.items()}
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("storage is down")
    broken["default"]["OPTIONS"] = {"location": str(blocker / "media")}
    settings.STORAGES = broken

    failed = _storescu(gateway, [file])

    output = (failed.stdout + failed.stderr).lower()
    assert "refused: outofresources" in output, output
    assert not Instance.objects.exists()

    # The sender retries once the store is back, and the instance arrives.
    settings.STORAGES = working
    assert _storescu(gateway, [file]).returncode == 0
    assert Instance.objects.count() == 1


def test_a_database_outage_mid_association_is_a_retryable_failure(
    gateway: int, tmp_path: Path
) -> None:
    """The database goes away between two instances of one association (the gateway's
    connection is terminated and cannot reconnect): that instance is refused with a status the
    sender retries, the association goes on, and the next instance after the outage is stored."""
    from django.db import connection, connections
    from pynetdicom import AE

    require_postgresql(
        "needs PostgreSQL to cut the gateway's connection (CI runs it with DATABASE_URL)"
    )
    files = [pydicom.dcmread(io.BytesIO(dicom_bytes("CT_small.dcm"))) for _ in range(3)]
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(files[0].SOPClassUID, files[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", gateway, ae_title="KRMC")
    assert assoc.is_established
    settings_dict = connections.settings["default"]
    port = settings_dict.get("PORT")
    try:
        assert assoc.send_c_store(files[0]).Status == 0x0000
        # The outage: every other connection to the database is cut, and none can be made.
        settings_dict["PORT"] = str(_free_port())
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert assoc.send_c_store(files[1]).Status == 0xA700
        # The database is back.
        settings_dict["PORT"] = port
        assert assoc.send_c_store(files[2]).Status == 0x0000
    finally:
        settings_dict["PORT"] = port
        assoc.release()
    stored = set(Instance.objects.values_list("sop_instance_uid", flat=True))
    assert stored == {files[0].SOPInstanceUID, files[2].SOPInstanceUID}
    # Nothing of the refused one was kept: the sender will send it again.
    assert pydicom.uid.UID(files[1].SOPInstanceUID) not in stored


def test_both_ends_turn_nagle_off(krmc: Facility) -> None:
    """DIMSE's small writes must not wait for delayed ACKs: TCP_NODELAY on the gateway's
    accepted sockets and on Relay's own outgoing associations (push, C-ECHO)."""
    import socket as sockets

    from transfers.dicom.push import _ae

    gateway_allow(krmc, "RELAY")
    port = _free_port()
    server = Gateway(ae_title="RELAY").start(host="127.0.0.1", port=port)
    try:
        ae = _ae()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="KRMC")
        assert assoc.is_established
        try:
            ours = assoc.dul.socket.socket
            (theirs,) = [a.dul.socket.socket for a in server.active_associations]
            for sock in (ours, theirs):
                assert sock.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_NODELAY) != 0
        finally:
            assoc.release()
    finally:
        server.shutdown()
