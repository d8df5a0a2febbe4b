"""Hostile files: deflate bombs answered with a clear refusal and flat memory (ingest, the
viewer, the gateway), and damaged files refused for their real fault.

The bombs are generated here: a small data set followed by a private OB element of zeros,
deflated. Repeating one fully flushed deflate segment makes a 1 GiB bomb in milliseconds.
Memory ceilings are measured in a child process (its peak RSS), never in the test process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.core.files.storage import storages
from django.db import connection
from django.test import Client
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from portal.models import AuditEvent
from tests.helpers import (
    client_for,
    dicom_bytes,
    gateway_allow,
    read_testdata,
    require_peer,
    upload,
)
from transfers.models import Instance

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
GiB = 1024 * MiB
# What a child process may reach while a bomb inflates to 1 GiB: Django, pydicom and numpy
# loaded take ~120 MB; the old code reached 2.2 GB.
RSS_CEILING_MB = 400


# --- generators -----------------------------------------------------------------------------------


def _identifiers(*, pixels: bool = False) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "BOMB^TEST"
    ds.PatientID = "B1"
    ds.Modality = "OT"
    if pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 16
        ds.Columns = 16
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
    return ds


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _part10(ds: Dataset, transfer_syntax: str, body: bytes) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + fp.getvalue() + body


def _segment(data: bytes) -> bytes:
    """`data` deflated on its own, ending on a full flush: segments can be concatenated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


def bomb(inflated: int, *, pixels: bool = False) -> tuple[bytes, str]:
    """A deflated file whose data set inflates to about `inflated` bytes (zeros in a private
    OB element), and its SOP Instance UID. With `pixels`, a 16 x 16 image follows the zeros."""
    ds = _identifiers(pixels=pixels)
    blob = (inflated // MiB) * MiB
    head = _encoded(ds) + struct.pack("<HH2sH", 0x0099, 0x0010, b"LO", 10) + b"RELAY BOMB"
    head += struct.pack("<HH2sHI", 0x0099, 0x1000, b"OB", 0, blob)
    tail = b""
    if pixels:
        tail = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 256) + bytes(range(256))
    one_mib = _segment(bytes(MiB))
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = _segment(head) + one_mib * (blob // MiB) + last.compress(tail) + last.flush()
    return _part10(ds, DeflatedExplicitVRLittleEndian, body), str(ds.SOPInstanceUID)


def deflated_ct() -> bytes:
    """pydicom's CT_small written deflated, with a UID of its own: a file well within bounds."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("CT_small.dcm")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _reject(client: Client, token: str, data: bytes, status: int = 400) -> str:
    response = upload(client, data, token=token, filename="hostile.dcm")
    assert response.status_code == status, response.content
    body = response.json()
    assert body["status"] == "rejected"
    return str(body["reason"])


# --- deflate bombs through the API ------------------------------------------------------------------


def test_the_bomb_generator_makes_a_1_gib_bomb_of_about_1_mb() -> None:
    data, _ = bomb(GiB)
    assert len(data) < 1.5 * MiB
    # The private element declares the gigabyte (the child process below inflates it whole).
    (group_length,) = struct.unpack("<I", data[140:144])
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(data[132 + 12 + group_length :], 64 * 1024)
    at = head.index(struct.pack("<HH2sH", 0x0099, 0x1000, b"OB", 0))
    assert struct.unpack("<I", head[at + 8 : at + 12])[0] == GiB


def test_it_refuses_a_deflate_bomb_with_413_and_says_why(client, bob_token) -> None:
    data, sop = bomb(GiB)
    reason = _reject(client, bob_token, data, 413)
    assert "decompression bomb" in reason
    assert "200 times the compressed size" in reason
    assert not Instance.objects.exists()
    event = AuditEvent.objects.filter(action="upload", outcome="failure").latest("at")
    assert "decompression bomb" in event.detail["reason"]


def test_the_absolute_cap_holds_whatever_the_ratio(client, bob_token, settings) -> None:
    settings.RELAY_MAX_INFLATE_RATIO = 100_000
    settings.RELAY_MAX_INFLATED_BYTES = 16 * MiB
    data, _ = bomb(64 * MiB)
    reason = _reject(client, bob_token, data, 413)
    assert "16.0 MiB" in reason
    assert not Instance.objects.exists()


def test_a_deflated_file_within_bounds_is_stored_byte_exact(client, bob_token) -> None:
    data = deflated_ct()
    response = upload(client, data, token=bob_token)
    assert response.status_code == 201, response.content
    instance = Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert (instance.rows, instance.columns) == (128, 128)
    with storages["default"].open(instance.storage_key) as fh:
        assert fh.read() == bytes(128) + data[128:]  # the preamble zeroed, as always


def test_a_truncated_deflated_file_is_refused_for_that(client, bob_token) -> None:
    data = deflated_ct()
    reason = _reject(client, bob_token, data[: len(data) - 3000])
    assert "deflated stream ends early" in reason


def test_a_deflated_file_that_does_not_inflate_is_refused_for_that(client, bob_token) -> None:
    data = bytearray(deflated_ct())
    (group_length,) = struct.unpack("<I", data[140:144])
    start = 132 + 12 + group_length
    data[start : start + 40] = b"\xff" * 40
    reason = _reject(client, bob_token, bytes(data))
    assert "does not inflate" in reason


# --- memory ceilings, measured in a child process ---------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    import django

    def peak_mb():
        # VmHWM: the peak RSS of this process's own memory since exec. (ru_maxrss would also
        # carry the RSS of the test process this one was forked from.)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    django.setup()
    from django.conf import settings
    limits = json.loads(sys.argv[2])
    for name, value in limits.items():
        setattr(settings, name, value)
    mode, path = sys.argv[1], sys.argv[3]
    before = peak_mb()
    if mode == "ingest":
        from portal.models import Facility
        from transfers.ingest import instance_ingest, read_chunks
        with open(path, "rb") as f:
            result = instance_ingest(
                facility=Facility.objects.get(slug="krmc"), user=None,
                chunks=read_chunks(f), filename="bomb.dcm", source="api",
            )
        outcome = {"status": result.status, "reason": result.reason, "http": result.http_status}
    else:
        from transfers.viewer.decode import DecodeError, frame_decode
        try:
            frame = frame_decode(path, 0)
            outcome = {"status": "decoded", "rows": frame.rows, "bytes": len(frame.data)}
        except DecodeError as exc:
            outcome = {"status": "error", "reason": exc.reason}
    after = peak_mb()
    print(json.dumps({**outcome, "rss_before_mb": before, "rss_peak_mb": after}))
    """
)


