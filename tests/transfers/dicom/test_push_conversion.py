"""Push to a PACS that accepts only implicit VR little endian: big-endian instances converted.

The peer is dcmtk's storescp with `+xi` (implicit VR little endian only) and `+B` (it writes
what it received byte for byte, so the test reads what Relay sent, not storescp's rewrite).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.core.files.storage import storages
from django.test import Client
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from bench.servers import free_port, stop_process_tree
from portal.models import Facility, User
from tests.helpers import dicom_bytes, require_peer, upload
from tests.transfers.dicom.test_pacs_push import FakeRequest, _destination, _received
from transfers.access import study_access
from transfers.dicom.push import push_create, push_send
from transfers.models import Instance, PushStatus, Share, Study, StudyStatus
from transfers.sharing.services import share_create

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.56"
# All stored as explicit VR big endian (pydicom's and pydicom-data's test files):
BIG_ENDIAN = [
    "liver_expb.dcm",  # 1 bit per pixel, 3 frames, bit-packed (98,304 bytes)
    "ExplVR_BigEnd.dcm",  # RGB with PlanarConfiguration 1
    "gdcm-US-ALOKA-16_big.dcm",  # PALETTE COLOR, 16 bit, segmented OW lookup tables
    "OBXXXX1A_expb.dcm",  # PALETTE COLOR, 8-bit pixels as OW, OW lookup tables
    "MR_small_bigendian.dcm",  # 16-bit signed greyscale
]
COMPRESSED = ["MR_small_RLE.dcm", "JPEG2000.dcm"]
LUT_DATA = [
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
]
LUT_TAGS = [
    "0028,1101",  # Red/Green/Blue Palette Color Lookup Table Descriptor
    "0028,1102",
    "0028,1103",
    "0028,1201",  # ... Data
    "0028,1202",
    "0028,1203",
    "0028,1221",  # Segmented ... Data
    "0028,1222",
    "0028,1223",
]


def _shared_study(client: Client, bob: User, token: str, gfc: Facility, names: list[str]) -> Share:
    for name in names:
        data = dicom_bytes(name, StudyInstanceUID=STUDY_UID, PatientID="GF-2")
        assert upload(client, data, token=token).status_code == 201, name
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
def big_endian_study(client: Client, bob: User, bob_token: str, gfc: Facility) -> Share:
    share = _shared_study(client, bob, bob_token, gfc, BIG_ENDIAN)
    assert set(Instance.objects.values_list("transfer_syntax_uid", flat=True)) == {
        ExplicitVRBigEndian
    }
    return share


@pytest.fixture
def implicit_only_storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    program = require_peer("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen(
        [program, "+xi", "+B", "-aet", "GFCPACS", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield port, received
    finally:
        stop_process_tree(proc)  # type: ignore[arg-type]


def _dump(path: Path, *tags: str) -> subprocess.CompletedProcess[str]:
    """dcmdump's reading of the file (all of it, or only `tags`), long values in full."""
    args = [require_peer("dcmdump"), "+L"]
    for tag in tags:
        args += ["+P", tag]
    return subprocess.run(  # noqa: S603  (our own arguments)
        [*args, str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def _values(dump: str) -> list[str]:
    """The tag and value of each line dcmdump printed (the VR left out: implicit VR has none
    of its own, so dcmdump names the dictionary's)."""
    out = []
    for line in dump.splitlines():
        if line.startswith("("):
            tag, _vr, rest = line.split(" ", 2)
            out.append(f"{tag} {rest.split('#')[0].strip()}")
    return out


@pytest.mark.peer
def test_it_converts_big_endian_for_a_pacs_that_takes_only_implicit_little_endian(
    big_endian_study: Share, dana: User, gfc: Facility, implicit_only_storescp: tuple[int, Path]
) -> None:
    port, folder = implicit_only_storescp
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)

    push_send(push=push)

    push.refresh_from_db()
    errors = list(push.items.values_list("error", flat=True))
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, len(BIG_ENDIAN), 0), errors
    assert set(push.items.values_list("transfer_syntax_uid", flat=True)) == {ImplicitVRLittleEndian}
    arrived = _received(folder)
    stored = {i.sop_instance_uid: i for i in Instance.objects.all()}
    # Every instance arrived under its own SOP Instance UID: the same image, not a new one.
    assert set(arrived) == set(stored)
    paths = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in folder.iterdir()}
    for uid, ds in arrived.items():
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        with storages["default"].open(stored[uid].storage_key) as f:
            original = pydicom.dcmread(f)
        name = f"{original.SOPClassUID.name} {original.PhotometricInterpretation}"
        # The PACS gets the pixels the original decodes to: bit-packed 1-bit frames, planes
        # kept planar, 8-bit data stored as OW, 16-bit words.
        assert ds.pixel_array.shape == original.pixel_array.shape, name
        assert np.array_equal(ds.pixel_array, original.pixel_array), name
        assert len(ds.PixelData) == len(original.PixelData), name
        assert ds.get("PlanarConfiguration") == original.get("PlanarConfiguration"), name
        # Every other attribute reads the same (numbers re-encoded little endian).
        for elem in original:
            if elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"):
                assert ds[elem.tag].value == elem.value, f"{name} {elem.tag}"
        if original.PhotometricInterpretation == "PALETTE COLOR":
            # The colour tables hold the same 16-bit words, each read in its file's byte order.
            tables = [t for t in LUT_DATA if t in original]
            assert tables, name
            for tag in tables:
                assert np.array_equal(
                    np.frombuffer(ds[tag].value, "<u2"), np.frombuffer(original[tag].value, ">u2")
                ), f"{name} {tag}"
            if "SegmentedRedPaletteColorLookupTableData" in original:
                # pydicom honours the byte order of segmented tables (not of plain ones, which
                # it reads as little endian whatever the file): the same colours.
                assert np.array_equal(
                    apply_color_lut(ds.pixel_array, ds),
                    apply_color_lut(original.pixel_array, original),
                ), name
        # dcmtk reads the received file without complaint, and its colour tables word for word
        # as it reads them in the original.
        dump = _dump(paths[uid])
        assert dump.returncode == 0 and not dump.stderr.strip(), (name, dump.stderr)
        with storages["default"].open(stored[uid].storage_key) as f:
            local = folder.parent / "original.dcm"
            local.write_bytes(f.read())
        assert _values(_dump(paths[uid], *LUT_TAGS).stdout) == _values(
            _dump(local, *LUT_TAGS).stdout
        ), name


@pytest.mark.peer
def test_it_decompresses_into_implicit_little_endian_for_such_a_pacs(
    client: Client,
    bob: User,
    bob_token: str,
    dana: User,
    gfc: Facility,
    implicit_only_storescp: tuple[int, Path],
) -> None:
    """Compressed instances take the same way: decoded, written implicit VR little endian."""
    _shared_study(client, bob, bob_token, gfc, COMPRESSED)
    port, folder = implicit_only_storescp
    access = study_access(FakeRequest(dana), Study.objects.get().uuid)  # type: ignore[arg-type]
    push = push_create(access=access, destination=_destination(gfc, port), by=dana)

    push_send(push=push)

    push.refresh_from_db()
    assert (push.status, push.sent, push.failed) == (PushStatus.DONE, len(COMPRESSED), 0)
    arrived = _received(folder)
    stored = {i.sop_instance_uid: i for i in Instance.objects.all()}
    assert set(arrived) == set(stored)
    for uid, ds in arrived.items():
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        with storages["default"].open(stored[uid].storage_key) as f:
            original = pydicom.dcmread(f)
        assert np.array_equal(ds.pixel_array, original.pixel_array)