def _database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    return f"postgres://{user}{password}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def _child(mode: str, path: Path, tmp_path: Path, **limits: Any) -> dict[str, Any]:
    media = tmp_path / "child-media"
    spool = tmp_path / "child-spool"
    spool.mkdir(exist_ok=True)
    limits.setdefault("FILE_UPLOAD_TEMP_DIR", str(spool))
    limits.setdefault(
        "STORAGES",
        {
            "default": {
                "BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": str(media)},
            },
            "staticfiles": {
                "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage",
            },
        },
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "relay.settings",
        "DATABASE_URL": _database_url(),
        "RELAY_VAR_DIR": str(tmp_path / "child-var"),
    }
    process = subprocess.run(
        [sys.executable, "-c", CHILD, mode, json.dumps(limits), str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    outcome: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    # Nothing inflated is left behind in the spool folder.
    assert not any(spool.iterdir())
    return outcome


@pytest.mark.django_db(transaction=True)
def test_ingest_of_a_1_gib_bomb_stays_under_the_memory_ceiling(krmc, tmp_path: Path) -> None:
    data, sop = bomb(GiB)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    outcome = _child("ingest", path, tmp_path)
    assert outcome["status"] == "rejected", outcome
    assert outcome["http"] == 413
    assert "decompression bomb" in outcome["reason"]
    assert outcome["rss_peak_mb"] < RSS_CEILING_MB, outcome
    assert not Instance.objects.filter(sop_instance_uid=sop).exists()


@pytest.mark.django_db(transaction=True)
def test_ingest_stays_flat_even_when_the_limits_let_1_gib_inflate(krmc, tmp_path: Path) -> None:
    # Limits raised so that the whole gigabyte is inflated and read: memory still stays flat,
    # because the inflated copy goes to a temporary file and large values stay in it.
    data, sop = bomb(GiB)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    outcome = _child(
        "ingest",
        path,
        tmp_path,
        RELAY_MAX_INFLATED_BYTES=2 * GiB,
        RELAY_MAX_INFLATE_RATIO=10_000,
    )
    assert outcome["status"] == "stored", outcome
    assert outcome["rss_peak_mb"] < RSS_CEILING_MB, outcome
    instance = Instance.objects.get(sop_instance_uid=sop)
    assert instance.size_bytes == len(data)


def test_a_viewer_decode_of_a_bomb_is_refused_under_the_ceiling(tmp_path: Path) -> None:
    data, _ = bomb(GiB, pixels=True)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    outcome = _child("decode", path, tmp_path)
    assert outcome["status"] == "error", outcome
    assert "decompression bomb" in outcome["reason"]
    assert outcome["rss_peak_mb"] < RSS_CEILING_MB, outcome


def test_a_viewer_frame_of_a_1_gib_deflated_file_is_read_from_a_temporary_copy(
    tmp_path: Path,
) -> None:
    data, _ = bomb(GiB, pixels=True)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    outcome = _child(
        "decode", path, tmp_path, RELAY_MAX_INFLATED_BYTES=2 * GiB, RELAY_MAX_INFLATE_RATIO=10_000
    )
    assert outcome["status"] == "decoded", outcome
    assert outcome["rows"] == 16
    assert outcome["rss_peak_mb"] < RSS_CEILING_MB, outcome


# --- the viewer over HTTP -----------------------------------------------------------------------------


def _frame(client: Client, instance: Instance) -> Any:
    study = instance.series.study
    response = client.get(f"/studies/{study.uuid}/view/frames/{instance.sop_instance_uid}/0/")
    assert response.status_code == 200
    return response, json.loads(response["X-Relay-Frame"])


def test_a_stored_deflated_file_opens_in_the_viewer(client, bob, bob_token) -> None:
    response = upload(client, deflated_ct(), token=bob_token)
    assert response.status_code == 201, response.content
    instance = Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])
    _, meta = _frame(client_for(bob), instance)
    assert meta["error"] is None


def test_a_bomb_stored_before_these_checks_gets_a_frame_error_not_a_gigabyte(
    client, bob, bob_token
) -> None:
    response = upload(client, deflated_ct(), token=bob_token)
    instance = Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])
    # As if it had been stored by an older version: the object swapped for a 1 GiB bomb.
    data, _ = bomb(GiB, pixels=True)
    path = Path(storages["default"].path(instance.storage_key))
    path.write_bytes(data)
    Instance.objects.filter(pk=instance.pk).update(
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data)
    )
    _, meta = _frame(client_for(bob), instance)
    assert "decompression bomb" in meta["error"]


# --- the gateway ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.peer
def test_the_gateway_answers_a_bomb_with_a_failure_and_an_error_comment(
    krmc, tmp_path: Path
) -> None:
    from tests.transfers.dicom.test_gateway import _free_port, _run
    from transfers.dicom.gateway import Gateway

    storescu = require_peer("storescu")
    # 256 MiB is enough to pass the 64 MiB floor and 200 times its ~260 kB; dcmtk's storescu
    # itself holds the inflated data set while sending it.
    data, sop = bomb(256 * MiB)
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    gateway_allow(krmc, "PACS1")
    port = _free_port()
    server = Gateway(ae_title="RELAY").start(host="127.0.0.1", port=port)
    try:
        result = _run(
            storescu, "-d", "-xd", "-aet", "PACS1", "-aec", "KRMC", "127.0.0.1", str(port),
            str(path),
        )  # fmt: skip
    finally:
        server.shutdown()
    output = result.stdout + result.stderr
    assert "0xc000: Error: Cannot understand" in output, output
    assert "[The deflated data set inflates to more than 64.0 MiB" in output
    assert "ErrorComment" in output
    assert not Instance.objects.filter(sop_instance_uid=sop).exists()
    event = AuditEvent.objects.filter(action="upload", outcome="failure").latest("at")
    assert "decompression bomb" in event.detail["reason"]


# --- stricter parsing -----------------------------------------------------------------------------


def _with_trailing_padding(data: bytes, length: int = 1000) -> bytes:
    return data + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, length) + bytes(length)


def test_a_file_cut_inside_the_padding_after_the_pixel_data_is_refused(client, bob_token):
    whole = _with_trailing_padding(dicom_bytes("CT_small.dcm"))
    reason = _reject(client, bob_token, whole[:-100])
    assert "ends inside element (FFFC,FFFC)" in reason
    assert "1000 bytes but only 900" in reason
    assert not Instance.objects.exists()
    # The whole file, padding and all, is fine.
    assert upload(client, whole, token=bob_token).status_code == 201


def test_stray_bytes_after_the_last_element_are_refused(client, bob_token):
    data = dicom_bytes("CT_small.dcm")
    reason = _reject(client, bob_token, data + b"\x00\x00\x00")
    assert f"ends inside the header of an element at byte {len(data)}" in reason
    reason = _reject(client, bob_token, data + bytes(16))
    assert f"Element (0000,0000) at byte {len(data)} has no valid value representation" in reason


def test_a_stored_file_with_padding_reads_back_in_dcmtk(client, bob_token, tmp_path):
    dcmdump = require_peer("dcmdump")
    response = upload(client, _with_trailing_padding(dicom_bytes("CT_small.dcm")), token=bob_token)
    assert response.status_code == 201, response.content
    instance = Instance.objects.get(sop_instance_uid=response.json()["sop_instance_uid"])
    path = storages["default"].path(instance.storage_key)
    result = subprocess.run(
        [dcmdump, "-q", path], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_data_set_without_a_sop_instance_uid_is_refused_even_if_the_meta_has_one(
    client, bob_token
):
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("CT_small.dcm")))
    assert ds.file_meta.MediaStorageSOPInstanceUID
    del ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    reason = _reject(client, bob_token, buffer.getvalue())
    assert reason == "The data set has no SOP Instance UID."
    assert not Instance.objects.exists()


@pytest.mark.parametrize("cut", [405, 705, 905, 1205])
def test_a_file_cut_inside_its_header_names_where(client, bob_token, cut):
    data = dicom_bytes("CT_small.dcm")
    reason = _reject(client, bob_token, data[:cut])
    assert "truncated" in reason
    assert "Study Instance UID" not in reason
    assert "ends inside" in reason
    assert f"byte {cut}" in reason or "bytes are there" in reason or "are left" in reason


def test_a_file_cut_between_two_elements_is_said_to_be_cut_short(client, bob_token):
    # Byte 700 of this file is the start of (0008,0070): every element before it is whole.
    data = dicom_bytes("CT_small.dcm")
    reason = _reject(client, bob_token, data[:700])
    assert reason.startswith("The data set has no Study Instance UID.")
    assert "ends with element (0008,0060)" in reason
    assert "cut short" in reason


def _element_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset of the element, offset of its length field) for the data set's first elements,
    explicit VR little endian (CT_small after dicom_bytes)."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    offsets = []
    position = data.index(b"\x08\x00", 132 + 12 + ds.file_meta.FileMetaInformationGroupLength)
    for _ in range(12):
        vr = data[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            length = struct.unpack("<I", data[position + 8 : position + 12])[0]
            offsets.append((position, position + 8))
            position += 12 + length
        else:
            length = struct.unpack("<H", data[position + 6 : position + 8])[0]
            offsets.append((position, position + 6))
            position += 8 + length
    return offsets


def test_a_damaged_length_is_refused_for_the_damage_not_for_a_missing_uid(client, bob_token):
    for element, length_at in _element_offsets(dicom_bytes("CT_small.dcm"))[:8]:
        data = bytearray(dicom_bytes("CT_small.dcm"))
        data[length_at + 1] ^= 0x40  # a flipped bit: the length grows by 16 kB
        reason = _reject(client, bob_token, bytes(data))
        assert "Study Instance UID" not in reason, (element, reason)
        assert "byte" in reason, reason
        assert "damaged" in reason or "truncated" in reason, reason


def test_a_flipped_vr_is_refused_for_that(client, bob_token):
    data = bytearray(dicom_bytes("CT_small.dcm"))
    element, _ = _element_offsets(bytes(data))[3]
    data[element + 4] = 0x01
    reason = _reject(client, bob_token, bytes(data))
    assert f"at byte {element} has no valid value representation" in reason


def test_a_file_meta_whose_group_length_is_wrong_is_refused_for_that(client, bob_token):
    data = bytearray(dicom_bytes("CT_small.dcm"))
    (declared,) = struct.unpack("<I", data[140:144])
    data[140:144] = struct.pack("<I", declared + 6)
    reason = _reject(client, bob_token, bytes(data))
    assert f"The file meta says it is {declared + 6} bytes long but it is {declared}" in reason


def test_well_formed_files_still_pass(client, bob_token):
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm"):
        response = upload(client, dicom_bytes(name), token=bob_token, filename=name)
        assert response.status_code == 201, (name, response.content)
    assert upload(client, read_testdata("rtdose.dcm"), token=bob_token).status_code == 201


def test_an_explicit_file_stays_explicit_little_endian(client, bob_token):
    # The meta's transfer syntax and the data set agree here; a plain sanity check that the
    # walker reads pydicom's own output as pydicom does.
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("MR_small.dcm")))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert upload(client, buffer.getvalue(), token=bob_token).status_code == 201


def test_damage_in_the_file_meta_is_named(client, bob_token):
    data = bytearray(dicom_bytes("CT_small.dcm"))
    at = data.index(b"\x02\x00\x10\x00UI")  # (0002,0010) Transfer Syntax UID
    data[at + 4 : at + 6] = b"\x00\x01"
    reason = _reject(client, bob_token, bytes(data))
    assert f"Element (0002,0010) at byte {at} has no valid value representation" in reason
